"""One factory (site) of the federation: a Ray actor that holds its private shard and trains on it.

``FactorySite`` is the plain class (usable without Ray); ``Factory`` is it as a Ray actor, made with
``make_factory``. At its first exchange a site checks that its Parquet shard exists (a path local to its
node: a missing one is reported naming the site, the path and the host), reads it, keeps the
``train/good`` rows only, holds a few of them back for validation, and builds one task bank per category
(backbone features of its normals and of synthetic anomalies made from them). Images and per-image
features never leave it. What it sends out:

- ``describe()``: its categories, the backbone's name and fingerprint, the feature width, the sums
  of its normal features (per channel: sum, sum of squares, count) from which the Coordinator sets the
  shared feature standardisation, and the Ray node and host it runs on;
- ``public_key()``: its X25519 public key for secure aggregation (the key pair lives in this process
  and is made afresh when the actor restarts);
- ``local_update(...)``: the clipped parameter delta of E local Proto-MAML episodes, either masked
  (secure aggregation: fixed-point uint64 values that only cancel in the sum) or encoded as bytes, with
  its weight, the episode count, scalar metrics and the bytes moved;
- ``validate(...)``: image AUROC on its held-out normals and synthetic anomalies made from them, and its
  calibration sufficient statistics (a Gamma shape and rate, which add up across sites);
- ``shard_bytes()``: how many bytes of images (encoded, as stored; masks not counted) its shard holds, to
  compare with what federation moves.

Pooled mode simulates many virtual sites over a bounded pool of actors: ``FactoryPool`` holds
``PooledFactory`` actors, each playing one virtual site per call, and hands out ``VirtualSite`` handles
that are used like Factory handles and keep each virtual site's state between its calls.
"""

from __future__ import annotations

import math
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bayprano.platform.data.anomalies import TRAINING_KINDS, VALIDATION_KINDS, AnomalyInjector
from bayprano.platform.data.shards import ShardReader
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.data.imageio import resize_square
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
    feature_sums,
    normal_log_statistics,
)
from bayprano.platform.methods.validation import model_checkpoint, model_context, validation_aurocs
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import NormalityPrior

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

    def __init__(self, site: str, shard_path: str, settings: Mapping[str, Any] | None = None,
                 extractor: PatchFeatureExtractor | None = None):
        torch.set_num_threads(1)
        self.site = site
        self.settings = {**DEFAULT_SITE_SETTINGS, **dict(settings or {})}
        self.meta = MetaConfig(**{**self.settings["meta"], "seed": int(self.settings["seed"])}).validate()
        self.shard_path = str(shard_path)
        self.extractor = extractor
        self.banks: dict[str, TaskBank] = {}
        self.val_banks: dict[str, TaskBank] = {}
        self._loaded = False
        self.secagg = SecAggSite(site)
        self._session: str | None = None

    def _check_shard(self) -> None:
        if not Path(self.shard_path).is_file():
            raise DataError(f"site {self.site!r}: shard {self.shard_path} does not exist on its node "
                            f"({socket.gethostname()})")

    def _load(self) -> None:
        """Read the shard and build the task banks, once (at the first exchange that needs them)."""
        if self._loaded:
            return
        s = self.settings
        self._check_shard()
        if self.extractor is None:
            self.extractor = build_backbone(s["backbone"], device=s["device"])
        images = self._read_normals()
        rng = np.random.default_rng([int(s["seed"]), *self.site.encode()])
        holdout = int(s["holdout"])
        need = self.meta.shots + max(self.meta.n_query_normal, self.meta.n_query_anomalous)
        injector, val_injector = AnomalyInjector(TRAINING_KINDS), AnomalyInjector(VALIDATION_KINDS)
        for c, (ims, ids) in sorted(images.items()):
            order = rng.permutation(len(ims))
            train, held = order[holdout:], order[:holdout]
            if len(train) < need:
                raise DataError(f"{self.shard_path}: category {c!r} has {len(ims)} train/good images; {holdout} held "
                                f"out for validation leaves {len(train)}, an episode needs {need}")
            self.banks[c] = build_task_bank(c, ims[train], [ids[i] for i in train], self._extract, injector,
                                            seed=int(s["seed"]))
            if holdout >= 2:
                self.val_banks[c] = build_task_bank(c, ims[held], [ids[i] for i in held], self._extract, val_injector,
                                                    seed=int(s["seed"]) + 1)
        self.model = BayesianPatchModel(self.extractor.out_channels, int(s["dim"]), seed=int(s["seed"]))
        self.layout = ParameterLayout.from_model(self.model)
        self._loaded = True

    # ------------------------------------------------------------------------------------ data

    def _extract(self, images: np.ndarray) -> torch.Tensor:
        return self.extractor.extract(images, size=int(self.settings["image_size"])).cpu()

    def _read_normals(self) -> dict[str, tuple[np.ndarray, list[str]]]:
        size = int(self.settings["image_size"])
        grouped: dict[str, list] = defaultdict(list)
        with ShardReader(self.shard_path) as reader:
            for row in reader.iter_rows(split="train"):
                if row.label == 0:
                    grouped[row.category].append((row.source_path, resize_square(row.image, size)))
        if not grouped:
            raise DataError(f"{self.shard_path}: no train/good rows, nothing to train on")
        return {c: (np.stack([im for _, im in rows]), [p for p, _ in rows]) for c, rows in grouped.items()}

    # ------------------------------------------------------------------------------- exchanges

    def describe(self) -> dict:
        self._load()
        total, total_sq, count = feature_sums(self.banks, torch.float64)
        return {
            "site": self.site, "categories": sorted(self.banks), "in_channels": self.extractor.out_channels,
            "backbone": self.extractor.name, "fingerprint": self.extractor.fingerprint(),
            "image_size": int(self.settings["image_size"]), "layout": self.layout.digest,
            "normals": sum(len(b) for b in self.banks.values()),
            "feature_sum": total.tolist(), "feature_sum_sq": total_sq.tolist(), "feature_count": count,
            "node": _node_id(), "host": socket.gethostname(),
        }

    def public_key(self, session: str | None = None) -> bytes:
        """The public key for a Coordinator session; a new session gets a new key pair, so that a round
        redone after a restart of the Coordinator is masked afresh rather than refused."""
        if session != self._session:
            self.secagg, self._session = SecAggSite(self.site), session
        return self.secagg.public_key_bytes()

    def use_key(self, session: str | None, private_key: bytes) -> None:
        """Take the key pair of ``session`` from outside (pooled mode: a virtual site's state is kept by the
        pool between its calls, since the actor that plays it changes)."""
        if session != self._session or self.secagg is None:
            self.secagg, self._session = SecAggSite(self.site, private_key), session

    def shard_bytes(self) -> int:
        self._check_shard()
        with ShardReader(self.shard_path) as reader:
            total = 0
            for batch in reader.iter_batches(columns=["image"]):
                total += sum(len(v) for v in batch.column("image").to_pylist() if v is not None)
        return total

    def _load_global(self, global_bytes: bytes, settings: Mapping[str, Any]) -> torch.Tensor:
        self._load()
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

    def _auroc(self, inner_steps: int) -> float:
        return self._method_aurocs(inner_steps, ("bayes",))["bayes"]

    def _method_aurocs(self, inner_steps: int, methods) -> dict[str, float]:
        """Image AUROC per registered method on the held-out normals and synthetic anomalies."""
        rng = np.random.default_rng(int(self.settings["seed"]) + 17)
        tasks = []
        for c, val in self.val_banks.items():
            bank = self.banks[c]
            support = bank.normals[rng.permutation(len(bank))[: self.meta.shots]].float()
            query = torch.cat([val.normals, val.anomalies]).float()
            tasks.append((support, query, np.array([0] * len(val) + [1] * val.anomalies.shape[0])))
        if not tasks:
            return {m: math.nan for m in methods}
        ckpt = model_checkpoint(self.model, self.extractor.name, self.extractor.fingerprint(),
                                int(self.settings["image_size"]), tuple(tasks[0][0].shape[-2:]), inner_steps,
                                inner_positions=0)
        return validation_aurocs(model_context(ckpt, inner_steps), tasks, methods)

    def validate(self, global_bytes: bytes, settings: Mapping[str, Any]) -> dict:
        self._load_global(global_bytes, settings)
        self.model.eval()
        methods = tuple(dict.fromkeys(("bayes", *self.settings.get("validation_methods", ()))))
        aurocs = self._method_aurocs(self.meta.inner_steps, methods)
        auroc = aurocs["bayes"]
        cal = calibrate(self.model, self.banks, self.meta)
        normality = NormalityPrior.summarize(normal_log_statistics(self.model, self.banks, self.meta))
        reply = {"site": self.site, "auroc": auroc, "calibration_shape": float(cal.shape),
                 "calibration_rate": float(cal.rate), "normality": normality, "bytes_received": len(global_bytes)}
        if len(methods) > 1:  # the settings' validation_methods, beside bayes
            reply["method_aurocs"] = aurocs
        return reply

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
    secure-aggregation key pair): the round's seeds are derived from (run seed, site, round), and the
    model is loaded from the broadcast global vector at every call, so nothing else carries over.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None):
        torch.set_num_threads(1)
        self.settings = {**DEFAULT_SITE_SETTINGS, **dict(settings or {})}
        self.extractor: PatchFeatureExtractor | None = None
        self.current: FactorySite | None = None
        self.switches = 0

    def call(self, site: str, shard_path: str, state: Mapping[str, Any], method: str, *args) -> Any:
        if method not in POOLED_METHODS:
            raise ConfigError(f"pooled mode: {method!r} is not a Factory exchange ({', '.join(POOLED_METHODS)})")
        if self.current is None or (self.current.site, self.current.shard_path) != (site, str(shard_path)):
            self.current = None  # release the last site's banks before building the next site's
            if self.extractor is None:
                self.extractor = build_backbone(self.settings["backbone"], device=self.settings["device"])
            self.current = FactorySite(site, shard_path, self.settings, extractor=self.extractor)
            self.switches += 1
        if state.get("private_key") is not None:
            self.current.use_key(state.get("session"), state["private_key"])
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


POOLED_METHODS = ("describe", "public_key", "local_update", "validate", "shard_bytes", "ping", "node", "check")


def _actor_options(settings: Mapping[str, Any], num_cpus: float, max_restarts: int, pin: str | None) -> dict:
    resources = ray.cluster_resources()
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": max_restarts, "max_task_retries": 0}
    if pin is not None and resources.get(pin, 0) > 0:
        options["resources"] = {pin: 0.001}
    if resources.get("GPU", 0) > 0 and settings.get("device", "cpu") != "cpu":
        options["num_gpus"] = float(settings.get("gpu_fraction", 0.1))
    return options


def make_factory(site: str, shard_path: str, settings: Mapping[str, Any] | None = None, num_cpus: float = 0.25,
                 max_restarts: int = 3):
    """A ``Factory`` actor for ``site``: pinned to its node when the cluster has a ``factory:<site>`` resource,
    with a GPU fraction when the cluster has GPUs (and ``settings`` then asks for cuda)."""
    settings = dict(settings or {})
    options = _actor_options(settings, num_cpus, max_restarts, f"factory:{site}")
    return Factory.options(**options).remote(site, shard_path, {k: v for k, v in settings.items() if k != "gpu_fraction"})


class VirtualSite:
    """A handle on a virtual site of pooled mode, used like a Factory actor handle (``h.describe.remote()``).

    It holds the site's state between calls (its shard path and secure-aggregation key pair) and sends
    each call to the pool. The key pair lives here, with the simulation's driver, rather than in a
    process of the site's own: pooled mode simulates sites; a real site is a ``Factory`` actor.
    """

    def __init__(self, pool: "FactoryPool", site: str, shard_path: str):
        self.pool, self.site, self.shard_path = pool, site, str(shard_path)
        self.state: dict[str, Any] = {"session": None, "private_key": None}

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

    def __init__(self, size: int, settings: Mapping[str, Any] | None = None, num_cpus: float = 0.25,
                 max_restarts: int = 3):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"--pool-size must be a whole number of at least 1, got {size!r}")
        settings = dict(settings or {})
        options = _actor_options(settings, num_cpus, max_restarts, None)
        clean = {k: v for k, v in settings.items() if k != "gpu_fraction"}
        self.actors = [PooledFactory.options(**options).remote(clean) for _ in range(size)]
        self._next = 0

    def site(self, site: str, shard_path: str) -> VirtualSite:
        return VirtualSite(self, site, shard_path)

    def submit(self, site: VirtualSite, method: str, args: tuple):
        if method == "public_key":
            session = args[0] if args else None
            if site.state["private_key"] is None or site.state["session"] != session:
                site.state = {"session": session, "private_key": X25519PrivateKey.generate().private_bytes_raw()}
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.call.remote(site.site, site.shard_path, dict(site.state), method, *args)

    def stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors])

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


Factory = ray.remote(FactorySite)
PooledFactory = ray.remote(PooledFactorySite)
