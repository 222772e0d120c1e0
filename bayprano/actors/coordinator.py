"""The federation's server: rounds of federated meta-training over Factory actors, with DP, secure
aggregation, fault tolerance and resumable checkpoints.

``FederatedTrainer`` holds the logic (a plain class, driven from the driver or from inside the
``Coordinator`` actor). The sites are the config's ``site_paths()`` (a shard folder's manifest, or
site names with the path of each shard on its own node); each gets a Factory actor, or with
``pool_size`` a virtual site played by a pool of actors (pooled mode, where a round validates on its
participants only). Before anything else, every site checks that its shard is there (a missing one
stops the run with the site's own error), describes itself, and the sites' feature statistics are
summed (under secure aggregation, or in the clear; under DP they are not asked for).

Each round: sample the sites (without DP a seeded choice; under DP Poisson sampling from the OS's
random source, recorded nowhere); broadcast the global vector and collect the replies with a timeout.
With secure aggregation every sum (the round's updates, its validation, the setup's feature
statistics) is one instance of the double-masking protocol (``platform.federated.secagg``): keys,
shares, masked inputs, unmasking. A site that is late or dead after sharing its keys is dropped and
its pairwise masks removed from the survivors' sum: no redo. Only when the survivors cannot remove the
masks (fewer than the threshold answer) is the sum retried, as a new instance with fresh keys, masks
and local episodes, while every reply still pending from the old one is abandoned unread. Then:
aggregate (weighted FedAvg; under DP the sum of clipped deltas plus Gaussian noise z * C over the
expected number of sites), take the server step (FedAvg / FedProx / FedAdam), account the privacy
spent (one step per sampled round: the only noised release), validate (not under DP), write the
checkpoint. Before a round that would take epsilon past the target the run stops and says why. Under
DP the history, the logs and the checkpoint name no participant.

Communication is counted per (round, site, direction): up, every reply a site sent at its serialised
size (``wire_bytes``); down, the arguments of every call to it. Every reply is also kept in
``transcript`` with its stage. The summary gives each site's totals and, with ``with_shard_bytes``,
the share of its own image bytes that it sent.

The checkpoint is a ``MetaCheckpoint`` (the centralised trainer's format), whose ``meta_config`` carries
the federated state under ``"federated"``: the last completed round, the accountant's state and the
epsilon spent at the configured delta, the server optimizer's and communication ledger's states, so
that ``resume`` continues from the next round.
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
from bayprano.platform.federated.aggregation import make_server_optimizer, weighted_average
from bayprano.platform.federated.privacy import PrivacyAccountant, add_gaussian_noise
from bayprano.platform.federated.secagg import (
    MIN_SITES,
    Advertisement,
    MaskedUpdate,
    SecAggServer,
    check_settings,
    instance_id,
)
from bayprano.platform.federated.summaries import feature_standardisation, normality_shots, read_validation
from bayprano.platform.federated.state import CommunicationLedger, ParameterLayout, decode_update, encode_update
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration

MAX_ATTEMPTS = 3  # instances of one secure sum before the round gives up
FEDERATED_KEY = "federated"


def wire_bytes(reply: Any) -> int:
    """The size of what a site sent: its reply as serialised for the wire (pickle protocol 5)."""
    return len(pickle.dumps(reply, protocol=5))


def site_settings_of(cfg) -> dict:
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
    settings = site_settings_of(cfg)
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
                 on_broadcast: Callable[[int, int, list[str]], None] | None = None,
                 on_masked: Callable[[str, int, int, list[str]], None] | None = None):
        self.cfg = cfg
        self.factories = dict(sorted(factories.items()))
        self.sites = list(self.factories)
        self.log = log
        self.on_broadcast = on_broadcast  # (round, attempt, sites) after the local updates were asked for
        self.on_masked = on_masked  # (purpose, round, attempt, survivors) after the masked inputs arrived
        self.received: list[dict] = []  # every update and validation reply, as received
        self.transcript: list[dict] = []  # every reply with its stage, round, site and size on the wire
        self.abandoned: list[dict] = []  # replies still pending at a deadline: never read (the last few)
        self.ledger = CommunicationLedger()
        self.history: list[dict] = []
        self.round = 0
        self.stop_reason = ""
        self.session = secrets.token_hex(8)  # names this run's secure-aggregation instances
        self.dp = cfg.dp_noise is not None
        self.sampler = secrets.SystemRandom()  # under DP: Poisson sampling from the OS's random source
        k = self.sites_per_round
        self.quorum = max(1, min(k, int(cfg.min_sites or math.ceil(k / 2))))
        if cfg.secure_agg:
            self.quorum = max(self.quorum, MIN_SITES)
            check_settings(k, getattr(cfg, "secagg_threshold", None), getattr(cfg, "secagg_neighbours", None))
        if self.dp and cfg.dp_clip is None:
            raise ConfigError("--dp-noise needs --dp-clip (the noise is z * C)")
        self.server = make_server_optimizer(cfg.server_opt, **({"lr": cfg.server_lr} if cfg.server_lr else {}))
        self.accountant = None
        if self.dp:
            self.accountant = PrivacyAccountant(cfg.dp_noise, k / len(self.sites), cfg.dp_delta)

    @property
    def sites_per_round(self) -> int:
        f = self.cfg.sites_per_round
        if f > 1:
            return min(len(self.sites), int(f))
        return max(1, min(len(self.sites), round(f * len(self.sites))))

    # ------------------------------------------------------------------------------ plumbing

    def _gather(self, stage: str, round: int, calls: Mapping[str, tuple[str, tuple]], timeout: float,
                retry: bool = False, after_submit: Callable[[], None] | None = None,
                attempt: int = 0, count: bool = True) -> tuple[dict[str, Any], list[str]]:
        """Replies that arrived within ``timeout`` seconds, and the sites that were late or failed.

        ``calls`` maps each site to (method, args). Each call's arguments count as bytes down, each
        reply as bytes up (``wire_bytes``), under ``round`` (unless not ``count``: the end-of-run report
        of shard sizes is not federation traffic); every reply goes to ``transcript``. A reply
        still pending at the deadline is abandoned: it is never read. With ``retry`` (for calls that can
        be repeated) a site whose actor is restarting is asked again until the deadline.
        """
        deadline = time.monotonic() + timeout

        def submit(site):
            method, args = calls[site]
            if count:
                self.ledger.record(round, site, "down", wire_bytes(args))
            return getattr(self.factories[site], method).remote(*args)

        pending = {submit(site): site for site in calls}
        if after_submit is not None:
            after_submit()
        replies: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:  # the deadline passed: what is ready by now still counts, nothing more
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                if not ready:
                    break
            else:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in ready:
                site = pending.pop(ref)
                try:
                    replies[site] = ray.get(ref)
                except ray.exceptions.ActorUnavailableError:
                    if retry and deadline - time.monotonic() > 0.5:
                        time.sleep(0.5)
                        pending[submit(site)] = site
                    else:
                        self.log(f"site {self._name(site)} is unavailable (restarting)")
                except ray.exceptions.RayError as exc:
                    self.errors[site] = getattr(exc, "cause", None) or exc
                    text = str(exc).strip()
                    self.log(f"site {self._name(site)} failed: {type(exc).__name__} "
                             f"{text.splitlines()[-1] if text else ''}")
        for ref, site in pending.items():
            self.abandoned.append({"stage": stage, "round": round, "attempt": attempt, "site": site, "ref": ref})
        del self.abandoned[:-32]
        for site, reply in replies.items():
            size = wire_bytes(reply)
            if count:
                self.ledger.record(round, site, "up", size)
            self.transcript.append({"stage": stage, "round": round, "attempt": attempt, "site": site,
                                    "reply": reply, "bytes": size})
            if stage in ("update", "validation"):
                self.received.append(reply)
        return replies, sorted(set(calls) - set(replies))

    def _name(self, site: str) -> str:
        """A site as the logs name it: under DP, not at all (who took part is part of the secret)."""
        return "(a sampled site)" if self.dp else site

    def _secure_sum(self, purpose: str, round: int, sites: list[str],
                    masked_call: Callable[[str, dict], tuple[str, tuple]],
                    after_submit: Callable[[int, list[str]], None] | None = None) -> dict | None:
        """One secure-aggregation instance over ``sites`` (retried as a new instance, fresh keys and masks,
        when the survivors cannot remove the masks): {"sum", "sites" (survivors), "attempt"}, or None."""
        cfg = self.cfg
        threshold_setting = getattr(cfg, "secagg_threshold", None)
        neighbours = getattr(cfg, "secagg_neighbours", None)
        timeout = cfg.round_timeout
        for attempt in range(MAX_ATTEMPTS):
            if len(sites) < self.quorum:
                self.log(f"{purpose} {round}: {len(sites)} site(s) left, quorum is {self.quorum}")
                return None
            instance = instance_id(self.session, purpose, round, attempt)
            ads, late = self._gather("advertise", round, {s: ("secagg_advertise", (instance,)) for s in sites},
                                     timeout, retry=True, attempt=attempt)
            roster = {s: a for s, a in ads.items() if isinstance(a, Advertisement) and a.site_id == s
                      and a.instance == instance}
            if len(roster) < self.quorum:
                self.log(f"{purpose} {round}: {len(roster)} site(s) sent keys, quorum is {self.quorum}")
                return None
            try:
                _, threshold = check_settings(len(roster), threshold_setting, neighbours)
            except ConfigError as exc:
                self.log(f"{purpose} {round}: {len(roster)} site(s) sent keys: {exc}")
                return None
            replies, late = self._gather("share", round, {s: ("secagg_share", (instance, roster, threshold, neighbours))
                                                          for s in roster}, timeout, attempt=attempt)
            server = SecAggServer(instance, roster, threshold, neighbours)
            server.route({s: r["shares"] for s, r in replies.items()})
            context = {"instance": instance, "roster": roster, "shared": server.shared, "neighbours": neighbours,
                       "round": round, "attempt": attempt}
            hook = None if after_submit is None else functools.partial(after_submit, attempt, list(server.shared))
            replies, dropped = self._gather(purpose, round, {s: masked_call(s, context) for s in server.shared},
                                            timeout, after_submit=hook, attempt=attempt)
            masked = {s: r["masked"] for s, r in replies.items()
                      if isinstance(r.get("masked"), MaskedUpdate) and r["masked"].instance == instance}
            if dropped:
                self.log(f"{purpose} {round} attempt {attempt}: {self._count_or_names(dropped)} dropped after "
                         "sharing their keys (late or dead); their pairwise masks are removed")
            if self.on_masked is not None:
                self.on_masked(purpose, round, attempt, sorted(masked))
            survivors = sorted(masked)
            if len(survivors) < self.quorum:  # nothing is unmasked: the masked inputs stay meaningless
                self.log(f"{purpose} {round}: {len(survivors)} site(s) answered, quorum is {self.quorum}")
                return None
            lost = sorted(set(server.shared) - set(survivors))
            revealed, _ = self._gather("unmask", round, {
                s: ("secagg_unmask", (instance, roster, survivors, lost, server.inbox(s), threshold, neighbours))
                for s in survivors}, timeout, attempt=attempt)
            try:
                total = server.finish(masked, {s: r["shares"] for s, r in revealed.items()})
            except DataError as exc:
                self.log(f"{purpose} {round} attempt {attempt}: {exc}; retrying as a new instance")
                sites = sorted(revealed)
                continue
            return {"sum": total, "sites": survivors, "attempt": attempt, "replies": replies}
        self.log(f"{purpose} {round}: no attempt of {MAX_ATTEMPTS} could remove the masks")
        return None

    def _count_or_names(self, sites: list[str]) -> str:
        return f"{len(sites)} site(s)" if self.dp else ", ".join(sites)

    def setup(self) -> None:
        cfg = self.cfg
        everyone = list(self.factories)
        _, missing = self._gather("check", 0, {s: ("check", ()) for s in everyone}, cfg.setup_timeout,
                                  retry=True)  # every shard is there before any site spends time reading one
        for s in missing:
            if isinstance(self.errors.get(s), BaypranoError):
                raise self.errors[s]
        infos, missing = self._gather("describe", 0, {s: ("describe", (self.dp,)) for s in everyone}, cfg.setup_timeout,
                                      retry=True)
        for s in missing:
            if isinstance(self.errors.get(s), BaypranoError):
                raise self.errors[s]
        if missing:
            raise DataError(f"sites {', '.join(missing)} did not start within {cfg.setup_timeout:g}s")
        self.infos = infos
        first = infos[self.sites[0]]
        for s, info in infos.items():
            if info["fingerprint"] != first["fingerprint"] or info["layout"] != first["layout"]:
                raise DataError(f"site {s} runs backbone {info['fingerprint']}, site {self.sites[0]} "
                                f"{first['fingerprint']}: every site must run the same model")
        self.model = BayesianPatchModel(first["in_channels"], cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
        self.layout = ParameterLayout.from_model(self.model)
        if self.dp:
            self.log("under DP the feature statistics stay at each site: the standardisation is the identity")
        else:
            summed = self._feature_sum()
            mean, std = feature_standardisation(summed)
            self.model.set_feature_statistics(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
        if cfg.resume and Path(cfg.out).is_file():
            self._restore(load_checkpoint(cfg.out))
        self.global_vector = self.layout.flatten(self.model)
        self.calibration = getattr(self, "calibration", None)
        self.normality = getattr(self, "normality", None)

    def _feature_sum(self) -> np.ndarray:
        cfg = self.cfg
        settings = {"dp": False}
        if cfg.secure_agg:
            result = self._secure_sum("features", 0, list(self.factories),
                                      lambda s, ctx: ("feature_statistics", (settings, ctx)))
            if result is None:
                raise DataError("the sites' feature statistics could not be summed under secure aggregation")
            return result["sum"].numpy()
        replies, missing = self._gather("features", 0, {s: ("feature_statistics", (settings, None))
                                                        for s in self.factories}, cfg.setup_timeout, retry=True)
        if missing:
            raise DataError(f"sites {', '.join(missing)} sent no feature statistics")
        return np.sum([r["features"] for r in replies.values()], axis=0)

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
                "clip": cfg.dp_clip, "weighted": not self.dp, "dp": self.dp, "fp16": cfg.fp16,
                "feature_mean": self.model.feature_mean.tolist(), "feature_std": self.model.feature_std.tolist()}

    def sample(self, round: int) -> list[str]:
        """The round's sites: without DP a seeded choice of ``sites_per_round``; under DP each site
        independently with probability q = sites_per_round / sites, from the OS's random source
        (Poisson sampling, as the accountant assumes; nobody can replay it, nothing records it)."""
        if self.dp:
            q = self.sites_per_round / len(self.sites)
            return sorted(s for s in self.sites if self.sampler.random() < q)
        rng = np.random.default_rng([self.cfg.seed, round])
        chosen = rng.choice(len(self.sites), size=self.sites_per_round, replace=False)
        return sorted(self.sites[i] for i in chosen)

    # --------------------------------------------------------------------------------- a round

    def run_round(self, round: int) -> dict | None:
        """Broadcast, collect and aggregate one round: {"delta", "sites", "attempt", "loss", "replies"},
        {"skipped": True} under DP when too few sites were sampled, or None when fewer than a quorum of
        sites answered."""
        cfg = self.cfg
        participants = self.sample(round)
        if self.dp and len(participants) < self.quorum:
            self.log(f"round {round}: fewer sites sampled than the quorum {self.quorum}; no update")
            return {"skipped": True, "sites": [], "attempt": 0, "delta": None, "loss": math.nan}
        global_bytes = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        settings = self._round_settings()
        size = self.layout.size
        if cfg.secure_agg:
            hook = None
            if self.on_broadcast:
                hook = functools.partial(self.on_broadcast, round)
            result = self._secure_sum(
                "update", round, participants,
                lambda s, ctx: ("local_update", (round, ctx["attempt"], global_bytes, ctx, settings)),
                after_submit=hook)
            if result is None:
                return None
            summed = result["sum"].double()
            n = len(result["sites"])
            if self.dp:
                delta = self._noised_mean(summed[:size])
                loss = math.nan
            else:
                delta = (summed[:size] / summed[size]).float()
                loss = float(summed[size + 1] / n)
            return {"delta": delta, "sites": result["sites"], "attempt": result["attempt"], "loss": loss,
                    "replies": result["replies"]}
        calls = {s: ("local_update", (round, 0, global_bytes, None, settings)) for s in participants}
        hook = None
        if self.on_broadcast:
            hook = functools.partial(self.on_broadcast, round, 0, list(participants))
        replies, dropped = self._gather("update", round, calls, cfg.round_timeout, after_submit=hook)
        if dropped:
            self.log(f"round {round} attempt 0: dropped {self._count_or_names(dropped)} (late or dead)")
        sites = sorted(replies)
        if len(sites) < self.quorum:
            self.log(f"round {round}: {len(sites)} site(s) answered, quorum is {self.quorum}")
            return None
        deltas = [decode_update(replies[s]["update"], self.layout) for s in sites]
        if self.dp:
            delta = self._noised_mean(torch.stack(deltas).double().sum(0))
            loss = math.nan
        else:
            delta = weighted_average(deltas, [replies[s]["weight"] for s in sites])
            loss = float(np.mean([replies[s]["metrics"]["loss"] for s in sites]))
        return {"delta": delta, "sites": sites, "attempt": 0, "loss": loss, "replies": replies}

    def _noised_mean(self, total: torch.Tensor) -> torch.Tensor:
        """DP-FedAvg's release: the sum of clipped deltas plus N(0, (z C)^2), over the expected number of
        sites q N (a fixed denominator: dividing by the count sampled would reveal it)."""
        cfg = self.cfg
        return (add_gaussian_noise(total.double(), cfg.dp_noise, cfg.dp_clip) / self.sites_per_round).float()

    def validate(self, sites: list[str] | None = None) -> dict:
        """Mean image AUROC over the sites (default: all) that answer, the pooled calibration and normality
        prior, from the sum of their validation vectors. Under DP nothing is asked: validation stays home."""
        if self.dp:
            return {"auroc": math.nan, "site_auroc": None}
        cfg = self.cfg
        data = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        settings = self._round_settings()
        sites = self.sites if sites is None else sites
        shots = normality_shots(cfg.shots)
        r = self.round + 1
        site_auroc = None
        if cfg.secure_agg:
            result = self._secure_sum("validation", r, list(sites), lambda s, ctx: ("validate", (data, settings, ctx)))
            if result is None:
                return {"auroc": math.nan, "site_auroc": None}
            total = result["sum"].numpy()
        else:
            replies, _ = self._gather("validation", r, {s: ("validate", (data, settings, None)) for s in sites},
                                      cfg.round_timeout, retry=True)
            if not replies:
                return {"auroc": math.nan, "site_auroc": {}}
            total = np.sum([v["validation"] for v in replies.values()], axis=0)
            site_auroc = {s: float(v["validation"][0]) if v["validation"][1] > 0 else math.nan
                          for s, v in sorted(replies.items())}
        summary = read_validation(total, self.model.dim, shots)
        if summary["calibration"] is not None:
            self.calibration = summary["calibration"]
        if summary["normality"] is not None:
            self.normality = summary["normality"]
        return {"auroc": summary["auroc"], "site_auroc": site_auroc}

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
            if result.get("delta") is not None:
                self.global_vector = self.server.step(self.global_vector, result["delta"])
                self.layout.load_into(self.model, self.global_vector)
            # every sampled round is counted, a skipped one too (its sampling happened)
            epsilon = self.accountant.step() if self.accountant is not None else None
            val = {"auroc": math.nan, "site_auroc": None}
            if not result.get("skipped"):
                val = self.validate(result["sites"] if cfg.pool_size else None)
            # episodes: local steps x sites that answered; under DP x the expected number of sites
            took_part = self.sites_per_round if self.dp else len(result["sites"])
            row = {"round": r, "attempt": result["attempt"], "loss": result["loss"], "val_auroc": val["auroc"],
                   "epsilon": epsilon, "episodes": cfg.local_steps * took_part, "seconds": time.perf_counter() - t0}
            if not self.dp:  # under DP who took part, and so how much moved, is not recorded
                row.update(sites=result["sites"], site_auroc=val["site_auroc"],
                           bytes_up=self.ledger.total(round=r, direction="up"),
                           bytes_down=self.ledger.total(round=r, direction="down"))
            self.history.append(row)
            self.round = r
            self.save()
            eps = "-" if epsilon is None else f"{epsilon:.3f} at delta {cfg.dp_delta:g}"
            loss = "-" if not math.isfinite(row["loss"]) else f"{row['loss']:.4f}"
            auroc = "-" if not math.isfinite(row["val_auroc"]) else f"{row['val_auroc']:.3f}"
            where = "" if self.dp else f" sites {','.join(result['sites'])}"
            moved = "" if self.dp else f" bytes up {row['bytes_up']} down {row['bytes_down']}"
            self.log(f"round {r}/{cfg.rounds}{where} loss {loss} val_auroc {auroc} epsilon {eps}{moved}")
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
        replies, missing = self._gather("shard_bytes", self.round, {s: ("shard_bytes", ()) for s in self.factories},
                                        self.cfg.round_timeout, retry=True, count=False)
        return {s: int(replies[s]) for s in sorted(replies)}

    def federated_state(self) -> dict:
        server = self.server.state_dict()
        for key in ("m", "v"):
            if isinstance(server.get(key), torch.Tensor):
                server[key] = server[key].tolist()
        ledger = self.ledger.state_dict()
        if self.dp:  # per round and site the ledger would say who took part: only the totals are kept
            ledger = {"rows": [[0, "all sites", d, self.ledger.total(direction=d)] for d in ("down", "up")]}
        return {"round": self.round, "sites": self.sites, "server": server, "ledger": ledger,
                "accountant": None if self.accountant is None else self.accountant.state_dict(),
                "epsilon": None if self.accountant is None else self.accountant.epsilon,
                "delta": None if self.accountant is None else self.cfg.dp_delta,
                "stop_reason": self.stop_reason}

    def save(self) -> None:
        cfg = self.cfg
        first = self.infos[self.sites[0]]
        calibration = self.calibration or Calibration.from_prior(self.model.dim, 1.0)
        settings = {k: v for k, v in site_settings_of(cfg)["meta"].items()}
        settings.update(inner_positions=128, seed=cfg.seed, shards=None if cfg.shards is None else str(cfg.shards),
                        sites=cfg.site_paths(), actor_pool_size=cfg.pool_size, rounds=cfg.rounds,
                        local_steps=cfg.local_steps, sites_per_round=cfg.sites_per_round, server_opt=cfg.server_opt,
                        secure_agg=cfg.secure_agg, secagg_threshold=getattr(cfg, "secagg_threshold", None),
                        secagg_neighbours=getattr(cfg, "secagg_neighbours", None), dp_noise=cfg.dp_noise, dp_clip=cfg.dp_clip, dp_delta=cfg.dp_delta,
                        pool_size=None if self.dp else sum(i["normals"] for i in self.infos.values()))
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
