"""The fused CUDA backward on a GPU (``pytest -m gpu``): extreme and NaN offsets give the float64
reference's gradients (NaN exactly where it has NaN) and read nothing out of range; the staged
patches are a pure speed choice (staged and unstaged kernels agree)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules.cuda_backward_fused import DataTiling, fused_backward_module

from helpers import grad_leaves, make_case
from test_forward import SHAPES

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

# Offset groups, groups, a 5x3 kernel at stride 2, with and without mask and bias, and more output
# channels than one weight stage takes.
CASES = {
    "asymmetric": SHAPES["asymmetric"],
    "og4_nobias": DeformConvSpec(3, 64, 20, 37, 32, 3, 3, padding=(1, 1), offset_groups=4, has_bias=False),
    "k5x3_og5_nomask": DeformConvSpec(1, 40, 33, 70, 24, 5, 3, stride=(2, 2), padding=(2, 1), offset_groups=5,
                                      has_mask=False),
    "two_weight_stages": DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1)),  # 64 out: two stages of 32
}
EXTREMES = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1e6, -1e6, 70.0, -70.0, -1.0, 3.5], dtype=torch.float64)


def _extreme(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """40 % of the offsets replaced by extreme values, 0.2 % by NaN."""
    gen = torch.Generator().manual_seed(seed)
    pick = EXTREMES[torch.randint(0, len(EXTREMES), offset.shape, generator=gen)].to(offset.dtype)
    offset = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset)
    return torch.where(torch.rand(offset.shape, generator=gen) < 0.002, math.nan, offset)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_extreme_offsets_give_the_reference_gradients(case, dtype):
    spec = dataclasses.replace(CASES[case], dtype=dtype)
    args = make_case(spec, seed=21)
    args["offset"] = _extreme(args["offset"], seed=22)
    grad_output = torch.randn(spec.output_shape, dtype=torch.float64).to(args["input"].dtype)
    in_float64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    expected = deform_conv2d_reference_backward(grad_output.double(), **in_float64)._asdict()
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    leaves = {k: v.cuda() for k, v in grad_leaves(args).items()}
    out = deft_tvm.deform_conv2d(**{**on_gpu, **leaves})
    grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_output.cuda())))
    torch.cuda.synchronize()  # an out-of-range access fails here
    for name, grad in grads.items():
        value = expected[name]
        assert torch.equal(torch.isnan(grad.cpu()), torch.isnan(value)), name
        scale = max(value.nan_to_num(0.0).abs().max().item(), 1.0)
        assert_close(grad.cpu().double() / scale, value / scale, dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_staged_and_unstaged_data_kernels_agree(case):
    spec = dataclasses.replace(CASES[case], dtype="float32")
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=23).items()}
    grad_output = torch.randn(spec.output_shape, device="cuda")
    n, c, h, w = spec.input_shape
    results = []
    for staged in (True, False):
        tiling = dataclasses.replace(DataTiling.for_spec(spec), staged=staged)
        module, _, _ = fused_backward_module(spec, tiling)
        kernel = compile_kernel(module, target_for_device("cuda"))["grad_data"]
        grad_input = torch.zeros((n, c, h * w), device="cuda")
        grad_offset = torch.empty((tiling.channel_splits, *spec.offset_shape), device="cuda")
        grad_mask = [torch.empty((tiling.channel_splits, *spec.mask_shape), device="cuda")] * spec.has_mask
        mask = [args["mask"]] * spec.has_mask
        kernel(args["input"].view(n, c, h * w), args["offset"], *mask, args["weight"], grad_output, grad_input,
               grad_offset, *grad_mask)
        results.append([grad_input, grad_offset.sum(0), *[m.sum(0) for m in grad_mask]])
    for staged, unstaged in zip(*results):
        scale = max(unstaged.abs().max().item(), 1.0)
        assert_close(staged / scale, unstaged.double() / scale, "float32")
