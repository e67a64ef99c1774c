"""A small DCNv2 network trained on real handwritten digits, shipped with its weights and data.

    deft-tvm tune --model deft_tvm.examples.digits:network --data deft_tvm.examples.digits:held_out

``network()`` is ``tools/real_profile.py``'s network (conv stem, two DCNv2 layers that predict
their own offsets and masks, a linear classifier; ``[batch, 1, 32, 32]`` float32 images in [0, 1]
-> ``[batch, 10]`` logits) with the weights that script trained (``digits_dcn_weights.pt``, 99.4 %
on the clean held-out digits); its offsets are learned, not drawn, which is what model-driven
tuning is for. ``held_out()`` gives that script's 360 held-out digits (``digits_held_out.pt``:
8x8 images as uint8 0..16 and their labels) on the 32x32 canvas, augmented (rotation, scale,
shift) with a seeded generator, in batches of 120: the batches the shipped profile
``tuning_logs/profiles/digits_dcn.json`` was recorded on.

Data: the UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn bundles it
(``sklearn.datasets.load_digits``; E. Alpaydin, C. Kaynak, 1998, CC BY 4.0); 360 of its 1797
images ship here so that nothing needs scikit-learn or a download.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deft_tvm.frontend.modules import ModulatedDeformConv2dPack

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "digits_dcn_weights.pt"
HELD_OUT = HERE / "digits_held_out.pt"
CANVAS = 32  # px, the network's input side
EVAL_BATCH = 120  # held-out images per batch (360 in 3 batches of one shape: one kernel per layer)
MAX_ROTATION_DEG, SCALE_RANGE = 25.0, (0.85, 1.15)
MAX_SHIFT_FRACTION = 1 / 8  # of the canvas side
DIGIT_FRACTION = 3 / 4  # of the canvas side
INK_LEVELS = 16  # the 8x8 digits' pixel values run 0..16


def build_network() -> nn.Sequential:
    """The untrained network: ``[batch, 1, 32, 32]`` float32 -> logits ``[batch, 10]``. Its DCN
    layers: 16 -> 32 channels on 16x16 maps, and 32 -> 32 with 2 offset groups on 8x8 maps."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
        ModulatedDeformConv2dPack(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        ModulatedDeformConv2dPack(32, 32, 3, padding=1, offset_groups=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def network() -> nn.Sequential:
    """The trained network (shipped weights), in eval mode, float32 on the CPU."""
    model = build_network()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


def to_canvas(digits: torch.Tensor, canvas: int = CANVAS) -> torch.Tensor:
    """8x8 digits ``[n, 8, 8]`` (any dtype, values 0..16) -> float32 ``[n, 1, canvas, canvas]`` in
    [0, 1]: each upsampled (bilinear) to ``round(3/4 * canvas)`` px square and centred."""
    images = digits.to(torch.float32)[:, None] / INK_LEVELS
    size = round(DIGIT_FRACTION * canvas)
    before = (canvas - size) // 2
    after = canvas - size - before
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return F.pad(images, (before, after, before, after))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation (+-25 deg), scale (0.85-1.15) and shift (+-1/8 of the side) of square images
    ``[batch, channels, size, size]``, drawn from ``generator``; same shape, zeros fill the
    border."""
    n = images.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    max_shift = MAX_SHIFT_FRACTION * images.shape[-1]
    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * math.pi / 180
    scale = uniform(*SCALE_RANGE)
    shift = uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    half = images.shape[-1] / 2
    theta = torch.stack((torch.stack((cos, -sin, shift[0] / half), 1), torch.stack((sin, cos, shift[1] / half), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped held-out digits: uint8 ``[360, 8, 8]`` (0..16) and int64 labels ``[360]``."""
    data = torch.load(HELD_OUT, weights_only=True)
    return data["images"], data["labels"]


def held_out(seed: int = 0) -> list[torch.Tensor]:
    """The held-out digits on the canvas, augmented with ``torch.Generator().manual_seed(seed)``,
    as float32 batches ``[120, 1, 32, 32]`` (3 of them)."""
    digits, _ = held_out_digits()
    return list(augment(to_canvas(digits), torch.Generator().manual_seed(seed)).split(EVAL_BATCH))
