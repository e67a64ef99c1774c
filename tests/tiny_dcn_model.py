"""A tiny DCNv2 network of two layer configurations for the model-tuning tests (``tune_model``,
``deft-tvm tune --model tiny_dcn_model:build``): its offsets and masks predicted by plain convs."""

from __future__ import annotations

import torch
from torch import nn

import deft_tvm

INPUT_SHAPE = (2, 3, 9, 8)


class TwoConfigurations(nn.Module):
    """``[N, 3, H, W]`` -> ``[N, 4, (H - 1) // 2 + 1, W - 2]``: a 3x3 DCNv2 layer (3 -> 6 channels),
    then a torchvision-style asymmetric one (6 -> 4, kernel 3x2, stride (2, 1), padding (1, 0),
    dilation (1, 2), 2 offset groups). ``reference=True`` runs the float64 reference op on the same
    parameters instead of the layers (float64 input)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.offset1 = nn.Conv2d(3, 27, 3, padding=1)  # 2 x 9 offsets, 9 masks
        self.dcn1 = deft_tvm.DeformConv2d(3, 6, 3, padding=1)
        self.offset2 = nn.Conv2d(6, 36, 3, stride=(2, 1), padding=(1, 0))  # 2 groups x 6 taps: 24 offsets, 12 masks
        self.dcn2 = deft_tvm.DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        for predict, layer in ((self.offset1, self.dcn1), (self.offset2, self.dcn2)):
            predicted = predict(x)
            masks = predicted.shape[1] // 3
            offset, mask = predicted[:, masks:] * 2, predicted[:, :masks].sigmoid()  # offsets of a few px
            if reference:
                x = deft_tvm.deform_conv2d_reference(x, offset, layer.weight.double(), layer.bias.double(),
                                                     layer.stride, layer.padding, layer.dilation, mask)
            else:
                x = layer(x, offset, mask)
            x = x.relu()
        return x


def build() -> nn.Module:
    return TwoConfigurations()


def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A stand-in data loader (``deft-tvm tune --model ... --data tiny_dcn_model:loader``): two
    ``(input [2, 3, 9, 8], labels [2])`` batches, the inputs seeded 1 and 2."""
    return [(torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed)), torch.zeros(2, dtype=torch.int64))
            for seed in (1, 2)]
