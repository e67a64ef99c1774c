"""End-to-end training benchmark: a ResNet whose every 3x3 conv is a DCNv2 layer, trained on real digits.

    pip install scikit-learn   # only for its bundled digits data set; nothing is downloaded
    python tools/train_bench.py [--steps 20] [--warmup 3] [--batch 32] [--width 64] [--canvas 64]
                                [--dtype float32|float16|bfloat16] [--tf32 off|on]
                                [--variants deft_tvm torchvision plain] [--check-reference]
                                [--csv PATH] [--seed 0] [--commit SHA]

Network (``build_resnet``): a 3x3 stem conv (1 -> width), two stages of two BasicBlocks (3x3 conv,
BN, ReLU, 3x3 conv, BN, plus the identity or a 1x1 stride-2 projection, ReLU), the second stage at
stride 2 and twice the width, global average pool, linear to 10 classes: 9 3x3 convs. The
defaults put the first stage's DCN layers at the project's benchmark layer (64 channels, 64x64,
batch 32). Variants, one network each:

* ``deft_tvm``: every 3x3 conv a ``deft_tvm.ModulatedDeformConv2dPack``;
* ``torchvision``: the same layers computed by ``torchvision.ops.deform_conv2d`` (same offsets
  and mask; only where torchvision imports, and it has no bfloat16 kernel);
* ``reference`` (``--check-reference``): computed by the float64 ``deform_conv2d_reference``
  and ``deform_conv2d_reference_backward`` (torchvision's gradients; slow; for the loss check);
* ``plain``: ``nn.Conv2d`` 3x3 of the same shapes, the dense baseline (its own parameters).

The DCN variants start from one state dict, and every variant trains on the same batches
(digits on a ``canvas`` x ``canvas`` canvas, seeded augmentation; see ``digits_data``): SGD with
momentum, cross-entropy, a step being forward, backward and optimizer step. Half dtypes convert
the whole model and its inputs (``model.to(dtype)``, no autocast: under autocast torchvision's op
would run in float32). ``--tf32`` sets TF32 for cuDNN and matmuls (float32 on a GPU only).

Timing: ``--warmup`` untimed steps (deft_tvm compiles each new layer shape's kernels there), then
``--steps`` timed ones; ``step_ms``, ``step_p20_ms`` and ``step_p80_ms`` are the median, 20th and
80th percentiles of the host time per step, with the GPU synchronized around each step on a GPU,
where ``gpu_step_ms`` is the median CUDA-event time of the same steps. ``vs_torchvision`` is
torchvision's ``step_ms`` over the variant's, ``vs_plain`` the variant's over plain's.

Losses: each variant's loss at every step (warm-up included) goes into the CSV's ``losses``
column; deft_tvm's are compared step by step with torchvision's and the reference's (whichever
ran), and the exit status is 1 where they differ beyond ``loss_tolerance``. Prints a table;
``--csv`` merges the rows into a CSV by key (``KEY``), as ``deft-tvm bench`` does.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from digits_data import augment, load_digits  # tools/ is on sys.path when this script runs
from torch import nn

import deft_tvm
from deft_tvm.bench import current_commit, int_at_least, merge_csv, tf32_mode, torchvision_deform_conv2d
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import TOLERANCES, tolerance_key

VARIANTS = ("deft_tvm", "torchvision", "reference", "plain")
DCN_VARIANTS = ("deft_tvm", "torchvision", "reference")
DTYPES = ("float32", "float16", "bfloat16")
COLUMNS = ["device", "network", "dtype", "tf32", "variant", "steps", "warmup", "step_ms", "step_p20_ms",
           "step_p80_ms", "gpu_step_ms", "first_loss", "last_loss", "vs_torchvision", "vs_plain", "commit",
           "losses"]
KEY = ("device", "network", "dtype", "tf32", "variant", "commit")
LEARNING_RATE, MOMENTUM = 0.05, 0.9
NAN = float("nan")

Conv3x3 = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> layer


class TorchvisionPack(deft_tvm.ModulatedDeformConv2dPack):
    """``ModulatedDeformConv2dPack`` computed by ``torchvision.ops.deform_conv2d`` (same offsets
    and mask from ``conv_offset``, same parameters). ``forward(input)``: ``[batch, in_channels,
    height, width]`` -> ``[batch, out_channels, out_h, out_w]``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deform_conv2d = torchvision_deform_conv2d()
        if self.deform_conv2d is None:
            raise RuntimeError("the torchvision variant needs torchvision, which does not import here")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        offset, mask = self.split_conv_offset(self.conv_offset(input))
        return self.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                  self.dilation, mask)


class _ReferenceDeformConv2d(torch.autograd.Function):
    """``deform_conv2d_reference`` with ``deform_conv2d_reference_backward`` as its backward: torchvision's
    forward and gradients in float64, rounded to each argument's dtype (shapes as ``deft_tvm.deform_conv2d``'s)."""

    @staticmethod
    def forward(ctx, input, offset, weight, bias, mask, stride, padding, dilation):
        ctx.save_for_backward(input, offset, weight, bias, mask)
        ctx.hyper = stride, padding, dilation
        return deft_tvm.deform_conv2d_reference(input, offset, weight, bias, stride, padding, dilation,
                                                mask).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, weight, bias, mask = ctx.saved_tensors
        grads = deform_conv2d_reference_backward(grad_output, input, offset, weight, bias, *ctx.hyper, mask)
        return (*(None if g is None else g.to(t.dtype) for g, t in zip(grads, (input, offset, weight, bias, mask))),
                None, None, None)


class ReferencePack(deft_tvm.ModulatedDeformConv2dPack):
    """``ModulatedDeformConv2dPack`` computed by the float64 reference forward and backward.

    Not autograd through ``deform_conv2d_reference``: autograd's offset gradient of the reference
    is zero at a sampling point exactly on -1, where torchvision's (and deft_tvm's) is one-sided
    (see ``deft_tvm.reference_backward``); with the zero-initialised ``conv_offset`` every border
    tap of a padding-1 layer lies there, so the trainings would part from the first step. ``forward(input)``: ``[batch, in_channels, height,
    width]`` -> ``[batch, out_channels, out_h, out_w]``, input's dtype.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        offset, mask = self.split_conv_offset(self.conv_offset(input))
        return _ReferenceDeformConv2d.apply(input, offset, self.weight, self.bias, mask, self.stride,
                                            self.padding, self.dilation)


DCN_CLASSES = {"deft_tvm": deft_tvm.ModulatedDeformConv2dPack, "torchvision": TorchvisionPack,
               "reference": ReferencePack}


def conv3x3_factory(variant: str) -> Conv3x3:
    """The 3x3 layer of ``variant`` (padding 1, no bias: a BN follows each)."""
    if variant == "plain":
        return lambda i, o, stride: nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False)
    dcn = DCN_CLASSES[variant]
    return lambda i, o, stride: dcn(i, o, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``: ``[batch, in_channels, h, w]`` ->
    ``[batch, out_channels, ceil(h / stride), ceil(w / stride)]``; the shortcut is the identity, or
    a 1x1 conv and BN where the shape changes."""

    def __init__(self, conv3x3: Conv3x3, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(),
            conv3x3(out_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def build_resnet(conv3x3: Conv3x3, width: int, stages: int = 2, blocks: int = 2, classes: int = 10) -> nn.Sequential:
    """``[batch, 1, size, size]`` -> logits ``[batch, classes]``: 3x3 stem (1 -> width), ``stages``
    stages of ``blocks`` BasicBlocks (stage s at width ``width * 2**s``, stride 2 from the second),
    global average pool, linear. Every 3x3 conv is ``conv3x3``'s: ``1 + 2 * stages * blocks`` of them."""
    layers = [conv3x3(1, width, 1), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage in range(stages):
        out = width * 2**stage
        for block in range(blocks):
            layers.append(BasicBlock(conv3x3, channels, out, 2 if stage > 0 and block == 0 else 1))
            channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def build_variants(variants, width: int, seed: int) -> dict[str, nn.Module]:
    """Variant -> network; the DCN variants share one seeded state dict, plain is seeded alike."""
    torch.manual_seed(seed)
    shared = build_resnet(conv3x3_factory("deft_tvm"), width).state_dict()
    networks = {}
    for variant in variants:
        torch.manual_seed(seed)
        networks[variant] = build_resnet(conv3x3_factory(variant), width)
        if variant in DCN_VARIANTS:
            networks[variant].load_state_dict(shared)
    return networks


def make_batches(images: torch.Tensor, labels: torch.Tensor, count: int, batch: int,
                 seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` seeded batches of augmented ``images`` ``[n, 1, size, size]`` (labels ``[n]``):
    ``([batch, 1, size, size], [batch])`` each, drawn without replacement within a batch."""
    if batch > len(images):
        raise ValueError(f"batch {batch} is larger than the data set ({len(images)} images)")
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        index = torch.randperm(len(images), generator=generator)[:batch]
        batches.append((augment(images[index], generator), labels[index]))
    return batches


def device_batches(images: torch.Tensor, labels: torch.Tensor, count: int, batch: int, seed: int,
                   device: torch.device, dtype: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``make_batches`` on ``device``, the images in ``dtype``."""
    return [(x.to(device, getattr(torch, dtype)), y.to(device))
            for x, y in make_batches(images, labels, count, batch, seed)]


def tf32_label(dtype: str, tf32: bool, device: torch.device) -> str:
    """The TF32 setting a run has: "on" / "off" for float32 on a GPU, else "n/a"."""
    return ("on" if tf32 else "off") if dtype == "float32" and device.type == "cuda" else "n/a"


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The benchmark's optimizer: SGD with momentum."""
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  after_phase: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One step on the batch ``(x, y)``: forward and cross-entropy, ``zero_grad`` and backward,
    optimizer step, ``after_phase()`` called after each of the three. Returns the loss."""
    loss = F.cross_entropy(model(x), y)
    after_phase()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    after_phase()
    optimizer.step()
    after_phase()
    return loss


def train_mode(model: nn.Module, frozen_bn: bool = False) -> None:
    """Training mode; with ``frozen_bn`` the batch norms in eval mode (running statistics, as
    detection backbones are fine-tuned)."""
    model.train()
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train(model: nn.Module, batches, warmup: int, device: torch.device, *, frozen_bn: bool = False,
          barrier: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Train ``model`` one step per batch (``training_step``; ``train_mode`` with ``frozen_bn``).
    Returns the loss of every step (``losses``), the host time (ms) of each step after the first
    ``warmup`` (``host_ms``: synchronized around each on a GPU, and with ``barrier``, e.g.
    ``torch.distributed.barrier``, every process waited for: the slowest one's) and their CUDA-event
    times (``gpu_ms``, GPU only)."""
    optimizer = sgd(model)
    cuda = device.type == "cuda"
    train_mode(model, frozen_bn)

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)
        if barrier is not None:
            barrier()

    losses, host_ms, events = [], [], []
    for x, y in batches:
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        synchronize()
        start = time.perf_counter()
        if cuda:
            events[-1][0].record()
        loss = training_step(model, optimizer, x, y)
        if cuda:
            events[-1][1].record()
        synchronize()
        host_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.detach())
    return {"losses": [loss.item() for loss in losses], "host_ms": host_ms[warmup:],
            "gpu_ms": [start.elapsed_time(end) for start, end in events[warmup:]]}


def dcn_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, deft_tvm.ModulatedDeformConv2dPack) for m in model.modules())


def loss_tolerance(dtype: str, tf32: bool, dcn_layers: int, step: int) -> float:
    """Largest relative difference allowed between deft_tvm's loss and another DCN variant's at
    ``step`` (counted from 0, warm-up included): ``4 * dcn_layers * (rtol + atol) * (step + 1)``.

    ``rtol`` and ``atol`` are the tolerance table's row for the kernels (``tolerance_key``: TF32 for
    float32 with ``--tf32 on``). Each DCN layer's output is within ``rtol * |y| + atol`` of the
    float64 reference, so two implementations are within ``2 * (rtol + atol)`` of each other at the
    unit scale BN keeps activations at, and BN passes an earlier layer's difference on with a gain
    of about one: the logits differ by up to ``dcn_layers`` times that. The cross-entropy's gradient
    in the logits has an L1 norm of at most 2, so the losses differ by at most twice the logits'
    difference, ``4 * dcn_layers * (rtol + atol)``, at step 0, where the parameters are the same;
    relative to losses of at least 1 (they start at ln 10 = 2.3) too. Every later step moves the
    parameters by gradients that differ by the same relative order, and the differences add up:
    the budget grows with ``step + 1``. For the half types that is loose (bfloat16: 0.86 at step 0
    with 9 layers; there the check only catches a broken training); float32 is where it bites.

    That growth also has to absorb the kinks of bilinear interpolation: the offset gradient jumps
    where a sampling point crosses a pixel row or column, points start on them (zero-initialised
    offsets), and a rounding difference that sends one to the other side parts the trajectories
    faster than rounding alone would. On the CPU in float32 (width 8, batch 8, seeds 0 and 1)
    deft_tvm's losses stayed within 1e-5 of the float64 reference's for 4 steps, then within 3%
    (step 16) against a budget of 6.7% there: an error budget with a margin of about two, not a
    proof. It catches a wrong forward (from step 0) and grossly wrong gradients, not a subtly wrong
    gradient: the op-level gradient tests do that.
    """
    row = TOLERANCES[tolerance_key(dtype, tf32)]
    return 4 * dcn_layers * (row["rtol"] + row["atol"]) * (step + 1)


def compare_losses(losses: list[float], expected: list[float], tolerance: Callable[[int], float]) -> tuple[float, bool]:
    """``(max relative difference, within ``tolerance(step)`` at every step)`` of two variants' losses."""
    relative = [abs(a - b) / abs(b) for a, b in zip(losses, expected)]
    return max(relative), all(r <= tolerance(step) for step, r in enumerate(relative))


def check_losses(losses: dict[str, list[float]], dtype: str, tf32: bool, dcn_layers: int) -> list[str]:
    """Compare deft_tvm's losses with torchvision's and the reference's (those in ``losses``, by
    variant), print the outcome; returns the variants they do not match."""
    mismatched = []
    for other in ("torchvision", "reference"):
        if "deft_tvm" in losses and other in losses:
            worst, ok = compare_losses(losses["deft_tvm"], losses[other],
                                       lambda step: loss_tolerance(dtype, tf32, dcn_layers, step))
            print(f"losses deft_tvm vs {other}: max relative difference {worst:.3g} over {len(losses[other])} "
                  f"steps (tolerance {loss_tolerance(dtype, tf32, dcn_layers, 0):.3g} x (step + 1)): "
                  + ("match" if ok else "MISMATCH"))
            if not ok:
                mismatched.append(other)
    return mismatched


def _quantiles(samples: list[float], q) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(samples, q)] if samples else [NAN] * len(q)


def run(images: torch.Tensor, labels: torch.Tensor, *, variants, steps: int, warmup: int, batch: int, width: int,
        dtype: str, tf32: bool, device: torch.device, seed: int, commit: str) -> tuple[list[dict], list[str]]:
    """Train every variant on the same batches of ``images`` ``[n, 1, size, size]`` (``labels``
    ``[n]``). Returns the rows (``COLUMNS``, one per variant) and the variants whose losses
    deft_tvm's do not match (``check_losses``)."""
    batches = device_batches(images, labels, warmup + steps, batch, seed, device, dtype)
    networks = build_variants(variants, width, seed)
    tf32_setting = tf32_label(dtype, tf32, device)
    with tf32_mode(tf32_setting):
        results = {variant: train(model.to(device, getattr(torch, dtype)), batches, warmup, device)
                   for variant, model in networks.items()}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    network = f"resnet_{width}c_{images.shape[-1]}x{images.shape[-1]}_n{batch}"
    rows = []
    for variant, result in results.items():
        median, p20, p80 = _quantiles(result["host_ms"], [50, 20, 80])
        (gpu,) = _quantiles(result["gpu_ms"], [50])
        rows.append(dict(device=device_name, network=network, dtype=dtype, tf32=tf32_setting, variant=variant,
                         steps=steps, warmup=warmup, step_ms=median, step_p20_ms=p20, step_p80_ms=p80,
                         gpu_step_ms=gpu, first_loss=round(result["losses"][0], 6),
                         last_loss=round(result["losses"][-1], 6), commit=commit,
                         losses=" ".join(f"{v:.8g}" for v in result["losses"])))
    times = {row["variant"]: row["step_ms"] for row in rows}
    for row in rows:
        row["vs_torchvision"] = round(times.get("torchvision", NAN) / row["step_ms"], 3)
        row["vs_plain"] = round(row["step_ms"] / times.get("plain", NAN), 3)
    dcn_layers = dcn_layer_count(networks["deft_tvm"]) if "deft_tvm" in networks else 0
    return rows, check_losses({v: r["losses"] for v, r in results.items()}, dtype, tf32_setting == "on", dcn_layers)


def read_rows(path: Path) -> list[dict]:
    """The rows of a train_bench CSV; refuses a file with other columns."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{path} is not a train_bench CSV: its columns are {reader.fieldnames}")
        return list(reader)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path``, keeping the rows already there whose key (``KEY``) no new row has."""
    merge_csv(path, rows, COLUMNS, KEY, read_rows)


def select_variants(requested: Optional[list[str]], check_reference: bool, dtype: str) -> list[str]:
    """The variants to run, in ``VARIANTS`` order: ``requested``, or by default deft_tvm,
    torchvision (where it imports and has the dtype) and plain; plus reference with
    ``check_reference``. Raises ValueError for a torchvision variant asked for where it cannot run."""
    if torchvision_deform_conv2d() is None:
        torchvision_missing = "torchvision does not import here: pip install torchvision"
    else:
        torchvision_missing = "torchvision has no bfloat16 kernel" if dtype == "bfloat16" else ""
    if requested is None:
        requested = ["deft_tvm", "plain"] + ([] if torchvision_missing else ["torchvision"])
    elif "torchvision" in requested and torchvision_missing:
        raise ValueError(f"--variants torchvision cannot run: {torchvision_missing}")
    return [v for v in VARIANTS if v in requested or (v == "reference" and check_reference)]


def parse_args(argv) -> argparse.Namespace:
    """The command line, with ``variants`` resolved by ``select_variants`` (exits on errors)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int_at_least(1), default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int_at_least(1), default=3,
                        help="untimed steps first, where kernels compile (default 3)")
    parser.add_argument("--batch", type=int_at_least(1), default=32)
    parser.add_argument("--width", type=int_at_least(1), default=64, help="channels of the first stage (default 64)")
    parser.add_argument("--canvas", type=int_at_least(8), default=64, help="image side in pixels (default 64)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--tf32", choices=("off", "on"), default="off", help="TF32 for float32 on a GPU (default off)")
    parser.add_argument("--variants", nargs="+", choices=("deft_tvm", "torchvision", "plain"), default=None,
                        help="default: deft_tvm, torchvision (where it imports) and plain")
    parser.add_argument("--check-reference", action="store_true",
                        help="also train with the float64 reference op and compare deft_tvm's losses with it")
    parser.add_argument("--csv", type=Path, default=None, help="write (merge) the rows into this CSV file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    try:
        args.variants = select_variants(args.variants, args.check_reference, args.dtype)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv=None, data: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> int:
    """Run the benchmark; ``data`` = ``(images [n, 1, size, size], labels [n])`` replaces the
    digits (and ``--canvas``: the canvas is then ``size``). Returns 1 where the losses do not match."""
    args = parse_args(argv)
    if data is None:
        try:
            data = load_digits(args.canvas)
        except ImportError as err:
            sys.exit(f"tools/train_bench.py: {err}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device.type}; variants {', '.join(args.variants)}; step_ms: host time per "
          f"step (median; GPU synchronized around each step), vs_torchvision = torchvision step_ms / own, "
          f"vs_plain = own step_ms / plain's")
    rows, failures = run(*data, variants=args.variants, steps=args.steps, warmup=args.warmup, batch=args.batch,
                         width=args.width, dtype=args.dtype, tf32=args.tf32 == "on", device=device,
                         seed=args.seed, commit=args.commit or current_commit())
    shown = COLUMNS[:-1]  # all but the per-step losses
    print(" | ".join(shown))
    for row in rows:
        print(" | ".join(str(row[c]) for c in shown))
    if args.csv is not None:
        write_csv(args.csv, rows)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
