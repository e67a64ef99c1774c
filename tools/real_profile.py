"""Record a real offset profile: train a small DCNv2 network on handwritten digits, then profile it.

    pip install scikit-learn   # only for its bundled digits data set; nothing is downloaded
    python tools/real_profile.py [--epochs 12] [--seed 0] [--out tuning_logs/profiles/digits_dcn.json]

Data: scikit-learn's 1797 8x8 digits, upsampled to 24x24 on a 32x32 canvas and randomly rotated,
scaled and shifted (so the offsets have something to do); a seeded split holds out 360 images.
Network: conv stem -> two ModulatedDeformConv2dPack layers -> linear classifier, trained on the
CPU with ``deform_conv2d_reference`` (deft_tvm's own op has no backward yet). The trained weights
are then loaded into the same network built from ``deft_tvm.ModulatedDeformConv2dPack`` (the TVM
kernels), which is evaluated and profiled by ``deft_tvm.stats.collect`` on augmented held-out
images. Prints the accuracies and the comparison with the synthetic profiles. Seeded; about two
minutes on two cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import deft_tvm
from deft_tvm import stats

OUT = Path(__file__).resolve().parent.parent / "tuning_logs" / "profiles" / "digits_dcn.json"
TEST_SIZE = 360
EVAL_BATCH = 120  # divides TEST_SIZE: every evaluation batch has one shape, so one kernel per layer
TRAIN_BATCH = 64
MAX_ROTATION_DEG, SCALE_RANGE, MAX_SHIFT_PX = 25.0, (0.85, 1.15), 4.0


class ReferencePack(deft_tvm.ModulatedDeformConv2dPack):
    """``ModulatedDeformConv2dPack`` computed by the differentiable ``deform_conv2d_reference``.

    Same parameters (so the same state dict) as the deft_tvm layer; ``forward(input)``:
    ``[batch, in_channels, height, width]`` -> ``[batch, out_channels, out_h, out_w]``, input's dtype.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        offset, mask = self.split_conv_offset(self.conv_offset(input))
        out = deft_tvm.deform_conv2d_reference(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
        )
        return out.to(input.dtype)


def build_network(dcn: type) -> nn.Sequential:
    """``[batch, 1, 32, 32]`` -> logits ``[batch, 10]``; ``dcn`` is the DCNv2 layer class."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
        dcn(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
        dcn(32, 32, 3, padding=1, offset_groups=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[1797, 1, 32, 32]`` in [0, 1] (the 8x8 digit upsampled to 24x24, centred) and labels ``[1797]``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("tools/real_profile.py needs scikit-learn for its bundled digits data: pip install scikit-learn")
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.pad(F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    return images, torch.tensor(digits.target)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and shift of ``[batch, 1, 32, 32]`` images (zeros fill the border)."""
    n = images.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG) * math.pi / 180
    scale = uniform(*SCALE_RANGE)
    shift = uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX), uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    half = images.shape[-1] / 2
    theta = torch.stack((torch.stack((cos, -sin, shift[0] / half), 1), torch.stack((sin, cos, shift[1] / half), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(1) for batch in images.split(EVAL_BATCH)])
    return (predicted == labels).float().mean().item()


def train(model: nn.Module, images, labels, epochs: int, generator: torch.Generator) -> None:
    """Adam with a one-cycle learning rate, fresh augmentations every epoch."""
    steps = epochs * math.ceil(len(images) / TRAIN_BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        for index in torch.randperm(len(images), generator=generator).split(TRAIN_BATCH):
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        print(f"epoch {epoch + 1:2d}/{epochs}: loss {total / len(images):.4f} ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    images, labels = load_digits()
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    test, train_split = order[:TEST_SIZE], order[TEST_SIZE:]
    torch.manual_seed(args.seed)
    trained = build_network(ReferencePack)
    train(trained, images[train_split], labels[train_split], args.epochs, generator)

    deployed = build_network(deft_tvm.ModulatedDeformConv2dPack)
    deployed.load_state_dict(trained.state_dict())
    held_out = augment(images[test], generator)
    results = {
        "train (augmented, reference op)": accuracy(trained, augment(images[train_split], generator),
                                                     labels[train_split]),
        "test (augmented, reference op)": accuracy(trained, held_out, labels[test]),
        "test (augmented, deft_tvm op)": accuracy(deployed, held_out, labels[test]),
        "test (clean, deft_tvm op)": accuracy(deployed, images[test], labels[test]),
    }
    for name, value in results.items():
        print(f"accuracy {name}: {value:.2%}")

    source = (
        f"tools/real_profile.py --seed {args.seed} --epochs {args.epochs}: scikit-learn digits (1797 8x8 images "
        f"upsampled to 24x24 on a 32x32 canvas, random rotation +-{MAX_ROTATION_DEG:g} deg, scale {SCALE_RANGE}, "
        f"shift +-{MAX_SHIFT_PX:g} px); network conv3x3(1->16)-BN-ReLU-maxpool, DCNv2 3x3(16->32)-BN-ReLU-maxpool, "
        f"DCNv2 3x3(32->32, 2 offset groups)-BN-ReLU, global average pool, linear(32->10), trained with "
        f"deform_conv2d_reference on {len(train_split)} images, Adam one-cycle, batch {TRAIN_BATCH}; accuracy "
        + ", ".join(f"{name} {value:.4f}" for name, value in results.items())
        + f"; profiled on the {TEST_SIZE} held-out images, augmented, in batches of {EVAL_BATCH}, "
        f"through deft_tvm.ModulatedDeformConv2dPack"
    )
    profile = stats.collect(deployed.eval(), held_out.split(EVAL_BATCH), seed=args.seed, source=source)
    path = profile.save(args.out)
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(stats.describe(profile))
    print()
    print(stats.compare(profile))


if __name__ == "__main__":
    main()
