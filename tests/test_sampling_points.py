"""The float64 reference samples where float32 arithmetic does when the tests give it
``float32_sampled_offsets``: the CPU op's offset gradient at a point that float32 rounds onto an
integer (where the bilinear derivative jumps) is the reference's on those offsets, and not on the
raw ones; NaN and infinite offsets stay as they are."""

from __future__ import annotations

import math

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close
from helpers import float32_sampled_offsets, grad_leaves, make_case

# Output (16, 5) of a 3x2 kernel, stride (2, 1), padding (1, 0): tap (1, 0)'s base y is 16 * 2 - 1 + 1
# = 32, offset -4e-7 (float32's spacing below 32 is 1.9e-6: rounded onto 32); x at output (7, 0), tap
# (0, 1): 0 + 1 + 2**-22 (float32's spacing above 1 is 2**-23: kept).
SPEC = DeformConvSpec(1, 2, 40, 20, 3, 3, 2, stride=(2, 1), padding=(1, 0), offset_groups=2, dtype="float32",
                      has_bias=False)
ROUNDED = (0, 2 * 2, 16, 5)  # offset group 0, tap 2 = (1, 0), y
KEPT = (0, 12 + 2 * 1 + 1, 7, 0)  # offset group 1, tap 1 = (0, 1), x


def _offsets() -> torch.Tensor:
    offset = torch.zeros(SPEC.offset_shape)
    offset[ROUNDED] = -4e-7
    offset[KEPT] = 2.0 ** -22
    offset[0, 0, 0, :4] = torch.tensor([math.nan, math.inf, -math.inf, 1e30])
    return offset


def test_offsets_move_points_onto_float32s_and_keep_the_rest():
    offset = _offsets()
    moved = float32_sampled_offsets(SPEC, offset)
    assert moved.dtype == torch.float64 and moved[ROUNDED] == 0.0 and moved[KEPT] == 2.0 ** -22
    assert moved[0, 0, 0, 0].isnan()
    assert moved[0, 0, 0, 1:4].tolist() == [math.inf, -math.inf, float(offset[0, 0, 0, 3])]
    untouched = torch.ones_like(offset, dtype=torch.bool)
    untouched[ROUNDED] = False
    untouched[0, 0, 0, :4] = False
    assert torch.equal(moved[untouched], offset.double()[untouched])


@pytest.mark.parametrize("sampled", [True, False])
def test_reference_on_sampled_offsets_gives_the_cpu_ops_offset_gradient(sampled):
    args = {**make_case(SPEC, seed=3), "offset": _offsets()}
    args["offset"][0, 0, 0, :4] = 0.0
    grad_output = torch.randn(SPEC.output_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    leaves = grad_leaves(args)
    out = deft_tvm.deform_conv2d(**{**args, **leaves})
    got = torch.autograd.grad(out, leaves["offset"], grad_output.float())[0]
    in_float64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if sampled:
        in_float64["offset"] = float32_sampled_offsets(SPEC, args["offset"])
    expected = deform_conv2d_reference_backward(grad_output, **in_float64).offset
    assert_close(got[KEPT], expected[KEPT], "float32")
    if sampled:
        assert_close(got, expected, "float32")
    else:  # the derivative of the other cell
        with pytest.raises(AssertionError, match="not close"):
            assert_close(got[ROUNDED], expected[ROUNDED], "float32")
