"""The federation's server: rounds of federated meta-training over Factory actors, with DP, secure
aggregation, fault tolerance and resumable checkpoints.

``FederatedTrainer`` composes the pieces (a plain class, driven from the driver, from a Tune trial or
from inside the ``Coordinator`` actor of ``actors.coordinator_actor``): a ``Strategy``
(``platform.federated.strategy``: sampling, the round's instruction, aggregation, the server optimiser,
and DP as a wrapper) decides; a ``SiteTransport`` (``actors.transport``: Ray calls with deadlines and
retries, the byte ledger, secure sums) carries; the trainer keeps the model, the history and the
checkpoint. The sites are the config's ``site_paths()`` (a shard folder's manifest, or site names with
the path of each shard on its own node); each gets a Factory actor, or with ``pool_size`` a virtual site
played by a pool of actors (pooled mode, where a round validates on its participants only). ``setup()``
checks that every site's shard is there (a missing one stops the run with the site's own error),
describes the sites, and sums their feature statistics (under secure aggregation, or in the clear; under
DP they are not asked for).

``step()`` runs one round: ask the strategy whether to run it (under DP: not when it would take epsilon
past the target), sample, broadcast the global vector with the round's ``RoundInstruction``, collect
the replies (plain, or one secure sum), aggregate, take the server step, account the privacy spent (one
step per sampled round: the only noised release), validate (not under DP), after the last round choose
the calibration rule (``choose_calibration_rule``, not under DP), write the checkpoint, and return the
round's history row. ``run_rounds(n)`` steps up to n rounds; ``run()`` every round left.
Under DP the history, the logs and the checkpoint name no participant.

Communication is counted per (round, site, direction) (``transport``); the summary gives each site's
totals and, with ``coordinator_actor.with_shard_bytes``, the share of its own image bytes that it sent.

The checkpoint is a ``MetaCheckpoint`` (the centralised trainer's format), whose ``meta_config`` carries
the federated state under ``"federated"``: the last completed round, the accountant's state and the
epsilon spent at the configured delta, the server optimizer's and communication ledger's states, so
that ``resume`` continues from the next round.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from bayprano.actors.transport import Gathered, SecureSum, SiteTransport, wire_bytes
from bayprano.config import round_size
from bayprano.platform.errors import BaypranoError, ConfigError, DataError
from bayprano.platform.federated.messages import (
    CalibrationReply,
    FeatureReply,
    RoundInstruction,
    SecAggContext,
    SiteDescription,
    SiteSettings,
    UpdateReply,
    ValidationReply,
)
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.federated.secagg import MIN_SITES, check_settings
from bayprano.platform.federated.state import CommunicationLedger, ParameterLayout, encode_update
from bayprano.platform.federated.strategy import Strategy, strategy_from_config
from bayprano.platform.federated.summaries import (
    feature_standardisation,
    normality_shots,
    prior_from_calibration_vector,
    read_validation,
    rules_from_loss_vector,
)
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration, NormalityPrior

FEDERATED_KEY = "federated"

__all__ = ["FEDERATED_KEY", "FederatedTrainer", "RoundOutcome", "wire_bytes"]


@dataclass
class RoundOutcome:
    """One round collected and aggregated: the sites that answered, the attempt that gave the sum, the
    aggregated delta (None when the round was skipped: under DP fewer sites were sampled than the quorum),
    the mean training loss (nan when not released) and the replies."""

    sites: list[str]
    attempt: int
    delta: torch.Tensor | None
    loss: float
    replies: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


class FederatedTrainer:
    """Rounds of federated meta-training over ``factories`` ({site: Factory handle}).

    ``strategy`` (default: the one ``cfg`` asks for, ``strategy_from_config``) samples, instructs and
    aggregates; the trainer moves the messages, keeps the ledger and writes the checkpoint.
    ``setup()`` checks and describes the sites; then ``step()`` runs one round, ``run_rounds(n)`` up to
    n, and ``run()`` every round left, with the summary.
    """

    model: BayesianPatchModel  # these three are set by setup()
    layout: ParameterLayout
    global_vector: torch.Tensor

    def __init__(
        self,
        cfg: Any,
        factories: Mapping[str, Any],
        log: Callable[[str], None] = print,
        on_broadcast: Callable[..., None] | None = None,
        on_masked: Callable[[str, int, int, list[str]], None] | None = None,
        strategy: Strategy | None = None,
    ):
        self.cfg = cfg
        self.factories = dict(sorted(factories.items()))
        self.sites = list(self.factories)
        self.log = log
        self.on_broadcast = on_broadcast  # (round, attempt, sites) after the local updates were asked for
        self.on_masked = on_masked  # (purpose, round, attempt, survivors) after the masked inputs arrived
        self.history: list[dict] = []
        self.round = 0
        self.stop_reason = ""
        self.session = secrets.token_hex(8)  # names this run's secure-aggregation instances
        k = round_size(cfg.sites_per_round, len(self.sites))
        self.quorum = max(1, min(k, int(cfg.min_sites or math.ceil(k / 2))))
        if cfg.secure_agg:
            self.quorum = max(self.quorum, MIN_SITES)
            check_settings(k, cfg.secagg_threshold, cfg.secagg_neighbours)
        self.strategy = strategy if strategy is not None else strategy_from_config(cfg, self.sites, k)
        self.dp = self.strategy.dp
        self.transport = SiteTransport(self.factories, log, private=self.dp)
        self.site_settings = SiteSettings.from_config(cfg)
        self.is_setup = False
        self.infos: dict[str, SiteDescription] = {}
        self.calibration: Calibration | None = None
        self.normality: NormalityPrior | None = None

    # ------------------------------------------------------------------------------ plumbing

    @property
    def sites_per_round(self) -> int:
        return self.strategy.expected_sites

    @property
    def accountant(self) -> PrivacyAccountant | None:
        return self.strategy.accountant

    @property
    def ledger(self) -> CommunicationLedger:
        return self.transport.ledger

    @property
    def transcript(self) -> list[dict]:
        return self.transport.transcript

    @property
    def received(self) -> list[Any]:
        return self.transport.received

    @property
    def abandoned(self) -> list[dict]:
        return self.transport.abandoned

    def _secure_sum(
        self,
        purpose: str,
        round: int,
        sites: list[str],
        masked_call: Callable[[str, SecAggContext], tuple[str, tuple]],
        after_submit: Callable[[int, list[str]], None] | None = None,
    ) -> SecureSum | None:
        cfg = self.cfg
        return self.transport.secure_sum(
            purpose,
            round,
            sites,
            self.quorum,
            cfg.round_timeout,
            cfg.secagg_threshold,
            cfg.secagg_neighbours,
            self.session,
            masked_call,
            after_submit=after_submit,
            on_masked=self.on_masked,
        )

    @staticmethod
    def _raise_site_error(gathered: Gathered) -> None:
        for s in gathered.missing:
            error = gathered.errors.get(s)
            if isinstance(error, BaypranoError):
                raise error

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Check every site's shard, describe the sites, build the model, sum the feature statistics (not
        under DP) and, with ``cfg.resume``, restore the checkpoint."""
        cfg = self.cfg
        everyone = list(self.factories)
        gather = self.transport.gather
        # every shard is there before any site spends time reading one
        self._raise_site_error(gather("check", 0, {s: ("check", ()) for s in everyone}, cfg.setup_timeout, retry=True))
        described = gather(
            "describe", 0, {s: ("describe", (self.dp,)) for s in everyone}, cfg.setup_timeout, retry=True
        )
        self._raise_site_error(described)
        if described.missing:
            raise DataError(f"sites {', '.join(described.missing)} did not start within {cfg.setup_timeout:g}s")
        self.infos = dict(described.replies)
        first = self.infos[self.sites[0]]
        for s, info in self.infos.items():
            if info.fingerprint != first.fingerprint or info.layout != first.layout:
                raise DataError(
                    f"site {s} runs backbone {info.fingerprint}, site {self.sites[0]} "
                    f"{first.fingerprint}: every site must run the same model"
                )
        self.model = BayesianPatchModel(first.in_channels, cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
        self.layout = ParameterLayout.from_model(self.model)
        if self.dp:
            self.log("under DP the feature statistics stay at each site: the standardisation is the identity")
        else:
            mean, std = feature_standardisation(self._feature_sum())
            self.model.set_feature_statistics(torch.from_numpy(mean).float(), torch.from_numpy(std).float())
        if cfg.resume and Path(cfg.out).is_file():
            self._restore(load_checkpoint(cfg.out))
        self.global_vector = self.layout.flatten(self.model)
        self.is_setup = True

    def _feature_sum(self) -> np.ndarray:
        cfg = self.cfg
        if cfg.secure_agg:
            result = self._secure_sum(
                "features", 0, list(self.factories), lambda s, ctx: ("feature_statistics", (False, ctx))
            )
            if result is None:
                raise DataError("the sites' feature statistics could not be summed under secure aggregation")
            return result.sum.numpy()
        got = self.transport.gather(
            "features",
            0,
            {s: ("feature_statistics", (False, None)) for s in self.factories},
            cfg.setup_timeout,
            retry=True,
        )
        if got.missing:
            raise DataError(f"sites {', '.join(got.missing)} sent no feature statistics")
        return np.sum([r.features for r in got.replies.values() if isinstance(r, FeatureReply)], axis=0)

    def _restore(self, ckpt: MetaCheckpoint) -> None:
        state = ckpt.meta_config.get(FEDERATED_KEY)
        fingerprint = self.infos[self.sites[0]].fingerprint
        if not isinstance(state, dict):
            raise DataError(f"{self.cfg.out}: not a federated checkpoint, cannot --resume from it")
        if ckpt.backbone_fingerprint != fingerprint:
            raise DataError(
                f"{self.cfg.out}: made with backbone {ckpt.backbone_fingerprint}, the sites run {fingerprint}"
            )
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
        self.strategy.server.load_state_dict(server_state)
        self.ledger.load_state_dict(state["ledger"])
        if self.accountant is not None:
            if state.get("accountant") is None:
                raise ConfigError(f"{self.cfg.out}: was trained without DP; cannot resume it with --dp-noise")
            self.accountant.load_state_dict(state["accountant"])
        elif state.get("accountant") is not None:
            raise ConfigError(f"{self.cfg.out}: was trained with DP; resume it with the same --dp-noise")
        self.log(f"resuming after round {self.round} from {self.cfg.out}")

    def instruction(self) -> RoundInstruction:
        """What every site of a round is told (the strategy's, with the model's feature standardisation)."""
        mean, std = self.model.feature_mean, self.model.feature_std
        assert isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)  # buffers of the model
        return self.strategy.configure_round(mean.tolist(), std.tolist())

    def sample(self, round: int) -> list[str]:
        """The round's sites, as the strategy samples them (under DP: Poisson, secret, recorded nowhere)."""
        return self.strategy.sample(round)

    # --------------------------------------------------------------------------------- a round

    def run_round(self, round: int) -> RoundOutcome | None:
        """Broadcast, collect and aggregate one round (no server step): its ``RoundOutcome`` (skipped under DP
        when fewer sites were sampled than the quorum), or None when fewer than a quorum answered."""
        cfg = self.cfg
        participants = self.sample(round)
        if len(participants) < self.quorum:  # only Poisson sampling (DP) can fall short
            self.log(f"round {round}: fewer sites sampled than the quorum {self.quorum}; no update")
            return RoundOutcome(sites=[], attempt=0, delta=None, loss=math.nan, skipped=True)
        global_bytes = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        instruction = self.instruction()
        if cfg.secure_agg:
            hook = None if self.on_broadcast is None else functools.partial(self.on_broadcast, round)
            result = self._secure_sum(
                "update",
                round,
                participants,
                lambda s, ctx: ("local_update", (round, ctx.attempt, global_bytes, ctx, instruction)),
                after_submit=hook,
            )
            if result is None:
                return None
            agg = self.strategy.aggregate_sum(result.sum, len(result.sites), self.layout.size)
            return RoundOutcome(result.sites, result.attempt, agg.delta, agg.loss, result.replies)
        calls = {s: ("local_update", (round, 0, global_bytes, None, instruction)) for s in participants}
        after = None
        if self.on_broadcast is not None:
            after = functools.partial(self.on_broadcast, round, 0, list(participants))
        got = self.transport.gather("update", round, calls, cfg.round_timeout, after_submit=after)
        if got.missing:
            self.log(f"round {round} attempt 0: dropped {self.transport.count_or_names(got.missing)} (late or dead)")
        replies = {s: r for s, r in got.replies.items() if isinstance(r, UpdateReply)}
        sites = sorted(replies)
        if len(sites) < self.quorum:
            self.log(f"round {round}: {len(sites)} site(s) answered, quorum is {self.quorum}")
            return None
        agg = self.strategy.aggregate(replies, self.layout)
        return RoundOutcome(sites, 0, agg.delta, agg.loss, dict(replies))

    def validate(self, sites: list[str] | None = None) -> dict:
        """Mean image AUROC over the sites (default: all) that answer, the pooled calibration and normality
        prior, from the sum of their validation vectors. Under DP nothing is asked: validation stays home."""
        instruction = self.instruction()
        if instruction.dp:
            return {"auroc": math.nan, "site_auroc": None}
        cfg = self.cfg
        data = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        sites = self.sites if sites is None else sites
        shots = normality_shots(cfg.shots)
        r = self.round + 1
        site_auroc = None
        if cfg.secure_agg:
            result = self._secure_sum(
                "validation", r, list(sites), lambda s, ctx: ("validate", (data, instruction, ctx))
            )
            if result is None:
                return {"auroc": math.nan, "site_auroc": None}
            total = result.sum.numpy()
        else:
            got = self.transport.gather(
                "validation",
                r,
                {s: ("validate", (data, instruction, None)) for s in sites},
                cfg.round_timeout,
                retry=True,
            )
            replies = {s: v for s, v in got.replies.items() if isinstance(v, ValidationReply)}
            if not replies:
                return {"auroc": math.nan, "site_auroc": {}}
            total = np.sum([v.validation for v in replies.values()], axis=0)
            site_auroc = {
                s: float(v.validation[0]) if v.validation[1] > 0 else math.nan for s, v in sorted(replies.items())
            }
        summary = read_validation(total, self.model.dim, shots)
        if summary["calibration"] is not None:
            self.calibration = summary["calibration"]
        if summary["normality"] is not None:
            self.normality = summary["normality"]
        return {"auroc": summary["auroc"], "site_auroc": site_auroc}

    def _site_sum(self, purpose: str, r: int, sites: list[str], call: Callable[[SecAggContext | None], tuple]):
        """The sum of the ``CalibrationReply`` vectors of ``sites`` (securely under ``secure_agg``) and who is
        in it, or None when no site (or fewer than a quorum under secure aggregation) answered."""
        if self.cfg.secure_agg:
            result = self._secure_sum(purpose, r, list(sites), lambda s, ctx: call(ctx))
            return None if result is None else (result.sum.numpy().astype(np.float64), list(result.sites))
        got = self.transport.gather(purpose, r, {s: call(None) for s in sites}, self.cfg.round_timeout, retry=True)
        replies = {s: v for s, v in got.replies.items() if isinstance(v, CalibrationReply)}
        if not replies:
            return None
        return np.sum([v.values for v in replies.values()], axis=0), sorted(replies)

    def choose_calibration_rule(self, sites: list[str] | None = None) -> dict | None:
        """The checkpoint's normality prior and its calibration rule per K, chosen as centralised meta-training
        chooses them (``meta.calibration.choose_rules``: each category calibrated on the prior of all the
        others, the rule of lowest pinball loss at the platform's target), from two sums over the sites:
        their calibration episodes' moments, then, given that sum, their categories' losses under every
        candidate rule. Only the sites in the first sum are asked for the second, so each subtracts its own
        part from a total that holds it. None (the prior and rule stay as they were) under DP or when too few
        sites answer. {K: the chosen rule, its pinball loss, FPR and counts}."""
        instruction = self.instruction()
        if instruction.dp:
            return None
        cfg = self.cfg
        r = self.round + 1 if self.round < cfg.rounds else self.round
        data = encode_update(self.global_vector, self.layout, fp16=cfg.fp16)
        shots = normality_shots(cfg.shots)
        sites = self.sites if sites is None else sites
        first = self._site_sum("calibration", r, sites, lambda ctx: ("calibration_episodes", (data, instruction, ctx)))
        if first is None:
            self.log("calibration rule: no site sent its calibration episodes; the rule stays the default")
            return None
        total, answered = first
        prior = prior_from_calibration_vector(total, shots)
        if prior is None:
            return None
        # a Factory keeps its episodes between the two sums and is sent the model's digest only; a pooled
        # worker keeps nothing between calls and makes them again from the model
        digest = hashlib.sha256(data).hexdigest()
        again = data if cfg.pool_size else None
        second = self._site_sum(
            "rules", r, answered, lambda ctx: ("calibration_rules", (digest, instruction, total, ctx, again))
        )
        rules = {} if second is None else rules_from_loss_vector(second[0], shots)
        self.normality = prior.with_rules(rules)
        chosen = {k: {f: v for f, v in rule.items() if f != "candidates"} for k, rule in rules.items()}
        described = "; ".join(
            f"K={k}: covariate {'on' if c['use_covariate'] else 'off'}, strength {c['strength']:g}, "
            f"spread of one {c['within']}, shift {'on' if c['loo_shift'] else 'off'}, "
            f"held-out FPR {c['fpr']:.3f} over {c['categories']} categories"
            for k, c in sorted(chosen.items())
        )
        self.log(f"calibration rule: {described or 'fewer than three categories, the default'}")
        return chosen

    # ------------------------------------------------------------------------------------ run

    @property
    def finished(self) -> bool:
        """No round is left to run: every round of ``cfg.rounds`` ran, or the run stopped (``stop_reason``)."""
        return bool(self.stop_reason) or self.round >= self.cfg.rounds

    def step(self) -> dict | None:
        """Run the next round (after ``setup()``, which it runs if needed) and save the checkpoint: the round's
        history row, or None when no round ran: the run is ``finished``, or it stops now (before a round the
        strategy refuses, such as one past the privacy budget, or at one that fewer than a quorum of sites
        answered), with ``stop_reason`` saying why."""
        cfg = self.cfg
        if not self.is_setup:
            self.setup()
        if self.finished:
            return None
        r = self.round + 1
        refusal = self.strategy.refusal()
        if refusal is not None:
            self._stop(f"stopped before round {r}: {refusal}")
            return None
        t0 = time.perf_counter()
        result = self.run_round(r)
        if result is None:
            self._stop(f"stopped at round {r}: fewer than {self.quorum} sites answered")
            return None
        if result.delta is not None:
            self.global_vector = self.strategy.apply(self.global_vector, result.delta)
            self.layout.load_into(self.model, self.global_vector)
        epsilon = self.strategy.account()  # every sampled round counts, a skipped one too (its sampling happened)
        val: dict[str, Any] = {"auroc": math.nan, "site_auroc": None}
        if not result.skipped:
            val = self.validate(result.sites if cfg.pool_size else None)
        rule = None
        if r == cfg.rounds and not result.skipped and not self.dp:
            rule = self.choose_calibration_rule(result.sites if cfg.pool_size else None)
        # episodes: local steps x sites that answered; under DP x the expected number of sites
        took_part = self.sites_per_round if self.dp else len(result.sites)
        row = {
            "round": r,
            "attempt": result.attempt,
            "loss": result.loss,
            "val_auroc": val["auroc"],
            "epsilon": epsilon,
            "episodes": cfg.local_steps * took_part,
            "seconds": time.perf_counter() - t0,
        }
        if rule is not None:
            row["calibration_rule"] = rule
        if not self.dp:  # under DP who took part, and so how much moved, is not recorded
            row.update(
                sites=result.sites,
                site_auroc=val["site_auroc"],
                bytes_up=self.ledger.total(round=r, direction="up"),
                bytes_down=self.ledger.total(round=r, direction="down"),
            )
        self.history.append(row)
        self.round = r
        self.save()
        eps = "-" if epsilon is None else f"{epsilon:.3f} at delta {cfg.dp_delta:g}"
        loss = "-" if not math.isfinite(row["loss"]) else f"{row['loss']:.4f}"
        auroc = "-" if not math.isfinite(row["val_auroc"]) else f"{row['val_auroc']:.3f}"
        where = "" if self.dp else f" sites {','.join(result.sites)}"
        moved = "" if self.dp else f" bytes up {row['bytes_up']} down {row['bytes_down']}"
        self.log(f"round {r}/{cfg.rounds}{where} loss {loss} val_auroc {auroc} epsilon {eps}{moved}")
        return row

    def run_rounds(self, n: int) -> list[dict]:
        """Up to ``n`` more rounds (fewer when the run finishes or stops): their history rows."""
        rows = []
        for _ in range(n):
            row = self.step()
            if row is None:
                break
            rows.append(row)
        return rows

    def run(self) -> dict:
        """Every round left (after ``setup()`` if it has not run), then the summary."""
        if not self.is_setup:
            self.setup()
        start = time.perf_counter()
        self.run_rounds(max(0, self.cfg.rounds - self.round))
        return self.summary(time.perf_counter() - start)

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.log(reason)
        if self.round > 0:
            self.save()  # the last completed round again, now with the reason

    def summary(self, seconds: float = 0.0) -> dict:
        return {
            "rounds": self.round,
            "stop_reason": self.stop_reason,
            "epsilon": None if self.accountant is None else self.accountant.epsilon,
            "bytes": self.ledger.total(),
            "history": self.history,
            "seconds": seconds,
            "out": str(self.cfg.out),
            "site_nodes": {s: i.node for s, i in sorted(self.infos.items())},
            "site_bytes": {
                s: {
                    "sent": self.ledger.total(site=s, direction="up"),
                    "received": self.ledger.total(site=s, direction="down"),
                }
                for s in self.sites
            },
        }

    def site_shard_bytes(self) -> dict[str, int]:
        """Image bytes in each site's shard, counted by the site: what centralising its data would move."""
        got = self.transport.gather(
            "shard_bytes",
            self.round,
            {s: ("shard_bytes", ()) for s in self.factories},
            self.cfg.round_timeout,
            retry=True,
            count=False,
        )
        return {s: int(got.replies[s]) for s in sorted(got.replies)}

    # ----------------------------------------------------------------------------- checkpoint

    def federated_state(self) -> dict:
        server = self.strategy.server.state_dict()
        for key in ("m", "v"):
            if isinstance(server.get(key), torch.Tensor):
                server[key] = server[key].tolist()
        ledger = self.ledger.state_dict()
        if self.dp:  # per round and site the ledger would say who took part: only the totals are kept
            ledger = {"rows": [[0, "all sites", d, self.ledger.total(direction=d)] for d in ("down", "up")]}
        return {
            "round": self.round,
            "sites": self.sites,
            "server": server,
            "ledger": ledger,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "epsilon": None if self.accountant is None else self.accountant.epsilon,
            "delta": None if self.accountant is None else self.cfg.dp_delta,
            "stop_reason": self.stop_reason,
        }

    def checkpoint_settings(self) -> dict:
        """What the checkpoint records of the run's settings (``MetaCheckpoint.meta_config``)."""
        cfg = self.cfg
        settings = self.site_settings.meta_settings()
        settings.update(
            seed=cfg.seed,
            shards=None if cfg.shards is None else str(cfg.shards),
            sites=cfg.site_paths(),
            actor_pool_size=cfg.pool_size,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
            sites_per_round=cfg.sites_per_round,
            server_opt=cfg.server_opt,
            secure_agg=cfg.secure_agg,
            secagg_threshold=cfg.secagg_threshold,
            secagg_neighbours=cfg.secagg_neighbours,
            dp_noise=cfg.dp_noise,
            dp_clip=cfg.dp_clip,
            dp_delta=cfg.dp_delta,
            pool_size=None if self.dp else sum(i.normals or 0 for i in self.infos.values()),
        )
        settings[FEDERATED_KEY] = self.federated_state()
        return settings

    def save(self) -> None:
        first = self.infos[self.sites[0]]
        calibration = self.calibration or Calibration.from_prior(self.model.dim, 1.0)
        categories = sorted({c for i in self.infos.values() for c in i.categories})
        ckpt = MetaCheckpoint(
            self.model.eval(),
            first.backbone,
            first.fingerprint,
            first.image_size,
            calibration,
            meta_config=self.checkpoint_settings(),
            categories=categories,
            history=self.history,
            normality=self.normality,
        )
        ckpt.save(self.cfg.out)
