"""Running the federation on Ray: the sites' Factory actors (one per site, or a pool playing virtual sites),
the Coordinator actor that drives ``FederatedTrainer`` over them, and ``train_federated``, the driver's
entry point that starts it on a cluster and returns its summary with each site's share of bytes sent."""

from __future__ import annotations

from typing import Any, Mapping

import ray
import torch

from bayprano.actors.coordinator import FederatedTrainer
from bayprano.actors.factory import FactoryPool, VirtualSite, make_factory
from bayprano.platform.errors import BaypranoError
from bayprano.platform.federated.messages import SiteSettings


def spawn_factories(cfg: Any, num_cpus: float = 0.25) -> dict[str, Any]:
    """A handle per site (``cfg.site_paths()``): its own Factory actor, or with ``cfg.pool_size`` a
    ``VirtualSite`` played by a pool of that many actors; every site runs ``SiteSettings.from_config(cfg)``."""
    settings = SiteSettings.from_config(cfg)
    paths = cfg.site_paths()
    if cfg.pool_size:
        pool = FactoryPool(cfg.pool_size, settings, num_cpus=num_cpus)
        return {site: pool.site(site, path) for site, path in paths.items()}
    return {site: make_factory(site, path, settings, num_cpus=num_cpus) for site, path in paths.items()}


def kill_factories(factories: Mapping[str, Any]) -> None:
    pools = {id(h.pool): h.pool for h in factories.values() if isinstance(h, VirtualSite)}
    for pool in pools.values():
        pool.kill()
    for handle in factories.values():
        if not isinstance(handle, VirtualSite):
            ray.kill(handle)


class CoordinatorActor:
    """The Coordinator as a Ray actor: spawns a Factory per site and runs ``FederatedTrainer``."""

    def __init__(self, cfg, factory_cpus: float = 0.25):
        torch.set_num_threads(1)
        self.cfg = cfg
        self.factory_cpus = factory_cpus

    def run(self) -> dict:
        # Everything that can refuse the settings runs here, not in __init__: an error raised while an actor
        # is created reaches the driver as an ActorDiedError without its cause.
        self.factories = spawn_factories(self.cfg, num_cpus=self.factory_cpus)
        try:
            self.trainer = FederatedTrainer(
                self.cfg, self.factories, log=lambda m: print(f"[federated] {m}", flush=True)
            )
            summary = self.trainer.run()
            return with_shard_bytes(summary, self.trainer.site_shard_bytes())
        finally:
            kill_factories(self.factories)


def with_shard_bytes(summary: dict, shard_bytes: Mapping[str, int]) -> dict:
    """``summary`` with each site's image bytes and the share of them it sent (``sent_fraction``), and the total."""
    summary = dict(summary)
    summary["shard_bytes"] = int(sum(shard_bytes.values()))
    per_site = {}
    for s, moved in summary["site_bytes"].items():
        images = shard_bytes.get(s)
        per_site[s] = {**moved, "shard_bytes": images, "sent_fraction": moved["sent"] / images if images else None}
    summary["site_bytes"] = per_site
    return summary


Coordinator = ray.remote(CoordinatorActor)


def train_federated(cfg) -> dict:
    """Run federated meta-training for a ``FederatedTrainConfig`` on the Ray cluster at ``cfg.address``
    (a local one when none is given and none is running); returns the Coordinator's summary.

    A user error raised inside the Coordinator comes back as that error, not as a Ray wrapper.
    """
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, include_dashboard=False)
    try:
        options: dict[str, Any] = {"num_cpus": 0.1}
        if ray.cluster_resources().get("coordinator", 0) > 0:  # cluster.yaml's head node
            options["resources"] = {"coordinator": 0.001}
        coordinator: Any = Coordinator.options(**options).remote(cfg)
        try:
            return ray.get(coordinator.run.remote())
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, BaypranoError):
                raise exc.cause from None
            raise
        finally:
            ray.kill(coordinator)
    finally:
        if started:
            ray.shutdown()
