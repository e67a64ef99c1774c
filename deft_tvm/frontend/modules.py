"""``nn.Module`` wrappers: torchvision's ``DeformConv2d`` and layers that predict their own offsets
(mmcv's DCNv1 and DCNv2 packs).

Both check their arguments when constructed and script with ``torch.jit.script``: ``forward``
calls the ``deft_tvm::deform_conv2d`` op with the (height, width) pairs stored at construction.
"""

# No ``from __future__ import annotations``: TorchScript needs the class attributes' annotations
# as types, not strings.
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import init

from deft_tvm.frontend.ops import deform_conv2d_call
from deft_tvm.frontend.checks import IntPair, as_pair


def _positive_int(value: object, name: str) -> int:
    """``value`` if it is an int >= 1; TypeError for a bool or non-int, ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _pair_at_least(value: IntPair, name: str, minimum: int) -> Tuple[int, int]:
    """``as_pair(value, name)`` whose two ints are >= ``minimum`` (0 or 1), else ValueError."""
    pair = as_pair(value, name)
    if min(pair) < minimum:
        expected = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return pair


def _check_divisible(channels_name: str, channels: int, groups_name: str, groups: int) -> None:
    """ValueError (torchvision's message, then the values) when ``groups`` does not divide ``channels``."""
    if channels % groups:
        raise ValueError(
            f"{channels_name} must be divisible by {groups_name}, got {channels_name}={channels} and "
            f"{groups_name}={groups}"
        )


def _split_conv_offset(conv_offset_output: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``conv_offset``'s output ``[batch, 3 * offset_groups * kernel_h * kernel_w, out_h, out_w]``
    -> ``(offset, mask)``: the first two thirds, and the sigmoid of the last third."""
    dy_dx_1, dy_dx_2, mask_logits = torch.chunk(conv_offset_output, 3, dim=1)
    return torch.cat((dy_dx_1, dy_dx_2), dim=1), torch.sigmoid(mask_logits)


class DeformConv2d(nn.Module):
    """Same constructor, parameter initialisation and repr as ``torchvision.ops.DeformConv2d``.

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are an int or a (height, width) pair,
    stored as pairs. ``forward(input, offset, mask=None)``: input ``[batch, in_channels, height,
    width]``, offset ``[batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]``, mask
    ``[batch, offset_groups * kernel_h * kernel_w, out_h, out_w]`` or None, all of one dtype
    (float32, float64, float16 or bfloat16) and device; returns ``[batch, out_channels, out_h,
    out_w]`` (errors: those of ``deft_tvm.deform_conv2d``).

    Raises:
        TypeError: a channel count or ``groups`` that is not an int (or is a bool); a size that is
            neither an int nor a pair of ints.
        ValueError: ``in_channels``, ``out_channels``, ``groups``, ``kernel_size``, ``stride`` or
            ``dilation`` below 1, ``padding`` below 0, a size that is not a pair, or channels not
            divisible by ``groups`` (torchvision's messages, followed by the values found).
    """

    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

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
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.groups = _positive_int(groups, "groups")
        _check_divisible("in_channels", in_channels, "groups", groups)
        _check_divisible("out_channels", out_channels, "groups", groups)
        self.kernel_size = _pair_at_least(kernel_size, "kernel_size", 1)
        self.stride = _pair_at_least(stride, "stride", 1)
        self.padding = _pair_at_least(padding, "padding", 0)
        self.dilation = _pair_at_least(dilation, "dilation", 1)
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
        return self._deform_conv2d(input, offset, mask)

    def _deform_conv2d(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The op with this layer's weight, bias and pairs (scripted: the registered op; eager:
        ``deform_conv2d_call``, which skips the dispatcher where it can)."""
        if torch.jit.is_scripting():
            return torch.ops.deft_tvm.deform_conv2d(
                input, offset, self.weight, self.bias, mask, self.stride[0], self.stride[1], self.padding[0],
                self.padding[1], self.dilation[0], self.dilation[1],
            )
        return deform_conv2d_call(
            input, offset, self.weight, self.bias, mask, self.stride[0], self.stride[1], self.padding[0],
            self.padding[1], self.dilation[0], self.dilation[1],
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


def _conv_offset(layer: "_Pack", offset_groups: int, per_tap: int) -> nn.Conv2d:
    """The zero-initialised ``nn.Conv2d`` of a pack: ``layer``'s kernel, stride, padding and
    dilation, ``per_tap * offset_groups * kernel_h * kernel_w`` output channels. Checks
    ``offset_groups`` (TypeError, ValueError) and sets ``layer.offset_groups``."""
    layer.offset_groups = _positive_int(offset_groups, "offset_groups")
    _check_divisible("in_channels", layer.in_channels, "offset_groups", offset_groups)
    kh, kw = layer.kernel_size
    conv = nn.Conv2d(layer.in_channels, per_tap * offset_groups * kh * kw, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, bias=True)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _Pack(DeformConv2d):
    """A layer that predicts its own offsets with ``conv_offset`` (``_conv_offset``); its repr names
    its offset groups."""

    offset_groups: int

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        extra = f", offset_groups={self.offset_groups}" if self.offset_groups != 1 else ""
        return base + extra + ")"


class ModulatedDeformConv2dPack(_Pack):
    """A DCNv2 layer that predicts its own offsets and mask (mmcv's ``ModulatedDeformConv2dPack``).

    A plain ``nn.Conv2d`` (``conv_offset``, same kernel, stride, padding and dilation) maps the
    input to ``3 * offset_groups * kernel_h * kernel_w`` channels: the first two thirds are the
    (dy, dx) offsets, the last third goes through a sigmoid to become the mask. ``conv_offset`` is
    zero-initialised, so a fresh layer samples the regular grid with mask 0.5.

    ``forward(input)``: input ``[batch, in_channels, height, width]`` ->
    ``[batch, out_channels, out_h, out_w]``.

    Raises:
        TypeError, ValueError: as ``DeformConv2d``; also ``offset_groups`` not an int, below 1, or
            not dividing ``in_channels``.
    """

    split_conv_offset = staticmethod(_split_conv_offset)

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
        self.conv_offset = _conv_offset(self, offset_groups, 3)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = _split_conv_offset(self.conv_offset(input))
        return self._deform_conv2d(input, offset, mask)


class DeformConv2dPack(_Pack):
    """A DCNv1 layer that predicts its own offsets (mmcv's ``DeformConv2dPack``): ``conv_offset``
    (an ``nn.Conv2d`` of the same kernel, stride, padding and dilation, zero-initialised) maps the
    input to the ``2 * offset_groups * kernel_h * kernel_w`` (dy, dx) offsets; no mask, and no bias
    by default (mmcv's layer has none).

    ``forward(input)``: input ``[batch, in_channels, height, width]`` ->
    ``[batch, out_channels, out_h, out_w]``.

    Raises:
        TypeError, ValueError: as ``ModulatedDeformConv2dPack``.
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
        bias: bool = False,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.conv_offset = _conv_offset(self, offset_groups, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._deform_conv2d(input, self.conv_offset(input), None)
