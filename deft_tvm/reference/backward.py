"""torchvision's deformable-convolution backward in plain-torch float64, independent of TVM.

The ground truth for gradient tests. It follows torchvision's backward kernels, not the calculus
of ``deform_conv2d_reference`` (which torch autograd would give): the two differ on the borders.
torchvision's offset gradient (``get_coordinate_weight``) has no early return for a sampling point
outside the image, so a point exactly at ``y = -1`` (or ``x = -1``), which contributes nothing to
the output, still gets the one-sided derivative of its in-image corners; the mask gradient
(``bilinear_interpolate``) and the input gradient (``col2im``, corners within one pixel) do not.
Where torchvision's result is undefined (it converts an infinite or NaN coordinate to int), an
infinite coordinate gets no gradient and a NaN one NaN offset, mask and weight gradients.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from deft_tvm.frontend.checks import IntPair, as_pair, spec_from_tensors
from deft_tvm.reference.forward import sampling_points


class DeformConvGrads(NamedTuple):
    """Gradients of ``deform_conv2d`` with respect to each argument (float64, the argument's shape;
    None for an absent ``bias`` or ``mask``)."""

    input: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]


def deform_conv2d_reference_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Optional[torch.Tensor] = None,
) -> DeformConvGrads:
    """Gradients of ``sum(grad_output * deform_conv2d(...))`` as torchvision's backward computes
    them, in float64. ``grad_output`` is ``[batch, out_channels, out_h, out_w]``; the other
    arguments are those of ``deft_tvm.deform_conv2d``."""
    stride, padding, dilation = as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation")
    spec = spec_from_tensors(input, offset, weight, bias, stride, padding, dilation, mask)
    n, c, h, w = spec.input_shape
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    oh, ow, co = spec.out_h, spec.out_w, spec.out_channels
    per_group = c // og

    y, x = sampling_points(spec, offset)  # [n, og, kh, kw, oh, ow]
    m = (mask.to(torch.float64).reshape(n, og, kh, kw, oh, ow) if mask is not None
         else torch.ones_like(y))

    # The columns' gradient, weight^T @ grad_output per group: [n, og, per_group, kh, kw, oh, ow].
    w64 = weight.to(torch.float64).reshape(g, co // g, c // g, kh, kw)
    grad_out = grad_output.to(torch.float64).reshape(n, g, co // g, oh, ow)
    grad_col = torch.einsum("goikl,ngopq->ngiklpq", w64, grad_out).reshape(n, og, per_group, kh, kw, oh, ow)

    # Bilinear corners (low/high in y and x) with the values of the channels of each offset group;
    # a corner outside the image reads zero. Coordinates are clamped to [-2, size + 1], which keeps
    # every corner's validity and makes infinite ones (where torchvision converts inf to int) read
    # zeros with finite weights: no gradient; NaN stays NaN.
    y, x = y.clamp(-2, h + 1), x.clamp(-2, w + 1)
    y_low, x_low = torch.floor(y), torch.floor(x)
    plane = input.to(torch.float64).reshape(n, og, per_group, h * w)

    def corner(yc: torch.Tensor, xc: torch.Tensor):
        valid = (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
        index = torch.where(valid, yc * w + xc, torch.zeros_like(yc)).long()
        flat = index.reshape(n, og, 1, kh * kw * oh * ow).expand(n, og, per_group, -1)
        values = torch.gather(plane, 3, flat).reshape(n, og, per_group, kh, kw, oh, ow)
        return valid, index, torch.where(valid[:, :, None], values, torch.zeros_like(values))

    ly, lx = y - y_low, x - x_low
    corners = {
        (0, 0): (corner(y_low, x_low), (1 - ly) * (1 - lx)),
        (0, 1): (corner(y_low, x_low + 1), (1 - ly) * lx),
        (1, 0): (corner(y_low + 1, x_low), ly * (1 - lx)),
        (1, 1): (corner(y_low + 1, x_low + 1), ly * lx),
    }
    v = {key: values for key, ((_, _, values), _) in corners.items()}

    # Input (col2im): every in-image corner within one pixel of the point gets its bilinear share.
    grad_input = torch.zeros(n, og, per_group, h * w, dtype=torch.float64, device=input.device)
    scaled = grad_col * m[:, :, None]
    for (valid, index, _), share in corners.values():
        contribution = torch.where(valid[:, :, None], scaled * share[:, :, None], torch.zeros_like(scaled))
        points = kh * kw * oh * ow
        flat = index.reshape(n, og, 1, points).expand(n, og, per_group, points)
        grad_input.scatter_add_(3, flat, contribution.reshape(n, og, per_group, points))

    # Offsets (get_coordinate_weight): the derivative of the interpolation along y and along x,
    # with no test of whether the point itself lies inside the image.
    # A NaN coordinate (whose output is NaN) gets NaN for both.
    d_dy = lx[:, :, None] * (v[1, 1] - v[0, 1]) + (1 - lx)[:, :, None] * (v[1, 0] - v[0, 0])
    d_dx = ly[:, :, None] * (v[1, 1] - v[1, 0]) + (1 - ly)[:, :, None] * (v[0, 1] - v[0, 0])
    undefined = (y.isnan() | x.isnan())[:, :, None]
    d_dy, d_dx = (torch.where(undefined, torch.full_like(d, torch.nan), d) for d in (d_dy, d_dx))
    grad_offset = torch.stack([(scaled * d_dy).sum(2), (scaled * d_dx).sum(2)], dim=4)  # [n, og, kh, kw, 2, oh, ow]

    # Mask and weight: the interpolated value (bilinear_interpolate: zero outside (-1, size)).
    outside = (y <= -1) | (y >= h) | (x <= -1) | (x >= w)
    interpolated = sum(values * share[:, :, None] for (_, _, values), share in corners.values())
    interpolated = torch.where(outside[:, :, None], torch.zeros_like(interpolated), interpolated)
    grad_mask = (grad_col * interpolated).sum(2).reshape(spec.mask_shape) if mask is not None else None
    columns = (interpolated * m[:, :, None]).reshape(n, g, (c // g) * kh * kw, oh * ow)
    grad_weight = torch.einsum("ngop,ngkp->gok", grad_out.reshape(n, g, co // g, oh * ow), columns)

    return DeformConvGrads(
        input=grad_input.reshape(n, c, h, w),
        offset=grad_offset.reshape(spec.offset_shape),
        weight=grad_weight.reshape(spec.weight_shape),
        bias=grad_out.sum((0, 3, 4)).reshape(co) if bias is not None else None,
        mask=grad_mask,
    )
