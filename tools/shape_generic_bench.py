"""Shape-generic kernels against per-size kernels, side by side on the CPU or a CUDA GPU.

    python tools/shape_generic_bench.py [--device cpu|cuda] [--workloads NAME ...] [--dtypes float32 ...]
                                        [--tf32 off|on] [--runs 5] [--parts PART ...] [--csv PATH]
                                        [--commit SHA]

For each registry workload and dtype, the default-schedule kernels of its exact sizes and those
of its layer configuration (``compute.spec.generic_spec``: batch, height and width TIR variables,
what the op runs on the CPU for every size; ``schedules/cpu.py``, ``schedules/cpu_backward.py``)
are compiled and timed on the same arguments (the workload's profile offsets): the forward
kernel, and the backward's gradient kernels plus the grad_input scatter. Prints and writes
(``--csv``) per workload, dtype and part the median of ``--runs`` calls in ms of both and their
ratio, with the CPU, torch's thread count and the commit.

``--device cuda``: the tensor-core forward (``schedules/cuda_tensorcore.py``; for layers whose
forward is unfused, r50dcn_c4/c5, the columns kernel, ``cuda_columns.py``) of each workload's
kernel spec (channels last; float32 on TF32 with ``--tf32 on``): the default kernel of its exact
sizes, that of its configuration, the tuned record of its sizes where there is one (``tuned``)
and the configuration's with the tiling of its record (``deft-tvm tune --configuration``) where
there is one (``configuration_tuned``); and the fused backward
(``schedules/cuda_backward_fused.py``, one entry call as the op makes it,
``runtime.backward.run_fused_backward``): the default kernels of its exact sizes, those of its layer
configuration, the tuned record of its sizes where there is one (``tuned``) and the configuration's
with the tilings of its record (``deft-tvm tune --fused-backward --configuration``, the user's or
the shipped one) where there is one (``configuration_tuned``), compiled in parallel, each timed
as the median of ``--runs`` rounds of 20 back-to-back calls (GPU time per call by CUDA events,
``tuning.timing.gpu_ms``), with the GPU's name; for float32 without TF32 and float64 also the staged
backward of deterministic calls (``schedules/cuda_backward.py``: the gradient kernels, the sort by
pixel and the sorted gather; part ``staged_backward``), per size and of the configuration;
``--parts`` names the parts timed (default: all three); ``--sizes N H W ...`` (forward and fused
backward) times those batch and image sizes of each workload's configuration instead of the
workload's own (its ``per_size`` default compiled for each).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import platform
import statistics
import time

import torch
import tvm

from deft_tvm.compute.backward import deform_conv2d_backward_te, scatter_primfunc, sorted_gather_primfunc
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import generic_spec
from deft_tvm.bench import current_commit, tf32_mode
from deft_tvm.runtime import backward
from deft_tvm.runtime.kernel_cache import schedule_for
from deft_tvm.runtime.records import recorded_fused_tilings
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules import default_schedule, unfused_forward
from deft_tvm.schedules.cuda_backward import THREADS
from deft_tvm.schedules.cuda_backward_fused import default_tilings
from deft_tvm.tuning.timing import gpu_ms
from deft_tvm.tuning.workloads import Workload, get_workload

DEFAULT_WORKLOADS = ("paper_64c_64x64_n1", "paper_64c_64x64_n8", "r50dcn_c5", "video_64c_180x320_og8")
# Tensor-core workloads (r50dcn_c4/c5: the columns kernel of their unfused forward).
CUDA_WORKLOADS = ("paper_64c_64x64_n1", "paper_64c_64x64_n8", "paper_64c_64x64_n32", "train_64c_64x64_n32",
                  "train_128c_32x32_n32", "train_down_64to128_n32", "r50dcn_c3", "r50dcn_c4", "r50dcn_c5")
LAUNCHES = 20
SIZE_FIELDS = ("batch", "height", "width")
CUDA_PARTS = ("forward", "backward", "staged_backward")  # --device cuda's parts (see the docstring)


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _kernels(spec, target, parts=("forward", "backward")) -> dict:
    """``{part: callable}`` of ``spec``'s (a size's or a configuration's) default kernels of ``parts``:
    the forward; the backward's gradient kernels and grad_input's plane scatter (CPU) or sorted
    gather (CUDA: the staged backward of deterministic calls)."""
    kernels = {}
    if "forward" in parts:
        kernels["forward"] = compile_kernel(default_schedule(kernel_primfunc(spec), spec, target).mod, target)["main"]
    if "backward" in parts:
        gradients = compile_kernel(default_schedule(kernel_primfunc(spec, "backward"), spec, target,
                                                    "backward").mod, target)["main"]
        if target.kind.name == "cuda":
            grad_input = compile_kernel(tvm.IRModule({"gather": sorted_gather_primfunc(spec, THREADS)}),
                                        target)["gather"]
        else:
            grad_input = compile_kernel(tvm.IRModule({"scatter": scatter_primfunc(spec)}), target)["scatter"]
        kernels["backward"] = (gradients, grad_input)
    return kernels


def _calls(spec, kernels: dict, inputs: dict) -> dict:
    """``{part: function}``: each part's kernels called on ``inputs`` (the workload's tensors, on
    the kernels' device)."""
    device = inputs["input"].device
    args = spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))
    output = torch.empty(spec.output_shape, dtype=args[0].dtype, device=device)
    _, outs = deform_conv2d_backward_te(spec)
    results = [torch.empty([int(s) for s in o.shape], dtype=getattr(torch, str(o.dtype)), device=device)
               for o in outs]
    grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(0)).to(device, args[0].dtype)
    given = [t for t in (inputs["input"], inputs["offset"], inputs["mask"], inputs["weight"], grad_output)
             if t is not None]
    grad_input = torch.empty(spec.input_shape, dtype=results[0].dtype, device=device)
    gradients, grad_input_kernel = kernels["backward"]

    def gradients_and_grad_input():
        gradients(*given, *results)
        if device.type == "cuda":  # columns, index, share: sorted by pixel, then gathered
            order, starts = backward.sort_by_pixel(results[1], spec.height * spec.width)
            grad_input_kernel(results[0], results[2], order, grad_input, starts)
        else:
            grad_input_kernel(results[0], results[1], results[2], grad_input)

    return {"forward": lambda: kernels["forward"](*args, output), "backward": gradients_and_grad_input}


def cuda_forward_rows(workloads, dtypes, tf32: bool, runs: int, commit: str, sizes=(None,)) -> list[dict]:
    """Rows of ``--device cuda`` for the forward (see the module docstring)."""
    device = torch.device("cuda")
    target = target_for_device(device)
    gpu = torch.cuda.get_device_name(device)
    print(f"gpu {gpu}, TF32 {'on' if tf32 else 'off'}, commit {commit}")
    cases = []
    for name in workloads:
        for dtype, size in ((d, z) for d in dtypes for z in sizes):
            workload = _sized(get_workload(name, dtype, tf32=tf32 and dtype == "float32"), size).for_target(target)
            spec = workload.spec
            part = "columns" if unfused_forward(spec, target) else "forward"
            tuned, is_tuned = schedule_for(spec, target, part)
            schedules = {"per_size": default_schedule(kernel_primfunc(spec, part), spec, target, part),
                         "generic": default_schedule(kernel_primfunc(generic_spec(spec), part), generic_spec(spec),
                                                     target, part)}
            if is_tuned:
                schedules["tuned"] = tuned
            recorded, is_recorded = schedule_for(generic_spec(spec), target, part)
            if is_recorded:
                schedules["configuration_tuned"] = recorded
            cases.append((name, dtype, part, workload, spec, schedules))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        built = [{k: pool.submit(compile_kernel, sch.mod, target) for k, sch in schedules.items()}
                 for *_, schedules in cases]
        kernels = [{k: f.result()["main"] for k, f in futures.items()} for futures in built]
    rows = []
    for (name, dtype, part, workload, spec, _), compiled in zip(cases, kernels):
        inputs = workload.make_inputs(device=device)
        args = spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))
        shape = spec.output_shape
        if part == "columns":  # the columns kernel takes (input, offset, mask?) and writes the columns
            args = args[:3 if spec.has_mask else 2]
            shape = (spec.batch, spec.out_h, spec.out_w, spec.kernel_h, spec.kernel_w, spec.in_channels)
        output = torch.empty(shape, dtype=args[0].dtype, device=device)
        ms = {k: statistics.median(gpu_ms(lambda kernel=kernel: kernel(*args, output), LAUNCHES) for _ in range(runs))
              for k, kernel in compiled.items()}
        rows.append(_cuda_row(name, dtype, tf32, part, ms, gpu, commit, spec))
    return rows


def _sized(workload: Workload, size: tuple[int, int, int] | None) -> Workload:
    """``workload`` at batch, height and width ``size`` (None: its own)."""
    if size is None:
        return workload
    return dataclasses.replace(workload, spec=dataclasses.replace(workload.spec, **dict(zip(SIZE_FIELDS, size))))


def cuda_backward_rows(workloads, dtypes, tf32: bool, runs: int, commit: str, sizes=(None,)) -> list[dict]:
    """Rows of ``--device cuda`` for the fused backward (see the module docstring)."""
    device = torch.device("cuda")
    target = target_for_device(device)
    arch, gpu = str(target.attrs["arch"]), torch.cuda.get_device_name(device)
    cases = []
    for name in workloads:
        for dtype in dtypes:
            for size in sizes:
                workload = _sized(get_workload(name, dtype, tf32=tf32 and dtype == "float32"), size)
                spec, configuration = workload.spec, generic_spec(workload.spec)
                variants = {"per_size": (spec, default_tilings(spec, arch)),
                            "generic": (configuration, default_tilings(configuration, arch))}
                for variant, compiled in (("tuned", spec), ("configuration_tuned", configuration)):
                    recorded = recorded_fused_tilings(compiled, target)
                    if recorded:
                        variants[variant] = (compiled, recorded)
                cases.append((name, dtype, workload, variants))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        built = [{k: pool.submit(backward.fused_kernels, compiled, target, *tilings)
                  for k, (compiled, tilings) in variants.items()} for *_, variants in cases]
        kernels = [{k: f.result() for k, f in futures.items()} for futures in built]
    rows = []
    for (name, dtype, workload, _), compiled in zip(cases, kernels):
        spec, inputs = workload.spec, workload.make_inputs(device=device)
        grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(0)).to(
            device, inputs["input"].dtype)
        tensors = (grad_output, inputs["input"], inputs["offset"], inputs["mask"], inputs["weight"])
        ms = {k: statistics.median(gpu_ms(lambda fused=fused: backward.run_fused_backward(spec, fused, *tensors),
                                          LAUNCHES) for _ in range(runs))
              for k, fused in compiled.items()}
        rows.append(_cuda_row(name, dtype, tf32, "backward", ms, gpu, commit, spec))
    return rows


def cuda_staged_rows(workloads, dtypes, runs: int, commit: str) -> list[dict]:
    """Rows of ``--device cuda`` for the staged backward (float32 without TF32 and float64; see the
    module docstring)."""
    device = torch.device("cuda")
    target = target_for_device(device)
    gpu = torch.cuda.get_device_name(device)
    rows = []
    for name in workloads:
        for dtype in (d for d in dtypes if d in ("float32", "float64")):
            workload = get_workload(name, dtype)
            spec, inputs = workload.spec, workload.make_inputs(device=device)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                built = {k: pool.submit(_kernels, s, target, ("backward",))
                         for k, s in (("per_size", spec), ("generic", generic_spec(spec)))}
            calls = {k: _calls(spec, f.result(), inputs)["backward"] for k, f in built.items()}
            ms = {k: statistics.median(gpu_ms(call, LAUNCHES) for _ in range(runs)) for k, call in calls.items()}
            rows.append(_cuda_row(name, dtype, False, "staged_backward", ms, gpu, commit))
    return rows


def _cuda_row(name: str, dtype: str, tf32: bool, part: str, ms: dict, gpu: str, commit: str,
              spec=None) -> dict:
    """One CSV row of ``--device cuda`` (printed): ``ms`` of the variants per_size, generic, tuned?,
    configuration_tuned?; ``size``: the batch, height and width of ``spec`` (the fused backward's
    rows: the sizes timed)."""
    def ratio(variant: str, over: str):
        return round(ms[variant] / ms[over], 3) if variant in ms and over in ms else ""

    row = {"workload": name, "dtype": dtype, "tf32": tf32, "part": part,
           "size": "x".join(str(getattr(spec, f)) for f in SIZE_FIELDS) if spec is not None else "",
           "per_size_ms": round(ms["per_size"], 4), "generic_ms": round(ms["generic"], 4),
           "generic_over_per_size": ratio("generic", "per_size"),
           "tuned_ms": round(ms["tuned"], 4) if "tuned" in ms else "",
           "generic_over_tuned": ratio("generic", "tuned"),
           "configuration_tuned_ms": round(ms["configuration_tuned"], 4) if "configuration_tuned" in ms else "",
           "configuration_tuned_over_per_size": ratio("configuration_tuned", "per_size"),
           "configuration_tuned_over_tuned": ratio("configuration_tuned", "tuned"),
           "gpu": gpu, "commit": commit}
    print(f"{name:24s} {dtype:8s} {part:8s} {row['size']:12s} per-size {row['per_size_ms']:8.4f} ms  "
          f"generic {row['generic_ms']:8.4f} ms  x{row['generic_over_per_size']:.2f}  tuned {row['tuned_ms']}  "
          f"configuration tuned {row['configuration_tuned_ms']}", flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workloads", nargs="+", default=None,
                        help=f"default: {' '.join(DEFAULT_WORKLOADS)} (cpu), {' '.join(CUDA_WORKLOADS)} (cuda)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--tf32", choices=("off", "on"), default="off", help="float32 on TF32 (cuda only)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", nargs="+", choices=CUDA_PARTS, default=list(CUDA_PARTS),
                        help="the kernels timed (cuda only; staged_backward with --tf32 off)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, metavar="N H W",
                        help="forward and fused backward (cuda): time these batch, height and width triples of each "
                        "workload's "
                        "configuration instead of the workload's own sizes")
    parser.add_argument("--csv", help="write the rows here")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse --short HEAD)")
    args = parser.parse_args(argv)
    if args.sizes is not None and (len(args.sizes) % 3 or min(args.sizes) < 1):
        parser.error(f"--sizes: triples of positive N H W, got {args.sizes}")
    sizes = [tuple(args.sizes[i:i + 3]) for i in range(0, len(args.sizes), 3)] if args.sizes else [None]
    commit = args.commit or current_commit()
    if args.device == "cuda":
        workloads, rows = args.workloads or CUDA_WORKLOADS, []
        with tf32_mode(args.tf32):
            if "forward" in args.parts:
                rows += cuda_forward_rows(workloads, args.dtypes, args.tf32 == "on", args.runs, commit, sizes)
            if "backward" in args.parts:
                rows += cuda_backward_rows(workloads, args.dtypes, args.tf32 == "on", args.runs, commit, sizes)
            if args.tf32 == "off" and "staged_backward" in args.parts:
                rows += cuda_staged_rows(workloads, args.dtypes, args.runs, commit)
        _write(args.csv, rows)
        return
    target = tvm.target.Target("llvm")
    cpu = platform.processor() or platform.machine()
    print(f"cpu {cpu}, torch threads {torch.get_num_threads()}, commit {commit}")
    rows = []
    for name in args.workloads or DEFAULT_WORKLOADS:
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
    _write(args.csv, rows)


def _write(path, rows: list[dict]) -> None:
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
