"""Sampling math shared by the forward and backward TE computes (torchvision's bilinear
interpolation, ``torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp``), and the index type of
hand-written kernels."""

from __future__ import annotations

from tvm import te, tirx

from deft_tvm.compute.spec import DeformConvSpec

CORNERS = 4


def sampling_coordinates(spec: DeformConvSpec, offset: te.Tensor, acc: str):
    """``(n, g, ky, kx, oy, ox) -> (y, x)``: where tap ``(ky, kx)`` of output ``(oy, ox)`` samples
    the input for offset group ``g``, in ``acc`` (regular grid position plus the offset)."""
    taps = spec.kernel_h * spec.kernel_w
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = spec.stride, spec.padding, spec.dilation

    def coordinates(n, g, ky, kx, oy, ox):
        tap = ky * spec.kernel_w + kx
        dy = offset[n, g * 2 * taps + 2 * tap, oy, ox].astype(acc)
        dx = offset[n, g * 2 * taps + 2 * tap + 1, oy, ox].astype(acc)
        y = (oy * stride_h - pad_h + ky * dil_h).astype(acc) + dy
        x = (ox * stride_w - pad_w + kx * dil_w).astype(acc) + dx
        return y, x

    return coordinates


def bilinear_share(ly, lx, corner, acc: str):
    """The bilinear weight of ``corner`` (0: low y low x, 1: low y high x, 2: high y low x, 3: high
    y high x) of a point at fractions ``(ly, lx)`` past its low corner."""
    wy = tirx.Select(corner // 2 == 1, ly, tirx.const(1, acc) - ly)
    wx = tirx.Select(corner % 2 == 1, lx, tirx.const(1, acc) - lx)
    return wy * wx


def index_extents(spec: DeformConvSpec, *extents) -> tuple:
    """``extents`` as constants of ``spec.index_dtype``: the buffer shapes and loop extents of a
    hand-written PrimFunc, so its index arithmetic is 64-bit exactly where it must be (those of a
    ``generic_spec``, int32 expressions of its size variables, as they are)."""
    return tuple(tirx.IntImm(spec.index_dtype, e) if isinstance(e, int) else e for e in extents)
