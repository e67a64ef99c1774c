"""Sampling at and beyond the image border, and non-finite offsets.

A 1x1 kernel with weight 1 and no bias makes each output pixel the sampled value itself, so the
expected values below follow from the bilinear rule by hand, without the reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import deft_tvm
from deft_tvm import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close

from helpers import DTYPES

H, W = 4, 5


def _sample(dtype: str, dy: float, dx: float, at=(1, 2)) -> torch.Tensor:
    """Output of a 1x1 identity deformable conv with offset (dy, dx) at output pixel ``at`` only."""
    torch_dtype = getattr(torch, dtype)
    x = (torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W) + 1).to(torch_dtype)
    offset = torch.zeros(1, 2, H, W, dtype=torch_dtype)
    offset[0, 0][at] = dy
    offset[0, 1][at] = dx
    weight = torch.ones(1, 1, 1, 1, dtype=torch_dtype)
    out = deft_tvm.deform_conv2d(x, offset, weight)
    assert_close(out, deform_conv2d_reference(x, offset, weight), dtype)
    return out[0, 0]


def _value(y: int, x: int) -> float:
    return float(y * W + x + 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "target_y, expected",
    [(-1.0, 0.0), (-0.5, _value(0, 2) / 2), (0.0, _value(0, 2)), (H - 1.0, _value(H - 1, 2)),
     (H - 0.5, _value(H - 1, 2) / 2), (float(H), 0.0)],
)
def test_rows_at_the_border(dtype, target_y, expected):
    out = _sample(dtype, dy=target_y - 1, dx=0.0)  # output pixel (1, 2) samples row 1 + dy
    assert out[1, 2].item() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target_x, expected", [(-1.0, 0.0), (0.0, _value(1, 0)), (W - 1.0, _value(1, W - 1)),
                                                (float(W), 0.0)])
def test_columns_at_the_border(dtype, target_x, expected):
    out = _sample(dtype, dy=0.0, dx=target_x - 2)
    assert out[1, 2].item() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dy, dx", [(1.0, -2.0), (-1.0, 1.0), (2.0, 2.0), (-1.0, -2.0)])
def test_integer_offsets_read_the_shifted_pixel(dtype, dy, dx):
    out = _sample(dtype, dy, dx)
    assert out[1, 2].item() == _value(1 + int(dy), 2 + int(dx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [1e6, -1e6, 1e30, -1e30, math.inf, -math.inf])
@pytest.mark.parametrize("axis", ["dy", "dx"])
def test_far_and_infinite_offsets_contribute_nothing(dtype, value, axis):
    out = _sample(dtype, **({"dy": value, "dx": 0.0} if axis == "dy" else {"dy": 0.0, "dx": value}))
    assert out[1, 2].item() == 0.0
    untouched = torch.ones_like(out, dtype=torch.bool)
    untouched[1, 2] = False
    expected = torch.arange(H * W, dtype=torch.float64).reshape(H, W) + 1
    assert torch.equal(out[untouched].double(), expected[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", ["dy", "dx"])
def test_nan_offset_gives_nan_like_torchvision_and_only_there(dtype, axis):
    # torchvision 0.26 returns NaN for a NaN dy (its range test lets NaN through and the bilinear
    # weights become NaN); for a NaN dx it reads out of bounds. deft_tvm gives NaN for both, reads
    # nothing out of range, and leaves every other output pixel alone.
    out = _sample(dtype, **({"dy": math.nan, "dx": 0.0} if axis == "dy" else {"dy": 0.0, "dx": math.nan}))
    assert math.isnan(out[1, 2].item())
    assert torch.isfinite(out).sum().item() == H * W - 1


def test_nan_offset_with_the_other_coordinate_outside_contributes_nothing():
    # torchvision's test is "y <= -1 or y >= H or x <= -1 or x >= W": an x far outside wins over a NaN y.
    out = _sample("float32", dy=math.nan, dx=1e6)
    assert out[1, 2].item() == 0.0


def test_nan_mask_propagates():
    x = torch.ones(1, 1, 3, 3)
    offset = torch.zeros(1, 2, 3, 3)
    mask = torch.ones(1, 1, 3, 3)
    mask[0, 0, 1, 1] = math.nan
    out = deft_tvm.deform_conv2d(x, offset, torch.ones(1, 1, 1, 1), mask=mask)
    assert math.isnan(out[0, 0, 1, 1].item()) and torch.isfinite(out).sum().item() == 8


def test_extreme_offsets_in_a_real_layer_match_reference():
    spec_args = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 9, 11, generator=gen)
    weight = torch.randn(4, 3, 3, 2, generator=gen)
    offset = torch.randn(2, 2 * 3 * 6, 4, 10, generator=gen) * 3
    extremes = torch.tensor([1e6, -1e6, 1e30, -1e30, math.inf, -math.inf, 2.0, -1.0])
    pick = torch.randint(0, 8, offset.shape, generator=gen)
    offset = torch.where(torch.rand(offset.shape, generator=gen) < 0.3, extremes[pick], offset)
    mask = torch.rand(2, 3 * 6, 4, 10, generator=gen)
    out = deft_tvm.deform_conv2d(x, offset, weight, None, mask=mask, **spec_args)
    assert torch.isfinite(out).all()
    assert_close(out, deform_conv2d_reference(x, offset, weight, None, mask=mask, **spec_args), "float32")
