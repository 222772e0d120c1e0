"""The BayPrAnoMeta model: backbone, head, Bayesian normality model, scoring."""
