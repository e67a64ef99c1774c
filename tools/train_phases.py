"""Where a training step of ``tools/train_bench.py``'s network goes: host time and GPU time per phase.

    python tools/train_phases.py [--dtype float32|float16|bfloat16] [--tf32 off|on]
                                 [--variants deft_tvm torchvision plain] [--steps 10] [--warmup 4]
                                 [--batch 32] [--width 64] [--canvas 64] [--kernels 0] [--seed 0]

Same network, batches and optimizer as ``train_bench.py`` (its defaults: 9 DCNv2 layers, 64
channels, 64x64, batch 32). Each step is synchronized before it starts and after it ends; within
it, the phases run as in training, nothing waits for the GPU:

* ``forward``: the network and the loss; ``backward``: ``zero_grad`` and ``loss.backward()``;
  ``optimizer``: the SGD step;
* ``host`` columns: the host's time to issue a phase (ms, median over the timed steps);
* ``gpu`` columns (CUDA only): the time between CUDA events recorded at the phase's ends (ms), the
  phase's span on the GPU's timeline; ``step``: the synchronized step's wall time (ms).

Reading it: a phase whose host time reaches its GPU span kept the GPU waiting for the host (the
host issues slower than the GPU runs); one whose GPU span is well above its host time is bound by
its kernels. ``--kernels K`` (CUDA) also prints the K kernels of most GPU time over two further
steps (``torch.profiler``, ms per step) and the step's busy kernel time. On a CPU the gpu columns
are NaN. Prints a table; exit status 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from digits_data import load_digits  # tools/ is on sys.path when this script runs
from train_bench import DTYPES, VARIANTS, build_variants, device_batches, sgd, tf32_label, training_step

from deft_tvm.bench import int_at_least, tf32_mode

PHASES = ("forward", "backward", "optimizer")
COLUMNS = ("variant", *(f"{p}_host_ms" for p in PHASES), *(f"{p}_gpu_ms" for p in PHASES), "step_ms")
NAN = float("nan")


def phase_times(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Train ``model`` one ``training_step`` per batch and return the ``COLUMNS`` times (ms, medians
    over the steps after ``warmup``) but the variant."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    samples = []
    for step, (x, y) in enumerate(batches):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []
        host = []

        def mark():  # the end of a phase (or the step's start), on the host and on the GPU's timeline
            if cuda:
                events[len(host)].record()
            host.append(time.perf_counter())

        sync()
        mark()
        training_step(model, optimizer, x, y, after_phase=mark)
        sync()
        end = time.perf_counter()
        if step >= warmup:
            gpu = [a.elapsed_time(b) for a, b in zip(events, events[1:])] if cuda else [NAN] * 3
            samples.append([(b - a) * 1e3 for a, b in zip(host, host[1:])] + gpu + [(end - host[0]) * 1e3])
    medians = [statistics.median(column) for column in zip(*samples)]
    return dict(zip(COLUMNS[1:], medians))


def kernel_table(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, device: torch.device,
                 rows: int) -> str:
    """The ``rows`` CUDA kernels of most GPU time over ``batches`` (two steps), ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x, y in batches:
            training_step(model, optimizer, x, y)
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    steps = len(batches)
    busy = sum(e.device_time_total for e in kernels) / 1e3 / steps
    lines = [f"  {e.device_time_total / 1e3 / steps:8.3f} ms  {e.count // steps:4d} calls  {e.key[:90]}"
             for e in kernels[:rows]]
    return "\n".join([f"  kernel time per step {busy:.3f} ms; the {rows} largest:"] + lines)


def run(images: torch.Tensor, labels: torch.Tensor, *, variants, steps: int, warmup: int, batch: int, width: int,
        dtype: str, tf32: bool, device: torch.device, seed: int, kernels: int = 0) -> list[dict]:
    """One row (``COLUMNS``) per variant, trained on ``images [n, 1, size, size]`` (``labels [n]``);
    ``kernels`` > 0 on CUDA prints each variant's kernel table (two more steps)."""
    batches = device_batches(images, labels, warmup + steps + 2, batch, seed, device, dtype)
    rows = []
    with tf32_mode(tf32_label(dtype, tf32, device)):
        for variant, model in build_variants(variants, width, seed).items():
            model = model.to(device, getattr(torch, dtype))
            optimizer = sgd(model)
            rows.append({"variant": variant, **phase_times(model, optimizer, batches[:warmup + steps], warmup, device)})
            if kernels > 0 and device.type == "cuda":
                print(f"{variant}:\n{kernel_table(model, optimizer, batches[warmup + steps:], device, kernels)}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--tf32", choices=("off", "on"), default="off", help="TF32 for float32 on a GPU")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "reference"],
                        default=["deft_tvm", "plain"])
    parser.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int_at_least(1), default=4, help="untimed first steps (default 4)")
    parser.add_argument("--batch", type=int_at_least(1), default=32)
    parser.add_argument("--width", type=int_at_least(1), default=64)
    parser.add_argument("--canvas", type=int_at_least(8), default=64)
    parser.add_argument("--kernels", type=int_at_least(0), default=0, help="kernel table rows (CUDA; default 0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        images, labels = load_digits(args.canvas)
    except ImportError as err:
        sys.exit(f"tools/train_phases.py: {err}")
    rows = run(images, labels, variants=args.variants, steps=args.steps, warmup=args.warmup, batch=args.batch,
               width=args.width, dtype=args.dtype, tf32=args.tf32 == "on", device=device, seed=args.seed,
               kernels=args.kernels)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}, TF32 {args.tf32}; ms per step (median of "
          f"{args.steps}), host = time to issue the phase, gpu = its span on the GPU's timeline")
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join([row["variant"]] + [f"{row[c]:.3f}" for c in COLUMNS[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
