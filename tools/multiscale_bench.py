"""Multi-scale training benchmark (issue 16): every iteration a new input size, compiles included.

    python tools/multiscale_bench.py [--iterations 50] [--batch 2] [--short-sides 480 800 32]
                                     [--aspect 1.667] [--downsample 8] [--width 32]
                                     [--dtype float32|float16|bfloat16] [--tf32 off|on]
                                     [--variants deft_tvm deft_tvm_cached torchvision plain]
                                     [--device cuda|cpu]
                                     [--csv PATH] [--seed 0] [--commit SHA]

Detection training draws the input size per batch: here the shorter side uniformly from
``range(*--short-sides)`` (default 480..800 step 32, as multi-scale training on COCO does), the
longer one ``--aspect`` times it rounded to a multiple of 32, landscape or portrait at random, one
size per iteration (the same sizes for every variant; seeded). The network is
``tools/train_bench.py``'s DCN ResNet (``build_resnet``: every 3x3 conv a DCNv2 layer, or
torchvision's, or a plain conv) behind an average pool of ``--downsample`` (a backbone's stem:
the DCN layers see 1/8 of the image by default), trained with SGD on random images and labels.

The kernel cache starts empty (a fresh ``DEFT_TVM_CACHE_DIR``), so deft_tvm's compiles happen
inside the run: ``compile_s`` is the wall time spent in TVM's compiler (every call of
``runtime.targets.compile_kernel`` the op makes, forward and backward), ``kernels`` how many it
compiled. ``deft_tvm_cached`` runs deft_tvm again with this process's kernels forgotten
(``runtime.backward.clear_memory_cache``), as a later process would start: its kernels load from
the disk cache the ``deft_tvm`` row (listed before it) compiled into. Per variant one row:
``total_s`` (all iterations, compiles included, GPU synchronized at the end), ``step_ms`` (median
time of an iteration that compiled nothing), the distinct sizes, with device, dtype, TF32 setting
and commit; ``--csv`` writes them.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from train_bench import DCN_VARIANTS, build_resnet, conv3x3_factory, sgd  # noqa: E402

from deft_tvm.bench import current_commit, tf32_mode  # noqa: E402
from deft_tvm.runtime import backward, kernel_cache  # noqa: E402


def input_sizes(iterations: int, short_sides: range, aspect: float, seed: int) -> list[tuple[int, int]]:
    """``iterations`` seeded (height, width) pairs: the shorter side from ``short_sides``, the
    longer ``aspect`` times it rounded to a multiple of 32, either orientation."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(iterations):
        short = rng.choice(short_sides)
        long = max(short, round(short * aspect / 32) * 32)
        sizes.append((short, long) if rng.random() < 0.5 else (long, short))
    return sizes


class CompileClock:
    """Times every TVM compile the op's runtime makes (``compile_kernel`` as ``kernel_cache`` and
    ``runtime.backward`` call it) while installed: ``seconds`` and ``count``."""

    def __init__(self):
        self.seconds, self.count, self._saved = 0.0, 0, []

    def __enter__(self):
        for module in (kernel_cache, backward):
            original = module.compile_kernel
            self._saved.append((module, original))

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
                    self.count += 1

            module.compile_kernel = timed
        return self

    def __exit__(self, *exc):
        for module, original in self._saved:
            module.compile_kernel = original


def train_multiscale(model: nn.Module, sizes, batch: int, dtype: torch.dtype, device: torch.device,
                     seed: int) -> dict:
    """One SGD step per size on random ``[batch, 1, h, w]`` images; returns ``total_s``,
    ``step_ms`` (median over the iterations that compiled nothing), ``compile_s`` and ``kernels``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = sgd(model)
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steady = []
    with CompileClock() as clock:
        sync()
        start = time.perf_counter()
        for h, w in sizes:
            x = torch.randn(batch, 1, h, w, generator=generator).to(device, dtype)
            y = torch.randint(0, 10, (batch,), generator=generator).to(device)
            compiles, step_start = clock.count, time.perf_counter()
            loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            if clock.count == compiles:
                steady.append((time.perf_counter() - step_start) * 1e3)
        total = time.perf_counter() - start
    return {"total_s": round(total, 3), "step_ms": round(statistics.median(steady), 3) if steady else float("nan"),
            "compile_s": round(clock.seconds, 3), "kernels": clock.count}


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--short-sides", type=int, nargs=3, default=[480, 801, 32], metavar=("START", "STOP", "STEP"))
    parser.add_argument("--aspect", type=float, default=1333 / 800)
    parser.add_argument("--downsample", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--tf32", choices=["off", "on"], default="on")
    parser.add_argument("--variants", nargs="+", default=["deft_tvm", "deft_tvm_cached", "torchvision", "plain"],
                        choices=["deft_tvm", "deft_tvm_cached", "torchvision", "plain"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = input_sizes(args.iterations, range(*args.short_sides), args.aspect, args.seed)
    os.environ[kernel_cache.CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="deft_multiscale_")  # compiles in the run
    kernel_cache.clear_memory_cache()
    commit = args.commit or current_commit()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tf32 = args.tf32 if args.dtype == "float32" and device.type == "cuda" else "n/a"
    rows = []
    for variant in args.variants:
        if variant == "torchvision" and (args.dtype == "bfloat16" or importlib.util.find_spec("torchvision") is None):
            print("torchvision: skipped (not installed, or bfloat16, which it has no kernel for)")
            continue
        if variant == "deft_tvm_cached":
            backward.clear_memory_cache()  # as in a new process: the kernels come from the disk cache
        torch.manual_seed(args.seed)
        layers = "deft_tvm" if variant == "deft_tvm_cached" else variant
        model = nn.Sequential(nn.AvgPool2d(args.downsample), build_resnet(conv3x3_factory(layers), args.width))
        model = model.to(device, dtype)
        with tf32_mode(tf32):
            result = train_multiscale(model, sizes, args.batch, dtype, device, args.seed)
        row = {"variant": variant, **result, "iterations": len(sizes), "distinct_sizes": len(set(sizes)),
               "batch": args.batch, "downsample": args.downsample, "width": args.width, "dtype": args.dtype,
               "tf32": tf32, "device": gpu, "dcn": layers in DCN_VARIANTS, "commit": commit}
        rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
