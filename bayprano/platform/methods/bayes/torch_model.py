"""The Bayesian method's torch model, shared with meta-training and the federation: the meta-learned head
and NIW prior (``bayprano.platform.model.bayes``), the NIW prototype with its Student-t predictive
(``bayprano.platform.model.niw``) and the adapted site model (``bayprano.platform.model.site``)."""

from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype, StudentT
from bayprano.platform.model.site import SiteModel, adapt_features

__all__ = ["BayesianPatchModel", "NIWPrototype", "SiteModel", "StudentT", "adapt_features"]
