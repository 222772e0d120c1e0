"""One factory (site) of the federation: a Ray actor that holds its private shard and trains on it.

``FactorySite`` is the plain class (usable without Ray); ``Factory`` is it as a Ray actor, made with
``make_factory``. A site reads its own Parquet shard (a path local to its node), keeps the ``train/good``
rows only, holds a few of them back for validation, and builds one task bank per category (backbone
features of its normals and of synthetic anomalies made from them). Images and per-image features never
leave it. What it sends out:

- ``describe()``: its categories, the backbone's name and fingerprint, the feature width, and the sums
  of its normal features (per channel: sum, sum of squares, count) from which the Coordinator sets the
  shared feature standardisation;
- ``public_key()``: its X25519 public key for secure aggregation (the key pair lives in this process
  and is made afresh when the actor restarts);
- ``local_update(...)``: the clipped parameter delta of E local Proto-MAML episodes, either masked
  (secure aggregation: fixed-point uint64 values that only cancel in the sum) or encoded as bytes, with
  its weight, the episode count, scalar metrics and the bytes moved;
- ``validate(...)``: image AUROC on its held-out normals and synthetic anomalies made from them, and its
  calibration sufficient statistics (a Gamma shape and rate, which add up across sites);
- ``shard_bytes()``: how many image bytes its shard holds, to compare with what federation moves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping

import numpy as np
import ray
import torch

from bayprano.platform.data.anomalies import AnomalyInjector
from bayprano.platform.data.shards import ShardReader
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.evaluate import _resize
from bayprano.platform.federated.aggregation import pack_weighted
from bayprano.platform.federated.local import local_meta_update
from bayprano.platform.federated.privacy import clip_update
from bayprano.platform.federated.secagg import SecAggSite
from bayprano.platform.federated.state import ParameterLayout, decode_update, encode_update
from bayprano.platform.meta.protomaml import (
    MetaConfig,
    TaskBank,
    build_task_bank,
    calibrate,
    clone,
    normal_log_statistics,
)
from bayprano.platform.metrics import image_auroc
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import NormalityPrior, image_statistic

DEFAULT_SITE_SETTINGS = {
    "backbone": "efficientnet_lite2",
    "image_size": 256,
    "dim": 64,
    "seed": 0,
    "holdout": 4,  # train/good images per category kept back for validation
    "device": "cpu",
    "meta": {},  # MetaConfig fields
}


def _site_seed(seed: int, site: str, round: int) -> int:
    """A per (run, site, round) seed, the same under every attempt of the round."""
    return int(np.random.SeedSequence([seed, round, *site.encode()]).generate_state(1)[0] % (2**31))


class FactorySite:
    """A site's private data and its side of every federated exchange."""

    def __init__(self, site: str, shard_path: str, settings: Mapping[str, Any] | None = None):
        torch.set_num_threads(1)
        self.site = site
        self.settings = {**DEFAULT_SITE_SETTINGS, **dict(settings or {})}
        s = self.settings
        self.meta = MetaConfig(**{**s["meta"], "seed": int(s["seed"])}).validate()
        self.shard_path = str(shard_path)
        self.extractor = build_backbone(s["backbone"], device=s["device"])
        images = self._read_normals()
        rng = np.random.default_rng([int(s["seed"]), *site.encode()])
        holdout = int(s["holdout"])
        need = self.meta.shots + max(self.meta.n_query_normal, self.meta.n_query_anomalous)
        injector = AnomalyInjector()
        self.banks: dict[str, TaskBank] = {}
        self.val_banks: dict[str, TaskBank] = {}
        for c, (ims, ids) in sorted(images.items()):
            order = rng.permutation(len(ims))
            train, held = order[holdout:], order[:holdout]
            if len(train) < need:
                raise DataError(f"{self.shard_path}: category {c!r} has {len(ims)} train/good images; {holdout} held "
                                f"out for validation leaves {len(train)}, an episode needs {need}")
            self.banks[c] = build_task_bank(c, ims[train], [ids[i] for i in train], self._extract, injector,
                                            seed=int(s["seed"]))
            if holdout >= 2:
                self.val_banks[c] = build_task_bank(c, ims[held], [ids[i] for i in held], self._extract, injector,
                                                    seed=int(s["seed"]) + 1)
        self.model = BayesianPatchModel(self.extractor.out_channels, int(s["dim"]), seed=int(s["seed"]))
        self.layout = ParameterLayout.from_model(self.model)
        self.secagg = SecAggSite(site)
        self._session: str | None = None

    # ------------------------------------------------------------------------------------ data

    def _extract(self, images: np.ndarray) -> torch.Tensor:
        return self.extractor.extract(images, size=int(self.settings["image_size"])).cpu()

    def _read_normals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        size = int(self.settings["image_size"])
        grouped: dict[str, list] = defaultdict(list)
        with ShardReader(self.shard_path) as reader:
            for row in reader.iter_rows(split="train"):
                if row.label == 0:
                    grouped[row.category].append((row.source_path, _resize(row.image, size)))
        if not grouped:
            raise DataError(f"{self.shard_path}: no train/good rows, nothing to train on")
        return {c: (np.stack([im for _, im in rows]), [p for p, _ in rows]) for c, rows in grouped.items()}

    # ------------------------------------------------------------------------------- exchanges

    def describe(self) -> dict:
        total = torch.zeros(self.extractor.out_channels, dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        count = 0
        for bank in self.banks.values():
            x = bank.normals.double()
            total += x.sum((0, 2, 3))
            total_sq += (x**2).sum((0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        return {
            "site": self.site, "categories": sorted(self.banks), "in_channels": self.extractor.out_channels,
            "backbone": self.extractor.name, "fingerprint": self.extractor.fingerprint(),
            "image_size": int(self.settings["image_size"]), "layout": self.layout.digest,
            "normals": sum(len(b) for b in self.banks.values()),
            "feature_sum": total.tolist(), "feature_sum_sq": total_sq.tolist(), "feature_count": count,
        }

    def public_key(self, session: str | None = None) -> bytes:
        """The public key for a Coordinator session; a new session gets a new key pair, so that a round
        redone after a restart of the Coordinator is masked afresh rather than refused."""
        if session != self._session:
            self.secagg, self._session = SecAggSite(self.site), session
        return self.secagg.public_key_bytes()

    def shard_bytes(self) -> int:
        with ShardReader(self.shard_path) as reader:
            total = 0
            for batch in reader.iter_batches(columns=["image", "mask"]):
                for col in ("image", "mask"):
                    total += sum(len(v) for v in batch.column(col).to_pylist() if v is not None)
        return total

    def _load_global(self, global_bytes: bytes, settings: Mapping[str, Any]) -> torch.Tensor:
        mean = torch.tensor(settings["feature_mean"], dtype=torch.float32)
        std = torch.tensor(settings["feature_std"], dtype=torch.float32)
        self.model.set_feature_statistics(mean, std)
        vector = decode_update(global_bytes, self.layout)
        self.layout.load_into(self.model, vector)
        return vector

    def local_update(self, round: int, attempt: int, global_bytes: bytes, peers_public_keys: Mapping[str, bytes] | None,
                     settings: Mapping[str, Any]) -> dict:
        start = self._load_global(global_bytes, settings)
        steps = int(settings["local_steps"])
        delta, metrics = local_meta_update(self.model, self.banks, self.meta, steps, start, self.layout,
                                           fedprox_mu=float(settings.get("fedprox_mu", 0.0)),
                                           seed=_site_seed(int(self.settings["seed"]), self.site, int(round)))
        norm = float(delta.norm())
        clip = settings.get("clip")
        if clip is not None:
            delta, norm = clip_update(delta, float(clip))
        weight = float(metrics["episodes"]) if settings.get("weighted", True) else 1.0
        reply = {"site": self.site, "round": int(round), "attempt": int(attempt), "weight": weight,
                 "episodes": int(metrics["episodes"]),
                 "metrics": {"loss": float(metrics["loss"]), "delta_norm": norm,
                             "clipped_norm": float(delta.norm()), "seconds": float(metrics["seconds"])},
                 "bytes_received": len(global_bytes) + sum(len(k) for k in (peers_public_keys or {}).values())}
        if settings.get("secure_agg"):
            if not peers_public_keys:
                raise ConfigError(f"site {self.site!r}: secure aggregation needs the peers' public keys")
            if settings.get("session") != self._session:
                raise ConfigError(f"site {self.site!r}: no key pair for session {settings.get('session')!r} "
                                  "(it restarted since it published its key)")
            masked = self.secagg.mask(pack_weighted(delta, weight), int(round), dict(peers_public_keys), int(attempt))
            reply.update(update=masked, bytes_sent=masked.num_bytes)
        else:
            data = encode_update(delta, self.layout, fp16=bool(settings.get("fp16", False)))
            reply.update(update=data, bytes_sent=len(data))
        return reply

    @torch.no_grad()
    def _auroc(self, inner_steps: int) -> float:
        labels, scores = [], []
        rng = np.random.default_rng(int(self.settings["seed"]) + 17)
        for c, val in self.val_banks.items():
            bank = self.banks[c]
            support = bank.normals[rng.permutation(len(bank))[: self.meta.shots]].float()
            with torch.enable_grad():
                task = clone(self.model).adapt(support, inner_steps, True)
            proto = self.model.prototype(task.embed(support))
            query = torch.cat([val.normals, val.anomalies]).float()
            maha = proto.mahalanobis(task.embed(query))
            scores.extend(image_statistic(maha, self.model.dim).tolist())
            labels.extend([0] * len(val) + [1] * val.anomalies.shape[0])
        if not labels:
            return math.nan
        return float(image_auroc(np.array(labels), np.array(scores)))

    def validate(self, global_bytes: bytes, settings: Mapping[str, Any]) -> dict:
        self._load_global(global_bytes, settings)
        self.model.eval()
        auroc = self._auroc(self.meta.inner_steps)
        cal = calibrate(self.model, self.banks, self.meta)
        normality = NormalityPrior.summarize(normal_log_statistics(self.model, self.banks, self.meta))
        return {"site": self.site, "auroc": auroc, "calibration_shape": float(cal.shape),
                "calibration_rate": float(cal.rate), "normality": normality, "bytes_received": len(global_bytes)}

    def ping(self) -> str:
        return self.site


def make_factory(site: str, shard_path: str, settings: Mapping[str, Any] | None = None, num_cpus: float = 0.25,
                 max_restarts: int = 3):
    """A ``Factory`` actor for ``site``: pinned to its node when the cluster has a ``factory:<site>`` resource,
    with a GPU fraction when the cluster has GPUs (and ``settings`` then asks for cuda)."""
    resources = ray.cluster_resources()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": 0}
    pin = f"factory:{site}"
    if resources.get(pin, 0) > 0:
        options["resources"] = {pin: 0.001}
    settings = dict(settings or {})
    if resources.get("GPU", 0) > 0 and settings.get("device", "cpu") != "cpu":
        options["num_gpus"] = float(settings.get("gpu_fraction", 0.1))
    return Factory.options(**options).remote(site, shard_path, {k: v for k, v in settings.items() if k != "gpu_fraction"})


Factory = ray.remote(FactorySite)
