"""bayprano: few-shot industrial image anomaly detection, federated across factories on Ray."""

__version__ = "0.1.0"
