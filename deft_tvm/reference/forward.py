"""A plain-torch float64 deformable convolution, independent of the TVM compute.

Used by the tests as ground truth and by the benchmarks as the baseline it was written to be:
gathers and one grouped matrix product, no TVM. Differentiable by torch autograd.
"""

from __future__ import annotations

from typing import Optional

import torch

from deft_tvm.frontend.checks import IntPair, as_pair, spec_from_tensors


def _sample_grid(out_size: int, kernel: int, stride: int, pad: int, dilation: int, device):
    """Regular sampling positions ``[kernel, out_size]`` along one axis."""
    out_pos = torch.arange(out_size, device=device, dtype=torch.float64) * stride - pad
    taps = torch.arange(kernel, device=device, dtype=torch.float64) * dilation
    return taps[:, None] + out_pos[None, :]


def sampling_points(spec, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each tap samples the input (regular grid plus offset), float64 ``(y, x)``, each
    ``[batch, offset_groups, kernel_h, kernel_w, out_h, out_w]``."""
    n, og, kh, kw, oh, ow = spec.batch, spec.offset_groups, spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w
    off = offset.to(torch.float64).reshape(n, og, kh, kw, 2, oh, ow)
    grid_y = _sample_grid(oh, kh, spec.stride[0], spec.padding[0], spec.dilation[0], offset.device)  # [kh, oh]
    grid_x = _sample_grid(ow, kw, spec.stride[1], spec.padding[1], spec.dilation[1], offset.device)  # [kw, ow]
    y = grid_y[None, None, :, None, :, None] + off[:, :, :, :, 0]
    x = grid_x[None, None, None, :, None, :] + off[:, :, :, :, 1]
    return y, x


def deform_conv2d_reference(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = (1, 1),
    padding: IntPair = (0, 0),
    dilation: IntPair = (1, 1),
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """torchvision's ``deform_conv2d`` computed in float64; shapes as in ``deft_tvm.deform_conv2d``.

    Returns a float64 tensor ``[batch, out_channels, out_h, out_w]``.
    """
    stride, padding, dilation = as_pair(stride, "stride"), as_pair(padding, "padding"), as_pair(dilation, "dilation")
    spec = spec_from_tensors(input, offset, weight, bias, stride, padding, dilation, mask)
    n, c, h, w = spec.input_shape
    kh, kw, og = spec.kernel_h, spec.kernel_w, spec.offset_groups
    taps, oh, ow = kh * kw, spec.out_h, spec.out_w
    x64 = input.to(torch.float64)

    y, x = sampling_points(spec, offset)  # [n, og, kh, kw, oh, ow]
    # Each input channel uses the offsets of its offset group: [n, c, kh, kw, oh, ow].
    y = y.repeat_interleave(c // og, dim=1)
    x = x.repeat_interleave(c // og, dim=1)

    outside = (y <= -1) | (y >= h) | (x <= -1) | (x >= w)  # NaN is not "outside": it propagates
    y0 = torch.floor(torch.where((y > -1) & (y < h), y, torch.zeros_like(y)))
    x0 = torch.floor(torch.where((x > -1) & (x < w), x, torch.zeros_like(x)))
    ly, lx = y - y0, x - x0
    plane = x64.reshape(n, c, h * w)

    def corner(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        valid = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
        values = torch.gather(plane, 2, index.reshape(n, c, taps * oh * ow)).reshape(index.shape)
        return torch.where(valid, values, torch.zeros_like(values))

    sampled = (
        (1 - ly) * (1 - lx) * corner(y0, x0)
        + (1 - ly) * lx * corner(y0, x0 + 1)
        + ly * (1 - lx) * corner(y0 + 1, x0)
        + ly * lx * corner(y0 + 1, x0 + 1)
    )
    sampled = torch.where(outside, torch.zeros_like(sampled), sampled)
    if mask is not None:
        m = mask.to(torch.float64).reshape(n, og, kh, kw, oh, ow).repeat_interleave(c // og, dim=1)
        sampled = sampled * m

    g = spec.groups
    columns = sampled.reshape(n, g, (c // g) * taps, oh * ow)
    w64 = weight.to(torch.float64).reshape(g, spec.out_channels // g, (c // g) * taps)
    out = torch.einsum("gok,ngkp->ngop", w64, columns).reshape(n, spec.out_channels, oh, ow)
    if bias is not None:
        out = out + bias.to(torch.float64)[None, :, None, None]
    return out
