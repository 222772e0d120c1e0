"""Attacks on secure aggregation over real Factory actors: a late site whose stale reply reaches the
server, and a site killed after masking.

The sites are ``GatedSite`` actors: Factory sites that, when armed for a round, tell a ``Gate`` actor
when their masked update is ready and (the late or doomed one) then wait until the gate opens. So
"late" is an event, not a timing accident: the round's deadline passes with the honest replies in
and the late one held back. They also keep each round's clear delta, which only the test reads, to
compare the server's aggregate (and the attacker's best guess) with the truth.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import torch

from bayprano.actors.coordinator import FederatedTrainer
from bayprano.actors.factory import FactorySite
from bayprano.config import FederatedTrainConfig
from bayprano.platform.federated.aggregation import pack_weighted
from bayprano.platform.federated.messages import SiteSettings
from bayprano.platform.federated.secagg import PAIR, SELF, decode_fixed, pair_mask_key, prg
from bayprano.platform.federated.shamir import Share, combine
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from federation_helpers import SMALL
from waiting import wait_until

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

SECURE = {**SMALL, "local_steps": 1, "secure_agg": True}


class Gate:
    """Where armed sites say they have masked (``arrive``) and where the late one waits (``hold``)."""

    def __init__(self):
        self.arrived: set[str] = set()
        self.opened = asyncio.Event()

    async def arrive(self, site: str) -> None:
        self.arrived.add(site)

    async def hold(self, site: str) -> None:
        self.arrived.add(site)
        await self.opened.wait()

    async def count(self) -> int:
        return len(self.arrived)

    async def open(self) -> None:
        self.opened.set()


class GatedSite(FactorySite):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.round, self.holds, self.clear = None, None, False, {}

    def arm(self, gate, round: int, holds: bool) -> None:
        self.gate, self.round, self.holds = gate, round, holds

    def local_delta(self, round, attempt, start, instruction):
        delta, metrics = super().local_delta(round, attempt, start, instruction)
        self.clear[(round, attempt)] = (delta.clone(), dict(metrics))
        return delta, metrics

    def local_update(self, round, attempt, global_bytes, secagg, instruction):
        reply = super().local_update(round, attempt, global_bytes, secagg, instruction)
        if self.gate is not None and round == self.round:
            ray.get((self.gate.hold if self.holds else self.gate.arrive).remote(self.site))
        return reply

    def clear_vector(self, round: int, attempt: int) -> np.ndarray:
        """What this site masked in that round: [weight * delta, weight, loss] (read by the test only)."""
        delta, metrics = self.clear[(round, attempt)]
        return np.concatenate(
            [pack_weighted(delta, float(metrics["episodes"])).double().numpy(), [float(metrics["loss"])]]
        )


def cfg_for(shard_dir, out, **overrides) -> FederatedTrainConfig:
    return FederatedTrainConfig(
        shards=shard_dir, out=out, **{**SECURE, "rounds": 1, "round_timeout": 10.0, **overrides}
    )


@pytest.fixture(scope="module")
def gated(ray_session, shard_dir, tmp_path_factory):
    cfg = cfg_for(shard_dir, tmp_path_factory.mktemp("g") / "c.pt")
    actor = ray.remote(GatedSite)
    handles = {
        s: actor.options(num_cpus=0.2, max_restarts=1, max_task_retries=0).remote(s, p, SiteSettings.from_config(cfg))
        for s, p in cfg.site_paths().items()
    }
    ray.get([h.describe.remote() for h in handles.values()], timeout=300)  # banks built before the tests start
    yield handles
    for h in handles.values():
        ray.kill(h)


def _wait_for(gate, n: int, seconds: float = 180.0) -> None:
    """Until ``n`` armed sites have masked their update."""
    wait_until(
        lambda: ray.get(gate.count.remote(), timeout=30) >= n,
        f"{n} sites masked",
        timeout=seconds,
        detail=lambda: f"{ray.get(gate.count.remote(), timeout=30)} had",
    )


def _answers(handle) -> bool:
    try:
        return bool(ray.get(handle.ping.remote(), timeout=5))
    except ray.exceptions.RayError:
        return False


def test_a_late_sites_stale_reply_does_not_reveal_its_update_and_the_round_needs_no_redo(gated, shard_dir, tmp_path):
    late = "site-002"
    gate = ray.remote(num_cpus=0)(Gate).remote()
    ray.get([h.arm.remote(gate, 1, s == late) for s, h in gated.items()])
    trainer = FederatedTrainer(
        cfg_for(shard_dir, tmp_path / "late.pt"),
        gated,
        log=lambda m: None,
        on_broadcast=lambda r, a, sites: _wait_for(gate, 3),
    )
    trainer.setup()
    try:
        result = trainer.run_round(1)
    finally:
        ray.get(gate.open.remote())
        ray.get([h.arm.remote(None, None, False) for h in gated.values()])
    survivors = ["site-000", "site-001"]
    assert result.sites == survivors and result.attempt == 0  # completed by the survivors, no redo
    truth = {s: ray.get(gated[s].clear_vector.remote(1, 0)) for s in gated}
    size = trainer.layout.size
    plain = sum(truth[s] for s in survivors)
    torch.testing.assert_close(result.delta.double(), torch.from_numpy(plain[:size] / plain[size]), atol=1e-6, rtol=0)

    # the coordinator never read the late reply; the attacker (the test) takes it from the abandoned ref
    assert not any(t["site"] == late and t["stage"] == "update" for t in trainer.transcript)
    stale = [a for a in trainer.abandoned if a["site"] == late and a["stage"] == "update"]
    assert len(stale) == 1
    y = ray.get(stale[0]["ref"], timeout=60).masked.values

    # everything the server holds: the roster, the survivors' masked inputs, the unmask answers
    seen = {(t["stage"], t["site"]): t["reply"] for t in trainer.transcript if t["round"] == 1}
    roster = {s: seen["advertise", s] for s in gated}
    answers = {s: seen["unmask", s].shares for s in survivors}
    assert all(answers[s][late][0] == PAIR for s in survivors)  # of the late site: only its pairwise key
    assert all(answers[s][o][0] == SELF for s in survivors for o in survivors if o != s)
    s_late = X25519PrivateKey.from_private_bytes(combine([Share.from_bytes(answers[s][late][1]) for s in survivors], 2))
    instance = roster[late].instance
    stripped = y.copy()
    for v in survivors:  # remove every pairwise mask of the late site
        m = prg(pair_mask_key(s_late, roster[v].s_public, instance, late, v), y.size)
        stripped = stripped - m if v > late else stripped + m
    guess = decode_fixed(stripped)
    x = truth[late]
    assert np.median(np.abs(guess - x)) > 1e9  # off by the self-mask, uniform over 2^64
    # least squares over every vector the server received or computed for the round, against what the
    # survivors' sum alone (which it may know) explains of the late site's update: the sites train the
    # same model, so their updates are alike, and the sum predicts much of it; the rest adds nothing
    survivors_masked = [decode_fixed(seen["update", s].masked.values) for s in survivors]

    def unexplained(*cols):
        a = np.stack([*cols, np.ones_like(x)], axis=1)
        a = a / np.abs(a).max(0)
        coef, *_ = np.linalg.lstsq(a, x, rcond=None)
        return float(np.linalg.norm(a @ coef - x) ** 2 / np.linalg.norm(x - x.mean()) ** 2)

    legitimate = unexplained(plain)
    everything = unexplained(plain, guess, decode_fixed(y), *survivors_masked)
    assert everything > legitimate - 0.01, (legitimate, everything)
    print(f"late site's update unexplained: by the survivors' sum {legitimate:.4f}, by everything {everything:.4f}")
    assert (
        unexplained(plain, x + 1e-3 * x.std() * np.random.default_rng(0).normal(size=x.size)) < 1e-4
    )  # it would see it

    # and no survivor gives a second answer for the same instance (so never the late site's self-mask)
    with pytest.raises(ray.exceptions.RayTaskError, match="already did 'unmask'"):
        ray.get(gated["site-000"].secagg_unmask.remote(instance, roster, survivors + [late], [], {}, 2), timeout=60)


def test_a_site_killed_after_masking_leaves_the_survivors_sum_without_a_redo(gated, shard_dir, tmp_path):
    victim = "site-001"
    gate = ray.remote(num_cpus=0)(Gate).remote()
    ray.get([h.arm.remote(gate, 1, s == victim) for s, h in gated.items()])

    def kill_after_masking(round, attempt, sites):
        _wait_for(gate, 3)  # the victim has masked and is held
        ray.kill(gated[victim], no_restart=False)

    logged = []
    trainer = FederatedTrainer(
        cfg_for(shard_dir, tmp_path / "kill.pt", rounds=2), gated, log=logged.append, on_broadcast=kill_after_masking
    )
    trainer.setup()
    result = trainer.run_round(1)
    survivors = ["site-000", "site-002"]
    assert result.sites == survivors and result.attempt == 0, logged
    assert any(f"update 1 attempt 0: {victim} dropped after sharing" in line for line in logged), logged
    truth = {s: ray.get(gated[s].clear_vector.remote(1, 0)) for s in survivors}
    size = trainer.layout.size
    plain = sum(truth.values())
    torch.testing.assert_close(result.delta.double(), torch.from_numpy(plain[:size] / plain[size]), atol=1e-6, rtol=0)
    for s in survivors:
        ray.get(gated[s].arm.remote(None, None, False))
    wait_until(lambda: _answers(gated[victim]), f"{victim} restarted and answers", timeout=60, every=0.5)
    ray.get(gated[victim].describe.remote(), timeout=300)  # its banks rebuilt before the round's deadline runs
    trainer.on_broadcast = None
    assert trainer.run_round(2).sites == sorted(gated)  # the restarted site, with a new secret, rejoins
