"""Episode sampler for Proto-MAML meta-training: one product category per episode, normal images only.

An episode holds K normal support images and a query set of held-out normals plus synthetic anomalies
made from further normals (see ``anomalies``), all from one category's train/good images. Test images
never enter: the sampler refuses any sample that is not train/good when it is built. Support, query
normals and anomaly bases are distinct images; a generator seed fixes every draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from bayprano.platform.data.anomalies import AnomalyInjector
from bayprano.platform.data.imageio import load_image
from bayprano.platform.data.mvtec import GOOD, Sample
from bayprano.platform.errors import ConfigError, DataError

ANOMALY_SUFFIX = "#anomaly"
MIN_IMAGE_SIZE = 32


@dataclass
class Episode:
    """One meta-learning task. Query order: the normal queries first, then the anomalous ones."""

    category: str
    support: np.ndarray  # (K, H, W, 3) uint8, normal images
    query: np.ndarray  # (Q, H, W, 3) uint8
    query_masks: np.ndarray  # (Q, H, W) bool, all False for normal queries
    query_labels: np.ndarray  # (Q,) int64, 1 = synthetic anomaly
    support_ids: list[str]  # sample paths
    query_ids: list[str]  # sample paths, with ANOMALY_SUFFIX for anomalous queries

    @property
    def shots(self) -> int:
        return int(self.support.shape[0])


def _load_default(sample: Sample) -> np.ndarray:
    return load_image(sample.path)


def _count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer of at least {minimum}")
    return int(value)


class EpisodeSampler:
    """Draws episodes from the train/good images of several categories.

    ``samples_by_category`` maps a category to its samples; every one must be a train/good sample of
    that category (``DataError`` names the first that is not). ``shots`` support images and
    ``n_query_normal`` + ``n_query_anomalous`` query images are drawn without overlap, so each category
    needs at least that many images (``ConfigError`` otherwise, checked here, not at the first episode).
    ``injector`` makes the anomalies (default: every kind, equal odds) and receives as ``source``
    another normal image of the category that is not in the support and not the image being altered.
    ``load`` reads a sample (default: its file); ``image_size`` resizes every image to a square of that
    side (bilinear) before anomalies are injected, so masks are made at the final size; with
    ``cache`` decoded (and resized) images are kept in memory.
    """

    def __init__(
        self,
        samples_by_category: Mapping[str, Sequence[Sample]],
        shots: int,
        n_query_normal: int,
        n_query_anomalous: int,
        injector: AnomalyInjector | Callable[..., tuple[np.ndarray, np.ndarray]] | None = None,
        image_size: int | None = None,
        load: Callable[[Sample], np.ndarray] | None = None,
        cache: bool = True,
    ) -> None:
        self.shots = _count("shots", shots, 1)
        self.n_query_normal = _count("n_query_normal", n_query_normal, 0)
        self.n_query_anomalous = _count("n_query_anomalous", n_query_anomalous, 0)
        n_query = self.n_query_normal + self.n_query_anomalous
        if n_query < 1:
            raise ConfigError("n_query_normal=0 and n_query_anomalous=0: an episode needs a query image")
        if image_size is not None:
            image_size = _count("image_size", image_size, MIN_IMAGE_SIZE)
        if not samples_by_category:
            raise ConfigError("samples_by_category: no categories given")

        needed = self.shots + n_query
        pools: dict[str, tuple[Sample, ...]] = {}
        for category in sorted(samples_by_category):
            samples = tuple(samples_by_category[category])
            seen: set[str] = set()
            for s in samples:
                if s.split != "train" or s.defect_type != GOOD:
                    raise DataError(
                        f"{s.path}: a {s.split}/{s.defect_type} image, episodes draw only from train/good images"
                    )
                if s.category != category:
                    raise DataError(f"{s.path}: a sample of category {s.category!r} listed under {category!r}")
                if s.path in seen:
                    raise DataError(f"{s.path}: listed twice in category {category!r}")
                seen.add(s.path)
            if len(samples) < needed:
                raise ConfigError(
                    f"shots={self.shots} plus {n_query} query images needs {needed} normal train images, "
                    f"category {category!r} has {len(samples)}"
                )
            pools[category] = samples

        self.categories: tuple[str, ...] = tuple(pools)
        self._pools = pools
        self.injector = injector if injector is not None else AnomalyInjector()
        self.image_size = image_size
        self._load = load if load is not None else _load_default
        self.cache = bool(cache)
        self._cache: dict[str, np.ndarray] = {}

    def image(self, sample: Sample) -> np.ndarray:
        """The sample's image as used in episodes: loaded, checked, resized; read-only when cached."""
        cached = self._cache.get(sample.path)
        if cached is not None:
            return cached
        image = self._load(sample)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DataError(f"{sample.path}: loader returned {got}, expected a uint8 array of shape (H, W, 3)")
        if self.image_size is not None and image.shape[:2] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
        elif self.cache:
            image = image.copy()  # the loader may hand out an array it still owns
        if self.cache:
            image.setflags(write=False)
            self._cache[sample.path] = image
        return image

    def _stack(self, category: str, samples: Sequence[Sample], images: Sequence[np.ndarray]) -> np.ndarray:
        first = images[0].shape
        for s, img in zip(samples, images):
            if img.shape != first:
                raise DataError(
                    f"{s.path}: image size {img.shape[1]}x{img.shape[0]} differs from {samples[0].path} "
                    f"({first[1]}x{first[0]}) in category {category!r}; set image_size to resize them"
                )
        return np.stack(images)

    def sample(self, rng: np.random.Generator, category: str | None = None) -> Episode:
        """One episode, from ``category`` or from a category drawn uniformly."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
        if category is None:
            category = self.categories[int(rng.integers(len(self.categories)))]
        elif category not in self._pools:
            raise ConfigError(f"category {category!r}: not in this sampler (available: {', '.join(self.categories)})")
        pool = self._pools[category]
        order = rng.permutation(len(pool))
        k, qn, qa = self.shots, self.n_query_normal, self.n_query_anomalous
        support = [pool[i] for i in order[:k]]
        normals = [pool[i] for i in order[k : k + qn]]
        bases = [pool[i] for i in order[k + qn : k + qn + qa]]
        spare = [pool[i] for i in order[k + qn + qa :]]

        support_images = [self.image(s) for s in support]
        query_samples = normals + bases
        query_images = [self.image(s) for s in normals]
        masks = [np.zeros(img.shape[:2], dtype=bool) for img in query_images]
        for base in bases:
            # A source from the images this episode leaves unused, when there are any, shares nothing
            # with the query; otherwise another query image will do. Never a support image.
            candidates = spare if spare else [s for s in query_samples if s.path != base.path]
            source = self.image(candidates[int(rng.integers(len(candidates)))]) if candidates else None
            image = self.image(base)
            try:
                altered, mask = self.injector(image, rng, source=source)
            except DataError as exc:
                raise DataError(f"{base.path}: {exc}") from None
            if altered.shape != image.shape or mask.shape != image.shape[:2] or mask.dtype != bool or not mask.any():
                raise DataError(
                    f"{base.path}: the injector returned image {altered.shape} and mask {mask.dtype} {mask.shape} "
                    f"for image {image.shape}; expected the same image shape and a non-empty bool mask"
                )
            query_images.append(altered)
            masks.append(mask)

        images = self._stack(category, support + query_samples, support_images + query_images)
        return Episode(
            category=category,
            support=images[:k],
            query=images[k:],
            query_masks=np.stack(masks),
            query_labels=np.array([0] * qn + [1] * qa, dtype=np.int64),
            support_ids=[s.path for s in support],
            query_ids=[s.path for s in normals] + [s.path + ANOMALY_SUFFIX for s in bases],
        )

    def episodes(self, n: int, seed: int) -> Iterator[Episode]:
        """``n`` episodes from ``numpy.random.default_rng(seed)``: the same seed gives the same episodes."""
        n = _count("n", n, 0)
        rng = np.random.default_rng(seed)
        for _ in range(n):
            yield self.sample(rng)
