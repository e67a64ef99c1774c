"""The custom ops under torch's tooling: opcheck of the forward and the backward op, and
torch.compile(fullgraph=True) of inference and of a training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend.ops import deform_conv2d_backward_op, deform_conv2d_op

from helpers import make_case, small_dcn_model

SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3)
# opcheck's own utilities (all of torch.library.opcheck's defaults, plus the static AOT dispatch).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic")
MASK_BIAS = pytest.mark.parametrize("has_mask, has_bias", [(True, True), (False, False), (True, False)])


def _hyper(spec: DeformConvSpec) -> tuple[int, ...]:
    return (*spec.stride, *spec.padding, *spec.dilation)


def _op_args(spec: DeformConvSpec, requires_grad: bool = False):
    a = make_case(spec)
    tensors = [a[k] if a[k] is None else a[k].requires_grad_(requires_grad)
               for k in ("input", "offset", "weight", "bias", "mask")]
    return (*tensors, *_hyper(spec))


@MASK_BIAS
def test_opcheck_forward_with_its_autograd(has_mask, has_bias):
    spec = dataclasses.replace(SPEC, has_mask=has_mask, has_bias=has_bias)
    torch.library.opcheck(deform_conv2d_op, _op_args(spec, requires_grad=True), test_utils=OPCHECK_UTILS)


@MASK_BIAS
def test_opcheck_backward(has_mask, has_bias):
    spec = dataclasses.replace(SPEC, has_mask=has_mask, has_bias=has_bias)
    input, offset, weight, _, mask, *hyper = _op_args(spec)
    grad_output = torch.randn(spec.output_shape)
    args = (grad_output, input, offset, weight, mask, has_bias, *hyper)
    torch.library.opcheck(deform_conv2d_backward_op, args, test_utils=OPCHECK_UTILS)
    grads = deform_conv2d_backward_op(*args)
    assert [tuple(g.shape) for g in grads] == [
        spec.input_shape, spec.offset_shape, spec.weight_shape, (spec.out_channels,) if has_bias else (0,),
        spec.mask_shape if has_mask else (0,)]


def test_fake_tensor_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _op_args(SPEC)
        assert deform_conv2d_op(*args).shape == SPEC.output_shape
        bad = (args[0], args[1][:, :-1], *args[2:])
        with pytest.raises(ValueError, match=r"offset.shape\[1\] \(35\)"):
            deform_conv2d_op(*bad)
        grad_output = torch.empty(SPEC.output_shape)
        with pytest.raises(ValueError, match=r"offset.shape\[1\] \(35\)"):
            deform_conv2d_backward_op(grad_output, bad[0], bad[1], bad[2], bad[4], True, *_hyper(SPEC))


def test_torch_compile_fullgraph_of_a_dcn_model():
    model = small_dcn_model()
    x = torch.randn(2, 3, 10, 12)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


def _training_step(model, x, target):
    """Loss and every parameter's gradient (and the input's) of one step."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    loss = torch.nn.functional.mse_loss(model(x), target)
    loss.backward()
    return loss.detach(), [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_training_step_matches_eager(dynamic):
    model = small_dcn_model().train()
    x = torch.randn(2, 3, 10, 12)
    target = torch.randn(2, 8, 10, 12)
    eager_loss, eager_grads = _training_step(model, x, target)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    loss, grads = _training_step(compiled, x, target)
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager)
    if dynamic:  # a second size runs through the same symbolic graph
        _training_step(compiled, torch.randn(1, 3, 9, 7), torch.randn(1, 8, 9, 7))
