"""The review queue: images a site's model sent to ``review``, kept in the registry for an inspector to label.

Layout under the registry root, beside the site's versions::

    sites/<site>/reviews/<id>/image.png    the image as it was scored, downscaled to ``image_side`` at most
    sites/<site>/reviews/<id>/item.json    score, p-value, threshold, uncertainty, model version, created,
                                           and once an inspector has looked: label (good | defective), labelled

Items are listed with the least certain first: that is the order in which an inspector's time helps
most. Labelled items stay in the site's folder as labelled data of that site; nothing here sends them
anywhere. The store is bounded per site: at most ``max_pending`` unlabelled items (the oldest pending
item is dropped first) and at most ``max_items`` items in all (the oldest labelled items are dropped
first, then the oldest pending ones). Each item is written in a staging folder and renamed into place;
a label is written atomically. Nothing here imports Ray.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write_json

LABELS = ("good", "defective")
ITEM_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")
MAX_PENDING = 200
MAX_ITEMS = 1000
IMAGE_SIDE = 512
RESULT_KEYS = ("score", "p_value", "threshold", "decision", "uncertainty", "model_version")
Items = list[dict]  # inside ReviewQueue, ``list`` is its method


def _age(item: dict) -> tuple:
    return item.get("added_ns", 0), item["id"]


class ReviewQueue:
    """Review items of every site under a registry root (``sites/<site>/reviews``)."""

    def __init__(
        self,
        registry_root: str | os.PathLike,
        max_pending: int = MAX_PENDING,
        max_items: int = MAX_ITEMS,
        image_side: int = IMAGE_SIDE,
    ):
        self.root = Path(registry_root)
        self.max_items = int(max_items)
        self.max_pending = min(int(max_pending), self.max_items)
        self.image_side = int(image_side)

    def _dir(self, site: str) -> Path:
        site_dir = self.root / "sites" / site
        if not (site_dir / "site.json").is_file():
            raise DataError(f"unknown site {site!r}")
        return site_dir / "reviews"

    def _item_dir(self, site: str, item_id: str) -> Path:
        if not isinstance(item_id, str) or not ITEM_ID.match(item_id):
            raise ConfigError(f"review item id {item_id[:40]!r} is not valid")
        path = self._dir(site) / item_id
        if not (path / "item.json").is_file():
            raise DataError(f"site {site!r} has no review item {item_id!r}")
        return path

    def add(self, site: str, image: np.ndarray, result: dict) -> str:
        """Queue one scored image (uint8 RGB) with its result; returns the item id."""
        from PIL import Image

        reviews = self._dir(site)
        reviews.mkdir(parents=True, exist_ok=True)
        now = datetime.now(timezone.utc)
        item_id = f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"
        item = {
            "id": item_id,
            "site": site,
            "created": now.isoformat(timespec="seconds"),
            "added_ns": time.time_ns(),
            **{k: result.get(k) for k in RESULT_KEYS},
            "label": None,
            "labelled": None,
        }
        staging = Path(tempfile.mkdtemp(prefix=f".{item_id}.", dir=reviews))
        try:
            buf = io.BytesIO()
            picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
            picture.thumbnail((self.image_side, self.image_side))  # keeps the aspect ratio; never enlarges
            picture.save(buf, format="PNG")
            (staging / "image.png").write_bytes(buf.getvalue())
            (staging / "item.json").write_text(json.dumps(item, indent=2) + "\n")
            os.rename(staging, reviews / item_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._trim(site)
        return item_id

    def _items(self, site: str) -> list[dict]:
        reviews = self._dir(site)
        if not reviews.is_dir():
            return []
        items = []
        for path in reviews.iterdir():
            if ITEM_ID.match(path.name) and (path / "item.json").is_file():
                try:
                    items.append(json.loads((path / "item.json").read_text()))
                except (OSError, ValueError):
                    continue  # an item being removed by a concurrent trim
        return items

    def _trim(self, site: str) -> None:
        items = self._items(site)
        pending = sorted((i for i in items if i["label"] is None), key=_age)
        labelled = sorted((i for i in items if i["label"] is not None), key=_age)
        drop = pending[: max(0, len(pending) - self.max_pending)]
        pending = pending[len(drop) :]
        excess = max(0, len(pending) + len(labelled) - self.max_items)
        drop += (labelled + pending)[:excess]
        for item in drop:
            shutil.rmtree(self._dir(site) / item["id"], ignore_errors=True)

    def list(self, site: str, pending: bool = True, limit: int = 50) -> list[dict]:
        """Items of ``site``, least certain first (then newest); only unlabelled ones with ``pending``."""
        items = [i for i in self._items(site) if not pending or i["label"] is None]
        items.sort(key=lambda i: (-(i.get("uncertainty") or 0.0), i["id"]))
        return items[: max(0, int(limit))]

    def pending_count(self, site: str) -> int:
        """How many of the site's items wait for a label."""
        return sum(1 for i in self._items(site) if i["label"] is None)

    def label(self, site: str, item_id: str, label: str) -> dict:
        if label not in LABELS:
            raise ConfigError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        path = self._item_dir(site, item_id)
        item = json.loads((path / "item.json").read_text())
        item.update(label=label, labelled=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        atomic_write_json(path / "item.json", item)
        return item

    def image_png(self, site: str, item_id: str) -> bytes:
        return (self._item_dir(site, item_id) / "image.png").read_bytes()

    def thumbnail_png(self, site: str, item_id: str, size: int = 160) -> bytes:
        from PIL import Image

        with Image.open(self._item_dir(site, item_id) / "image.png") as im:
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return buf.getvalue()

    def labelled(self, site: str) -> Items:
        """The site's labelled data: every item an inspector marked good or defective."""
        return sorted((i for i in self._items(site) if i["label"] is not None), key=_age)
