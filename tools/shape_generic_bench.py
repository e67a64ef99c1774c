"""Shape-generic kernels against per-size kernels, side by side on the CPU.

    python tools/shape_generic_bench.py [--workloads NAME ...] [--dtypes float32 ...] [--runs 5]
                                        [--csv PATH]

For each registry workload and dtype, the default-schedule kernels of its exact sizes and those
of its layer configuration (``compute.spec.generic_spec``: batch, height and width TIR variables,
what the op runs on the CPU for every size; ``schedules/cpu.py``, ``schedules/cpu_backward.py``)
are compiled and timed on the same arguments (the workload's profile offsets): the forward
kernel, and the backward's gradient kernels plus the grad_input scatter. Prints and writes
(``--csv``) per workload, dtype and part the median of ``--runs`` calls in ms of both and their
ratio, with the CPU, torch's thread count and the commit. CUDA kernels are per size for now.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import subprocess
import time

import torch
import tvm

from deft_tvm.compute.backward import deform_conv2d_backward_te, scatter_primfunc
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import generic_spec
from deft_tvm.runtime.targets import compile_kernel
from deft_tvm.schedules import default_schedule
from deft_tvm.tuning.workloads import get_workload

DEFAULT_WORKLOADS = ("paper_64c_64x64_n1", "paper_64c_64x64_n8", "r50dcn_c5", "video_64c_180x320_og8")


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _kernels(spec, target) -> dict:
    """``{part: callable}`` of ``spec``'s (a size's or a configuration's) default CPU kernels."""
    forward = compile_kernel(default_schedule(kernel_primfunc(spec), spec, target).mod, target)["main"]
    gradients = compile_kernel(default_schedule(kernel_primfunc(spec, "backward"), spec, target,
                                                "backward").mod, target)["main"]
    scatter = compile_kernel(tvm.IRModule({"scatter": scatter_primfunc(spec)}), target)["scatter"]
    return {"forward": forward, "backward": (gradients, scatter)}


def _calls(spec, kernels: dict, inputs: dict) -> dict:
    """``{part: function}``: each part's kernels called on ``inputs`` (the workload's tensors)."""
    args = spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))
    output = torch.empty(spec.output_shape, dtype=args[0].dtype)
    _, outs = deform_conv2d_backward_te(spec)
    results = [torch.empty([int(s) for s in o.shape], dtype=getattr(torch, str(o.dtype))) for o in outs]
    grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(0)).to(args[0].dtype)
    given = [t for t in (inputs["input"], inputs["offset"], inputs["mask"], inputs["weight"], grad_output)
             if t is not None]
    grad_input = torch.empty(spec.input_shape, dtype=results[0].dtype)
    gradients, scatter = kernels["backward"]

    def backward():
        gradients(*given, *results)
        scatter(results[0], results[1], results[2], grad_input)

    return {"forward": lambda: kernels["forward"](*args, output), "backward": backward}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--csv", help="write the rows here")
    args = parser.parse_args(argv)
    target = tvm.target.Target("llvm")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    print(f"cpu {cpu}, torch threads {torch.get_num_threads()}, commit {commit or 'unknown'}")
    rows = []
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype)
            spec, inputs = workload.spec, workload.make_inputs()
            sized = _calls(spec, _kernels(spec, target), inputs)
            generic = _calls(spec, _kernels(generic_spec(spec), target), inputs)
            for part in ("forward", "backward"):
                per_size, shared = _median_ms(sized[part], args.runs), _median_ms(generic[part], args.runs)
                rows.append({"workload": name, "dtype": dtype, "part": part, "per_size_ms": round(per_size, 3),
                             "generic_ms": round(shared, 3), "generic_over_per_size": round(shared / per_size, 3),
                             "cpu": cpu, "threads": torch.get_num_threads(), "commit": commit})
                print(f"{name:24s} {dtype:8s} {part:8s} per-size {per_size:9.2f} ms  generic {shared:9.2f} ms  "
                      f"x{shared / per_size:.2f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
