"""Bad arguments give a ValueError/TypeError that names the observed and expected values."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec

from helpers import make_case

SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3)


def _call(**overrides):
    args = make_case(SPEC)
    args.update(overrides)
    return deft_tvm.deform_conv2d(**args)


def _args():
    return make_case(SPEC)


@pytest.mark.parametrize(
    "name, bad, error, match",
    [
        ("input", torch.zeros(6, 9, 11), ValueError, r"input must be a 4-D tensor .* got 3-D with shape \(6, 9, 11\)"),
        ("offset", torch.zeros(2, 36, 4), ValueError, r"offset must be a 4-D tensor .* got 3-D"),
        ("weight", torch.zeros(4, 3, 3), ValueError, r"weight must be a 4-D tensor .* got 3-D"),
        ("mask", torch.zeros(2, 18, 4, 10, 1), ValueError, r"mask must be a 4-D tensor .* got 5-D"),
        ("bias", torch.zeros(4, 1), ValueError, r"bias must be a 1-D tensor \[out_channels\], got 2-D"),
        ("weight", torch.zeros(4, 4, 3, 2), ValueError,
         r"input channels \(6\) must be a multiple of weight.shape\[1\] \(4\)"),
        ("weight", torch.zeros(5, 3, 3, 2), ValueError,
         r"weight.shape\[0\] \(out_channels = 5\) must be divisible by groups \(2 ="),
        ("offset", torch.zeros(2, 35, 4, 10), ValueError,
         r"offset.shape\[1\] \(35\) must be a positive multiple of 2 \* kernel_h \* kernel_w = 12"),
        ("offset", torch.zeros(2, 48, 4, 10), ValueError,
         r"input channels \(6\) must be divisible by offset_groups \(4 ="),
        ("offset", torch.zeros(2, 36, 5, 10), ValueError, r"offset has shape \(2, 36, 5, 10\), expected \(2, 36, 4, 10\)"),
        ("offset", torch.zeros(3, 36, 4, 10), ValueError, r"offset has shape \(3, 36, 4, 10\), expected \(2, 36, 4, 10\)"),
        ("mask", torch.zeros(2, 36, 4, 10), ValueError, r"mask has shape \(2, 36, 4, 10\), expected \(2, 18, 4, 10\)"),
        ("mask", torch.zeros(2, 18, 4, 9), ValueError, r"mask has shape \(2, 18, 4, 9\), expected \(2, 18, 4, 10\)"),
        ("bias", torch.zeros(5), ValueError, r"bias has shape \(5,\), expected \(4,\)"),
        ("input", torch.zeros(2, 6, 9, 11, dtype=torch.float64), TypeError,
         r"all tensors must have the same dtype, got input=float64, offset=float32"),
        ("mask", torch.zeros(2, 18, 4, 10, dtype=torch.float16), TypeError, r"mask=float16"),
        ("offset", torch.zeros(2, 36, 4, 10, device="meta"), ValueError,
         r"all tensors must be on the same device, got input=cpu, offset=meta"),
        ("input", [[1.0]], TypeError, r"input must be a torch.Tensor, got list"),
    ],
)
def test_bad_tensor(name, bad, error, match):
    with pytest.raises(error, match=match):
        _call(**{name: bad})


def test_unsupported_dtype():
    args = {k: (v.to(torch.int32) if isinstance(v, torch.Tensor) else v) for k, v in _args().items()}
    with pytest.raises(TypeError, match=r"dtype int32 is not supported; expected one of float32, float64"):
        deft_tvm.deform_conv2d(**args)


@pytest.mark.parametrize(
    "name, bad, error, match",
    [
        ("stride", 0, ValueError, r"stride must be > 0, got \(0, 0\)"),
        ("stride", (1, 2, 3), ValueError, r"stride must be an int or a pair of ints, got \(1, 2, 3\)"),
        ("padding", (-1, 0), ValueError, r"padding must be >= 0, got \(-1, 0\)"),
        ("dilation", (1, 0), ValueError, r"dilation must be > 0, got \(1, 0\)"),
        ("dilation", 1.5, TypeError, r"dilation must be an int or a pair of ints, got 1.5"),
        ("stride", True, TypeError, r"stride must be an int or a pair of ints, got True"),
    ],
)
def test_bad_hyper_parameters(name, bad, error, match):
    with pytest.raises(error, match=match):
        _call(**{name: bad})


def test_kernel_larger_than_padded_input():
    x = torch.zeros(1, 2, 3, 4)
    weight = torch.zeros(2, 2, 5, 3)
    offset = torch.zeros(1, 30, 1, 2)
    with pytest.raises(ValueError, match=r"kernel 5x3 .* does not fit the padded input 3x4 .*output would be -1x2"):
        deft_tvm.deform_conv2d(x, offset, weight)


def test_double_backward_is_refused():
    args = _args()
    args["input"].requires_grad_(True)
    out = deft_tvm.deform_conv2d(**args)
    (grad_input,) = torch.autograd.grad(out.sum(), args["input"], create_graph=True)
    with pytest.raises(RuntimeError, match=r"deft_tvm.deform_conv2d has no double backward \(create_graph=True\)"):
        grad_input.sum().backward()


def test_module_rejects_indivisible_channels():
    with pytest.raises(ValueError, match=r"in_channels must be divisible by groups, got in_channels=5 and groups=2"):
        deft_tvm.DeformConv2d(5, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"out_channels must be divisible by groups, got out_channels=5 and groups=2"):
        deft_tvm.DeformConv2d(4, 5, 3, groups=2)
    with pytest.raises(ValueError, match=r"in_channels must be divisible by offset_groups, got in_channels=4 and offset_groups=3"):
        deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, offset_groups=3)
