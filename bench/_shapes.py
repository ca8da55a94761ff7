"""Layer and activation shapes of the benchmark sweeps.

Taken from the three networks of the issue, at their fine-tuning resolutions:
MobileNetV2-w0.35 at 128x128 (``trady_triton.models`` "mbv2-w0.35-arch", the paper's
counts), EfficientNet-Lite0 at 224x224 ("efficientnet-lite0") and ResNet-18 at 224x224
(torchvision's layout; not in the model zoo, so its shapes are written out here).
``test_bench_kernels.py::test_shapes_match_the_model_zoo`` checks the first two against
the models' own profiles, so a change of the zoo cannot silently leave them stale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The paper's budgets (docs/METHOD.md section 4): MobileNetV2-w0.35 memory units at 128x128,
# and the keep ratios they make of its 1,252,320 full units (used for other backbones).
MBV2_FULL_UNITS = 1_252_320
MBV2_BUDGET_UNITS = (27_946, 66_592, 93_696)
KEEP_RATIOS = tuple(u / MBV2_FULL_UNITS for u in MBV2_BUDGET_UNITS)   # 2.23 %, 5.32 %, 7.48 %
BUDGET_LEVELS = ("small", "medium", "large")


@dataclass(frozen=True)
class LayerShape:
    """A conv (or Linear, ``kind == "linear"``, H = W = 1) whose weight gradient we time."""

    name: str
    net: str
    kind: str            # "pw" (1x1), "conv" (kxk dense), "dw" (depthwise), "linear"
    c_in: int
    c_out: int
    k: int = 1
    stride: int = 1
    h: int = 1
    w: int = 1
    zoo_layer: str | None = None   # layer name in trady_triton.models, when there is one

    @property
    def groups(self) -> int:
        return self.c_in if self.kind == "dw" else 1

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        p = self.padding
        return ((self.h + 2 * p - self.k) // self.stride + 1,
                (self.w + 2 * p - self.k) // self.stride + 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.c_out, self.c_in)
        return (self.c_out, self.c_in // self.groups, self.k, self.k)

    def label(self) -> str:
        if self.kind == "linear":
            return f"{self.name} linear {self.c_in}->{self.c_out}"
        s = f" s{self.stride}" if self.stride != 1 else ""
        kind = "dw" if self.kind == "dw" else ""
        return f"{self.name} {kind}{self.k}x{self.k}{s} {self.c_in}->{self.c_out} @{self.h}x{self.w}"

    def selected(self, keep: float) -> int:
        """Number of input channels kept at keep fraction ``keep`` (at least one)."""
        return max(1, min(self.c_in, round(keep * self.c_in)))

    def weight_grad_flops(self, batch: int, k_sel: int) -> int:
        """2 x MACs of the weight gradient of ``k_sel`` input channels."""
        oh, ow = self.out_hw
        per_channel = self.c_out // self.groups * self.k * self.k * oh * ow
        return 2 * batch * k_sel * per_channel


@dataclass(frozen=True)
class ActShape:
    """An activation ``[N, C, H, W]`` that a frozen BN -> ReLU6 -> conv chain produces."""

    name: str
    net: str
    c: int
    h: int
    w: int

    def label(self) -> str:
        return f"{self.name} {self.c}@{self.h}x{self.w}"

    def numel(self, batch: int) -> int:
        return batch * self.c * self.h * self.w


# ---------------------------------------------------------------- weight-gradient layers
MBV2 = (
    LayerShape("mbv2.pw_8_48", "mbv2", "pw", 8, 48, 1, 1, 64, 64, "features.2.conv.0.0"),
    LayerShape("mbv2.dw_48_s2", "mbv2", "dw", 48, 48, 3, 2, 64, 64, "features.2.conv.1.0"),
    LayerShape("mbv2.pw_96_16", "mbv2", "pw", 96, 16, 1, 1, 16, 16, "features.5.conv.2.0"),
    LayerShape("mbv2.pw_32_192", "mbv2", "pw", 32, 192, 1, 1, 8, 8, "features.12.conv.0.0"),
    LayerShape("mbv2.dw_192", "mbv2", "dw", 192, 192, 3, 1, 8, 8, "features.12.conv.1.0"),
    LayerShape("mbv2.pw_336_56", "mbv2", "pw", 336, 56, 1, 1, 4, 4, "features.15.conv.2.0"),
    LayerShape("mbv2.pw_112_448", "mbv2", "pw", 112, 448, 1, 1, 4, 4, "features.18.0"),
    LayerShape("mbv2.fc", "mbv2", "linear", 448, 1000, zoo_layer="classifier"),
)
LITE0 = (
    LayerShape("lite0.dw_96_s2", "lite0", "dw", 96, 96, 3, 2, 112, 112, "features.2.conv.1.0"),
    LayerShape("lite0.dw5_240", "lite0", "dw", 240, 240, 5, 1, 28, 28, "features.5.conv.1.0"),
    LayerShape("lite0.pw_480_80", "lite0", "pw", 480, 80, 1, 1, 14, 14, "features.7.conv.2.0"),
    LayerShape("lite0.dw5_672", "lite0", "dw", 672, 672, 5, 1, 14, 14, "features.10.conv.1.0"),
    LayerShape("lite0.pw_320_1280", "lite0", "pw", 320, 1280, 1, 1, 7, 7, "features.17.0"),
    LayerShape("lite0.fc", "lite0", "linear", 1280, 1000, zoo_layer="classifier"),
)
RESNET18 = (   # torchvision resnet18 at 224x224
    LayerShape("r18.l1_3x3_64", "resnet18", "conv", 64, 64, 3, 1, 56, 56),
    LayerShape("r18.l2_3x3_128", "resnet18", "conv", 128, 128, 3, 1, 28, 28),
    LayerShape("r18.l3_3x3_256", "resnet18", "conv", 256, 256, 3, 1, 14, 14),
    LayerShape("r18.l4_3x3_512", "resnet18", "conv", 512, 512, 3, 1, 7, 7),
    LayerShape("r18.down_1x1_64", "resnet18", "pw", 64, 128, 1, 2, 56, 56),
    LayerShape("r18.fc", "resnet18", "linear", 512, 1000),
)
ALL_LAYERS = MBV2 + LITE0 + RESNET18

# The issue-3 speed targets are stated on MobileNetV2 and ResNet layer shapes, batch 64-256.
CORE_LAYERS = tuple(s for s in ALL_LAYERS if s.name in (
    "mbv2.dw_48_s2", "mbv2.pw_96_16", "mbv2.pw_32_192", "mbv2.pw_112_448",
    "r18.l1_3x3_64", "r18.l3_3x3_256", "r18.down_1x1_64"))

# ------------------------------------------------ activations (fused BN -> ReLU6 -> compact)
ACTS = (
    ActShape("mbv2.a48_64", "mbv2", 48, 64, 64),
    ActShape("mbv2.a96_16", "mbv2", 96, 16, 16),
    ActShape("mbv2.a144_8", "mbv2", 144, 8, 8),
    ActShape("mbv2.a336_4", "mbv2", 336, 4, 4),
    ActShape("lite0.a96_112", "lite0", 96, 112, 112),
    ActShape("lite0.a144_56", "lite0", 144, 56, 56),
    ActShape("lite0.a480_14", "lite0", 480, 14, 14),
    ActShape("lite0.a1152_7", "lite0", 1152, 7, 7),
    ActShape("r18.a64_56", "resnet18", 64, 56, 56),
    ActShape("r18.a128_28", "resnet18", 128, 28, 28),
    ActShape("r18.a256_14", "resnet18", 256, 14, 14),
    ActShape("r18.a512_7", "resnet18", 512, 7, 7),
)
CORE_ACTS = tuple(a for a in ACTS if a.name in ("mbv2.a48_64", "mbv2.a144_8", "lite0.a144_56",
                                                 "r18.a64_56", "r18.a256_14"))

KEEPS = (0.02, 0.05, 0.1, 0.25, 0.5)
CORE_KEEPS = (0.05, 0.25)
GPU_BATCHES = (64, 256)

# ------------------------------------------------------------------ tiny (smoke) shapes
TINY_LAYERS = (
    LayerShape("tiny.pw", "tiny", "pw", 12, 8, 1, 1, 6, 5),
    LayerShape("tiny.conv", "tiny", "conv", 8, 6, 3, 2, 7, 6),
    LayerShape("tiny.dw", "tiny", "dw", 10, 10, 3, 1, 5, 5),
    LayerShape("tiny.fc", "tiny", "linear", 16, 5),
)
TINY_ACTS = (ActShape("tiny.a", "tiny", 10, 5, 3),)

# CPU suite: small enough for a few minutes on one core.
CPU_LAYERS = tuple(s for s in ALL_LAYERS if s.name in (
    "mbv2.dw_48_s2", "mbv2.pw_96_16", "mbv2.pw_112_448", "mbv2.fc",
    "lite0.pw_480_80", "lite0.dw5_672", "r18.l3_3x3_256", "r18.fc"))
CPU_ACTS = tuple(a for a in ACTS if a.name in ("mbv2.a48_64", "lite0.a480_14", "r18.a256_14"))
CPU_KEEPS = (0.05, 0.25)
CPU_BATCH = 8


def sizes(size: str) -> dict:
    """Shapes, keep fractions, batches and dtypes of one suite size."""
    if size == "tiny":
        return {"layers": TINY_LAYERS, "acts": TINY_ACTS, "keeps": (0.3,), "batches": (2,),
                "dtypes": ("float32",)}
    if size == "cpu":
        return {"layers": CPU_LAYERS, "acts": CPU_ACTS, "keeps": CPU_KEEPS,
                "batches": (CPU_BATCH,), "dtypes": ("float32",)}
    if size == "gpu":   # pytest on a GPU: the issue-3 core set (run_gpu.py sweeps everything)
        return {"layers": CORE_LAYERS, "acts": CORE_ACTS, "keeps": CORE_KEEPS,
                "batches": GPU_BATCHES, "dtypes": ("float32", "bfloat16")}
    raise ValueError(f"size={size!r}: allowed values are tiny, cpu, gpu")


def compact_bytes(batch: int, k_sel: int, h: int, w: int, elt: int) -> int:
    return batch * k_sel * h * w * elt


def mask_bytes(numel: int) -> int:
    return math.ceil(numel / 8)
