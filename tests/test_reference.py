"""The float64 reference itself, checked against facts that need no deformable-conv code."""

import torch
import torch.nn.functional as F

from deft_tvm import deform_conv2d_reference
from deft_tvm.compute.spec import DeformConvSpec

from helpers import make_case


def test_zero_offsets_and_unit_mask_is_a_dense_convolution():
    spec = DeformConvSpec(3, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                          offset_groups=3, dtype="float64")
    args = make_case(spec)
    args["offset"] = torch.zeros(spec.offset_shape, dtype=torch.float64)
    args["mask"] = torch.ones(spec.mask_shape, dtype=torch.float64)
    expected = F.conv2d(args["input"], args["weight"], args["bias"], spec.stride, spec.padding, spec.dilation, groups=2)
    torch.testing.assert_close(deform_conv2d_reference(**args), expected, rtol=1e-12, atol=1e-12)


def test_integer_offset_shifts_the_input():
    # An offset of (+1, -2) on every tap equals a dense convolution of the input shifted by it.
    spec = DeformConvSpec(2, 3, 8, 9, 5, 3, 3, has_mask=False, dtype="float64")  # no padding: the shift must not pull in padded pixels
    args = make_case(spec)
    offset = torch.zeros(spec.offset_shape, dtype=torch.float64)
    offset[:, 0::2] = 1.0
    offset[:, 1::2] = -2.0
    args["offset"] = offset
    shifted = torch.zeros_like(args["input"])
    shifted[:, :, :-1, 2:] = args["input"][:, :, 1:, :-2]
    expected = F.conv2d(shifted, args["weight"], args["bias"])
    torch.testing.assert_close(deform_conv2d_reference(**args), expected, rtol=1e-12, atol=1e-12)


def test_half_pixel_offset_averages_neighbours():
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    offset = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    offset[0, 1, 1, 1] = 0.5  # dx at output (1, 1): halfway between x[1, 1] and x[1, 2]
    out = deform_conv2d_reference(x, offset, weight)
    assert out[0, 0, 1, 1].item() == (x[0, 0, 1, 1] + x[0, 0, 1, 2]).item() / 2
