"""The federation's server: rounds of federated meta-training over Factory actors, with DP, secure
aggregation, fault tolerance and resumable checkpoints.

``FederatedTrainer`` holds the logic (a plain class, driven from the driver or from inside the
``Coordinator`` actor). The sites are the config's ``site_paths()`` (a shard folder's manifest, or
site names with the path of each shard on its own node); each gets a Factory actor, or with
``pool_size`` a virtual site played by a pool of actors (pooled mode, where a round validates on its
participants only). Before anything else, every site checks that its shard is there (a missing one
stops the run with the site's own error). Each round: sample a seeded fraction of the sites; with secure aggregation,
gather their public keys; broadcast the global vector; collect the replies with a timeout (a site that
is late or dead is dropped when a quorum remains; with secure aggregation a drop after masking leaves
masks that do not cancel, so the round is redone by the remaining sites under the next ``attempt``);
aggregate (weighted FedAvg, or with DP the unweighted sum of clipped deltas plus Gaussian noise z * C,
divided by the number of sites); take the server step (FedAvg / FedProx / FedAdam); account the privacy
spent; validate on every reachable site; write the checkpoint. Before a round that would take epsilon
past the target the run stops and says why.

Communication is counted per (round, site, direction): up, every reply a site sent (its description
at setup, public keys, updates, validation results) at its serialised size (``wire_bytes``); down, the
broadcast global vector and peers' public keys. The summary gives each site's totals and, with
``with_shard_bytes``, the share of its own image bytes that it sent.

The checkpoint is a ``MetaCheckpoint`` (the centralised trainer's format), whose ``meta_config`` carries
the federated state under ``"federated"``: the last completed round, the accountant's, server
optimizer's and communication ledger's states, so that ``resume`` continues from the next round.
"""

from __future__ import annotations

import functools
import math
import pickle
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import ray
import torch

from bayprano.actors.factory import FactoryPool, VirtualSite, make_factory
from bayprano.platform.errors import BaypranoError, ConfigError, DataError
from bayprano.platform.federated.aggregation import make_server_optimizer, unpack_weighted, weighted_average
from bayprano.platform.federated.privacy import PrivacyAccountant, add_gaussian_noise
from bayprano.platform.federated.secagg import MIN_SITES, aggregate
from bayprano.platform.federated.state import CommunicationLedger, ParameterLayout, decode_update, encode_update
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.meta.tasks import statistics_from_sums
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration, NormalityPrior

FEDERATED_KEY = "federated"


def wire_bytes(reply: Any) -> int:
    """The size of what a site sent: its reply as serialised for the wire (pickle protocol 5)."""
    return len(pickle.dumps(reply, protocol=5))


def _site_settings(cfg) -> dict:
    return {
        "backbone": cfg.backbone, "image_size": cfg.image_size, "dim": cfg.dim, "seed": cfg.seed,
        "holdout": cfg.holdout, "device": cfg.device,
        "meta": {"shots": cfg.shots, "inner_steps": cfg.inner_steps, "n_query_normal": cfg.n_query_normal,
                 "n_query_anomalous": cfg.n_query_anomalous, "lr": cfg.lr, "supcon_weight": cfg.supcon_weight,
                 "first_order": not cfg.second_order, "calibration_episodes": cfg.calibration_episodes},
    }


def spawn_factories(cfg, num_cpus: float = 0.25) -> dict[str, Any]:
    """A handle per site (``cfg.site_paths()``): its own Factory actor, or with ``cfg.pool_size`` a
    ``VirtualSite`` played by a pool of that many actors."""
    settings = _site_settings(cfg)
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


class FederatedTrainer:
    """Rounds of federated meta-training over ``factories`` ({site: Factory handle})."""

    def __init__(self, cfg, factories: Mapping[str, Any], log: Callable[[str], None] = print,
                 on_broadcast: Callable[[int, int, list[str]], None] | None = None):
        self.cfg = cfg
        self.factories = dict(sorted(factories.items()))
        self.sites = list(self.factories)
        self.log = log
        self.on_broadcast = on_broadcast
        self.received: list[dict] = []  # every reply a Factory sent, as received
        self.ledger = CommunicationLedger()
        self.history: list[dict] = []
        self.round = 0
        self.stop_reason = ""
        self.session = secrets.token_hex(8)  # names this run's secure-aggregation keys
        k = self.sites_per_round
        self.quorum = max(1, min(k, int(cfg.min_sites or math.ceil(k / 2))))
        if cfg.secure_agg:
            self.quorum = max(self.quorum, MIN_SITES)
            if k < MIN_SITES:
                raise ConfigError(f"--secure-agg needs at least {MIN_SITES} sites per round, --sites-per-round "
                                  f"{cfg.sites_per_round} of {len(self.sites)} sites gives {k}")
        self.server = make_server_optimizer(cfg.server_opt, **({"lr": cfg.server_lr} if cfg.server_lr else {}))
        self.accountant = None
        if cfg.dp_noise is not None:
            self.accountant = PrivacyAccountant(cfg.dp_noise, k / len(self.sites), cfg.dp_delta)

    @property
    def sites_per_round(self) -> int:
        f = self.cfg.sites_per_round
        if f > 1:
            return min(len(self.sites), int(f))
        return max(1, min(len(self.sites), round(f * len(self.sites))))

    # ------------------------------------------------------------------------------ plumbing

    def _gather(self, calls: Mapping[str, Callable[[], Any]], timeout: float, retry: bool = False,
                after_submit: Callable[[], None] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Replies that arrived within ``timeout`` seconds, and the sites that were late or failed.

        ``calls`` maps each site to a function that submits its call. With ``retry`` (for calls that can
        be repeated: keys, validation) a site whose actor is restarting is asked again until the deadline.
        """
        deadline = time.monotonic() + timeout
        pending = {fn(): site for site, fn in calls.items()}
        if after_submit is not None:
            after_submit()
        replies: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                site = pending.pop(ref)
                try:
                    replies[site] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    if retry and deadline - time.monotonic() > 0.5:
                        time.sleep(0.5)
                        pending[calls[site]()] = site
                    else:
                        self.log(f"site {site} is unavailable (restarting)")
                except ray.exceptions.RayError as exc:
                    self.errors[site] = getattr(exc, "cause", None) or exc
                    text = str(exc).strip()
                    self.log(f"site {site} failed: {type(exc).__name__} {text.splitlines()[-1] if text else ''}")
        return replies, sorted(set(calls) - set(replies))

    def setup(self) -> None:
        cfg = self.cfg
        _, missing = self._gather({s: f.check.remote for s, f in self.factories.items()}, cfg.setup_timeout,
                                  retry=True)  # every shard is there before any site spends time reading one
        for s in missing:
            if isinstance(self.errors.get(s), BaypranoError):
                raise self.errors[s]
        infos, missing = self._gather({s: f.describe.remote for s, f in self.factories.items()},
                                      cfg.setup_timeout, retry=True)
        for s in missing:
            if isinstance(self.errors.get(s), BaypranoError):
                raise self.errors[s]
        if missing:
            raise DataError(f"sites {', '.join(missing)} did not start within {cfg.setup_timeout:g}s")
        self.infos = infos
        if not cfg.resume or not Path(cfg.out).is_file():
            for s, info in infos.items():
                self.ledger.record(0, s, "up", wire_bytes(info))
        first = infos[self.sites[0]]
        for s, info in infos.items():
            if info["fingerprint"] != first["fingerprint"] or info["layout"] != first["layout"]:
                raise DataError(f"site {s} runs backbone {info['fingerprint']}, site {self.sites[0]} "
                                f"{first['fingerprint']}: every site must run the same model")
        self.model = BayesianPatchModel(first["in_channels"], cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
        self.layout = ParameterLayout.from_model(self.model)
        count = sum(i["feature_count"] for i in infos.values())
        total = torch.tensor([i["feature_sum"] for i in infos.values()], dtype=torch.float64).sum(0)
        total_sq = torch.tensor([i["feature_sum_sq"] for i in infos.values()], dtype=torch.float64).sum(0)
        mean, std = statistics_from_sums(total, total_sq, count)
        self.model.set_feature_statistics(mean.float(), std.float())
        if cfg.resume and Path(cfg.out).is_file():
            self._restore(load_checkpoint(cfg.out))
        self.global_vector = self.layout.flatten(self.model)
        self.calibration = getattr(self, "calibration", None)
        self.normality = getattr(self, "normality", None)

    def _restore(self, ckpt: MetaCheckpoint) -> None:
        state = ckpt.meta_config.get(FEDERATED_KEY)
        if not isinstance(state, dict):
            raise DataError(f"{self.cfg.out}: not a federated checkpoint, cannot --resume from it")
        if ckpt.backbone_fingerprint != self.infos[self.sites[0]]["fingerprint"]:
            raise DataError(f"{self.cfg.out}: made with backbone {ckpt.backbone_fingerprint}, the sites run "
                            f"{self.infos[self.sites[0]]['fingerprint']}")
        diff = self.layout.difference(ParameterLayout.from_model(ckpt.model))
        if diff:
            raise DataError(f"{self.cfg.out}: its model does not match this run's ({diff})")
        self.model = ckpt.model
        self.round = int(state["round"])
        self.history = list(ckpt.history)
        self.calibration = ckpt.calibration
        self.normality = ckpt.normality
        server_state = dict(state["server"])
        for key in ("m", "v"):
            if server_state.get(key) is not None:
                server_state[key] = torch.tensor(server_state[key], dtype=torch.float32)
        self.server.load_state_dict(server_state)
        self.ledger.load_state_dict(state["ledger"])
        if self.accountant is not None:
            if state.get("accountant") is None:
                raise ConfigError(f"{self.cfg.out}: was trained without DP; cannot resume it with --dp-noise")
            self.accountant.load_state_dict(state["accountant"])
        elif state.get("accountant") is not None:
            raise ConfigError(f"{self.cfg.out}: was trained with DP; resume it with the same --dp-noise")
        self.log(f"resuming after round {self.round} from {self.cfg.out}")

    def _round_settings(self) -> dict:
        cfg = self.cfg
        return {"local_steps": cfg.local_steps, "fedprox_mu": cfg.fedprox_mu if cfg.server_opt == "fedprox" else 0.0,
                "clip": cfg.dp_clip, "weighted": cfg.dp_noise is None, "secure_agg": cfg.secure_agg,
                "session": self.session, "fp16": cfg.fp16,
                "feature_mean": self.model.feature_mean.tolist(), "feature_std": self.model.feature_std.tolist()}

    def sample(self, round: int) -> list[str]:
        rng = np.random.default_rng([self.cfg.seed, round])
        chosen = rng.choice(len(self.sites), size=self.sites_per_round, replace=False)
        return sorted(self.sites[i] for i in chosen)

    # --------------------------------------------------------------------------------- a round

    def run_round(self, round: int) -> dict | None:
        """Broadcast, collect and aggregate one round; the aggregated delta and its participants, or
        None when fewer than a quorum of sites answered."""
        cfg = self.cfg
        participants = self.sample(round)
        keys: dict[str, bytes] = {}
        if cfg.secure_agg:
            keys, late = self._gather(
                {s: functools.partial(self.factories[s].public_key.remote, self.session) for s in participants},
                cfg.round_timeout, retry=True)
            participants = sorted(keys)
            for s, key in keys.items():
                self.ledger.record(round, s, "up", wire_bytes(key))
            if late:
                self.log(f"round {round}: no public key from {', '.join(late)}; dropped")
        global_bytes = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        settings = self._round_settings()
        attempt = 0
        while True:
            if len(participants) < self.quorum:
                self.log(f"round {round}: {len(participants)} site(s) left, quorum is {self.quorum}")
                return None
            peers = {s: keys[s] for s in participants} if cfg.secure_agg else None
            calls = {s: functools.partial(self.factories[s].local_update.remote, round, attempt, global_bytes, peers,
                                          settings) for s in participants}
            hook = None
            if self.on_broadcast:
                hook = functools.partial(self.on_broadcast, round, attempt, list(participants))
            replies, dropped = self._gather(calls, cfg.round_timeout, after_submit=hook)
            for s in participants:
                self.ledger.record(round, s, "down", len(global_bytes) + sum(len(k) for k in (peers or {}).values()))
            for s, r in replies.items():
                self.received.append(r)
                self.ledger.record(round, s, "up", wire_bytes(r))
            if dropped:
                self.log(f"round {round} attempt {attempt}: dropped {', '.join(dropped)} (late or dead)")
            participants = sorted(replies)
            if cfg.secure_agg and dropped:
                attempt += 1
                continue
            if len(participants) < self.quorum:
                self.log(f"round {round}: {len(participants)} site(s) answered, quorum is {self.quorum}")
                return None
            break
        agg = self._aggregate(round, attempt, [replies[s] for s in participants])
        return {"delta": agg, "sites": participants, "attempt": attempt, "replies": replies}

    def _aggregate(self, round: int, attempt: int, replies: list[dict]) -> torch.Tensor:
        cfg = self.cfg
        n = len(replies)
        if cfg.secure_agg:
            summed = aggregate([r["update"] for r in replies], expected_sites=[r["site"] for r in replies],
                               round=round, attempt=attempt)
            if cfg.dp_noise is None:
                delta, _ = unpack_weighted(summed)
                return delta
            total = summed[:-1]
        else:
            deltas = [decode_update(r["update"], self.layout) for r in replies]
            if cfg.dp_noise is None:
                return weighted_average(deltas, [r["weight"] for r in replies])
            total = torch.stack(deltas).double().sum(0).float()
        return add_gaussian_noise(total, cfg.dp_noise, cfg.dp_clip) / n

    def validate(self, sites: list[str] | None = None) -> dict:
        """Mean image AUROC over the sites (default: all) that answer, and the pooled calibration."""
        data = encode_update(self.global_vector, self.layout, fp16=self.cfg.fp16)
        settings = self._round_settings()
        sites = self.sites if sites is None else sites
        replies, _ = self._gather({s: functools.partial(self.factories[s].validate.remote, data, settings)
                                   for s in sites}, self.cfg.round_timeout, retry=True)
        for s, r in replies.items():
            self.ledger.record(self.round + 1, s, "down", int(r["bytes_received"]))
            self.ledger.record(self.round + 1, s, "up", wire_bytes(r))
        for r in replies.values():
            self.received.append(r)
        aurocs = [r["auroc"] for r in replies.values() if math.isfinite(r["auroc"])]
        out = {"auroc": float(np.mean(aurocs)) if aurocs else math.nan,
               "site_auroc": {s: r["auroc"] for s, r in sorted(replies.items())}}
        if replies:
            self.calibration = Calibration(self.model.dim, sum(r["calibration_shape"] for r in replies.values()),
                                           sum(r["calibration_rate"] for r in replies.values()))
            pooled: dict = {}
            for r in replies.values():
                for k, groups in r.get("normality", {}).items():
                    pooled.setdefault(int(k), []).extend(tuple(g) for g in groups)
            if pooled:
                self.normality = NormalityPrior.from_summaries(pooled)
        return out

    # ------------------------------------------------------------------------------------ run

    def run(self) -> dict:
        cfg = self.cfg
        if not hasattr(self, "layout"):
            self.setup()
        start = time.perf_counter()
        while self.round < cfg.rounds:
            r = self.round + 1
            if self.accountant is not None and cfg.target_epsilon is not None \
                    and self.accountant.would_exceed(cfg.target_epsilon):
                self._stop(f"stopped before round {r}: it would take epsilon from {self.accountant.epsilon:.3f} "
                           f"to {self.accountant.epsilon_after(1):.3f}, past the target {cfg.target_epsilon:g} "
                           f"(delta {cfg.dp_delta:g})")
                break
            t0 = time.perf_counter()
            result = self.run_round(r)
            if result is None:
                self._stop(f"stopped at round {r}: fewer than {self.quorum} sites answered")
                break
            self.global_vector = self.server.step(self.global_vector, result["delta"])
            self.layout.load_into(self.model, self.global_vector)
            epsilon = self.accountant.step() if self.accountant is not None else None
            val = self.validate(result["sites"] if cfg.pool_size else None)
            replies = result["replies"]
            loss = float(np.mean([replies[s]["metrics"]["loss"] for s in result["sites"]]))
            row = {"round": r, "sites": result["sites"], "attempt": result["attempt"], "loss": loss,
                   "val_auroc": val["auroc"], "site_auroc": val["site_auroc"], "epsilon": epsilon,
                   "bytes_up": self.ledger.total(round=r, direction="up"),
                   "bytes_down": self.ledger.total(round=r, direction="down"),
                   "episodes": int(sum(replies[s]["episodes"] for s in result["sites"])),
                   "seconds": time.perf_counter() - t0}
            self.history.append(row)
            self.round = r
            self.save()
            eps = "-" if epsilon is None else f"{epsilon:.3f}"
            self.log(f"round {r}/{cfg.rounds} sites {','.join(result['sites'])} loss {loss:.4f} "
                     f"val_auroc {val['auroc']:.3f} epsilon {eps} bytes up {row['bytes_up']} down {row['bytes_down']}")
        return self.summary(time.perf_counter() - start)

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.log(reason)
        if self.round > 0:
            self.save()  # the last completed round again, now with the reason

    def summary(self, seconds: float = 0.0) -> dict:
        return {"rounds": self.round, "stop_reason": self.stop_reason,
                "epsilon": None if self.accountant is None else self.accountant.epsilon,
                "bytes": self.ledger.total(), "history": self.history, "seconds": seconds, "out": str(self.cfg.out),
                "site_nodes": {s: i.get("node") for s, i in sorted(getattr(self, "infos", {}).items())},
                "site_bytes": {s: {"sent": self.ledger.total(site=s, direction="up"),
                                   "received": self.ledger.total(site=s, direction="down")} for s in self.sites}}

    def site_shard_bytes(self) -> dict[str, int]:
        """Image bytes in each site's shard, counted by the site: what centralising its data would move."""
        replies, missing = self._gather({s: f.shard_bytes.remote for s, f in self.factories.items()},
                                        self.cfg.round_timeout, retry=True)
        return {s: int(replies[s]) for s in sorted(replies)}

    def federated_state(self) -> dict:
        server = self.server.state_dict()
        for key in ("m", "v"):
            if isinstance(server.get(key), torch.Tensor):
                server[key] = server[key].tolist()
        return {"round": self.round, "sites": self.sites, "server": server, "ledger": self.ledger.state_dict(),
                "accountant": None if self.accountant is None else self.accountant.state_dict(),
                "stop_reason": self.stop_reason}

    def save(self) -> None:
        cfg = self.cfg
        first = self.infos[self.sites[0]]
        calibration = self.calibration or Calibration.from_prior(self.model.dim, 1.0)
        settings = {k: v for k, v in _site_settings(cfg)["meta"].items()}
        settings.update(inner_positions=128, seed=cfg.seed, shards=None if cfg.shards is None else str(cfg.shards),
                        sites=cfg.site_paths(), actor_pool_size=cfg.pool_size, rounds=cfg.rounds,
                        local_steps=cfg.local_steps, sites_per_round=cfg.sites_per_round, server_opt=cfg.server_opt,
                        secure_agg=cfg.secure_agg, dp_noise=cfg.dp_noise, dp_clip=cfg.dp_clip, dp_delta=cfg.dp_delta,
                        pool_size=sum(i["normals"] for i in self.infos.values()))
        settings[FEDERATED_KEY] = self.federated_state()
        categories = sorted({c for i in self.infos.values() for c in i["categories"]})
        ckpt = MetaCheckpoint(self.model.eval(), first["backbone"], first["fingerprint"], first["image_size"],
                              calibration, meta_config=settings, categories=categories, history=self.history,
                              normality=self.normality)
        ckpt.save(cfg.out)


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
            self.trainer = FederatedTrainer(self.cfg, self.factories,
                                            log=lambda m: print(f"[federated] {m}", flush=True))
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
        per_site[s] = {**moved, "shard_bytes": images,
                       "sent_fraction": moved["sent"] / images if images else None}
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
        coordinator = Coordinator.options(**options).remote(cfg)
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
