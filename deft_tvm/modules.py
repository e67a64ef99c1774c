"""``nn.Module`` wrappers: torchvision's ``DeformConv2d`` and a layer that predicts its own offsets."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import init

from .checks import IntPair, as_pair
from .functional import deform_conv2d


class DeformConv2d(nn.Module):
    """Same constructor, parameter initialisation and repr as ``torchvision.ops.DeformConv2d``.

    ``forward(input, offset, mask=None)``: input ``[batch, in_channels, height, width]``, offset
    ``[batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]``, mask
    ``[batch, offset_groups * kernel_h * kernel_w, out_h, out_w]`` or None; returns
    ``[batch, out_channels, out_h, out_w]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = as_pair(stride, "stride")
        self.padding = as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_conv2d(
            input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )

    def __repr__(self) -> str:
        s = (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}"
        )
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + ")"


class ModulatedDeformConv2dPack(DeformConv2d):
    """A DCNv2 layer that predicts its own offsets and mask (mmcv's ``ModulatedDeformConv2dPack``).

    A plain ``nn.Conv2d`` (``conv_offset``, same kernel, stride, padding and dilation) maps the
    input to ``3 * offset_groups * kernel_h * kernel_w`` channels: the first two thirds are the
    (dy, dx) offsets, the last third goes through a sigmoid to become the mask. ``conv_offset`` is
    zero-initialised, so a fresh layer samples the regular grid with mask 0.5.

    ``forward(input)``: input ``[batch, in_channels, height, width]`` ->
    ``[batch, out_channels, out_h, out_w]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if in_channels % offset_groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})")
        self.offset_groups = offset_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels, 3 * offset_groups * kh * kw, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @staticmethod
    def split_conv_offset(conv_offset_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv_offset``'s output ``[batch, 3 * offset_groups * kernel_h * kernel_w, out_h, out_w]``
        -> ``(offset, mask)``: the first two thirds, and the sigmoid of the last third."""
        dy_dx_1, dy_dx_2, mask_logits = torch.chunk(conv_offset_output, 3, dim=1)
        return torch.cat((dy_dx_1, dy_dx_2), dim=1), torch.sigmoid(mask_logits)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = self.split_conv_offset(self.conv_offset(input))
        return super().forward(input, offset, mask)

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        extra = f", offset_groups={self.offset_groups}" if self.offset_groups != 1 else ""
        return base + extra + ")"
