"""``deform_conv2d_call``: plain eager calls skip the dispatcher (``_EagerDeformConv2d``, or the
kernel alone where no gradient is wanted) with the op's exact results, gradients and errors;
everything else goes through the registered ops."""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend import ops

from helpers import make_case

SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3)
NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that reach the registered forward op."""
    calls = []
    original = ops.deform_conv2d_op
    monkeypatch.setattr(ops, "deform_conv2d_op", lambda *args: calls.append(1) or original(*args))
    return calls


def _leaves(dtype=torch.float64):
    case = make_case(SPEC)
    return [case[k].to(dtype).requires_grad_(True) for k in NAMES]


def _call(leaves):
    return deft_tvm.deform_conv2d(*leaves[:4], SPEC.stride, SPEC.padding, SPEC.dilation, leaves[4])


def test_plain_eager_matches_the_op_bit_for_bit(op_calls):
    leaves = _leaves()
    grad_output = torch.randn(SPEC.output_shape, dtype=torch.float64)
    eager = _call(leaves)
    eager_grads = torch.autograd.grad(eager, leaves, grad_output)
    assert op_calls == []
    via_op = ops.deform_conv2d_op(*leaves, *SPEC.stride, *SPEC.padding, *SPEC.dilation)
    op_grads = torch.autograd.grad(via_op, leaves, grad_output)
    assert torch.equal(eager, via_op)
    for name, a, b in zip(NAMES, eager_grads, op_grads):
        assert torch.equal(a, b), name


@pytest.fixture
def applied(monkeypatch):
    """Counts the calls that go through ``_EagerDeformConv2d`` (the eager autograd)."""
    calls = []
    original = ops._EagerDeformConv2d.apply
    monkeypatch.setattr(ops._EagerDeformConv2d, "apply", lambda *args: calls.append(1) or original(*args))
    return calls


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_leaf_requires_grad"])
def test_calls_wanting_no_gradient_skip_the_autograd_function(op_calls, applied, context):
    leaves = _leaves()
    expected = ops.deform_conv2d_op(*[t.detach() for t in leaves], *SPEC.stride, *SPEC.padding, *SPEC.dilation)
    op_calls.clear()
    if context == "no_leaf_requires_grad":
        out = _call([t.detach() for t in leaves])
    else:
        with getattr(torch, context)():
            out = _call(leaves)
    assert op_calls == [] and applied == []
    assert torch.equal(out, expected) and not out.requires_grad


def test_a_call_wanting_a_gradient_takes_the_autograd_function(op_calls, applied):
    leaves = _leaves()
    leaves[1:] = [t.detach() for t in leaves[1:]]  # only the input requires a gradient
    out = _call(leaves)
    assert op_calls == [] and applied == [1] and out.requires_grad


def test_module_without_bias_or_mask_skips_the_dispatcher(op_calls):
    layer = deft_tvm.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, bias=False)
    case = make_case(SPEC)
    x = case["input"].float().requires_grad_(True)
    out = layer(x, case["offset"].float())
    weight_grad, input_grad = torch.autograd.grad(out.square().sum(), (layer.weight, x))
    assert op_calls == [] and weight_grad.shape == layer.weight.shape and input_grad.shape == x.shape


def test_autocast_takes_the_eager_path_with_the_ops_casts_and_results(op_calls, applied):
    leaves = _leaves(torch.float32)
    grad_output = torch.randn(SPEC.output_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _call(leaves)
    assert op_calls == [] and applied == [1] and eager.dtype == torch.bfloat16
    eager_grads = torch.autograd.grad(eager, leaves, grad_output)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the registered op: its autocast kernel casts
        via_op = ops.deform_conv2d_op(*leaves, *SPEC.stride, *SPEC.padding, *SPEC.dilation)
    op_grads = torch.autograd.grad(via_op, leaves, grad_output)
    assert op_calls and via_op.dtype == torch.bfloat16 and torch.equal(eager, via_op)
    for name, leaf, a, b in zip(NAMES, leaves, eager_grads, op_grads):
        assert a.dtype == leaf.dtype == torch.float32 and torch.equal(a, b), name
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # no gradient wanted: the kernel alone
        assert torch.equal(_call(leaves), eager.detach()) and applied == [1]


def test_float64_stays_float64_under_autocast(op_calls):
    leaves = _leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(leaves)
    assert op_calls == [] and out.dtype == torch.float64
    assert torch.equal(out, ops.deform_conv2d_op(*leaves, *SPEC.stride, *SPEC.padding, *SPEC.dilation))


def test_tensor_subclasses_and_fake_tensors_take_the_op(op_calls):
    case = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in make_case(SPEC).items()}
    two = dict(case, input=TwoTensor(case["input"], case["input"].clone()))
    assert ops.plain_eager([two["input"]]) is False and ops.plain_eager([case["input"]]) is True
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
        assert deft_tvm.deform_conv2d(**fake).shape == SPEC.output_shape
    assert op_calls == [1]


def test_eager_double_backward_is_refused_like_the_op():
    leaves = _leaves()
    (grad_input,) = torch.autograd.grad(_call(leaves).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"deft_tvm.deform_conv2d has no double backward \(create_graph=True\)"):
        grad_input.sum().backward()


def test_a_module_given_no_tensor_raises_the_op_error():
    layer = deft_tvm.DeformConv2d(6, 4, 3)
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Tensor' for argument 'input' but instead found "
                                           r"type 'list'"):
        layer([[1.0]], torch.zeros(1, 18, 1, 1))


def test_eager_bad_input_raises_the_op_error():
    leaves = [t.detach() for t in _leaves()]
    leaves[1] = leaves[1][:, :35]
    with pytest.raises(ValueError, match=r"offset.shape\[1\] \(35\) must be a positive multiple of 2 \* kernel_h"):
        _call(leaves)
