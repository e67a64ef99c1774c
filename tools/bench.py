"""Forward-time benchmark on this machine's CPU: deft_tvm vs the plain-torch reference vs a dense conv.

    python tools/bench.py [--workload paper_64c_64x64_n1] [--dtype float32] [--repeats 20]

All providers run in one process on the same inputs (offsets from the workload's profile). The
dense ``torch.nn.functional.conv2d`` of the same shape is the lower bound a deformable conv is
compared with. GPU benchmarks (torchvision, cuDNN) come with the CUDA kernels.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import deft_tvm
from deft_tvm.spec import SUPPORTED_DTYPES
from deft_tvm.workloads import DEFAULT_WORKLOAD, WORKLOADS, get_workload


def _time_ms(fn, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up (and, for deft_tvm, compile or load the kernel)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=5)
    return statistics.median(samples), q[0], q[3]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=list(WORKLOADS))
    parser.add_argument("--dtype", default="float32", choices=SUPPORTED_DTYPES)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    workload = get_workload(args.workload, args.dtype)
    spec = workload.spec
    inputs = workload.make_inputs()
    dense_args = (inputs["input"], inputs["weight"], inputs["bias"], spec.stride, spec.padding, spec.dilation, spec.groups)
    providers = {
        "deft_tvm": lambda: deft_tvm.deform_conv2d(**inputs),
        "reference (torch, float64)": lambda: deft_tvm.deform_conv2d_reference(**inputs),
        "dense conv2d (same shape)": lambda: F.conv2d(*dense_args),
    }
    print(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"commit {_commit()}; torch {torch.__version__}")
    print(f"workload {workload.name} ({spec.key()}), dtype {spec.dtype}, offsets {workload.profile}, "
          f"{spec.flops / 1e9:.2f} GFLOP")
    results = {}
    with torch.no_grad():
        for name, fn in providers.items():
            results[name] = _time_ms(fn, args.repeats)
    base = results["deft_tvm"][0]
    print(f"{'provider':30s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'vs deft_tvm':>12s}")
    for name, (median, p20, p80) in results.items():
        print(f"{name:30s} {median:10.2f} {p20:8.2f} {p80:8.2f} {median / base:11.2f}x")


if __name__ == "__main__":
    main()
