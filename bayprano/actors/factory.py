"""One factory (site) of the federation: a Ray actor that holds its private shard and trains on it.

``FactorySite`` is the plain class (usable without Ray); ``Factory`` is it as a Ray actor, made with
``make_factory``. At its first exchange a site checks that its Parquet shard exists (a path local to its
node: a missing one is reported naming the site, the path and the host), reads it, keeps the
``train/good`` rows only, holds a few of them back for validation, and builds one task bank per category
(backbone features of its normals and of synthetic anomalies made from them). Images and per-image
features never leave it. What it sends out:

- ``describe(dp)``: a ``SiteDescription``: its categories, the backbone's name and fingerprint, the
  feature width, the number of its normal images (not under DP), and the Ray node and host it runs on;
- ``feature_statistics(dp, secagg)``: the per-channel sums of its normal features (sum, sum of
  squares, count), from which the Coordinator sets the shared feature standardisation: in the clear,
  or masked under secure aggregation; under DP it is not asked for (the standardisation stays the
  identity) and the site refuses it;
- ``secagg_advertise`` / ``secagg_share`` / ``secagg_unmask``: its side of each secure-aggregation
  instance (``platform.federated.secagg``): fresh public keys, its encrypted Shamir shares for its
  neighbours, and, once per instance, the shares it holds of the survivors' self-mask seeds and of the
  dropped sites' pairwise keys (never both kinds for one peer). Every instance's keys and masks come
  from a 32-byte master secret drawn from the OS when the actor starts, which never leaves it;
- ``local_update(round, attempt, global_bytes, secagg, instruction)``: the clipped parameter delta of
  E local Proto-MAML episodes (E and the rest from the round's ``RoundInstruction``), masked under
  secure aggregation (with the weight and, without DP, the loss summed in the same vector: a
  ``MaskedReply``) or encoded as bytes with its weight and metrics (an ``UpdateReply``); the local
  episodes are drawn from a seed of (run seed, site, round, attempt), so a retried round trains afresh;
- ``validate(...)``: image AUROC on its held-out normals and synthetic anomalies made from them, its
  calibration statistics and the moments of its normal log-statistics, as one additive vector
  (``platform.federated.summaries``): in the clear, or masked; under DP nothing (validation stays home);
- ``calibration_episodes(...)`` and ``calibration_rules(..., total, ...)``: after the last round, the two
  sums that choose the checkpoint's calibration rule as centralised meta-training chooses it: the
  moments of its fresh normal episodes (with leave-one-out statistics), then, given their sum over the
  sites, each of its categories' pinball losses under every candidate rule on the prior of all the
  other categories (``summaries.rule_loss_vector``); in the clear, or masked; under DP nothing;
- ``shard_bytes()``: how many bytes of images (encoded, as stored; masks not counted) its shard holds, to
  compare with what federation moves.

Every message in and out is a dataclass of ``platform.federated.messages``; a site runs the
``SiteSettings`` it is given, as is.

Pooled mode simulates many virtual sites over a bounded pool of actors: ``FactoryPool`` holds
``PooledFactory`` actors, each playing one virtual site per call, and hands out ``VirtualSite`` handles
that are used like Factory handles and keep each virtual site's state between its calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import torch

from bayprano.platform.data.anomalies import TRAINING_KINDS, VALIDATION_KINDS, AnomalyInjector
from bayprano.platform.data.shards import ShardReader
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.data.imageio import resize_square
from bayprano.platform.federated.aggregation import pack_weighted
from bayprano.platform.federated.local import local_meta_update
from bayprano.platform.federated.messages import (
    CalibrationReply,
    FeatureReply,
    MaskedReply,
    RoundInstruction,
    SecAggContext,
    SharesReply,
    SiteDescription,
    SiteSettings,
    UpdateMetrics,
    UpdateReply,
    ValidationReply,
)
from bayprano.platform.federated.privacy import clip_update
from bayprano.platform.federated.secagg import SecAggClient, SiteRoster
from bayprano.platform.federated.summaries import (
    calibration_vector,
    feature_vector,
    normality_shots,
    rule_loss_vector,
    validation_vector,
)
from bayprano.platform.federated.state import ParameterLayout, decode_update, encode_update
from bayprano.platform.meta.calibration import RULE_EPISODES_PER_CATEGORY, NormalEpisode, normal_episodes
from bayprano.platform.meta.protomaml import TaskBank, build_task_bank, calibrate, feature_sums, normal_log_statistics
from bayprano.platform.methods.validation import model_checkpoint, model_context, validation_aurocs
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import NormalityPrior


def _site_seed(seed: int, site: str, round: int, attempt: int = 0) -> int:
    """The local episodes' seed of (run, site, round, attempt): another attempt of a round trains on
    other episodes, so a retried round never sends the same update twice."""
    digest = hashlib.sha256(repr((int(seed), site, int(round), int(attempt))).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)


class FactorySite:
    """A site's private data and its side of every federated exchange."""

    def __init__(
        self,
        site: str,
        shard_path: str,
        settings: SiteSettings | None = None,
        extractor: PatchFeatureExtractor | None = None,
    ):
        torch.set_num_threads(1)
        self.site = site
        self.settings = SiteSettings() if settings is None else settings
        self.meta = self.settings.meta
        self.shard_path = str(shard_path)
        self.extractor = extractor
        self.banks: dict[str, TaskBank] = {}
        self.val_banks: dict[str, TaskBank] = {}
        self._loaded = False
        self._master = os.urandom(32)  # every secure-aggregation key and mask of this site derives from it
        self._spent: set[tuple[str, str]] = set()  # (instance, "mask" | "unmask"): each done once
        self._calibration: tuple[str, list[NormalEpisode]] | None = None  # (model digest, its episodes)

    def _check_shard(self) -> None:
        if not Path(self.shard_path).is_file():
            raise DataError(
                f"site {self.site!r}: shard {self.shard_path} does not exist on its node ({socket.gethostname()})"
            )

    def _load(self) -> None:
        """Read the shard and build the task banks, once (at the first exchange that needs them)."""
        if self._loaded:
            return
        s = self.settings
        self._check_shard()
        if self.extractor is None:
            self.extractor = build_backbone(s.backbone, device=s.device)
        images = self._read_normals()
        rng = np.random.default_rng([s.seed, *self.site.encode()])
        holdout = s.holdout
        need = self.meta.shots + max(self.meta.n_query_normal, self.meta.n_query_anomalous)
        injector, val_injector = AnomalyInjector(TRAINING_KINDS), AnomalyInjector(VALIDATION_KINDS)
        for c, (ims, ids) in sorted(images.items()):
            order = rng.permutation(len(ims))
            train, held = order[holdout:], order[:holdout]
            if len(train) < need:
                raise DataError(
                    f"{self.shard_path}: category {c!r} has {len(ims)} train/good images; {holdout} held "
                    f"out for validation leaves {len(train)}, an episode needs {need}"
                )
            self.banks[c] = build_task_bank(
                c, ims[train], [ids[i] for i in train], self._extract, injector, seed=s.seed
            )
            if holdout >= 2:
                self.val_banks[c] = build_task_bank(
                    c, ims[held], [ids[i] for i in held], self._extract, val_injector, seed=s.seed + 1
                )
        self.model = BayesianPatchModel(self.backbone.out_channels, s.dim, seed=s.seed)
        self.layout = ParameterLayout.from_model(self.model)
        self._loaded = True

    # ------------------------------------------------------------------------------------ data

    @property
    def backbone(self) -> PatchFeatureExtractor:
        """The feature extractor (built at the first exchange that needs the shard)."""
        if self.extractor is None:
            raise DataError(f"site {self.site!r}: the backbone is built with the task banks; none is loaded yet")
        return self.extractor

    def _extract(self, images: np.ndarray) -> torch.Tensor:
        return self.backbone.extract(images, size=self.settings.image_size).cpu()

    def _read_normals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        size = self.settings.image_size
        grouped: dict[str, list] = defaultdict(list)
        with ShardReader(self.shard_path) as reader:
            for row in reader.iter_rows(split="train"):
                if row.label == 0:
                    if not isinstance(row.image, np.ndarray):
                        raise DataError(f"{self.shard_path}: row {row.source_path} was not decoded to an image")
                    grouped[row.category].append((row.source_path, resize_square(row.image, size)))
        if not grouped:
            raise DataError(f"{self.shard_path}: no train/good rows, nothing to train on")
        return {c: (np.stack([im for _, im in rows]), [p for p, _ in rows]) for c, rows in grouped.items()}

    # ------------------------------------------------------------------------------- exchanges

    def describe(self, dp: bool = False) -> SiteDescription:
        """What the site runs and where; the number of its normal images too, except under DP."""
        self._load()
        return SiteDescription(
            site=self.site,
            categories=tuple(sorted(self.banks)),
            in_channels=self.backbone.out_channels,
            backbone=self.backbone.name,
            fingerprint=self.backbone.fingerprint(),
            image_size=self.settings.image_size,
            layout=self.layout.digest,
            node=_node_id(),
            host=socket.gethostname(),
            normals=None if dp else sum(len(b) for b in self.banks.values()),
        )

    def feature_statistics(self, dp: bool, secagg: SecAggContext | None = None) -> FeatureReply | MaskedReply:
        """Per-channel sums of its normal features, in the clear or masked (``secagg``); refused under DP."""
        if dp:
            raise ConfigError(f"site {self.site!r}: under DP the feature statistics stay home")
        self._load()
        total, total_sq, count = feature_sums(self.banks, torch.float64)
        vector = feature_vector(total.numpy(), total_sq.numpy(), count)
        if secagg is not None:
            return self._mask(vector, secagg)
        return FeatureReply(self.site, np.asarray(vector, dtype=np.float64))

    # ------------------------------------------------------------------------ secure aggregation

    def _client(self, instance: str) -> SecAggClient:
        return SecAggClient(self.site, self._master, instance)

    def _spend(self, instance: str, stage: str) -> None:
        if (instance, stage) in self._spent:
            raise DataError(
                f"secure aggregation: site {self.site!r} already did {stage!r} for instance {instance}; "
                "a retry must come as a new instance (the next attempt)"
            )
        self._spent.add((instance, stage))

    def secagg_advertise(self, instance: str):
        return self._client(instance).advertise()

    def secagg_share(self, instance: str, roster: SiteRoster, threshold: int, neighbours: int | None) -> SharesReply:
        return SharesReply(self.site, instance, self._client(instance).share_keys(roster, threshold, neighbours))

    def secagg_unmask(
        self,
        instance: str,
        roster: SiteRoster,
        survivors: list[str],
        dropped: list[str],
        inbox: Mapping[str, bytes],
        threshold: int,
        neighbours: int | None = None,
    ) -> SharesReply:
        self._spend(instance, "unmask")
        return SharesReply(
            self.site, instance, self._client(instance).unmask(roster, survivors, dropped, inbox, threshold, neighbours)
        )

    def use_secrets(self, master: bytes, spent: set) -> None:
        """Take the master secret and the spent stages from outside (pooled mode: a virtual site's state is
        kept by the pool between its calls, since the actor that plays it changes)."""
        self._master, self._spent = bytes(master), spent

    def _mask(self, vector: np.ndarray, secagg: SecAggContext) -> MaskedReply:
        """``vector`` masked for the instance of ``secagg``."""
        self._spend(secagg.instance, "mask")
        masked = self._client(secagg.instance).mask(
            vector, secagg.roster, list(secagg.shared), secagg.neighbours, secagg.round, secagg.attempt
        )
        return MaskedReply(self.site, masked)

    def shard_bytes(self) -> int:
        self._check_shard()
        with ShardReader(self.shard_path) as reader:
            total = 0
            for batch in reader.iter_batches(columns=["image"]):
                total += sum(len(v) for v in batch.column("image").to_pylist() if v is not None)
        return total

    def _load_global(self, global_bytes: bytes, instruction: RoundInstruction) -> torch.Tensor:
        self._load()
        mean = torch.tensor(instruction.feature_mean, dtype=torch.float32)
        std = torch.tensor(instruction.feature_std, dtype=torch.float32)
        self.model.set_feature_statistics(mean, std)
        vector = decode_update(global_bytes, self.layout)
        self.layout.load_into(self.model, vector)
        return vector

    def local_delta(
        self, round: int, attempt: int, start: torch.Tensor, instruction: RoundInstruction
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return local_meta_update(
            self.model,
            self.banks,
            self.meta,
            instruction.local_steps,
            start,
            self.layout,
            fedprox_mu=instruction.fedprox_mu,
            seed=_site_seed(self.settings.seed, self.site, int(round), int(attempt)),
        )

    def local_update(
        self, round: int, attempt: int, global_bytes: bytes, secagg: SecAggContext | None, instruction: RoundInstruction
    ) -> UpdateReply | MaskedReply:
        """This round's delta: with ``secagg`` (the instance, its view of the roster and the sites that
        shared) one masked vector [weight * delta, weight] (+ [loss] without DP); else the encoded delta
        with its weight and metrics."""
        start = self._load_global(global_bytes, instruction)
        delta, metrics = self.local_delta(round, attempt, start, instruction)
        norm = float(delta.norm())
        if instruction.clip is not None:
            delta, norm = clip_update(delta, float(instruction.clip))
        weight = float(metrics["episodes"]) if instruction.weighted else 1.0
        if secagg is not None:
            vector = pack_weighted(delta, weight).double().numpy()
            if not instruction.dp:
                vector = np.concatenate([vector, [float(metrics["loss"])]])
            masked = self._mask(vector, secagg)
            return dataclasses.replace(masked, round=int(round), attempt=int(attempt))
        data = encode_update(delta, self.layout, fp16=instruction.fp16)
        if instruction.dp:  # under DP the metrics stay home
            return UpdateReply(self.site, int(round), int(attempt), weight, data)
        return UpdateReply(
            self.site,
            int(round),
            int(attempt),
            weight,
            data,
            episodes=int(metrics["episodes"]),
            metrics=UpdateMetrics(
                loss=float(metrics["loss"]),
                delta_norm=norm,
                clipped_norm=float(delta.norm()),
                seconds=float(metrics["seconds"]),
            ),
        )

    def _auroc(self, inner_steps: int) -> float:
        return self._method_aurocs(inner_steps, ("bayes",))["bayes"]

    def _method_aurocs(self, inner_steps: int, methods) -> dict[str, float]:
        """Image AUROC per registered method on the held-out normals and synthetic anomalies."""
        rng = np.random.default_rng(self.settings.seed + 17)
        tasks = []
        for c, val in self.val_banks.items():
            bank = self.banks[c]
            support = bank.normals[rng.permutation(len(bank))[: self.meta.shots]].float()
            query = torch.cat([val.normals, val.anomalies]).float()
            tasks.append((support, query, np.array([0] * len(val) + [1] * val.anomalies.shape[0])))
        if not tasks:
            return {m: math.nan for m in methods}
        grid = tasks[0][0].shape[-2:]
        ckpt = model_checkpoint(
            self.model,
            self.backbone.name,
            self.backbone.fingerprint(),
            self.settings.image_size,
            (int(grid[0]), int(grid[1])),
            inner_steps,
            inner_positions=0,
        )
        return validation_aurocs(model_context(ckpt, inner_steps), tasks, methods)

    def validate(
        self, global_bytes: bytes, instruction: RoundInstruction, secagg: SecAggContext | None = None
    ) -> ValidationReply | MaskedReply:
        """AUROC, calibration and normality moments as one additive vector (``summaries.validation_vector``),
        in the clear or masked; refused under DP (validation stays home)."""
        if instruction.dp:
            raise ConfigError(f"site {self.site!r}: under DP the validation results stay home")
        self._load_global(global_bytes, instruction)
        self.model.eval()
        auroc = self._auroc(self.meta.inner_steps)
        cal = calibrate(self.model, self.banks, self.meta)
        shots = normality_shots(self.meta.shots)
        normality = NormalityPrior.summarize(normal_log_statistics(self.model, self.banks, self.meta))
        vector = validation_vector(auroc, cal, normality, shots)
        if secagg is not None:
            return self._mask(vector, secagg)
        return ValidationReply(self.site, np.asarray(vector, dtype=np.float64))

    def _calibration_episodes(
        self, digest: str, instruction: RoundInstruction, global_bytes: bytes | None = None
    ) -> list[NormalEpisode]:
        """Fresh normal episodes of this site at K = 1, 2 and K, with leave-one-out statistics, for the model
        whose encoded vector has sha256 ``digest``: made once per model from ``global_bytes``, then kept for
        the rules' stage, which names the model by its digest only (episodes come from a fixed seed: a
        site that lost them makes the same ones again from the model's bytes)."""
        if self._calibration is not None and self._calibration[0] == digest:
            return self._calibration[1]
        if global_bytes is None or hashlib.sha256(global_bytes).hexdigest() != digest:
            raise DataError(
                f"site {self.site!r}: no calibration episodes for model {digest[:12]} (the site restarted since "
                "it made them, or was sent another model)"
            )
        self._load_global(global_bytes, instruction)
        self.model.eval()
        episodes = normal_episodes(
            self.model,
            self.banks,
            self.meta,
            normality_shots(self.meta.shots),
            per_category=RULE_EPISODES_PER_CATEGORY,
            loo=True,
        )
        self._calibration = (digest, episodes)
        return episodes

    def calibration_episodes(
        self, global_bytes: bytes, instruction: RoundInstruction, secagg: SecAggContext | None = None
    ) -> CalibrationReply | MaskedReply:
        """The moments of this site's calibration episodes (``summaries.calibration_vector``) for the model of
        ``global_bytes``, in the clear or masked; refused under DP."""
        if instruction.dp:
            raise ConfigError(f"site {self.site!r}: under DP the calibration episodes stay home")
        digest = hashlib.sha256(global_bytes).hexdigest()
        episodes = self._calibration_episodes(digest, instruction, global_bytes)
        vector = calibration_vector(episodes, normality_shots(self.meta.shots))
        if secagg is not None:
            return self._mask(vector, secagg)
        return CalibrationReply(self.site, np.asarray(vector, dtype=np.float64))

    def calibration_rules(
        self,
        digest: str,
        instruction: RoundInstruction,
        total: np.ndarray,
        secagg: SecAggContext | None = None,
        global_bytes: bytes | None = None,
    ) -> CalibrationReply | MaskedReply:
        """Given ``total``, the sum of every site's ``calibration_episodes`` (this one's included), the pinball
        losses of this site's categories under every candidate rule, each on the prior of the others
        (``summaries.rule_loss_vector``), for the episodes of the model of sha256 ``digest`` (made again
        from ``global_bytes`` where given and the site no longer holds them), in the clear or masked;
        refused under DP."""
        if instruction.dp:
            raise ConfigError(f"site {self.site!r}: under DP the calibration episodes stay home")
        episodes = self._calibration_episodes(digest, instruction, global_bytes)
        vector = rule_loss_vector(episodes, np.asarray(total, dtype=np.float64), normality_shots(self.meta.shots))
        if secagg is not None:
            return self._mask(vector, secagg)
        return CalibrationReply(self.site, vector)

    def ping(self) -> str:
        return self.site

    def check(self) -> str:
        """That this site's shard is there, on its node, without reading it (a missing one raises DataError)."""
        self._check_shard()
        return self.site

    def node(self) -> dict:
        """Where this site runs: the Ray node id (None outside Ray) and the host name."""
        return {"site": self.site, "node": _node_id(), "host": socket.gethostname()}


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class PooledFactorySite:
    """A worker of pooled mode: plays one virtual site per call, for many virtual sites.

    ``call(site, shard_path, state, method, *args)`` runs ``FactorySite.method`` as virtual site ``site``;
    the worker keeps only the site it played last (its task banks are rebuilt from the shard when a
    different site comes), and shares one backbone between them. Whatever a virtual site must keep
    between its calls comes with the call in ``state`` (the session and private key of its
    secure-aggregation master secret and the stages it has spent): the round's seeds are derived from
    (run seed, site, round, attempt), and the model is loaded from the broadcast global vector
    at every call, so nothing else carries over.
    """

    def __init__(self, settings: SiteSettings | None = None):
        torch.set_num_threads(1)
        self.settings = SiteSettings() if settings is None else settings
        self.extractor: PatchFeatureExtractor | None = None
        self.current: FactorySite | None = None
        self.switches = 0

    def call(self, site: str, shard_path: str, state: Mapping[str, Any], method: str, *args) -> Any:
        if method not in POOLED_METHODS:
            raise ConfigError(f"pooled mode: {method!r} is not a Factory exchange ({', '.join(POOLED_METHODS)})")
        if self.current is None or (self.current.site, self.current.shard_path) != (site, str(shard_path)):
            self.current = None  # release the last site's banks before building the next site's
            if self.extractor is None:
                self.extractor = build_backbone(self.settings.backbone, device=self.settings.device)
            self.current = FactorySite(site, shard_path, self.settings, extractor=self.extractor)
            self.switches += 1
        if state.get("master") is not None:
            self.current.use_secrets(state["master"], set(state.get("spent", ())))
        return getattr(self.current, method)(*args)

    def stats(self) -> dict:
        """Sites switched to so far, node, and this process's peak resident memory in bytes (Linux; else None)."""
        return {"switches": self.switches, "node": _node_id(), "peak_rss": peak_rss()}


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes (``VmHWM``), or None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


POOLED_METHODS = (
    "describe",
    "feature_statistics",
    "secagg_advertise",
    "secagg_share",
    "secagg_unmask",
    "local_update",
    "validate",
    "calibration_episodes",
    "calibration_rules",
    "shard_bytes",
    "ping",
    "node",
    "check",
)


def _actor_options(settings: SiteSettings, num_cpus: float, max_restarts: int, pin: str | None) -> dict:
    resources = ray.cluster_resources()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": 0}
    if pin is not None and resources.get(pin, 0) > 0:
        options["resources"] = {pin: 0.001}
    if resources.get("GPU", 0) > 0 and settings.device != "cpu":
        options["num_gpus"] = float(settings.gpu_fraction)
    return options


def make_factory(
    site: str, shard_path: str, settings: SiteSettings | None = None, num_cpus: float = 0.25, max_restarts: int = 3
) -> Any:
    """A ``Factory`` actor for ``site``: pinned to its node when the cluster has a ``factory:<site>`` resource,
    with a GPU fraction when the cluster has GPUs (and ``settings`` then asks for cuda)."""
    settings = SiteSettings() if settings is None else settings
    options = _actor_options(settings, num_cpus, max_restarts, f"factory:{site}")
    return Factory.options(**options).remote(site, shard_path, settings)


class VirtualSite:
    """A handle on a virtual site of pooled mode, used like a Factory actor handle (``h.describe.remote()``).

    It holds the site's state between calls (its shard path, its secure-aggregation master secret and
    the protocol stages it has spent, each once per instance) and sends each call to the pool. The
    secret lives here, with the simulation's driver, rather than in a process of the site's own:
    pooled mode simulates sites; a real site is a ``Factory`` actor.
    """

    def __init__(self, pool: "FactoryPool", site: str, shard_path: str):
        self.pool, self.site, self.shard_path = pool, site, str(shard_path)
        self.state: dict[str, Any] = {"master": os.urandom(32), "spent": set()}

    def __getattr__(self, method: str) -> "_PooledCall":
        if method not in POOLED_METHODS:
            raise AttributeError(method)
        return _PooledCall(self, method)


class _PooledCall:
    def __init__(self, site: VirtualSite, method: str):
        self.site, self.method = site, method

    def remote(self, *args):
        return self.site.pool.submit(self.site, self.method, args)


class FactoryPool:
    """``size`` PooledFactory actors that play any number of virtual sites, the calls dealt round-robin."""

    def __init__(self, size: int, settings: SiteSettings | None = None, num_cpus: float = 0.25, max_restarts: int = 3):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"--pool-size must be a whole number of at least 1, got {size!r}")
        settings = SiteSettings() if settings is None else settings
        options = _actor_options(settings, num_cpus, max_restarts, None)
        self.actors: list[Any] = [PooledFactory.options(**options).remote(settings) for _ in range(size)]
        self._next = 0

    def site(self, site: str, shard_path: str) -> VirtualSite:
        return VirtualSite(self, site, shard_path)

    def submit(self, site: VirtualSite, method: str, args: tuple):
        state = {"master": site.state["master"], "spent": set(site.state["spent"])}
        stage = _stage_spent(method, args)
        if stage is not None:  # as a Factory does: each stage once per instance, refused before it is sent
            if stage in site.state["spent"]:
                raise DataError(
                    f"secure aggregation: site {site.site!r} already did {stage[1]!r} for instance {stage[0]}"
                )
            site.state["spent"].add(stage)
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.call.remote(site.site, site.shard_path, state, method, *args)

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def _stage_spent(method: str, args: tuple) -> tuple[str, str] | None:
    """The (instance, stage) a pooled call spends, if any."""
    if method == "secagg_unmask":
        return (args[0], "unmask")
    secagg = {
        "local_update": 3,
        "validate": 2,
        "calibration_episodes": 2,
        "calibration_rules": 3,
        "feature_statistics": 1,
    }.get(method)
    if secagg is not None and len(args) > secagg and args[secagg] is not None:
        return (args[secagg].instance, "mask")
    return None


Factory = ray.remote(FactorySite)
PooledFactory = ray.remote(PooledFactorySite)
