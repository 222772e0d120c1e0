"""Export to ONNX and OpenVINO: the exported graphs answer as the torch site model does, through the CLI too.

Site models are adapted from a frozen checkpoint on the default backbone (DINOv2 ViT-S/14, 70 px) and on
EfficientNet-Lite2 and -Lite0 (64 px), exported once per module with `bayprano export`, and compared image by image
with ``SiteModel.score`` on synthetic good and defective images (one of them not at the model's side,
so the resize is compared too).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bayprano.cli import main
from site_fixtures import defective, frozen_checkpoint, good

SIZE, DIM = 64, 32
BACKBONES = ("dinov2_vits14", "efficientnet_lite2", "efficientnet_lite0")
SIDES = {"dinov2_vits14": 70}  # a multiple of its 14 px patch; the CNNs take SIZE
RTOL = 1e-4


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=BACKBONES)
def exported(request, tmp_path_factory):
    """(site model, its folder, {format: exported graph}) for one backbone."""
    from bayprano.platform.model.backbone import build_backbone
    from bayprano.platform.model.site import adapt

    extractor = build_backbone(request.param)
    side = SIDES.get(request.param, SIZE)
    ckpt = frozen_checkpoint(extractor, np.stack(good("wood", 0, 3) + good("fabric", 0, 3)), side, DIM)
    site = adapt(ckpt, good("wood", 1, 3), extractor=extractor)
    work = tmp_path_factory.mktemp(f"export-{request.param}")
    site.save(work / "site")
    graphs = {}
    for fmt in ("onnx", "openvino"):
        status, out, err = cli("export", "--model", str(work / "site"), "--format", fmt, "--out", str(work / fmt))
        assert status == 0, err
        graphs[fmt] = work / fmt / ("model.onnx" if fmt == "onnx" else "model.xml")
        assert f"wrote {graphs[fmt]}" in out
    return site, work / "site", graphs


def line_images():
    return good("wood", 7, 3) + [defective("wood", 3), defective("wood", 4), good("wood", 8, 1, size=80)[0]]


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_graph_gives_the_torch_models_statistics_maps_and_decisions(exported, fmt):
    from bayprano.platform.exported import ExportedModel

    site, _, graphs = exported
    images = line_images()
    expected = site.score(images, maps=True)
    model = ExportedModel.load(graphs[fmt])
    got = model.score(images, maps=True, batch_size=4)  # a batch of 4 and one of 2: the batch size is dynamic
    stat, want = np.array([r.score for r in got]), np.array([r.score for r in expected])
    np.testing.assert_allclose(stat, want, rtol=RTOL)
    for g, e in zip(got, expected):
        assert g.anomaly_map.shape == e.anomaly_map.shape == (site.image_size, site.image_size)
        np.testing.assert_allclose(g.anomaly_map, e.anomaly_map, rtol=RTOL, atol=RTOL * float(e.anomaly_map.max()))
    assert [r.decision for r in got] == [r.decision for r in expected]
    np.testing.assert_allclose([r.p_value for r in got], [r.p_value for r in expected], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose([r.uncertainty for r in got], [r.uncertainty for r in expected], rtol=1e-3, atol=1e-6)
    assert got[0].threshold == expected[0].threshold and got[0].map_threshold == pytest.approx(
        expected[0].map_threshold
    )
    assert {r.decision for r in expected} != {"normal"}  # the defects are seen, so decisions are really compared
    single = model.score(images[:1], maps=False)[0]
    assert single.score == pytest.approx(got[0].score, rel=RTOL) and single.anomaly_map is None


def test_metadata_is_in_the_graph_and_beside_it(exported):
    import onnx

    from bayprano.platform.export import read_metadata

    site, folder, graphs = exported
    model = onnx.load(str(graphs["onnx"]))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props["bayprano"])
    assert float(props["threshold"]) == meta["threshold"] == site.threshold
    assert meta["target_fpr"] == site.target_fpr and meta["input"]["image_size"] == site.image_size
    assert meta["calibration"] == site.calibration.as_dict()
    assert meta["model_sha256"] == json.loads((folder / "meta.json").read_text())["model_sha256"]
    assert meta["normalisation"]["mean"] == pytest.approx(site.extractor.mean.flatten().tolist())
    sidecar = json.loads((graphs["onnx"].parent / "model.json").read_text())
    assert {k: v for k, v in sidecar.items() if k != "files"} == meta == read_metadata(graphs["openvino"])
    assert set(json.loads((graphs["openvino"].parent / "model.json").read_text())["files"]) == {
        "model.onnx",
        "model.xml",
        "model.bin",
    }
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"image": ["batch", 3, site.image_size, site.image_size]}


def test_exported_file_scores_through_the_cli_as_the_torch_model(exported, tmp_path):
    site, folder, graphs = exported
    line = tmp_path / "line"
    line.mkdir()
    for i, image in enumerate(line_images()):
        Image.fromarray(image).save(line / f"{i}.png")
    runs = {}
    for name, model in (("torch", folder), ("onnx", graphs["onnx"]), ("openvino", graphs["openvino"])):
        status, out, err = cli("score", "--model", str(model), str(line))
        assert status == 0, err
        runs[name] = [json.loads(row) for row in out.splitlines()]
    torch_rows = runs.pop("torch")
    assert [r["image"] for r in torch_rows] == sorted(str(p) for p in line.iterdir())
    for rows in runs.values():
        assert [set(r) for r in rows] == [set(r) for r in torch_rows]
        assert [r["decision"] for r in rows] == [r["decision"] for r in torch_rows]
        assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in torch_rows], rel=RTOL)


@pytest.mark.parametrize("exported", BACKBONES[:1], indirect=True)
def test_a_folder_with_bad_files_is_scored_completely(exported, tmp_path):
    _, _, graphs = exported
    line = tmp_path / "line"
    line.mkdir()
    images = line_images()
    for i, image in enumerate(images):
        Image.fromarray(image).save(line / f"{i}.png")
    (line / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (line / "notes.txt").write_text("shift 2, operator A")
    out = tmp_path / "out"
    status, stdout, stderr = cli("score", "--model", str(graphs["onnx"]), str(line), "--output", str(out))
    assert status == 2
    scored = [json.loads(row) for row in stdout.splitlines()]
    assert len(scored) == len(images) and all(r["decision"] in ("normal", "anomalous", "review") for r in scored)
    assert f"bayprano: error: {line / 'corrupt.png'}: not a readable image" in stderr
    assert f"bayprano: error: {line / 'notes.txt'}: not an image file (.txt)" in stderr
    with open(out / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {f"{i}.png" for i in range(len(images))} | {"corrupt.png", "notes.txt"}
    assert all(rows[f"{i}.png"]["error"] == "" and float(rows[f"{i}.png"]["score"]) > 0 for i in range(len(images)))
    assert rows["corrupt.png"]["score"] == "" and rows["notes.txt"]["error"] == "not an image file (.txt)"
    version = json.loads((graphs["onnx"].parent / "model.json").read_text())["model_sha256"][:12]
    assert {rows[f"{i}.png"]["model_version"] for i in range(len(images))} == {version}
    flagged = [n for n, r in rows.items() if r["decision"] in ("anomalous", "review")]
    assert flagged and sorted((out / "overlays").iterdir()) == sorted(out / rows[n]["overlay"] for n in flagged)
    assert "corrupt.png" in (out / "summary.html").read_text()


@pytest.mark.parametrize("exported", BACKBONES[:1], indirect=True)
def test_a_corrupt_or_foreign_model_is_refused(exported, tmp_path):
    site, folder, graphs = exported
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])
    status, _, err = cli("export", "--model", str(truncated), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert status == 2 and "corrupt artifact (sha256 does not match meta.json)" in err
    future = tmp_path / "future"
    shutil.copytree(folder, future)
    meta = json.loads((future / "meta.json").read_text())
    (future / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    status, _, err = cli("export", "--model", str(future), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert status == 2 and "artifact format 99 is not supported" in err
    assert not (tmp_path / "x").exists()

    image = tmp_path / "a.png"
    Image.fromarray(good("wood", 9, 1)[0]).save(image)
    status, _, err = cli("score", "--model", str(image), str(image))
    assert status == 2 and f"{image}: not a site model folder nor an exported model (.onnx, .xml)" in err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(graphs["onnx"].read_bytes()[:5000])
    status, _, err = cli("score", "--model", str(broken), str(image))
    assert status == 2 and f"{broken}: not a readable exported model" in err
    import onnx

    model = onnx.load(str(graphs["onnx"]))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value, message in (
        ("bayprano", None, "has no bayprano metadata"),
        ("bayprano", json.dumps({**json.loads(props["bayprano"]), "format": 7}), "export format 7 is not supported"),
    ):
        del model.metadata_props[:]
        if value is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        foreign = tmp_path / "foreign.onnx"
        foreign.write_bytes(model.SerializeToString())
        status, _, err = cli("score", "--model", str(foreign), str(image))
        assert status == 2 and message in err, err
