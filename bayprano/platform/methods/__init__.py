"""Anomaly-detection methods, one folder each, behind one protocol (``base``) and one registry (``METHODS``).

Importing this package registers the built-in methods, in the order the harness reports them: ``bayes``,
``bayes-frozen``, ``protomaml``, ``patchcore``, ``padim``, ``anomalydino``. A new method is a folder with its torch model
and one ``register_method`` call.
"""

# Registration, in the harness's order (hence not sorted).
from bayprano.platform.methods import bayes  # noqa: F401, I001
from bayprano.platform.methods import protomaml  # noqa: F401
from bayprano.platform.methods import patchcore  # noqa: F401
from bayprano.platform.methods import padim  # noqa: F401
from bayprano.platform.methods import anomalydino  # noqa: F401
from bayprano.platform.methods.base import (
    METHODS,
    Method,
    MethodContext,
    MethodScores,
    MethodSpec,
    PatchScoreMethod,
    get_method,
    loo_threshold,
    register_method,
    unregister_method,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "MethodScores",
    "MethodSpec",
    "PatchScoreMethod",
    "get_method",
    "loo_threshold",
    "register_method",
    "unregister_method",
]
