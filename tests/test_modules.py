"""DeformConv2d and ModulatedDeformConv2dPack."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deft_tvm
from deft_tvm.tolerances import assert_close


@pytest.mark.parametrize(
    "kwargs, expected",
    [  # torchvision.ops.DeformConv2d's repr for the same arguments
        (dict(in_channels=4, out_channels=6, kernel_size=3), "DeformConv2d(4, 6, kernel_size=(3, 3), stride=(1, 1))"),
        (
            dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=2,
                 groups=2, bias=False),
            "DeformConv2d(4, 6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 2), groups=2, "
            "bias=False)",
        ),
    ],
)
def test_deform_conv2d_repr_matches_torchvision(kwargs, expected):
    assert repr(deft_tvm.DeformConv2d(**kwargs)) == expected


def test_deform_conv2d_parameters_and_init():
    torch.manual_seed(0)
    layer = deft_tvm.DeformConv2d(8, 6, (3, 2), groups=2)
    assert layer.weight.shape == (6, 4, 3, 2) and layer.bias.shape == (6,)
    fan_in = 4 * 3 * 2
    # kaiming_uniform_(a=sqrt(5)) and the bias both draw from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(fan_in)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound
    assert layer.bias.abs().max() <= bound
    assert deft_tvm.DeformConv2d(8, 6, 3, bias=False).bias is None


def test_deform_conv2d_forward_is_the_functional():
    torch.manual_seed(0)
    layer = deft_tvm.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2)
    x = torch.randn(2, 6, 9, 11)
    offset = torch.randn(2, 2 * 3 * 6, 4, 10)
    mask = torch.rand(2, 3 * 6, 4, 10)
    with torch.no_grad():
        out = layer(x, offset, mask)
        expected = deft_tvm.deform_conv2d(x, offset, layer.weight, layer.bias, (2, 1), (1, 0), (2, 1), mask)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_fresh_pack_layer_is_half_a_dense_convolution(offset_groups):
    # conv_offset starts at zero: offsets 0 and mask sigmoid(0) = 0.5 everywhere.
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(4, 6, 3, stride=(1, 2), padding=1, groups=2, offset_groups=offset_groups)
    assert layer.conv_offset.out_channels == 3 * offset_groups * 9
    x = torch.randn(2, 4, 7, 8)
    with torch.no_grad():
        out = layer(x)
    dense = F.conv2d(x.double(), 0.5 * layer.weight.double(), layer.bias.double(), (1, 2), 1, groups=2)
    assert_close(out, dense, "float32")


def test_pack_layer_uses_its_predicted_offsets_and_mask():
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, padding=1, offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        o1, o2, logits = torch.chunk(layer.conv_offset(x), 3, dim=1)
        expected = deft_tvm.deform_conv2d_reference(
            x, torch.cat([o1, o2], 1), layer.weight, layer.bias, padding=1, mask=torch.sigmoid(logits)
        )
        assert_close(layer(x), expected, "float32")
    assert repr(layer) == "ModulatedDeformConv2dPack(4, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), offset_groups=2)"
