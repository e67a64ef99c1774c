"""``convert_model``: a model's deformable convolutions replaced by deft_tvm's layers, weights kept.

Converted, wherever they are in the model (the root included):

* ``torchvision.ops.DeformConv2d`` -> ``deft_tvm.DeformConv2d`` (the same constructor arguments,
  state dict and ``forward(input, offset, mask=None)``);
* mmcv-style packs, layers that predict their own offsets with a ``conv_offset`` convolution of the
  layer's kernel, stride, padding and dilation: ``DeformConv2dPack`` / ``DeformConvPack`` (DCNv1:
  ``2 * offset_groups * kh * kw`` offset channels) -> ``deft_tvm.DeformConv2dPack``, and
  ``ModulatedDeformConv2dPack`` / ``ModulatedDeformConvPack`` (DCNv2: ``3 * offset_groups * kh *
  kw`` channels, offsets and a sigmoid mask) -> ``deft_tvm.ModulatedDeformConv2dPack``, found by
  class name (mmcv's ``mmcv.ops``, mmdet's and BasicSR's packs share these names and this
  structure) with the offset groups in ``deform_groups`` (mmcv) or ``deformable_groups`` (BasicSR).

The new layer takes the old one's parameters (values, dtype, device, ``requires_grad``) and
training mode; its state dict has the same keys, so checkpoints load either way; a layer held in
several places is replaced by one new layer. deft_tvm's own layers stay as they are. Other
attributes and hooks of the old layer are not carried over.
"""

from __future__ import annotations

import sys

from torch import nn

from deft_tvm.frontend.modules import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack

# Class name of an mmcv-style pack -> (deft_tvm's pack, conv_offset's output channels per offset group and tap).
PACKS = {
    "DeformConv2dPack": (DeformConv2dPack, 2),
    "DeformConvPack": (DeformConv2dPack, 2),
    "ModulatedDeformConv2dPack": (ModulatedDeformConv2dPack, 3),
    "ModulatedDeformConvPack": (ModulatedDeformConv2dPack, 3),
}


def convert_model(model: nn.Module) -> nn.Module:
    """``model`` with every torchvision ``DeformConv2d`` and mmcv-style pack in it (see the
    module's docstring) replaced, in place, by deft_tvm's layer of the same configuration and
    parameters; returns ``model``, or the new layer where ``model`` itself is one.

    Raises:
        ValueError: a pack whose ``conv_offset`` does not match it (output channels other than 2 or
            3 x offset groups x taps, or another kernel, stride, padding or dilation), naming
            the observed and expected values, or without its offset groups.
    """
    return _convert(model, {})


def _convert(module: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """``convert_model`` of ``module``; ``done``: the layers converted so far, by ``id``."""
    if id(module) in done:
        return done[id(module)]
    converted = _converted(module)
    if converted is None:
        converted = module
        for name, child in list(module._modules.items()):  # every slot: named_children skips repeats
            if child is not None:
                setattr(module, name, _convert(child, done))
    done[id(module)] = converted
    return converted


def _converted(module: nn.Module) -> nn.Module | None:
    """deft_tvm's layer replacing ``module``, or None where ``module`` is not a layer to convert
    (deft_tvm's own layers included: its packs share mmcv's class names)."""
    torchvision_ops = sys.modules.get("torchvision.ops")  # a model holding its layers has imported it
    if isinstance(module, DeformConv2d):  # deft_tvm's DeformConv2d and its packs
        return None
    if torchvision_ops is not None and isinstance(module, torchvision_ops.DeformConv2d):
        layer = DeformConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups, bias=module.bias is not None)
    elif type(module).__name__ in PACKS:
        pack, per_tap = PACKS[type(module).__name__]
        offset_groups = getattr(module, "deform_groups", getattr(module, "deformable_groups", None))
        if offset_groups is None:
            raise ValueError(f"cannot convert {type(module).__name__}: it has neither deform_groups (mmcv) nor "
                             f"deformable_groups (BasicSR), expected one of them (its offset groups)")
        layer = pack(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, module.groups, offset_groups=offset_groups,
                     bias=getattr(module, "bias", None) is not None)
        _check_conv_offset(type(module).__name__, module.conv_offset, layer.conv_offset, per_tap)
    else:
        return None
    layer.to(device=module.weight.device, dtype=module.weight.dtype)  # before the copy: no rounding on the way
    layer.load_state_dict(module.state_dict())
    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(module.get_parameter(name).requires_grad)
    return layer.train(module.training)


def _check_conv_offset(name: str, found: nn.Conv2d, expected: nn.Conv2d, per_tap: int) -> None:
    """ValueError where the pack's ``conv_offset`` is not the one deft_tvm's pack (``expected``)
    has: the same output channels, kernel, stride, padding and dilation."""
    fields = ("out_channels", "kernel_size", "stride", "padding", "dilation")
    observed = {f: getattr(found, f) for f in fields}
    wanted = {f: getattr(expected, f) for f in fields}
    if observed != wanted:
        raise ValueError(
            f"cannot convert {name}: its conv_offset has {observed}, expected {wanted} ({per_tap} x offset groups x "
            f"taps output channels and the layer's kernel, stride, padding and dilation)"
        )
