"""Test helpers for the federation: a site made late on purpose, by a gate that the test opens, not by timing."""

from __future__ import annotations

import asyncio

import ray


@ray.remote(num_cpus=0)
class Gate:
    """Closed until ``open()``; ``wait()`` returns once it is open."""

    def __init__(self):
        self.opened = asyncio.Event()

    async def wait(self) -> bool:
        await self.opened.wait()
        return True

    async def open(self) -> None:
        self.opened.set()


@ray.remote(num_cpus=0)
def _after(gate_opened: bool, reply):
    return reply


class HeldBack:
    """A Factory handle whose replies to the ``local_update`` calls numbered in ``held`` (1 = its first call)
    reach the Coordinator only once ``gate`` is open: the site computes its update as usual, and is late."""

    def __init__(self, handle, gate, held: set[int]):
        self.handle, self.gate, self.held = handle, gate, set(held)
        self.calls = 0

    def __getattr__(self, method: str):
        if method != "local_update":
            return getattr(self.handle, method)
        return self

    def remote(self, *args, **kwargs):
        self.calls += 1
        reply = self.handle.local_update.remote(*args, **kwargs)
        if self.calls in self.held:
            return _after.remote(self.gate.wait.remote(), reply)
        return reply


# small episodes on a real backbone (EfficientNet-Lite2, the cheapest at 64 px): what every federation test trains with
SMALL = dict(
    image_size=64,
    shots=2,
    n_query_normal=2,
    n_query_anomalous=2,
    calibration_episodes=2,
    holdout=3,
    backbone="efficientnet_lite2",
    round_timeout=120.0,
)
SMALL_FLAGS = [
    "--backbone",
    "efficientnet_lite2",
    "--image-size",
    "64",
    "--shots",
    "2",
    "--n-query-normal",
    "2",
    "--n-query-anomalous",
    "2",
    "--calibration-episodes",
    "2",
]


def fed_cfg(shard_dir, out, **overrides):
    from bayprano.config import FederatedTrainConfig

    return FederatedTrainConfig(shards=shard_dir, out=out, **{**SMALL, "rounds": 2, "local_steps": 2, **overrides})


def quiet(message: str) -> None:
    pass
