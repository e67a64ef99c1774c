"""Forward-time benchmark: deft_tvm vs torchvision vs a dense conv2d of the same shape, in one run.

    python tools/bench.py [--workloads NAME ...] [--dtypes float32 float16 ...] [--tf32 off on]
                          [--iters 20] [--csv tools/results/NAME.csv]

Providers: ``deft_tvm`` (what users get: the committed tuned record when there is one, else the
default schedule; the ``schedule`` column says which), ``deft_tvm_default`` (the default schedule,
only where a tuned record exists, as the ablation), torchvision and dense conv2d.

On a GPU every provider is timed with CUDA events over ``--iters`` back-to-back calls after a
warm-up (GPU time per call; host overhead hides under it once kernels are long enough), and one
call with a synchronize around it is timed on the host (per-call latency). The dense conv2d is
cuDNN's, in NCHW and in channels_last. On a CPU-only machine the providers are deft_tvm, the
plain-torch float64 reference and torch's dense conv2d. Offsets come from each workload's profile.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import deft_tvm
from deft_tvm import kernel_cache
from deft_tvm.compute import deform_conv2d_primfunc
from deft_tvm.schedules import default_schedule
from deft_tvm.targets import target_for_device
from deft_tvm.spec import SUPPORTED_DTYPES
from deft_tvm.workloads import DEFAULT_WORKLOAD, WORKLOADS, get_workload

COLUMNS = ["device", "workload", "dtype", "tf32", "profile", "provider", "schedule", "gpu_ms", "latency_ms",
           "vs_dense", "vs_torchvision", "commit"]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _latency_ms(fn, device: str, repeats: int = 20) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _providers(workload, device: str, tuned: bool):
    spec = workload.spec
    inputs = workload.make_inputs(device=device)
    dense = (inputs["input"], inputs["weight"], inputs["bias"], spec.stride, spec.padding, spec.dilation, spec.groups)
    providers = {"deft_tvm": lambda: deft_tvm.deform_conv2d(**inputs)}
    if tuned:
        target = target_for_device(device)
        default = kernel_cache.load_or_build(spec, target, default_schedule(deform_conv2d_primfunc(spec), spec, target))
        args = [inputs[k] for k in ("input", "offset", "mask", "weight", "bias") if inputs[k] is not None]
        out = torch.empty(spec.output_shape, dtype=args[0].dtype, device=device)
        providers["deft_tvm_default"] = lambda: default(*args, out)
    if device == "cuda":
        try:
            from torchvision.ops import deform_conv2d as tv_deform_conv2d
        except ImportError:
            tv_deform_conv2d = None
        if tv_deform_conv2d is not None and spec.dtype != "bfloat16":  # torchvision has no bf16 kernel
            providers["torchvision"] = lambda: tv_deform_conv2d(**inputs)
        cl_input = inputs["input"].contiguous(memory_format=torch.channels_last)
        cl_weight = inputs["weight"].contiguous(memory_format=torch.channels_last)
        providers["cudnn_nchw"] = lambda: F.conv2d(*dense)
        providers["cudnn_channels_last"] = lambda: F.conv2d(cl_input, cl_weight, *dense[2:])
    else:
        providers["reference_float64"] = lambda: deft_tvm.deform_conv2d_reference(**inputs)
        providers["dense_conv2d"] = lambda: F.conv2d(*dense)
    return providers


def run(workloads, dtypes, tf32_modes, iters: int, device: str, commit: str) -> list[dict]:
    rows = []
    kernel_cache.prebuild([get_workload(n, d).spec for n in workloads for d in dtypes], torch.device(device))
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    target = target_for_device(device)
    for name in workloads:
        for dtype in dtypes:
            workload = get_workload(name, dtype)
            tuned = kernel_cache.schedule_for(workload.spec, target)[1]
            schedule = {"deft_tvm": "tuned" if tuned else "default", "deft_tvm_default": "default"}
            for tf32 in tf32_modes if dtype == "float32" and device == "cuda" else ["n/a"]:
                torch.backends.cuda.matmul.allow_tf32 = tf32 == "on"
                torch.backends.cudnn.allow_tf32 = tf32 == "on"
                timings = {}
                with torch.no_grad():
                    for provider, fn in _providers(workload, device, tuned).items():
                        gpu = gpu_ms(fn, iters) if device == "cuda" else float("nan")
                        timings[provider] = (gpu, _latency_ms(fn, device))
                column = 0 if device == "cuda" else 1
                dense = min(v[column] for k, v in timings.items() if "cudnn" in k or "dense" in k)
                torchvision = timings["torchvision"][column] if "torchvision" in timings else float("nan")
                for provider, (gpu, latency) in timings.items():
                    own = gpu if device == "cuda" else latency
                    rows.append(dict(device=device_name, workload=name, dtype=dtype, tf32=tf32,
                                     profile=workload.profile, provider=provider,
                                     schedule=schedule.get(provider, ""), gpu_ms=round(gpu, 4),
                                     latency_ms=round(latency, 4), vs_dense=round(own / dense, 2),
                                     vs_torchvision=round(torchvision / own, 2), commit=commit))
                    print(" | ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=[DEFAULT_WORKLOAD], choices=list(WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=SUPPORTED_DTYPES)
    parser.add_argument("--tf32", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV file")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}; vs_dense = own time / fastest dense conv2d of the same shape, "
          "vs_torchvision = torchvision time / own time "
          f"({'GPU time' if device == 'cuda' else 'latency'})")
    print(" | ".join(COLUMNS))
    rows = run(args.workloads, args.dtypes, args.tf32, args.iters, device, args.commit or _commit())
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
