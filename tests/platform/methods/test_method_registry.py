"""The method registry: a method registered from its own folder is run by evaluate, listed in the demo's
method table and validated, with no other edits; the built-in methods keep the protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bayprano.demo import method_rows
from bayprano.platform.data.synth import generate_dataset
from bayprano.platform.errors import ConfigError
from bayprano.platform.evaluate import run_evaluation
from bayprano.platform.evaluation_data import load_category, support_indices
from bayprano.platform.evaluation_report import markdown_table
from bayprano.platform.methods import METHODS, MethodContext, get_method, register_method, unregister_method
from bayprano.platform.methods.postprocess import STATISTICS, statistic
from bayprano.platform.metrics import decision_rates, image_auroc, pixel_metrics
from bayprano.platform.model.anomaly_map import anomaly_map
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.methods.validation import model_checkpoint, model_context, validation_aurocs
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import decide, relative_sd

import mean_distance

MAX_PATCH_SCORE_METHODS = {"patchcore", "padim", "anomalydino"}


@pytest.fixture
def registered():
    mean_distance.register()
    yield mean_distance.NAME
    unregister_method(mean_distance.NAME)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods") / "synth"
    generate_dataset(out, categories=2, size=64, n_train=8, n_test_good=4, n_test_defective=4)
    return out


def evaluate_fabric(root, tmp_path, **settings) -> dict:
    """Every registered method on the fabric category: K = 2, one draw, the random control backbone."""
    return run_evaluation(
        root,
        tmp_path / "eval.json",
        categories=["fabric"],
        shots=(2,),
        seeds=1,
        episodes=2,
        image_size=64,
        backbone="random",
        progress=lambda m: None,
        **settings,
    )


def test_the_built_in_methods_are_registered_in_the_harness_order():
    assert list(METHODS)[:6] == ["bayes", "bayes-frozen", "protomaml", "patchcore", "padim", "anomalydino"]
    assert get_method("bayes").checkpoint == "niw" and get_method("padim").checkpoint is None
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_method("padim", lambda context: None)


def test_a_registered_method_is_evaluated_and_in_the_demo_table(registered, root, tmp_path):
    result = evaluate_fabric(root, tmp_path)
    methods = {r["method"] for r in result["records"]}
    assert methods == set(METHODS) and registered in methods
    record = next(r for r in result["records"] if r["method"] == registered)
    # the same numbers by hand: features of the random control as evaluate extracts them (train features stored
    # in float16), the support draw of seed 0, each patch's distance to the support's mean at its position
    data = load_category(root, "fabric", 64)
    extractor = build_backbone("random")
    support = (
        extractor.extract(data.train_images, size=64)
        .to(torch.float16)
        .float()[support_indices(len(data.train_images), 2, 0, "fabric")]
    )
    test = extractor.extract(data.test_images, size=64)
    patches = torch.linalg.vector_norm(test - support.mean(0), dim=1)
    scores = patches.flatten(1).amax(1).numpy()
    loo = max(float(torch.linalg.vector_norm(support[i] - support[1 - i], dim=0).max()) for i in range(2))
    normal_scores = scores[data.test_labels == 0]
    assert record["own_image_auroc"] == pytest.approx(image_auroc(data.test_labels, scores), abs=1e-12)
    assert record["measured_fpr"] == pytest.approx(float(np.mean(normal_scores > loo)), abs=1e-12)
    # a method without an uncertainty band decides every image at its threshold: nothing goes to review
    assert record["decision_rates"]["normal_images"] == pytest.approx(
        {"normal": 1 - record["measured_fpr"], "review": 0.0, "anomalous": record["measured_fpr"]}
    )
    assert record["decision_rates"]["defective_images"]["review"] == 0.0
    # the Bayesian model's band only turns decisions into review: the normal images decided anomalous are
    # some of those above the threshold, the ones decided normal some of those below it
    bayes = next(r for r in result["records"] if r["method"] == "bayes")
    good = bayes["decision_rates"]["normal_images"]
    assert sum(good.values()) == pytest.approx(1.0)
    assert good["anomalous"] <= bayes["measured_fpr"] <= good["anomalous"] + good["review"]
    # ... and its band is the site model's: the image's posterior spread and the threshold's, in quadrature
    cal, band = bayes["calibration"], bayes["calibration"]["band"]
    assert band["threshold_sd"] == pytest.approx(math.sqrt(cal["site_calibration"]["mean_var"]), rel=1e-12)
    stat = np.asarray(cal["normal_statistics"])
    sd = np.sqrt(relative_sd(stat, band["dim"], band["nu_n"], band["kappa_n"]) ** 2 + band["threshold_sd"] ** 2)
    by_hand = decision_rates(np.zeros(len(stat)), decide(stat, cal["threshold"], sd, band["z_review"])[0])
    assert by_hand["normal_images"] == good
    assert result["summary"]["bayes"]["2"]["decided_fpr"] == good["anomalous"]
    expected_pixels = pixel_metrics(data.test_masks, anomaly_map(patches, (64, 64)).numpy())
    assert record["pixel_auroc"] == pytest.approx(expected_pixels["pixel_auroc"], abs=1e-6)
    assert record["image_auroc"] == pytest.approx(
        image_auroc(data.test_labels, statistic(patches, record["statistic"], 64)), abs=1e-12
    )
    rows = method_rows(result, {"fabric": "site-0"})
    assert {r["method"] for r in rows} == methods and all(r["site"] == "site-0" for r in rows)
    assert registered in result["summary"]
    # the post-processing menu: chosen on the other category (meta-validation), recorded, ablated
    for r in result["records"]:
        assert r["statistic"] in STATISTICS and set(r["validation_aurocs"]) == set(STATISTICS)
        assert set(r["statistic_aurocs"]) == set(STATISTICS)
        assert r["image_auroc"] == r["statistic_aurocs"][r["statistic"]]
        if r["method"] in MAX_PATCH_SCORE_METHODS | {registered}:  # their own image score is the max patch score
            assert r["own_image_auroc"] == r["statistic_aurocs"]["max"]
    assert set(result["ablation"]) == methods
    assert set(result["ablation"]["padim"]["2"]) == {*STATISTICS, "own", "chosen"}
    assert result["ablation"]["padim"]["2"]["own"] == result["ablation"]["padim"]["2"]["max"]
    assert "Image statistic ablation" in markdown_table(result)


def test_validation_loops_over_the_methods_a_site_can_build(registered):
    gen = torch.Generator().manual_seed(0)
    normals = torch.randn(10, 8, 6, 6, generator=gen)
    anomalies = normals[:3].clone()
    anomalies[:, :, 2:4, 2:4] += 6.0
    query = torch.cat([normals[5:8], anomalies])
    labels = np.array([0, 0, 0, 1, 1, 1])
    model = BayesianPatchModel(8, 4, seed=0)
    ckpt = model_checkpoint(model, "random", "random:0", 48, (6, 6), inner_steps=1, inner_positions=0)
    aurocs = validation_aurocs(model_context(ckpt, 1), [(normals[:4], query, labels)])
    assert set(aurocs) == {
        "bayes",
        "patchcore",
        "padim",
        "anomalydino",
        registered,
    }  # not the ones needing other checkpoints
    assert aurocs[registered] == 1.0 and aurocs["patchcore"] == 1.0
    with pytest.raises(ConfigError, match="not a 'euclidean' checkpoint"):
        validation_aurocs(model_context(ckpt, 1), [(normals[:4], query, labels)], ["protomaml"])
    assert MethodContext().can_build(get_method(registered))


def test_support_augmentation_gives_every_method_the_same_views_and_leaves_an_image_out_with_its_views(
    registered, root, tmp_path
):
    from bayprano.platform.data.augment import augment_support

    result = evaluate_fabric(root, tmp_path, augments=("none", "flips"))
    variants = {(r["method"], r["augment"]) for r in result["records"]}
    assert variants == {(m, a) for m in METHODS for a in ("none", "flips")}
    assert {f"{m}+flips" for m in METHODS} | set(METHODS) == set(result["summary"])
    record = next(r for r in result["records"] if r["method"] == registered and r["augment"] == "flips")
    # by hand: each support image and its two mirror images; the mean over the 6 views; the threshold from each
    # original scored against the mean of the other original's 3 views (never against its own mirror images)
    data = load_category(root, "fabric", 64)
    extractor = build_backbone("random")
    idx = support_indices(len(data.train_images), 2, 0, "fabric")
    views = [augment_support([data.train_images[i]], "flips") for i in idx]
    assert [len(v) for v in views] == [3, 3]
    feats = [extractor.extract(np.stack(v), size=64) for v in views]
    test = extractor.extract(data.test_images, size=64)
    patches = torch.linalg.vector_norm(test - torch.cat(feats).mean(0), dim=1)
    scores = patches.flatten(1).amax(1).numpy()
    loo = max(float(torch.linalg.vector_norm(feats[i][0] - feats[1 - i].mean(0), dim=0).max()) for i in range(2))
    assert record["own_image_auroc"] == pytest.approx(image_auroc(data.test_labels, scores), abs=1e-9)
    assert record["measured_fpr"] == pytest.approx(float(np.mean(scores[data.test_labels == 0] > loo)), abs=1e-12)
    bayes = next(r for r in result["records"] if r["method"] == "bayes" and r["augment"] == "flips")
    assert len(bayes["calibration"]["loo_statistics"]) == 2  # one per original image, not one per view


def test_a_leave_one_out_threshold_leaves_every_view_of_the_image_out():
    from bayprano.platform.methods.base import PatchScoreMethod, loo_threshold

    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3) + 3.0
    support = torch.cat([a, a, b, b])  # each image twice, as an augmentation that changed nothing would give
    plain = loo_threshold(lambda: PatchScoreMethod(mean_distance.MeanDistance), support)
    grouped = loo_threshold(lambda: PatchScoreMethod(mean_distance.MeanDistance), support, [0, 0, 1, 1])
    expected = float(torch.linalg.vector_norm(a[0] - b[0], dim=0).max())
    assert grouped == pytest.approx(expected, rel=1e-6)  # scored against the other image alone
    assert plain < 0.75 * grouped  # with its own copy left in, every image looks closer to normal
    with pytest.raises(ConfigError, match="number the originals"):
        loo_threshold(lambda: PatchScoreMethod(mean_distance.MeanDistance), support, [0, 0, 2, 2])
