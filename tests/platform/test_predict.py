"""Batch prediction over a folder: every file gets a row, bad files are reported and skipped, overlays
only for anomalous and review images, and a self-contained summary page."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from bayprano.platform.predict import COLUMNS, expand_inputs, predict


@dataclass
class Result:
    score: float
    p_value: float
    threshold: float
    decision: str
    uncertainty: float


def brightness_scorer(images):
    """Image score = mean brightness / 100: dark images normal, mid review, bright anomalous."""
    out = []
    for im in images:
        s = float(im.mean()) / 100.0
        decision = "normal" if s < 0.9 else ("review" if s < 1.1 else "anomalous")
        out.append(Result(s, max(0.0, 1.0 - s / 2), 1.0, decision, 0.5 if decision == "review" else 0.0))
    return out


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "line"
    (root / "day2").mkdir(parents=True)
    for name, level in (("dark.png", 40), ("mid.png", 100), ("bright.png", 200)):
        Image.fromarray(np.full((48, 48, 3), level, np.uint8)).save(root / name)
    Image.fromarray(np.full((48, 48, 3), 230, np.uint8)).save(root / "day2" / "bright.png")  # same stem, other day
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "tiny.png")
    return root


def test_a_folder_is_scored_completely_with_bad_files_listed(folder, tmp_path):
    out = tmp_path / "out"
    emitted = []
    run = predict(
        [str(folder)],
        brightness_scorer,
        output=out,
        model_version="v3",
        overlay=lambda image, r: 255 - image,
        emit=emitted.append,
        batch_size=2,
    )
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    by_name = {r["path"].split("line/", 1)[1]: r for r in rows}
    assert set(by_name) == {
        "dark.png",
        "mid.png",
        "bright.png",
        "day2/bright.png",
        "broken.png",
        "notes.txt",
        "tiny.png",
    }
    assert by_name["dark.png"]["decision"] == "normal" and float(by_name["dark.png"]["score"]) == pytest.approx(0.4)
    assert by_name["bright.png"]["decision"] == "anomalous" and by_name["mid.png"]["decision"] == "review"
    assert all(by_name[n]["model_version"] == "v3" for n in ("dark.png", "mid.png"))
    assert "not a readable image" in by_name["broken.png"]["error"]
    assert by_name["notes.txt"]["error"] == "not an image file (.txt)"
    assert "smaller than 32 px" in by_name["tiny.png"]["error"]
    assert by_name["dark.png"]["overlay"] == "" and by_name["mid.png"]["overlay"] == "overlays/line_mid.png"
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["day2_bright.png", "line_bright.png", "line_mid.png"]  # stems repeat: parent_stem
    written = np.asarray(Image.open(out / by_name["bright.png"]["overlay"]))
    assert (written == 255 - 200).all()
    assert run.counts() == {"normal": 1, "anomalous": 2, "review": 1, "failed": 3}
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [e.path for e in emitted] == [line["path"] for line in lines] == [r["path"] for r in rows]
    page = (out / "summary.html").read_text()
    assert "Most anomalous images" in page and "data:image/png;base64," in page
    assert "notes.txt" in page and "not an image file (.txt)" in page


def test_one_image_that_fails_to_score_does_not_fail_its_batch(folder, tmp_path):
    def fragile(images):
        if any(im.mean() > 220 for im in images):
            raise RuntimeError("scorer refused a saturated image")
        return brightness_scorer(images)

    run = predict([str(folder / "*.png"), str(folder / "day2" / "*.png")], fragile, batch_size=8)
    errors = {r.path.split("line/", 1)[1]: r.error for r in run.failed}
    assert sorted(r.path.split("line/", 1)[1] for r in run.rows if r.error is None) == [
        "bright.png",
        "dark.png",
        "mid.png",
    ]
    assert errors["day2/bright.png"] == "scoring failed (RuntimeError: scorer refused a saturated image)"
    assert "not a readable image" in errors["broken.png"] and "smaller than 32 px" in errors["tiny.png"]


def test_inputs_that_name_nothing_are_rows_not_crashes(tmp_path):
    files, problems = expand_inputs([str(tmp_path / "missing.png"), str(tmp_path / "*.jpg")])
    assert files == []
    assert [p.error for p in problems] == ["no such file or folder", "pattern matches no file"]
