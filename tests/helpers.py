"""Helpers shared by the tests: the dtype list, random arguments for a spec, extreme offsets and a
CUDA graph's capture and replay."""

from __future__ import annotations

import math
from typing import Callable

import torch

from deft_tvm.compute.spec import DeformConvSpec

DTYPES = ["float64", "float32", "float16", "bfloat16"]

# float16 layers the CUDA tensor-core schedule takes, with torchvision-style asymmetric parameters:
# few channels per offset group (2-byte gathers), positions spanning rows, stride/dilation per axis,
# no mask or bias, 1x1 kernels.
TENSOR_CORE_SHAPES = {
    "og8_cpg2": DeformConvSpec(1, 16, 8, 16, 16, 3, 3, padding=(1, 1), offset_groups=8, dtype="float16"),
    "og3_width8": DeformConvSpec(2, 48, 9, 8, 32, 3, 3, padding=(1, 1), offset_groups=3, dtype="float16"),
    "asymmetric": DeformConvSpec(2, 32, 17, 15, 48, 3, 3, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                 offset_groups=4, dtype="float16", has_mask=False, has_bias=False),
    "1x1": DeformConvSpec(4, 64, 8, 8, 16, 1, 1, dtype="float16"),
    "positions_padded": DeformConvSpec(1, 16, 7, 9, 32, 3, 3, padding=(1, 1), dtype="float16"),  # 63 positions
}

# The tensor arguments of deform_conv2d, in its order (bias and mask may be None).
TENSOR_ARGUMENTS = ("input", "offset", "weight", "bias", "mask")


def grad_leaves(args: dict) -> dict:
    """Copies of ``args``' tensor arguments (those given) that require grad, by name."""
    return {k: args[k].clone().requires_grad_(True) for k in TENSOR_ARGUMENTS if args[k] is not None}


def float32_sampled_offsets(spec: DeformConvSpec, offset: torch.Tensor) -> torch.Tensor:
    """``offset`` (N x 2 * offset groups * taps x out_h x out_w, any float dtype) as float64 offsets
    that put each sampling point where float32 arithmetic puts it: the kernels (and torchvision)
    add a tap's integer base coordinate (px) and its offset in float32, which rounds points
    within half a float32 ulp of an integer (e.g. 171.9999959 -> 172) onto it. grad_offset (the
    bilinear derivative) is discontinuous there, so a float64 reference of such a point takes the
    other cell's derivative; on these offsets it takes the op's cell. NaN and infinities stay."""
    taps = spec.kernel_h * spec.kernel_w
    t = torch.arange(taps, dtype=torch.float64)
    base_y = (torch.arange(spec.out_h, dtype=torch.float64)[None, :, None] * spec.stride[0] - spec.padding[0]
              + (t // spec.kernel_w)[:, None, None] * spec.dilation[0])
    base_x = (torch.arange(spec.out_w, dtype=torch.float64)[None, None, :] * spec.stride[1] - spec.padding[1]
              + (t % spec.kernel_w)[:, None, None] * spec.dilation[1])
    base = torch.stack(torch.broadcast_tensors(base_y, base_x), dim=1).reshape(2 * taps, spec.out_h, spec.out_w)
    base = base.repeat(spec.offset_groups, 1, 1).to(offset.device)
    with torch.no_grad():
        point = base.float() + offset.float()
        return torch.where(point.isfinite(), point.double() - base, offset.double())


def make_case(spec: DeformConvSpec, *, seed: int = 0, offset_scale: float = 2.0):
    """Random arguments for ``spec`` as keyword arguments of ``deform_conv2d``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return {
        "input": randn(spec.input_shape),
        "offset": randn(spec.offset_shape, offset_scale),
        "weight": randn(spec.weight_shape, (spec.weight_shape[1] * spec.kernel_h * spec.kernel_w) ** -0.5),
        "bias": randn((spec.out_channels,)) if spec.has_bias else None,
        "stride": spec.stride,
        "padding": spec.padding,
        "dilation": spec.dilation,
        "mask": torch.rand(spec.mask_shape, generator=gen, dtype=torch.float64).to(dtype) if spec.has_mask else None,
    }


def small_dcn_model() -> torch.nn.Sequential:
    """Conv -> ModulatedDeformConv2dPack (offsets made non-zero) -> ReLU, seeded, in eval mode."""
    import deft_tvm

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        deft_tvm.ModulatedDeformConv2dPack(8, 8, 3, padding=1, offset_groups=2),
        torch.nn.ReLU(),
    ).eval()
    torch.nn.init.normal_(model[1].conv_offset.weight, std=0.1)
    return model


def with_extreme_offsets(case: dict, seed: int) -> dict:
    """``case`` (``make_case``'s arguments) with far outside, infinite and NaN offsets in 30 % of
    the entries: the reference's result, and no out-of-bounds read, is expected of them."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([1e6, -1e6, 1e4, -1e4, math.inf, -math.inf, math.nan, 20.0, -1.0, 0.5])
    pick = values[torch.randint(0, len(values), case["offset"].shape, generator=gen)].to(case["offset"].dtype)
    case["offset"] = torch.where(torch.rand(case["offset"].shape, generator=gen) < 0.3, pick, case["offset"])
    return case


def replayed_in_cuda_graph(call: Callable[[dict], torch.Tensor], static: dict, fresh: dict) -> torch.Tensor:
    """``call(static)`` (keyword arguments of deform_conv2d on the GPU) warmed up on a side stream,
    captured in a CUDA graph, then replayed after ``fresh``'s tensors were copied into ``static``'s:
    the graph's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static)
    for name in TENSOR_ARGUMENTS:
        if static[name] is not None:
            static[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    return out
