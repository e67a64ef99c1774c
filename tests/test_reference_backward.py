"""The float64 reference backward (torchvision's gradients), checked against torch autograd of the
float64 reference forward away from the borders and against torchvision's formulas on them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deft_tvm import deform_conv2d_reference
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward

from helpers import TENSOR_ARGUMENTS, grad_leaves, make_case

SPECS = {
    "asymmetric": DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                 offset_groups=3, dtype="float64"),
    "no_mask_no_bias": DeformConvSpec(1, 4, 6, 7, 6, 3, 3, padding=(1, 1), offset_groups=2, has_mask=False,
                                      has_bias=False, dtype="float64"),
    "1x1_batch3": DeformConvSpec(3, 3, 5, 4, 2, 1, 1, dtype="float64"),
}


def _autograd(args: dict, grad_output: torch.Tensor) -> dict:
    leaves = grad_leaves(args)
    out = deform_conv2d_reference(**{**args, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("shape", list(SPECS))
def test_matches_autograd_of_the_forward_reference_inside_the_image(shape):
    # Offsets of up to 2.5 px with this seed put no sampling point exactly on a border or a
    # pixel, where the calculus and torchvision's kernels may differ.
    spec = SPECS[shape]
    args = make_case(spec, seed=3)
    grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = _autograd(args, grad_output)
    grads = deform_conv2d_reference_backward(grad_output, **args)._asdict()
    for name in TENSOR_ARGUMENTS:
        if args[name] is None:
            assert grads[name] is None, name
        else:
            assert grads[name].shape == args[name].shape, name
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-10, atol=1e-10, msg=name)


def _one_point_case(dy: float, dx: float):
    """A 1x1 kernel on a 3x4 image: one output pixel, at (0, 1), sampled at (dy, 1 + dx)."""
    spec = DeformConvSpec(1, 2, 3, 4, 1, 1, 1, dtype="float64")
    args = make_case(spec, seed=5)
    offset = torch.full(spec.offset_shape, 0.25, dtype=torch.float64)
    offset[0, 0, 0, 1], offset[0, 1, 0, 1] = dy, dx
    args["offset"] = offset
    return spec, args


def test_point_exactly_at_minus_one_keeps_torchvisions_one_sided_offset_gradient():
    # y = -1 exactly: the point contributes nothing (-1 < y fails), so autograd of the forward gives
    # no gradient; torchvision's get_coordinate_weight has no early return there and gives the
    # derivative of the row-0 corners (the y = -1 corners read zero).
    spec, args = _one_point_case(dy=-1.0, dx=0.25)
    grad_output = torch.zeros(spec.output_shape, dtype=torch.float64)
    grad_output[0, 0, 0, 1] = 1.0
    grads = deform_conv2d_reference_backward(grad_output, **args)
    image, weight, mask = args["input"][0], args["weight"][0, :, 0, 0], args["mask"][0, 0, 0, 1]
    # Corners (0, 1) and (0, 2) with weights 1 - 0.25 and 0.25 along x, per channel.
    along_y = (0.75 * image[:, 0, 1] + 0.25 * image[:, 0, 2]) * weight
    torch.testing.assert_close(grads.offset[0, 0, 0, 1], mask * along_y.sum(), rtol=1e-12, atol=1e-12)
    assert grads.offset[0, 0, 0, 1] != 0
    assert grads.offset[0, 1, 0, 1] == 0  # along x: only the y = -1 row, which reads zero, moves
    assert grads.mask[0, 0, 0, 1] == 0 and grads.input.abs().sum() == 0 and grads.weight.abs().sum() == 0
    assert _autograd(args, grad_output)["offset"][0, 0, 0, 1] == 0


@pytest.mark.parametrize("dy, dx", [(-1.5, 0.25), (3.0, 0.25), (0.5, -2.5), (1e6, 0.0), (float("inf"), 0.0),
                                    (0.0, float("-inf"))],
                         ids=["above_minus_one", "at_height", "left_of_minus_one", "far", "inf", "minus_inf"])
def test_points_outside_get_no_gradient(dy, dx):
    spec, args = _one_point_case(dy, dx)
    grad_output = torch.zeros(spec.output_shape, dtype=torch.float64)
    grad_output[0, 0, 0, 1] = 1.0
    grads = deform_conv2d_reference_backward(grad_output, **args)
    assert grads.offset[0, :, 0, 1].abs().sum() == 0 and grads.mask[0, 0, 0, 1] == 0
    assert grads.input.abs().sum() == 0 and grads.weight.abs().sum() == 0


def test_batch_zero_gives_empty_and_zero_gradients():
    spec = dataclasses.replace(SPECS["asymmetric"], batch=0)
    args = make_case(spec)
    grads = deform_conv2d_reference_backward(torch.zeros(spec.output_shape, dtype=torch.float64), **args)
    assert grads.input.shape == spec.input_shape and grads.offset.shape == spec.offset_shape
    assert grads.weight.shape == spec.weight_shape and grads.weight.abs().sum() == 0
    assert grads.bias.abs().sum() == 0


def test_nan_offset_gives_nan_offset_and_mask_gradients():
    spec, args = _one_point_case(float("nan"), 0.25)
    grad_output = torch.zeros(spec.output_shape, dtype=torch.float64)
    grad_output[0, 0, 0, 1] = 1.0
    grads = deform_conv2d_reference_backward(grad_output, **args)
    assert torch.isnan(grads.offset[0, :, 0, 1]).all() and torch.isnan(grads.mask[0, 0, 0, 1])
    assert grads.input.isfinite().all()  # a NaN point has no in-image corner to scatter to
