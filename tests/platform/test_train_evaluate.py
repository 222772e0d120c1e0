"""Centralised meta-training and the honesty of the evaluation: which images each pool may hold, and refusals.

Everything runs on a small synthetic root (three categories, 64 px) with the random-control backbone, so
that the tests measure the plumbing, not the accuracy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

from bayprano.config import TrainConfig
from bayprano.platform.data.imageio import load_image
from bayprano.platform.data.mvtec import list_categories, scan_category
from bayprano.platform.data.synth import generate_dataset
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.evaluate import run_evaluation
from bayprano.platform.evaluation_data import check_disjoint, load_category, pixel_hashes, support_indices
from bayprano.platform.meta.checkpoint import load_checkpoint
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.site import adapt
from bayprano.platform import train as train_module
from bayprano.platform.train import load_pool, train_centralised

SIZE = 64
SHOTS = 2


def train_config(root: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(
        data_root=root,
        shots=SHOTS,
        inner_steps=1,
        episodes=2,
        out=out,
        image_size=SIZE,
        backbone="random",
        calibration_episodes=2,
    )
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "synth"
    generate_dataset(out, categories=3, size=SIZE, n_train=10, n_test_good=4, n_test_defective=4)
    return out


@pytest.fixture(scope="module")
def held(root) -> str:
    return list_categories(root)[0]


@pytest.fixture(scope="module")
def extractor():
    return build_backbone("random")


@pytest.fixture(scope="module")
def trained(root, held, tmp_path_factory):
    """A checkpoint trained with every image file the trainer opens, and every task bank it builds, recorded."""
    opened: list[str] = []
    banks: dict[str, list[str]] = {}
    real_open, real_bank = PIL.Image.open, train_module.build_task_bank

    def spy_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    def spy_bank(category, images, ids, *args, **kwargs):
        bank = real_bank(category, images, ids, *args, **kwargs)
        banks[category] = list(bank.normal_ids)
        assert len(ids) == len(images) == len(bank)
        return bank

    cfg = train_config(root, tmp_path_factory.mktemp("ckpt") / "meta.pt", exclude=[held])
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PIL.Image, "open", spy_open)
        mp.setattr(train_module, "build_task_bank", spy_bank)
        ckpt = train_centralised(cfg, progress=lines.append)
    return SimpleNamespace(cfg=cfg, ckpt=ckpt, opened=opened, banks=banks, lines=lines)


def test_train_centralised_writes_a_checkpoint_of_the_other_categories(trained, root, held):
    cfg, ckpt, lines = trained.cfg, trained.ckpt, trained.lines
    others = [c for c in list_categories(root) if c != held]
    loaded = load_checkpoint(cfg.out)
    assert loaded.sha256 == ckpt.sha256 and loaded.categories == others
    assert loaded.backbone == "random" and loaded.image_size == SIZE
    assert loaded.meta_config["inner_steps"] == 1 and loaded.meta_config["first_order"] is True
    assert loaded.meta_config["shots"] == SHOTS and loaded.meta_config["pool_size"] == 20
    assert [row["episode"] for row in loaded.history] == [1, 2]
    assert any(line.startswith("episode 2/2 loss ") and "pixel" in line and "supcon" in line for line in lines)
    # two training categories: none to leave out beside the one held, so the default threshold rule
    assert any("threshold rule (leave-one-category-out) K=1: covariate prior" in line for line in lines)
    assert not any("rule" in e for e in loaded.normality.table.values())
    assert not list(Path(cfg.out).parent.glob(".*"))  # the atomic write left no temporary file


def test_train_centralised_opens_only_train_good_of_the_training_categories(trained, root, held):
    ckpt, opened = trained.ckpt, trained.opened
    expected = {str(p) for c in ckpt.categories for p in sorted((root / c / "train" / "good").iterdir())}
    assert set(opened) == expected
    assert not [p for p in opened if "/test/" in p or "/ground_truth/" in p or f"/{held}/" in p]


def test_pools_are_disjoint_by_path_and_by_pixel_hash(trained, root, held):
    cfg, ckpt, banks = trained.cfg, trained.ckpt, trained.banks
    pool = load_pool(cfg)
    assert banks == pool.paths and sorted(banks) == ckpt.categories
    pool_paths = {p for paths in pool.paths.values() for p in paths}
    assert all(Path(p).parent.name == "good" and Path(p).parent.parent.name == "train" for p in pool_paths)

    data = load_category(root, held, SIZE)
    idx = support_indices(len(data.train_images), SHOTS, 0, held)
    support_paths = {data.train_ids[i] for i in idx}
    test_paths = {s.path for s in scan_category(root, held) if s.split == "test"}
    assert set(data.test_ids) == test_paths and len(test_paths) == 8
    candidates = set(data.train_ids)  # every image a support set may be drawn from
    assert support_paths <= candidates and not pool_paths & candidates
    assert not pool_paths & test_paths and not candidates & test_paths

    pool_hashes = pool.hashes()
    assert pool_hashes == set(ckpt.meta_config["pool_sha256"]) and len(pool_hashes) == 20
    check_disjoint(
        {
            "meta-training": pool_hashes,
            "support": pixel_hashes(data.train_images[idx]),
            "test": pixel_hashes(data.test_images),
        }
    )
    # the same for the pixels as stored in the files, before any resizing
    raw = {
        name: pixel_hashes([load_image(p) for p in paths])
        for name, paths in (("meta-training", pool_paths), ("support", support_paths), ("test", test_paths))
    }
    check_disjoint(raw)
    with pytest.raises(DataError, match="leakage: 1 image"):
        check_disjoint({"support": raw["support"], "test": raw["test"] | {next(iter(raw["support"]))}})


def test_evaluation_refuses_a_checkpoint_trained_on_the_evaluated_category(trained, root, held, tmp_path):
    cfg, ckpt = trained.cfg, trained.ckpt
    seen = ckpt.categories[0]
    with pytest.raises(ConfigError, match=f"meta-trained on category '{seen}'; evaluating it there would leak"):
        run_evaluation(
            root,
            tmp_path / "out.json",
            categories=[seen],
            shots=[SHOTS],
            seeds=1,
            methods=["bayes"],
            checkpoint=cfg.out,
            backbone="random",
        )
    assert not (tmp_path / "out.json").exists()


def test_evaluation_refuses_a_checkpoint_whose_pool_held_a_test_image(trained, root, held, tmp_path):
    """The same checkpoint, as if its meta-training pool (elsewhere) had held a copy of a held-out test image."""
    ckpt = trained.ckpt
    test_image = load_category(root, held, SIZE).test_images[-1]
    leaky = replace(
        ckpt,
        meta_config={
            **ckpt.meta_config,
            "pool_sha256": ckpt.meta_config["pool_sha256"] + [*pixel_hashes([test_image])],
        },
    )
    leaky.save(tmp_path / "leaky.pt")
    with pytest.raises(
        DataError,
        match=r"leakage: 1 image\(s\) are in both the checkpoint's meta-training "
        r"and the test pool",
    ):
        run_evaluation(
            root,
            tmp_path / "out.json",
            categories=[held],
            shots=[SHOTS],
            seeds=1,
            methods=["bayes"],
            checkpoint=tmp_path / "leaky.pt",
            backbone="random",
        )
    assert not (tmp_path / "out.json").exists()


def test_train_refuses_too_few_images_and_unknown_categories(root, held, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"category '\w+' has 10 train/good images; an episode needs 12 "
        r"\(--shots 8 \+ 4 query images\)",
    ):
        train_centralised(train_config(root, tmp_path / "x.pt", shots=8))
    with pytest.raises(ConfigError, match="--exclude: unknown category 'nope'"):
        train_centralised(train_config(root, tmp_path / "x.pt", exclude=["nope"]))
    everything = list_categories(root)
    with pytest.raises(ConfigError, match="no category left to train on"):
        train_centralised(train_config(root, tmp_path / "x.pt", exclude=everything))
    with pytest.raises(ConfigError, match="--dim 500: must be at most the backbone's 168 channels"):
        train_centralised(train_config(root, tmp_path / "x.pt", dim=500))
    assert not (tmp_path / "x.pt").exists()


def test_adapt_refuses_bad_images_and_another_backbone(trained, extractor):
    ckpt = trained.ckpt
    good = list(np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8))
    site = adapt(ckpt, good, extractor=extractor)  # the default target: a normal image's p-value 0.05
    assert site.target_fpr == 0.05 and float(site.calibration.p_value(site.threshold, site.df)) == pytest.approx(0.05)
    assert site.info["support_size"] == 2 and len(site.info["loo_statistics"]) == 2
    with pytest.raises(DataError, match=r"image 1 must be RGB of shape \(H, W, 3\), got shape \(64, 64\) \(grayscale"):
        adapt(ckpt, [good[0], np.zeros((SIZE, SIZE), np.uint8)], extractor=extractor)
    with pytest.raises(DataError, match="must have dtype uint8"):
        adapt(ckpt, [good[0].astype(np.uint16) * 256], extractor=extractor)
    with pytest.raises(DataError, match=r"shape \(8, 8, 3\) is smaller than 32 px"):
        adapt(ckpt, [np.zeros((8, 8, 3), np.uint8)], extractor=extractor)
    other = replace(ckpt, backbone="efficientnet_lite2", backbone_fingerprint="efficientnet_lite2:0123456789abcdef")
    with pytest.raises(
        ConfigError,
        match=r"checkpoint was meta-trained on backbone efficientnet_lite2:0123456789abcdef, "
        r"not random:",
    ):
        adapt(other, good, extractor=extractor)
