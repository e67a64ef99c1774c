"""The bound the deterministic fused backward scales grad_input by (``runtime.backward.contribution_bound``):
it bounds every |grad_column x mask| of the call, and is None where the fixed-point kernels do not apply."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deft_tvm.runtime.backward import contribution_bound
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case


def _columns_times_mask(spec, grad_output, mask, weight) -> torch.Tensor:
    """|grad_columns x mask| in float64, ``[N, C, taps, Ho * Wo]``: per group, weight^T . grad_output."""
    n, g, taps = spec.batch, spec.groups, spec.kernel_h * spec.kernel_w
    w = weight.double().reshape(g, spec.out_channels // g, spec.in_channels // g, taps)
    dy = grad_output.double().reshape(n, g, spec.out_channels // g, -1)
    columns = torch.einsum("goct,ngop->ngctp", w, dy).reshape(n, spec.in_channels, taps, -1)
    if mask is not None:  # a channel takes its offset group's mask
        per_group = mask.double().reshape(n, spec.offset_groups, 1, taps, -1)
        cpg = spec.in_channels // spec.offset_groups
        columns = columns.reshape(n, spec.offset_groups, cpg, taps, -1) * per_group
    return columns.abs().reshape(n, spec.in_channels, taps, -1)


@pytest.mark.parametrize("name", ["test_asymmetric", "test_video_small", "test_paper_small"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_bound_covers_every_column_times_mask(name, dtype):
    spec = get_workload(name, "float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32").spec
    args = make_case(spec, seed=5)
    grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(6)).to(args["input"].dtype)
    bound = contribution_bound(spec, grad_output, args["mask"], args["weight"])
    largest = _columns_times_mask(spec, grad_output, args["mask"], args["weight"]).max().item()
    assert largest <= bound < 64 * largest  # a bound, and not a loose one on these layers


def test_no_bound_where_fixed_point_does_not_apply():
    spec = get_workload("test_paper_small", "float16").spec
    args = make_case(spec, seed=5)
    grad_output = torch.randn(spec.output_shape).half()
    for other in ("float32", "float64"):  # float32 without TF32: its tolerance is below the quantum
        wide = dataclasses.replace(spec, dtype=other)
        assert contribution_bound(wide, grad_output.to(getattr(torch, other)), args["mask"], args["weight"]) is None
    for bad in (float("nan"), float("inf")):
        broken = grad_output.clone()
        broken[0, 0, 0, 0] = bad
        assert contribution_bound(spec, broken, args["mask"], args["weight"]) is None
    weight = args["weight"].clone()
    weight[0, 0, 0, 0] = float("inf")
    assert contribution_bound(spec, grad_output, args["mask"], weight) is None
