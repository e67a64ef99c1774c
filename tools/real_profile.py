"""Record a real offset profile: train a small DCNv2 network on handwritten digits, then profile it.

    pip install scikit-learn   # only for its bundled digits data set; nothing is downloaded
    python tools/real_profile.py [--epochs 12] [--seed 0] [--out tuning_logs/profiles/digits_dcn.json]
                                 [--weights deft_tvm/examples/digits_dcn_weights.pt]
                                 [--held-out deft_tvm/examples/digits_held_out.pt]

Data: scikit-learn's 1797 8x8 digits, upsampled to 24x24 on a 32x32 canvas and randomly rotated,
scaled and shifted (so the offsets have something to do); a seeded split holds out 360 images.
Network: ``deft_tvm.examples.digits.build_network`` (conv stem -> two
``deft_tvm.ModulatedDeformConv2dPack`` layers -> linear classifier), trained on the CPU through
deft_tvm's own op (TVM kernels forward and backward, torchvision's gradients), then evaluated and
profiled by ``deft_tvm.stats.collect`` on the held-out images as ``deft_tvm.examples.digits.held_out``
gives them (augmented, seeded). Saves the profile, the trained weights and the held-out 8x8 digits
(the last two ship with the package: ``deft_tvm.examples.digits``, the README's main job). Prints
the accuracies and the comparison with the synthetic profiles. Seeded; a few minutes on two cores
(each new batch shape compiles its kernels once).
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

from deft_tvm.examples import digits
from deft_tvm.tuning import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_data import MAX_ROTATION_DEG, MAX_SHIFT_FRACTION, SCALE_RANGE, augment, load_raw_digits  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tuning_logs" / "profiles" / "digits_dcn.json"
TEST_SIZE = 360
EVAL_BATCH = digits.EVAL_BATCH  # divides TEST_SIZE: one batch shape, so one kernel per layer
TRAIN_BATCH = 64
CANVAS = 32


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
    parser.add_argument("--weights", type=Path, default=digits.WEIGHTS, help="where the trained state dict goes")
    parser.add_argument("--held-out", type=Path, default=digits.HELD_OUT,
                        help="where the held-out 8x8 digits (uint8 0..16) and labels go")
    args = parser.parse_args()

    try:
        raw, labels = load_raw_digits()  # 8x8, 0..16
    except ImportError as err:
        sys.exit(f"tools/real_profile.py: {err}")
    images = digits.to_canvas(raw, CANVAS)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(images), generator=generator)
    test, train_split = order[:TEST_SIZE], order[TEST_SIZE:]
    torch.manual_seed(args.seed)
    model = digits.build_network()
    train(model, images[train_split], labels[train_split], args.epochs, generator)

    torch.save({"images": raw[test].clone(), "labels": labels[test].clone()}, args.held_out)
    torch.save(model.state_dict(), args.weights)
    print(f"saved {args.weights} ({args.weights.stat().st_size / 1024:.0f} KiB), "
          f"{args.held_out} ({args.held_out.stat().st_size / 1024:.0f} KiB)")
    held_out = torch.cat(digits.held_out(args.seed))  # as the package gives them: fresh seeded augmentation
    results = {
        "train (augmented)": accuracy(model, augment(images[train_split], generator), labels[train_split]),
        "test (augmented)": accuracy(model, held_out, labels[test]),
        "test (clean)": accuracy(model, images[test], labels[test]),
    }
    for name, value in results.items():
        print(f"accuracy {name}: {value:.2%}")

    source = (
        f"tools/real_profile.py --seed {args.seed} --epochs {args.epochs}: scikit-learn digits (1797 8x8 images "
        f"upsampled to 24x24 on a 32x32 canvas, random rotation +-{MAX_ROTATION_DEG:g} deg, scale {SCALE_RANGE}, "
        f"shift +-{MAX_SHIFT_FRACTION * CANVAS:g} px); network conv3x3(1->16)-BN-ReLU-maxpool, "
        f"DCNv2 3x3(16->32)-BN-ReLU-maxpool, "
        f"DCNv2 3x3(32->32, 2 offset groups)-BN-ReLU, global average pool, linear(32->10), trained through "
        f"deft_tvm's op on {len(train_split)} images, Adam one-cycle, batch {TRAIN_BATCH}; accuracy "
        + ", ".join(f"{name} {value:.4f}" for name, value in results.items())
        + f"; profiled on the {TEST_SIZE} held-out images, augmented, in batches of {EVAL_BATCH}, "
        f"through deft_tvm.ModulatedDeformConv2dPack (as deft_tvm.examples.digits.held_out({args.seed}) gives them)"
    )
    profile = stats.collect(model.eval(), held_out.split(EVAL_BATCH), seed=args.seed, source=source)
    path = profile.save(args.out)
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(stats.describe(profile))
    print()
    print(stats.compare(profile))


if __name__ == "__main__":
    main()
