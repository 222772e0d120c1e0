"""The Ray Serve application: adapted per-site models scored over HTTP, hardened for a plant's network.

Two deployments:

- ``Gateway``, the FastAPI ingress: authenticates the bearer token and its scope before it reads a byte
  of the body, applies the token's rate and concurrency limits, reads the body through one bounded
  reader, decodes the images in a bounded pool off the event loop with a deadline (``images.py``: an
  allow-list of formats, limits checked before and after decoding), resolves the site's live version
  from the registry's ``current`` pointer on every request and forwards the images to the model
  deployment under the multiplexed model id ``site@vNNNN``. A newly published version is therefore live
  for the next request, while requests already in flight finish on the version they were routed with.
- ``SiteModels``, the model deployment: one frozen backbone per replica, shared by up to
  ``max_models_per_replica`` site models held in Serve's multiplexed LRU cache; concurrent requests for the
  same model id are batched with ``@serve.batch`` (Serve splits a batch by model id), and a request or an
  image that fails there fails alone. It also runs /adapt: adaptation from the registry's
  meta-checkpoint, then publication of a candidate version (live at once only with ``?activate=true``).

What the gateway holds at once is bounded: request bodies by ``max_inflight_bytes``, decoded pixels by
``max_inflight_pixels`` (and per request by ``max_request_pixels``), decodes by ``max_concurrent_decodes``;
a request that cannot get its share before its deadline is answered 429 with ``Retry-After``.

Scoring several images reports each image in its own item (``status`` ok or error): a bad image never
fails the others; a request whose every image is bad is answered with the first one's 4xx.

The gateway also serves the review page (``GET /``, ``static/``): an inspector picks a site, drops an
image and sees its overlay, score, decision and uncertainty, and works through the site's review queue
(``review.py``), least certain first, marking each good or defective.

Every request is counted by site, route and status and timed, and scored images by decision, with Ray's
metrics API (``metrics.py``), for the Prometheus endpoint of each Ray node.

Every error is a JSON ``{code, message}``: a 4xx when the request is at fault, with messages that name
the request's own values (shortened) and never a server path or an exception's text. A bad token is 401
whether or not the site exists; another site's valid token is 403. Every response carries a
Content-Security-Policy, X-Frame-Options, X-Content-Type-Options and Referrer-Policy. ``/docs`` and
``/openapi.json`` are off unless ``docs`` is set. ``build_app(args)`` is the application builder for
``serve run`` / ``serve deploy``; ``application(cfg)`` builds it from a ``ServeConfig``.

Where things live: ``api.py`` (the FastAPI app, error model, security headers, request metrics),
``gateway.py`` (the ingress and its routes), ``uploads.py`` (bounded reading, parsing and pooled decoding),
``images.py`` (safe decoding), ``limits.py`` (budgets and per-token limits), ``models.py`` (the model
deployment and map rendering), ``registry.py``, ``review.py``, ``metrics.py`` and ``schemas.py``. This module
binds the two deployments together.
"""

from typing import Any

from ray import serve
from ray.serve import Application

from bayprano.config import ServeConfig, load_yaml_config
from bayprano.serve.api import SECURITY_HEADERS, api
from bayprano.serve.gateway import Gateway
from bayprano.serve.models import SiteModels
from bayprano.serve.registry import Registry

__all__ = ["SECURITY_HEADERS", "api", "application", "build_app", "build_config", "deployment_options"]


def deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """The Serve options of the two deployments for a ServeConfig: ``{"SiteModels": ..., "Gateway": ...}``."""
    models: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.autoscaling:
        models["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        models["num_replicas"] = cfg.num_replicas
    # The ingress only awaits the model replicas: it must let through as many requests as they can batch.
    gateway = {
        "num_replicas": cfg.ingress_replicas,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
    }
    return {"SiteModels": models, "Gateway": gateway}


def application(cfg: ServeConfig) -> Application:
    """The bound application (ingress + model deployment) for a ServeConfig."""
    settings = cfg.model_dump(mode="json")
    options = deployment_options(cfg)
    models = serve.deployment(**options["SiteModels"])(SiteModels).bind(settings)
    return serve.deployment(**options["Gateway"])(Gateway).bind(models, settings)


def build_config(args: dict) -> ServeConfig:
    """The ServeConfig of ``build_app``'s ``args``: ServeConfig keys, and optionally ``config``, a YAML file of
    them that the other keys override."""
    args = {str(k).replace("-", "_"): v for k, v in dict(args or {}).items()}
    config = args.pop("config", None)
    return load_yaml_config(config, ServeConfig, args)


def build_app(args: dict) -> Application:
    """Application builder for ``serve run`` / ``serve deploy`` (``args`` as for ``build_config``)."""
    cfg = build_config(args)
    Registry(cfg.registry)  # refuse a missing registry before anything is deployed
    return application(cfg)
