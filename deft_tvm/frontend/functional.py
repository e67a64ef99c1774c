"""``deform_conv2d`` with torchvision's exact signature."""

from __future__ import annotations

from typing import Optional

import torch

from deft_tvm.frontend.checks import IntPair, as_pair, check_tensor_types
from deft_tvm.frontend.ops import deform_conv2d_call


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deformable convolution v1 (``mask=None``) or v2, a drop-in for ``torchvision.ops.deform_conv2d``.

    Args:
        input: ``[batch, in_channels, height, width]``.
        offset: ``[batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]``, a (dy, dx) pair
            per kernel tap, in pixels, added to the regular sampling position.
        weight: ``[out_channels, in_channels // groups, kernel_h, kernel_w]``; ``groups`` is
            ``in_channels // weight.shape[1]``.
        bias: ``[out_channels]`` or None.
        stride, padding, dilation: an int or a (height, width) pair.
        mask: ``[batch, offset_groups * kernel_h * kernel_w, out_h, out_w]`` modulation scalars
            (DCNv2) or None (DCNv1).

    Returns:
        ``[batch, out_channels, out_h, out_w]``, same dtype and device as ``input``.

    Samples outside the image contribute zero, as in torchvision; an offset that is NaN gives NaN,
    also as in torchvision, but never an out-of-range read. On a GPU, float32 layers multiply on
    TF32 tensor cores (operands cut to 10 mantissa bits, sums in float32) where
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as torchvision's matmuls then do.
    """
    check_tensor_types(input, offset, weight, bias, mask)
    stride_h, stride_w = as_pair(stride, "stride")
    pad_h, pad_w = as_pair(padding, "padding")
    dil_h, dil_w = as_pair(dilation, "dilation")
    return deform_conv2d_call(input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
