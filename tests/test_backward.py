"""Backward through the custom op on the CPU: gradcheck in float64 and torchvision's gradients
(the float64 reference backward), including its one-sided offset gradient at y = -1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close

from helpers import TENSOR_ARGUMENTS, grad_leaves, make_case

SPECS = {
    "asymmetric": DeformConvSpec(2, 6, 5, 6, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                 offset_groups=3),
    "no_mask_no_bias": DeformConvSpec(1, 4, 5, 6, 6, 3, 3, padding=(1, 1), offset_groups=2, has_mask=False,
                                      has_bias=False),
    "1x1_batch3": DeformConvSpec(3, 3, 4, 3, 2, 1, 1),
}


def _call(spec: DeformConvSpec):
    return lambda input, offset, weight, bias, mask: deft_tvm.deform_conv2d(
        input, offset, weight, bias, spec.stride, spec.padding, spec.dilation, mask)


@pytest.mark.parametrize("shape", list(SPECS))
def test_gradcheck_float64(shape):
    spec = dataclasses.replace(SPECS[shape], dtype="float64")
    args = make_case(spec, seed=3)
    leaves = grad_leaves(args)
    call = _call(spec)
    tensors = {k: args[k] for k in TENSOR_ARGUMENTS}
    assert torch.autograd.gradcheck(lambda *t: call(**{**tensors, **dict(zip(leaves, t))}), tuple(leaves.values()),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", list(SPECS))
def test_gradients_match_torchvisions(shape, dtype):
    spec = dataclasses.replace(SPECS[shape], dtype=dtype)
    args = make_case(spec, seed=5)
    offset = args["offset"].clone()
    offset.view(-1)[::7] = -1.0 - torch.arange(offset.numel())[::7] % 3  # some points on y or x = -1, -2, -3
    args["offset"] = offset
    leaves = grad_leaves(args)
    out = _call(spec)(**{**{k: args[k] for k in TENSOR_ARGUMENTS}, **leaves})
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(out.dtype))
    expected = deform_conv2d_reference_backward(grad_output, **args)._asdict()
    for name, grad in zip(leaves, grads):
        assert grad.dtype == args[name].dtype and grad.shape == args[name].shape, name
        assert_close(grad, expected[name], dtype)


def test_batch_zero_gives_zero_gradients():
    spec = dataclasses.replace(SPECS["asymmetric"], batch=0, dtype="float64")
    args = make_case(spec)
    leaves = grad_leaves(args)
    _call(spec)(**{**{k: args[k] for k in TENSOR_ARGUMENTS}, **leaves}).sum().backward()
    assert leaves["weight"].grad.shape == spec.weight_shape and leaves["weight"].grad.abs().sum() == 0
    assert leaves["input"].grad.shape == spec.input_shape
