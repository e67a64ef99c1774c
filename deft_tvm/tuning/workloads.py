"""The one workload registry: name -> shapes, dtype and offset-statistics profile.

Tuning, tests and benchmarks all read it. ``BENCHMARK_WORKLOADS`` are the real layers the
project is measured on; ``TEST_WORKLOADS`` are small shapes with the same structure that tests
compile and check quickly. ``DEFAULT_WORKLOAD`` is what the README's main job builds.
"""

from __future__ import annotations

import dataclasses

import torch

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.tuning.stats import PROFILES, OffsetProfile, offset_profile  # noqa: F401 - the registry's profiles


@dataclasses.dataclass(frozen=True)
class Workload:
    """A named layer: its ``DeformConvSpec`` and the offset profile it is measured with."""

    name: str
    spec: DeformConvSpec
    profile: str = "normal_2px"
    description: str = ""

    def with_dtype(self, dtype: str, tf32: bool = False) -> "Workload":
        """This workload in ``dtype`` (float32 ``tf32``: allowed to multiply on TF32 tensor cores)."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, dtype=dtype, tf32=tf32))

    def for_target(self, target) -> "Workload":
        """This workload with the spec ``target``'s kernels take (``schedules.kernel_spec``)."""
        from deft_tvm.schedules import kernel_spec

        return dataclasses.replace(self, spec=kernel_spec(self.spec, target))

    def kernel_tensors(self, inputs: dict) -> list[torch.Tensor]:
        """``make_inputs``' keyword arguments as this workload's compiled kernel takes them, before
        the output (``DeformConvSpec.kernel_arguments``)."""
        return self.spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))

    def make_inputs(self, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
        """Random input/weight/bias and profile-distributed offset/mask, as keyword arguments."""
        spec, profile = self.spec, offset_profile(self.profile)
        gen = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, spec.dtype)

        def normal(shape, scale=1.0):
            return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

        fan_in = spec.weight_shape[1] * spec.kernel_h * spec.kernel_w
        return {
            "input": normal(spec.input_shape),
            "offset": profile.sample_offsets(spec.offset_shape, gen, dtype, device),
            "weight": normal(spec.weight_shape, fan_in**-0.5),
            "bias": normal((spec.out_channels,)) if spec.has_bias else None,
            "stride": spec.stride,
            "padding": spec.padding,
            "dilation": spec.dilation,
            "mask": profile.sample_mask(spec.mask_shape, gen, dtype, device) if spec.has_mask else None,
        }


def _layer(name, batch, channels, height, width, *, out_channels=None, stride=1, offset_groups=1, bias=True,
           description="") -> Workload:
    """A 3x3, padding-1 DCNv2 layer (``out_channels`` default: ``channels``)."""
    spec = DeformConvSpec(batch, channels, height, width, out_channels or channels, 3, 3, stride=(stride, stride),
                          padding=(1, 1), offset_groups=offset_groups, has_bias=bias)
    return Workload(name, spec, description=description)


_BENCHMARK = [
    _layer("paper_64c_64x64_n1", 1, 64, 64, 64, description="DefT paper layer, batch 1"),
    _layer("paper_64c_64x64_n8", 8, 64, 64, 64, description="DefT paper layer, batch 8"),
    _layer("paper_64c_64x64_n32", 32, 64, 64, 64, description="DefT paper layer, batch 32"),
    _layer("r50dcn_c3", 2, 128, 100, 168, description="ResNet-50-DCN stage c3, 800x1344 input, batch 2"),
    _layer("r50dcn_c4", 2, 256, 50, 84, description="ResNet-50-DCN stage c4, 800x1344 input, batch 2"),
    _layer("r50dcn_c5", 2, 512, 25, 42, description="ResNet-50-DCN stage c5, 800x1344 input, batch 2"),
    _layer("video_64c_180x320_og8", 1, 64, 180, 320, offset_groups=8,
           description="video restoration alignment (EDVR/BasicVSR-style), 8 offset groups"),
    # The DCN layers of tools/train_bench.py's default network (batch 32, 64x64 digits, width 64; no
    # bias: a BatchNorm follows each), so that the training benchmark runs on tuned kernels.
    _layer("train_stem_1to64_64x64_n32", 32, 1, 64, 64, out_channels=64, bias=False,
           description="train_bench stem, 1 -> 64 channels"),
    _layer("train_64c_64x64_n32", 32, 64, 64, 64, bias=False, description="train_bench stage 1 (4 layers)"),
    _layer("train_down_64to128_n32", 32, 64, 64, 64, out_channels=128, stride=2, bias=False,
           description="train_bench stage 2's first layer, stride 2, 64 -> 128 channels"),
    _layer("train_128c_32x32_n32", 32, 128, 32, 32, bias=False, description="train_bench stage 2 (3 layers)"),
]

_TEST = [
    _layer("test_paper_small", 2, 8, 12, 12, description="paper layer structure, small"),
    Workload(
        "test_asymmetric",
        DeformConvSpec(3, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3),
        profile="student_t3_2px",
        description="torchvision-style asymmetric parameters",
    ),
    _layer("test_video_small", 1, 16, 10, 14, offset_groups=8, description="video layer structure, small"),
    _layer("test_tensor_core_small", 2, 32, 10, 16, offset_groups=2,
           description="smallest shape the float16 tensor-core schedule takes (channels and width % 16)"),
]

WORKLOADS: dict[str, Workload] = {w.name: w for w in _BENCHMARK + _TEST}
BENCHMARK_WORKLOADS: tuple[str, ...] = tuple(w.name for w in _BENCHMARK)
TEST_WORKLOADS: tuple[str, ...] = tuple(w.name for w in _TEST)
DEFAULT_WORKLOAD = "paper_64c_64x64_n1"


def get_workload(name: str, dtype: str | None = None, tf32: bool = False) -> Workload:
    """The registered workload ``name``, optionally in another dtype; ``tf32`` (float32 only): its
    kernels may multiply on TF32 tensor cores, as the op's do under
    ``torch.backends.cuda.matmul.allow_tf32``."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; registered: {', '.join(WORKLOADS)}")
    workload = WORKLOADS[name]
    return workload.with_dtype(dtype or workload.spec.dtype, tf32) if dtype or tf32 else workload
