"""torch.autocast: the op runs in the autocast dtype (as conv2d does), forward and backward."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.reference.tolerances import assert_close

AUTOCAST_DTYPES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])


def _pack_layer() -> deft_tvm.ModulatedDeformConv2dPack:
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(8, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    return layer


def check_pack_layer_under_autocast(layer: deft_tvm.ModulatedDeformConv2dPack, x: torch.Tensor, dtype) -> None:
    """``layer(x)`` under autocast on ``x``'s device type runs in ``dtype`` and matches the float64
    reference of the cast tensors (offsets and mask from ``conv_offset`` under the same autocast)
    at ``dtype``'s tolerance."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
        out = layer(x)
        offset, mask = layer.split_conv_offset(layer.conv_offset(x))  # autocast: already in dtype
    assert out.dtype == offset.dtype == mask.dtype == dtype
    expected = deft_tvm.deform_conv2d_reference(
        x.to(dtype), offset, layer.weight.to(dtype), layer.bias.to(dtype), layer.stride, layer.padding,
        layer.dilation, mask)
    assert_close(out, expected, str(dtype).removeprefix("torch."))


@AUTOCAST_DTYPES
def test_pack_layer_under_autocast_matches_the_reference_in_the_autocast_dtype(dtype):
    check_pack_layer_under_autocast(_pack_layer(), torch.randn(2, 8, 9, 10), dtype)


@AUTOCAST_DTYPES
def test_autocast_gradients_are_those_of_the_op_on_cast_tensors(dtype):
    layer = deft_tvm.DeformConv2d(4, 6, (3, 2), padding=(1, 0), groups=2)
    x = torch.randn(1, 4, 7, 6, requires_grad=True)
    offset = torch.randn(1, 12, 7, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x, offset)
    assert out.dtype == dtype
    grad_output = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (x, offset, layer.weight, layer.bias), grad_output)
    assert [g.dtype for g in grads] == [torch.float32] * 4  # back through autocast's casts

    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, offset, layer.weight, layer.bias)]
    manual = deft_tvm.deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], padding=(1, 0))
    assert torch.equal(manual, out)
    expected = torch.autograd.grad(manual, leaves, grad_output)
    for grad, cast in zip(grads, expected):
        assert torch.equal(grad, cast.float())


def test_float64_tensors_are_not_cast():
    layer = deft_tvm.DeformConv2d(2, 2, 3, padding=1).double()
    x, offset = torch.randn(1, 2, 5, 5, dtype=torch.float64), torch.zeros(1, 18, 5, 5, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x, offset).dtype == torch.float64


def test_outside_autocast_float32_stays_float32():
    layer = deft_tvm.DeformConv2d(2, 2, 3, padding=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(torch.randn(1, 2, 5, 5), torch.zeros(1, 18, 5, 5)).dtype == torch.float32
