"""The review queue on disk: least certain first, labels kept as the site's data, bounded, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from bayprano.platform.errors import ConfigError, DataError
from bayprano.serve.registry import Registry
from bayprano.serve.review import ReviewQueue


@pytest.fixture
def queue(tmp_path):
    registry, _ = Registry.init(tmp_path / "reg")
    registry.add_site("line-1")
    registry.add_site("line-2")
    return ReviewQueue(registry.root, max_pending=3)


def _result(u: float) -> dict:
    return {
        "score": 2.0,
        "p_value": 0.04,
        "threshold": 2.1,
        "decision": "review",
        "uncertainty": u,
        "model_version": "v0001",
    }


def test_items_come_least_certain_first_and_labels_stay_with_the_site(queue):
    image = np.full((8, 8, 3), 7, dtype=np.uint8)
    ids = {u: queue.add("line-1", image, _result(u)) for u in (0.2, 0.9, 0.5)}
    assert [i["uncertainty"] for i in queue.list("line-1")] == [0.9, 0.5, 0.2]
    assert queue.list("line-2") == []
    item = queue.label("line-1", ids[0.9], "defective")
    assert item["label"] == "defective" and item["labelled"]
    assert [i["uncertainty"] for i in queue.list("line-1")] == [0.5, 0.2]
    assert [i["id"] for i in queue.labelled("line-1")] == [ids[0.9]]
    assert queue.image_png("line-1", ids[0.5]).startswith(b"\x89PNG")
    from PIL import Image
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(queue.image_png("line-1", ids[0.5])))), image)


def test_the_pending_queue_is_bounded_and_labelled_items_are_never_dropped(queue):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    first = queue.add("line-1", image, _result(0.1))
    queue.label("line-1", first, "good")
    pending = [queue.add("line-1", image, _result(0.1 * k)) for k in range(5)]
    left = {i["id"] for i in queue.list("line-1", limit=100)}
    assert len(left) == 3 and left <= set(pending)
    assert [i["id"] for i in queue.labelled("line-1")] == [first]


def test_bad_input_is_named(queue):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    item = queue.add("line-1", image, _result(0.3))
    with pytest.raises(ConfigError, match="label must be one of good, defective, got 'maybe'"):
        queue.label("line-1", item, "maybe")
    with pytest.raises(DataError, match="unknown site 'nope'"):
        queue.add("nope", image, _result(0.3))
    with pytest.raises(ConfigError, match="not valid"):
        queue.label("line-1", "../../etc", "good")
    with pytest.raises(DataError, match="no review item"):
        queue.label("line-2", item, "good")


def test_the_store_is_capped_oldest_labelled_first_and_images_are_downscaled(tmp_path):
    import io

    from PIL import Image

    registry, _ = Registry.init(tmp_path / "reg")
    registry.add_site("line-1")
    queue = ReviewQueue(registry.root, max_pending=10, max_items=4, image_side=32)
    image = np.zeros((200, 100, 3), dtype=np.uint8)
    labelled = []
    for _ in range(3):
        labelled.append(queue.add("line-1", image, _result(0.5)))
        queue.label("line-1", labelled[-1], "good")
    pending = [queue.add("line-1", image, _result(0.5)) for _ in range(3)]
    # 6 items, cap 4: the two oldest labelled ones go first
    assert [i["id"] for i in queue.labelled("line-1")] == labelled[2:]
    assert {i["id"] for i in queue.list("line-1", limit=100)} == set(pending)
    more = [queue.add("line-1", image, _result(0.5)) for _ in range(2)]
    assert queue.labelled("line-1") == []  # then the last labelled one, then the oldest pending
    assert [i["id"] for i in sorted(queue.list("line-1", limit=100), key=lambda i: i["added_ns"])] == (pending + more)[
        1:
    ]
    stored = Image.open(io.BytesIO(queue.image_png("line-1", more[-1])))
    assert stored.size == (16, 32)  # the longest side downscaled to 32, the aspect ratio kept
