"""The ``deft_tvm::deform_conv2d`` torch custom op: real kernel, fake (meta) kernel, autograd.

Tensor shapes are those of ``deft_tvm.spec.DeformConvSpec``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .checks import spec_from_tensors
from .kernel_cache import get_kernel
from .targets import target_for_device
from .workloads import kernel_arguments


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
    spec = spec_from_tensors(
        input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w), mask
    )
    output = input.new_empty(spec.output_shape)
    if spec.batch == 0:
        return output
    from deft_tvm.schedules import kernel_spec  # imported on use, as kernel_cache does: it is slow to import

    # TF32 where torch allows it for matmuls (torchvision's deform_conv2d multiplies with addmm).
    if spec.dtype == "float32" and input.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        spec = dataclasses.replace(spec, tf32=True)
    spec = kernel_spec(spec, target_for_device(input.device))
    kernel = get_kernel(spec, input.device)
    kernel(*kernel_arguments(spec, input, offset, mask, weight, bias), output)
    return output


@deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
    spec = spec_from_tensors(
        input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w), (dilation_h, dilation_w), mask
    )
    return input.new_empty(spec.output_shape)


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, mask, *hyper = inputs
    ctx.save_for_backward(input, offset, weight, mask)
    ctx.has_bias = bias is not None
    ctx.hyper = hyper


def _backward(ctx, grad_output):
    if torch.is_grad_enabled():
        raise RuntimeError("deft_tvm.deform_conv2d has no double backward (create_graph=True)")
    from .backward import deform_conv2d_backward

    input, offset, weight, mask = ctx.saved_tensors
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w = ctx.hyper
    bias = weight.new_empty(weight.shape[0]) if ctx.has_bias else None
    spec = spec_from_tensors(input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w), mask)
    if spec.batch == 0:
        grads = (torch.zeros_like(input), torch.zeros_like(offset), torch.zeros_like(weight),
                 torch.zeros_like(bias) if bias is not None else None,
                 torch.zeros_like(mask) if mask is not None else None)
    else:
        grads = deform_conv2d_backward(spec, grad_output, input, offset, mask, weight)
    return (grads[0], grads[1], grads[2], grads[3], grads[4], None, None, None, None, None, None)


deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
