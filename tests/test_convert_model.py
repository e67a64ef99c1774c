"""``deft_tvm.convert_model`` (issue 17): torchvision's ``DeformConv2d`` and mmcv-style packs
anywhere in a model become deft_tvm's layers with the same state dict, dtype, device,
``requires_grad`` and training mode, and the model's output stays that of the layers it replaced
(here: stand-ins with their attributes whose forward is the float64 reference op; with torchvision
installed, its own layer too)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.nn.modules.utils import _pair

import deft_tvm
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close

ASYMMETRIC = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2)


class TorchvisionDeformConv2d(nn.Module):
    """``torchvision.ops.DeformConv2d``'s attributes; its forward the float64 reference op."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels // groups, *self.kernel_size) * 0.3)
        self.bias = nn.Parameter(torch.randn(out_channels)) if bias else None

    def forward(self, input, offset, mask=None):
        return deform_conv2d_reference(input, offset, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, mask).to(input.dtype)


class Pack(TorchvisionDeformConv2d):
    """An mmcv-style pack (``conv_offset``, offset groups in ``groups_attribute``); DCNv2 where
    ``modulated``, named by the subclasses as mmcv, mmdet and BasicSR name theirs."""

    modulated = True
    groups_attribute = "deform_groups"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 offset_groups=1, bias=True, per_tap=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        setattr(self, self.groups_attribute, offset_groups)
        taps = self.kernel_size[0] * self.kernel_size[1]
        per_tap = per_tap or (3 if self.modulated else 2)
        self.conv_offset = nn.Conv2d(in_channels, per_tap * offset_groups * taps, self.kernel_size, self.stride,
                                     self.padding, self.dilation)
        nn.init.normal_(self.conv_offset.weight, std=0.3)  # offsets of a trained layer, not zero

    def forward(self, input):
        out = self.conv_offset(input)
        if not self.modulated:
            return super().forward(input, out)
        dy_dx_1, dy_dx_2, mask = torch.chunk(out, 3, dim=1)
        return super().forward(input, torch.cat((dy_dx_1, dy_dx_2), dim=1), torch.sigmoid(mask))


class ModulatedDeformConv2dPack(Pack):  # mmcv.ops
    pass


class ModulatedDeformConvPack(Pack):  # BasicSR
    groups_attribute = "deformable_groups"


class DeformConv2dPack(Pack):  # mmcv.ops (DCNv1, no bias)
    modulated = False


class OffsetNet(nn.Module):
    """A network whose torchvision-style layer takes offsets and a mask from a plain convolution."""

    def __init__(self, deform: type[nn.Module]):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.offsets = nn.Conv2d(8, 3 * 3 * 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1))
        self.deform = deform(8, 6, **ASYMMETRIC)

    def forward(self, x):
        x = self.stem(x)
        dy_dx_1, dy_dx_2, mask = torch.chunk(self.offsets(x), 3, dim=1)
        return self.deform(x, torch.cat((dy_dx_1, dy_dx_2), dim=1) * 2, torch.sigmoid(mask))


def _packs(dtype: torch.dtype) -> nn.Module:
    packs = nn.ModuleDict({
        "mmcv_v2": ModulatedDeformConv2dPack(8, 6, **ASYMMETRIC, offset_groups=2),
        "basicsr_v2": ModulatedDeformConvPack(8, 8, 3, padding=1, offset_groups=4, bias=False),
        "mmcv_v1": DeformConv2dPack(8, 4, 3, stride=2, padding=2, dilation=2, bias=False),
    })
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), packs).to(dtype)


def _run_packs(model: nn.Module, x: torch.Tensor) -> dict:
    features = model[0](x)
    return {name: pack(features) for name, pack in model[1].items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mmcv_style_packs_become_deft_tvm_packs_with_the_same_state_and_output(dtype):
    torch.manual_seed(0)
    model = _packs(dtype)
    model[1]["mmcv_v1"].weight.requires_grad_(False)  # a frozen layer stays frozen
    model.eval()
    x = torch.randn(2, 3, 13, 11, dtype=dtype)
    with torch.no_grad():
        expected = _run_packs(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = deft_tvm.convert_model(model)
    assert converted is model
    kinds = {name: type(layer) for name, layer in model[1].items()}
    assert kinds == {"mmcv_v2": deft_tvm.ModulatedDeformConv2dPack, "basicsr_v2": deft_tvm.ModulatedDeformConv2dPack,
                     "mmcv_v1": deft_tvm.DeformConv2dPack}
    assert model[1]["basicsr_v2"].offset_groups == 4 and model[1]["mmcv_v2"].groups == 2
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) and after[k].dtype == dtype
                                              for k in state)
    assert not model[1]["mmcv_v1"].weight.requires_grad and model[1]["mmcv_v2"].weight.requires_grad
    assert not any(layer.training for layer in model.modules())
    with torch.no_grad():
        for name, output in _run_packs(model, x).items():
            assert output.dtype == dtype
            assert_close(output, expected[name].double(), str(dtype).removeprefix("torch."))


def test_torchvision_style_layers_convert_anywhere_and_keep_the_output(monkeypatch):
    fake = types.ModuleType("torchvision.ops")
    fake.DeformConv2d = TorchvisionDeformConv2d
    monkeypatch.setitem(__import__("sys").modules, "torchvision.ops", fake)
    torch.manual_seed(1)
    model = nn.Sequential(OffsetNet(TorchvisionDeformConv2d), nn.ReLU())
    x = torch.randn(2, 3, 12, 9)
    expected = model(x)
    converted = deft_tvm.convert_model(model)
    assert type(converted[0].deform) is deft_tvm.DeformConv2d and converted[0].deform.kernel_size == (3, 2)
    out = converted(x)
    assert_close(out.detach(), expected.detach().double(), "float32")
    out.sum().backward()  # trains: the converted layer's weight gets a gradient
    assert converted[0].deform.weight.grad is not None
    layer = TorchvisionDeformConv2d(4, 4, 3, bias=False)  # the root itself, and a layer shared twice
    assert type(deft_tvm.convert_model(layer)) is deft_tvm.DeformConv2d
    shared = nn.Sequential(layer, layer)
    deft_tvm.convert_model(shared)
    assert shared[0] is shared[1] and shared[0].bias is None


def test_real_torchvision_layers_convert():
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(2)
    model = OffsetNet(ops.DeformConv2d)
    x = torch.randn(1, 3, 10, 12)
    expected = model(x).detach()
    converted = deft_tvm.convert_model(model)
    assert type(converted.deform) is deft_tvm.DeformConv2d
    assert_close(converted(x).detach(), expected.double(), "float32")


def test_a_pack_whose_conv_offset_does_not_match_is_refused():
    with pytest.raises(ValueError, match=r"cannot convert ModulatedDeformConv2dPack: its conv_offset has "
                                         r"\{'out_channels': 36, .*expected \{'out_channels': 27"):
        deft_tvm.convert_model(ModulatedDeformConv2dPack(4, 4, 3, padding=1, per_tap=4))
    no_groups = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    del no_groups.deform_groups
    with pytest.raises(ValueError, match=r"neither deform_groups \(mmcv\) nor deformable_groups \(BasicSR\)"):
        deft_tvm.convert_model(no_groups)


def test_deft_tvm_layers_stay_as_they_are():
    """deft_tvm's packs share mmcv's class names but are not converted (nor refused: they keep their
    offset groups in ``offset_groups``); the model is the same object with the same layers."""
    model = nn.Sequential(deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, padding=1, offset_groups=2),
                          deft_tvm.DeformConv2dPack(4, 4, 3, padding=1), deft_tvm.DeformConv2d(4, 4, 3))
    layers = list(model)
    assert deft_tvm.convert_model(model) is model and list(model) == layers
    assert deft_tvm.convert_model(layers[0]) is layers[0]
