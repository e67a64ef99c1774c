"""DeformConv2d, ModulatedDeformConv2dPack and DeformConv2dPack: repr, init, forward, TorchScript,
construction checks."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import deft_tvm
from deft_tvm.reference.tolerances import assert_close


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


def test_dcn_v1_pack_layer_uses_its_predicted_offsets_and_no_mask():
    torch.manual_seed(0)
    layer = deft_tvm.DeformConv2dPack(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                      offset_groups=2)
    assert layer.bias is None and layer.conv_offset.out_channels == 2 * 2 * 6
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        expected = deft_tvm.deform_conv2d_reference(x, layer.conv_offset(x), layer.weight, None, (2, 1), (1, 0),
                                                    (2, 1))
        assert_close(layer(x), expected, "float32")
    assert repr(layer) == ("DeformConv2dPack(4, 6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), "
                           "dilation=(2, 1), groups=2, bias=False, offset_groups=2)")
    with pytest.raises(ValueError, match=r"in_channels must be divisible by offset_groups, got in_channels=4 and "
                                         r"offset_groups=3"):
        deft_tvm.DeformConv2dPack(4, 6, 3, offset_groups=3)


# torch 2.13 deprecates TorchScript in favour of torch.export; the modules still script.
SCRIPTING_DEPRECATED = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


@SCRIPTING_DEPRECATED
@pytest.mark.parametrize("bias, mask", [(True, True), (False, False)])
def test_scripted_deform_conv2d_matches_eager(bias, mask):
    torch.manual_seed(0)
    layer = deft_tvm.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, bias=bias)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 6, 9, 11)
    offset = torch.randn(2, 2 * 3 * 6, 4, 10)
    mask = torch.rand(2, 3 * 6, 4, 10) if mask else None
    with torch.no_grad():
        assert torch.equal(scripted(x, offset, mask), layer(x, offset, mask))
        assert torch.equal(scripted(x, offset), layer(x, offset))


@SCRIPTING_DEPRECATED
@pytest.mark.parametrize("bias", [True, False])
def test_scripted_pack_layer_matches_eager_after_save_and_load(bias):
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, padding=1, groups=2, offset_groups=2, bias=bias)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(layer), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))
    assert (loaded.stride, loaded.padding, loaded.dilation) == ((1, 1), (1, 1), (1, 1))


@SCRIPTING_DEPRECATED
def test_scripted_dcn_v1_pack_layer_matches_eager():
    torch.manual_seed(0)
    layer = deft_tvm.DeformConv2dPack(4, 4, 3, padding=1, offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(layer)(x), layer(x))


@SCRIPTING_DEPRECATED
def test_scripted_pack_layer_has_the_eager_gradients():
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, padding=1, groups=2, offset_groups=2)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    leaves = [x, layer.weight, layer.bias, layer.conv_offset.weight]
    eager = torch.autograd.grad(layer(x).sum(), leaves)
    scripted = torch.autograd.grad(torch.jit.script(layer)(x).sum(), leaves)  # shares layer's parameters
    assert all(torch.equal(e, s) for e, s in zip(eager, scripted))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(stride=0), ValueError, r"stride must be positive, got 0$"),
        (dict(stride=(0, 1)), ValueError, r"stride must be positive, got \(0, 1\)$"),
        (dict(padding=-1), ValueError, r"padding must be non-negative, got -1$"),
        (dict(dilation=(1, 0)), ValueError, r"dilation must be positive, got \(1, 0\)$"),
        (dict(kernel_size=(3, 0)), ValueError, r"kernel_size must be positive, got \(3, 0\)$"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int or a pair of ints, got \(3, 3, 3\)"),
        (dict(in_channels=0), ValueError, r"in_channels must be a positive integer, got 0$"),
        (dict(out_channels=-2), ValueError, r"out_channels must be a positive integer, got -2$"),
        (dict(groups=0), ValueError, r"groups must be a positive integer, got 0$"),
        (dict(groups=3), ValueError, r"in_channels must be divisible by groups, got in_channels=8 and groups=3$"),
        (dict(out_channels=6, groups=4), ValueError,
         r"out_channels must be divisible by groups, got out_channels=6 and groups=4$"),
        (dict(offset_groups=0), ValueError, r"offset_groups must be a positive integer, got 0$"),
        (dict(offset_groups=3), ValueError,
         r"in_channels must be divisible by offset_groups, got in_channels=8 and offset_groups=3$"),
        (dict(in_channels=8.0), TypeError, r"in_channels must be an int, got float 8\.0$"),
        (dict(groups=True), TypeError, r"groups must be an int, got bool True$"),
        (dict(stride=True), TypeError, r"stride must be an int or a pair of ints, got True$"),
        (dict(padding=(1, 1.5)), ValueError, r"padding must be an int or a pair of ints, got \(1, 1\.5\)$"),
    ],
)
def test_construction_rejects_bad_arguments(kwargs, error, message):
    arguments = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        deft_tvm.ModulatedDeformConv2dPack(**arguments)
    if "offset_groups" not in kwargs:
        with pytest.raises(error, match=message):
            deft_tvm.DeformConv2d(**arguments)
