"""The torch custom ops: ``deft_tvm::deform_conv2d`` and its backward
``deft_tvm::deform_conv2d_backward``, each with a real kernel and a fake (meta) kernel, the
forward's autograd (through the backward op, so AOT autograd and ``torch.compile`` see two
opaque ops) and autocast rules; and ``deform_conv2d_call``, which the functional and the modules
call: a plain eager call (``plain_eager``) runs the same kernels through an
``autograd.Function`` without the dispatcher (the Python custom-op machinery costs about 0.3 ms
of host time per forward and backward on the H200's host, a third of a batch-1 layer's), or
straight to the kernel where no gradient is wanted (no grad mode, or no argument requiring one:
the ``autograd.Function`` alone costs about as much host time as the rest of the call), every
call under autocast too, its arguments cast as the op's autocast rule casts them
(``autocast_arguments``); every other call (tracing, fake tensors, functorch transforms, tensor
subclasses) the ops.

Tensor shapes are those of ``deft_tvm.compute.spec.DeformConvSpec``.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from deft_tvm.frontend.checks import spec_from_tensors, tensors_spec
from deft_tvm.runtime.kernel_cache import forward_call


def _spec(input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
    return spec_from_tensors(
        input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w), mask
    )


@torch.library.custom_op("deft_tvm::deform_conv2d", mutates_args=())
def deform_conv2d_op(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> torch.Tensor:
    """Deformable convolution forward; see ``deft_tvm.deform_conv2d``."""
    spec = _spec(input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    return _forward(spec, input, offset, weight, bias, mask)


def _forward(spec, input, offset, weight, bias, mask) -> torch.Tensor:
    if spec.batch == 0:
        return input.new_empty(spec.output_shape)
    return forward_call(spec, input.device).call(input, offset, mask, weight, bias)


_recorded: list | None = None  # the specs of the fake forward calls, while ``recording_specs`` runs


@contextlib.contextmanager
def recording_specs():
    """Within the block, the spec of every forward call that reaches the fake kernel (meta or fake
    tensors: ``frontend.model.layer_specs`` traces a model on the meta device) is appended to the
    list this yields. Not thread-safe: one recording at a time."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


@deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, *hyper):
    spec = _spec(input, offset, weight, bias, mask, *hyper)
    if _recorded is not None:
        _recorded.append(spec)
    return input.new_empty(spec.output_shape)


@torch.library.custom_op("deft_tvm::deform_conv2d_backward", mutates_args=())
def deform_conv2d_backward_op(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor],
    has_bias: bool,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's gradients of ``deform_conv2d`` for ``grad_output`` ``[batch, out_channels,
    out_h, out_w]``: ``(grad_input, grad_offset, grad_weight, grad_bias, grad_mask)``, contiguous,
    in the tensors' dtype, shaped as input, offset, weight, bias ``[out_channels]`` and mask
    (``[0]``, empty, for a forward without bias or mask). Raises as ``deform_conv2d`` does for
    inconsistent arguments."""
    bias = weight.new_empty(weight.shape[0]) if has_bias else None
    spec = _spec(input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    return _gradients(spec, grad_output, input, offset, weight, mask)


def _gradients(spec, grad_output, input, offset, weight, mask) -> tuple:
    if spec.batch == 0:
        grads = [input.new_zeros(shape) if present else None for shape, present in (
            (spec.input_shape, True), (spec.offset_shape, True), (spec.weight_shape, True),
            ((spec.out_channels,), spec.has_bias), (spec.mask_shape, spec.has_mask))]
    else:
        from deft_tvm.runtime.backward import deform_conv2d_backward  # imported on use: it loads the backward compute

        grads = deform_conv2d_backward(spec, grad_output, input, offset, mask, weight)
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_output, input, offset, weight, mask, has_bias, *hyper):
    _spec(input, offset, weight, weight.new_empty(weight.shape[0]) if has_bias else None, mask, *hyper)
    return (input.new_empty(input.shape), offset.new_empty(offset.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0] if has_bias else 0),
            mask.new_empty(mask.shape) if mask is not None else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, *hyper = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.has_bias = bias is not None
    ctx.hyper = hyper


def _argument_grads(grads, has_bias: bool, has_mask: bool) -> tuple:
    """The backward op's five gradients as autograd takes them for the forward's eleven arguments:
    None for an absent bias or mask and for the six ints."""
    grad_input, grad_offset, grad_weight, grad_bias, grad_mask = grads
    return (grad_input, grad_offset, grad_weight, grad_bias if has_bias else None, grad_mask if has_mask else None,
            *(None,) * 6)


def _backward(ctx, grad_output):
    input, offset, weight, mask = ctx.saved_tensors
    grads = deform_conv2d_backward_op(grad_output, input, offset, weight, mask, ctx.has_bias, *ctx.hyper)
    return _argument_grads(grads, ctx.has_bias, mask is not None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("deft_tvm.deform_conv2d has no double backward (create_graph=True)")


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
deform_conv2d_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


class _EagerDeformConv2d(torch.autograd.Function):
    """``deform_conv2d_op`` and its autograd without the dispatcher: the same kernels, results and
    errors; arguments as the op's, the six ints as one tuple (fewer arguments for autograd to
    unpack)."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, hyper):
        ctx.save_for_backward(input, offset, weight, mask)
        ctx.spec, ctx.hyper = tensors_spec(input, offset, weight, bias, mask, hyper), hyper
        return _forward(ctx.spec, input, offset, weight, bias, mask)

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, weight, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward op, whose autograd refuses a second derivative
            grads = deform_conv2d_backward_op(grad_output, input, offset, weight, mask, ctx.spec.has_bias, *ctx.hyper)
        else:  # the forward's spec, validated then
            grads = _gradients(ctx.spec, grad_output, input, offset, weight, mask)
        return _argument_grads(grads, ctx.spec.has_bias, ctx.spec.has_mask)[:6]  # one None for the six ints


_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter, type(None)))


def plain_eager(tensors) -> bool:
    """Whether a call on ``tensors`` (its tensor arguments, the input first; None for an absent
    bias or mask) may skip the dispatcher: plain tensors, the input on a CPU or CUDA device,
    nothing tracing (``torch.compile``, ``torch.export``, ``torch.jit.trace``), no dispatch or
    torch-function mode (fake tensors, ``make_fx``) and no functorch transform (``vmap``,
    ``torch.func.grad``), each of which needs the registered ops (as do arguments
    that are not tensors, for the op's error). Autocast is allowed: ``deform_conv2d_call`` casts
    the arguments as the op's autocast rule would."""
    if not _PLAIN_TENSOR_TYPES.issuperset(map(type, tensors)) or tensors[0] is None:
        return False
    return (tensors[0].device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None)


def _wants_gradient(tensors) -> bool:
    return torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in tensors])


def deform_conv2d_call(input, offset, weight, bias, mask, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                       dilation_h: int, dilation_w: int) -> torch.Tensor:
    """``deform_conv2d_op``'s arguments and result: where ``plain_eager`` allows, through
    ``_EagerDeformConv2d`` if a gradient is wanted and straight to the kernel if not (the spec
    from ``tensors_spec``, a look-up per repeated signature), under autocast on the arguments
    ``autocast_arguments`` gives (the op's autocast kernel's casts, which autograd records);
    through the op otherwise."""
    hyper = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
    tensors = (input, offset, weight, bias, mask)
    if not plain_eager(tensors):
        return deform_conv2d_op(input, offset, weight, bias, mask, *hyper)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        cast = autocast_arguments(tensors, device_type)
        with torch.autocast(device_type, enabled=False):
            return _plain_call(cast, hyper)
    return _plain_call(tensors, hyper)


def _plain_call(tensors, hyper) -> torch.Tensor:
    input, offset, weight, bias, mask = tensors
    if _wants_gradient(tensors):
        return _EagerDeformConv2d.apply(input, offset, weight, bias, mask, hyper)
    return _forward(tensors_spec(*tensors, hyper), input, offset, weight, bias, mask)

AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # device type -> its autocast dispatch key
_library = torch.library.Library("deft_tvm", "FRAGMENT")


def autocast_arguments(args, device_type: str) -> list:
    """``args`` as the forward runs them under ``torch.autocast(device_type, dtype=D)``: its
    floating-point tensors on that device type, except float64 ones, cast to ``D`` (torch's own
    eligibility rule, as ``conv2d``'s); other arguments as they are."""
    dtype = torch.get_autocast_dtype(device_type)
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
            and a.device.type == device_type else a for a in args]


def _register_autocast(device_type: str) -> None:
    """Under ``torch.autocast(device_type, dtype=D)`` the op runs in ``D`` (float16 or bfloat16)
    on ``autocast_arguments`` (torch's ``torch.library.register_autocast`` fixes the cast dtype at
    registration; here it is the autocast dtype in force). The backward needs no rule: autograd
    hands it the forward's dtype."""

    def autocast_kernel(keyset, *args):
        cast = autocast_arguments(args, device_type)
        with torch.autocast(device_type, enabled=False):
            return deform_conv2d_op(*cast)

    _library.impl("deform_conv2d", autocast_kernel, AUTOCAST_KEYS[device_type], with_keyset=True)


for _device_type in AUTOCAST_KEYS:
    _register_autocast(_device_type)
