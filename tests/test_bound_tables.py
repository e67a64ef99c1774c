"""The fused backward's first kernel (``cuda_backward_fused.prepare_primfunc``), built serial for the
CPU: it zeroes grad_input's sums and writes the data kernel's bound tables, the largest
|grad_output| over the output channels per (image, position) (NaN where one is NaN) and the sum of
|weight| over each group's output channels per (input channel, tap); only fixed-point tilings that
are not deterministic read tables."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import tvm

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda_backward_fused import DataTiling, _slices, prepare_primfunc

SPEC = DeformConvSpec(2, 6, 5, 7, 9, 3, 2, stride=(2, 1), padding=(1, 0), groups=3, dtype="float16")


def reference_tables(spec, weight, grad_output):
    """The bound tables in float32 (flat, positions then (channel, tap)) from torch: the largest
    |grad_output| over the output channels (NaN where one is NaN), the sum of |weight| over each
    group's output channels."""
    opg = spec.out_channels // spec.groups
    peaks = grad_output.float().abs().amax(1).flatten()
    sums = torch.cat([weight[g * opg:(g + 1) * opg].float().abs().sum(0) for g in range(spec.groups)]).flatten()
    return peaks, sums


def assert_tables(bounds, spec, weight, grad_output, rtol):
    """``bounds`` (a prepare kernel's) are ``reference_tables``' (NaN in the same places, the sums
    within ``rtol``: float32 rounding in another order) and the case has one NaN and one infinite
    peak."""
    peaks, sums = reference_tables(spec, weight, grad_output)
    positions = spec.batch * spec.out_h * spec.out_w
    assert torch.equal(bounds[:positions].isnan(), peaks.isnan()) and peaks.isnan().sum() == 1
    assert torch.equal(bounds[:positions].nan_to_num(), peaks.nan_to_num()) and bounds[:positions].isinf().sum() == 1
    torch.testing.assert_close(bounds[positions:], sums, rtol=rtol, atol=0)


def _serial_prepare(spec, data):
    func = prepare_primfunc(spec, data, bind_threads=False)
    return tvm.compile(tvm.IRModule({"prepare": func}), target=tvm.target.Target({"kind": "llvm"}))["prepare"]


def test_prepare_zeroes_the_sums_and_writes_both_tables():
    data = DataTiling.for_spec(SPEC)
    assert data.fixed_point and data.bound_elements(SPEC) == 2 * SPEC.out_h * SPEC.out_w + 6 * 6
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(SPEC.weight_shape, generator=gen).half()
    grad_output = torch.randn(SPEC.output_shape, generator=gen).half()
    grad_output[1, 4, 0, 2] = math.nan
    grad_output[0, 8, 1, 3] = -math.inf
    accumulator = torch.full((math.prod(SPEC.input_shape),), 7.0)
    bounds = torch.full((data.bound_elements(SPEC),), 7.0)
    _serial_prepare(SPEC, data)(accumulator, weight, grad_output, bounds)

    assert torch.equal(accumulator, torch.zeros_like(accumulator))
    assert_tables(bounds, SPEC, weight, grad_output, rtol=1e-6)


@pytest.mark.parametrize("change", [{"deterministic": True}, {"fixed_point": False}, {"staged": False}],
                         ids=["deterministic", "float_patches", "unstaged"])
def test_only_fixed_point_patches_take_tables(change):
    data = dataclasses.replace(DataTiling.for_spec(SPEC), **change)
    assert data.bound_elements(SPEC) == 0
    assert [p.name for p in prepare_primfunc(SPEC, data).params] == ["accumulator"]
    accumulator = torch.full((math.prod(SPEC.input_shape),), 7, dtype=torch.int64 if data.deterministic else
                             torch.float32)
    _serial_prepare(SPEC, data)(accumulator)
    assert not accumulator.any()


def test_slices_leave_each_thread_at_most_32_channels():
    assert [_slices(c, True) for c in (1, 32, 33, 64, 512, 4096)] == [1, 1, 2, 2, 16, 16]
    assert _slices(512, False) == 1
