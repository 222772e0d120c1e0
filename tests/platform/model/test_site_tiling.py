"""A site model's scoring modes, region of interest and support augmentation, end to end on the random
control backbone at 64 px tiles: one tile scores as the resized image does, a strip gets a map of its
own size, a defect outside the region leaves the statistic alone, the leave-one-out calibration leaves
every view of an image out together, and all of it survives a save and a load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from site_fixtures import SIZE, frozen_checkpoint, good  # noqa: E402

from bayprano.platform.data.augment import augment_support  # noqa: E402
from bayprano.platform.errors import ConfigError, DataError  # noqa: E402
from bayprano.platform.model.scoring import image_statistic  # noqa: E402
from bayprano.platform.model.site import SiteModel, adapt  # noqa: E402
from bayprano.platform.model.tiling import RegionOfInterest, crop_grid, plan_tiles, split, stitch  # noqa: E402

DIM = 32


@pytest.fixture(scope="module")
def extractor():
    from bayprano.platform.model.backbone import build_backbone

    return build_backbone("random")


@pytest.fixture(scope="module")
def checkpoint(extractor):
    return frozen_checkpoint(extractor, np.stack(good("wood", 0, 4) + good("fabric", 0, 4)), SIZE, DIM, inner_steps=0)


def strip(seed: int, tiles: int = 4, category: str = "wood") -> np.ndarray:
    """A (64, 64 * tiles) image of the category's texture."""
    return np.ascontiguousarray(np.concatenate(good(category, seed, tiles), axis=1))


def with_defect(image: np.ndarray, x0: int, x1: int) -> np.ndarray:
    out = image.copy()
    rng = np.random.default_rng(7)
    out[16:48, x0:x1] = rng.integers(0, 256, size=(32, x1 - x0, 3), dtype=np.uint8)
    return out


def as_mode(site: SiteModel, scoring: str, roi=None) -> SiteModel:
    return SiteModel(
        site.model,
        site.prototype,
        site.calibration,
        site.target_fpr,
        site.image_size,
        site.info,
        site.extractor,
        site.z_review,
        scoring,
        site.tile_overlap,
        roi,
    )


def test_an_image_of_one_tile_scores_the_same_resized_and_tiled(checkpoint, extractor):
    site = adapt(checkpoint, good("wood", 1, 3), extractor=extractor)
    image = good("wood", 9, 1)[0]
    resized = site.score([image])[0]
    tiled = as_mode(site, "tile").score([image])[0]
    assert tiled.score == resized.score
    assert tiled.anomaly_map.shape == resized.anomaly_map.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(tiled.anomaly_map, resized.anomaly_map)


def test_stitched_features_equal_the_whole_image_features_away_from_tile_borders():
    """The stitching geometry is exact; what differs is the CNN's receptive field at tile borders.

    EfficientNet-Lite0 at 256 px tiles on a 256 x 1024 image (a multiple of the stride, so nothing is
    padded), against the same image's feature grid computed whole. Measured, the largest relative L2
    difference of a tile's feature cell by its distance (in cells of 8 px) from the tile's nearest border
    that is not an image border: 0.98 at 0, 0.37 at 4, 0.13 at 8, 0.034 at 15, 0.01 at 16, under 0.001
    from 19 on (the random control's receptive field is wider: 0.11 still at 15 cells of 128 px tiles).
    Asserted: the stitched grid equals the whole grid to 2e-3 wherever every covering tile has the cell
    20 or more cells from its inner borders, and differs by more than 0.1 on some tile-border cell."""
    from bayprano.platform.model.backbone import build_backbone

    extractor = build_backbone("efficientnet_lite0")
    image = np.ascontiguousarray(np.concatenate(good("wood", 3, 4, size=256), axis=1))
    plan = plan_tiles(*image.shape[:2], 256, extractor.stride, 0.25)
    tiles = extractor.extract(list(split(image, plan)), size=256)
    stitched = crop_grid(stitch(tiles, plan), plan)
    whole = extractor.extract([image])[0]
    assert stitched.shape == whole.shape == (tiles.shape[1], 32, 128)
    error = ((stitched - whole).norm(dim=0) / whole.norm(dim=0)).amax(0).numpy()  # per column
    g, cols = plan.tile_grid, whole.shape[-1]
    distance = np.full(cols, 10**6)
    for _, x in plan.origins:
        xs = x // plan.stride
        for c in range(xs, xs + g):
            left = c - xs if xs > 0 else 10**6
            right = xs + g - 1 - c if xs + g < cols else 10**6
            distance[c] = min(distance[c], left, right)
    far = distance >= 20
    assert far.sum() >= 10
    assert error[far].max() < 2e-3, error[far].max()
    assert error[distance == 0].max() > 0.1


@pytest.mark.parametrize("shape", [(256, 4096), (70, 301)])
def test_a_large_image_gets_a_map_of_its_own_size_and_a_finite_statistic(checkpoint, extractor, shape):
    site = adapt(checkpoint, good("fabric", 1, 2), extractor=extractor, scoring="tile")
    h, w = shape
    image = np.asarray(Image.fromarray(strip(5, 4, "fabric")).resize((w, h)))
    result = site.score([image])[0]
    assert result.anomaly_map.shape == (h, w)
    assert np.isfinite(result.score) and np.isfinite(result.anomaly_map).all()
    assert result.decision in ("normal", "anomalous", "review")


def test_a_defect_outside_the_region_leaves_the_statistic_alone_and_inside_raises_it(checkpoint, extractor):
    roi = RegionOfInterest.rectangle(0, 0, 96, 64)
    site = adapt(checkpoint, [strip(s) for s in (1, 2, 3)], extractor=extractor, scoring="tile", roi=roi)
    clean = strip(8)
    base, outside, inside = site.score([clean, with_defect(clean, 200, 240), with_defect(clean, 20, 50)])
    assert outside.score == base.score
    assert inside.score > base.score * 1.05
    assert (base.anomaly_map[:, 96:] == 0).all() and (base.anomaly_map[:, :96] > 0).any()
    unmasked = as_mode(site, "tile").score([clean, with_defect(clean, 200, 240)])
    assert unmasked[1].score != unmasked[0].score  # without the region, the same defect counts


def test_the_region_restricts_the_support_statistics(checkpoint, extractor):
    """Support images with noise outside the region calibrate as clean ones do: the leave-one-out
    statistics are taken inside the region and the tiles outside it are not fitted."""
    roi = RegionOfInterest.rectangle(0, 0, 96, 64)
    clean = [strip(s) for s in (1, 2, 3)]
    noisy = [with_defect(im, 150, 250) for im in clean]
    a = adapt(checkpoint, clean, extractor=extractor, scoring="tile", roi=roi)
    b = adapt(checkpoint, noisy, extractor=extractor, scoring="tile", roi=roi)
    assert a.info["support_views"] == b.info["support_views"] < 3 * len(plan_tiles(64, 256, SIZE, 8).origins)
    assert a.info["loo_statistics"] == pytest.approx(b.info["loo_statistics"], rel=1e-5)
    c = adapt(checkpoint, noisy, extractor=extractor, scoring="tile")
    assert c.info["loo_statistics"] != pytest.approx(a.info["loo_statistics"], rel=1e-3)


def test_leave_one_out_leaves_every_view_of_an_image_out_together(checkpoint, extractor):
    support = good("wood", 4, 3)
    site = adapt(checkpoint, support, extractor=extractor, augment="shifts")
    assert site.info["support_views"] == 15 and site.info["support_size"] == 3 and site.info["augment"] == "shifts"
    model = checkpoint.model  # no inner steps: the site's head is the checkpoint's
    views = [extractor.extract(augment_support([im], "shifts"), size=SIZE) for im in support]
    z = [model.embed(v) for v in views]
    together, alone = [], []
    with torch.no_grad():
        for i in range(3):
            rest = model.prototype(torch.cat([z[j] for j in range(3) if j != i]))
            together.append(float(image_statistic(rest.distance(z[i][:1]), DIM)[0]))
            others = model.prototype(torch.cat([z[j] for j in range(3) if j != i] + [z[i][1:]]))
            alone.append(float(image_statistic(others.distance(z[i][:1]), DIM)[0]))
    assert site.info["loo_statistics"] == pytest.approx(together, rel=1e-4)
    # Leaving only the original out would be optimistic: its shifted copies stay and look like it.
    assert all(a < t for a, t in zip(alone, together))


@pytest.mark.parametrize("kind", ["rectangle", "mask"])
def test_mode_region_and_augmentation_survive_a_save_and_a_load(checkpoint, extractor, tmp_path, kind):
    if kind == "rectangle":
        roi = RegionOfInterest.rectangle(8, 0, 200, 60)
    else:
        mask = np.zeros((64, 256), dtype=bool)
        mask[10:60, 30:220] = True
        roi = RegionOfInterest.from_mask(mask)
    site = adapt(
        checkpoint,
        [strip(1), strip(2)],
        extractor=extractor,
        scoring="tile",
        tile_overlap=0.5,
        roi=roi,
        augment="shifts",
    )
    site.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["scoring"] == "tile" and meta["tile_overlap"] == 0.5 and meta["augment"] == "shifts"
    loaded = SiteModel.load(tmp_path / "m", extractor=extractor)
    assert (loaded.scoring, loaded.tile_overlap, loaded.info["augment"]) == ("tile", 0.5, "shifts")
    assert (loaded.roi.mask(64, 256) == roi.mask(64, 256)).all()
    image = with_defect(strip(6), 100, 140)
    want, got = site.score([image])[0], loaded.score([image])[0]
    assert got.score == pytest.approx(want.score, rel=1e-5)
    np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-5, atol=1e-6)
    if kind == "mask":
        assert meta["roi"]["mask"] == "roi.png"
        png = tmp_path / "m" / "roi.png"
        png.write_bytes(png.read_bytes() + b"\0")
        with pytest.raises(DataError, match="roi.png.*sha256"):
            SiteModel.load(tmp_path / "m", extractor=extractor)
    else:
        assert meta["roi"] == {"rectangle": [8, 0, 200, 60]}


def test_a_model_folder_without_mode_region_or_augmentation_loads_as_resize(checkpoint, extractor, tmp_path):
    site = adapt(checkpoint, good("wood", 1, 2), extractor=extractor)
    site.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("scoring", "tile_overlap", "roi", "augment", "support_views"):
        meta.pop(key, None)
    meta_path.write_text(json.dumps(meta))
    loaded = SiteModel.load(tmp_path / "old", extractor=extractor)
    assert loaded.scoring == "resize" and loaded.roi is None
    image = good("wood", 5, 1)[0]
    assert loaded.score([image])[0].score == pytest.approx(site.score([image])[0].score, rel=1e-5)


def test_bad_settings_are_refused_by_name(checkpoint, extractor, tmp_path):
    support = good("wood", 1, 2)
    with pytest.raises(ConfigError, match="scoring mode 'crop'"):
        adapt(checkpoint, support, extractor=extractor, scoring="crop")
    with pytest.raises(ConfigError, match="tile overlap"):
        adapt(checkpoint, support, extractor=extractor, scoring="tile", tile_overlap=1.0)
    with pytest.raises(ConfigError, match="augmentation 'rotate'"):
        adapt(checkpoint, support, extractor=extractor, augment="rotate")
    site = adapt(checkpoint, support, extractor=extractor, scoring="tile")
    site.save(tmp_path / "m")
    meta_path = tmp_path / "m" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "scoring": "zoom"}))
    with pytest.raises(DataError, match="meta.json.*scoring mode 'zoom'"):
        SiteModel.load(tmp_path / "m", extractor=extractor)


def test_the_inner_loop_takes_a_bounded_spread_of_the_views():
    from bayprano.platform.model.site import inner_views

    groups = [g for g in range(3) for _ in range(21)]
    chosen = inner_views(groups, 8)
    assert len(chosen) == 8 and chosen == sorted(set(chosen))
    assert sorted({groups[v] for v in chosen}) == [0, 1, 2]
    assert inner_views(list(range(5)), 8) is None


def test_a_tiled_support_adapts_with_inner_steps_and_fits_every_view(extractor):
    ckpt = frozen_checkpoint(extractor, np.stack(good("wood", 0, 4)), SIZE, DIM, inner_steps=1)
    site = adapt(ckpt, [strip(1), strip(2)], extractor=extractor, scoring="tile")
    assert site.info["support_views"] == 2 * len(plan_tiles(64, 256, SIZE, 8).origins) > 8
    assert site.prototype.n_support_ == site.info["support_views"]
    assert np.isfinite(site.score([strip(3)])[0].score)


def test_export_refuses_a_tiled_model_or_one_with_a_region(checkpoint, extractor, tmp_path):
    from bayprano.platform.export import export_site_model

    support = good("wood", 1, 2)
    for site in (
        adapt(checkpoint, support, extractor=extractor, scoring="tile"),
        adapt(checkpoint, support, extractor=extractor, roi=RegionOfInterest.rectangle(0, 0, 32, 32)),
    ):
        with pytest.raises(ConfigError, match="export covers resize scoring without a region of interest"):
            export_site_model(tmp_path / "m", "onnx", tmp_path / "out", site=site)
    assert not (tmp_path / "out").exists()
