"""Forward with patch + halo staging (``schedules/cuda_patch_forward.py``) vs the op's forward kernel
(MetaSchedule-tuned, gathers from L2), torchvision and cuDNN ``conv2d`` (NCHW and channels_last), side by
side in one run: the issue-15 ablation of halo staging per layer and halo, with the columns staged in
shared memory or interpolated into the mma's registers (``PatchTiling.columns``).

Per registry workload and precision (float16, bfloat16, TF32) that the patch kernel supports: GPU time per
call (ms, CUDA events, ``deft_tvm.tuning.timing.gpu_ms``) of each provider's kernel on the same profile
inputs (the op's kernel and the patch kernel on the same channels-last tensors), each patch halo's coverage
of the profile's samples (``tuning.stats.profile_halo_coverage``; ``chosen``: the halo the profile chooses,
the smallest covering ``CHOSEN_COVERAGE``), and whether its output matches the op's
kernel within the dtype's tolerance (``reference.tolerances``). Writes a CSV with the GPU name, dtype, TF32
setting, offset profile and commit.

    python tools/patch_forward_bench.py --workloads r50dcn_c5 --precisions float16 tf32 \
        [--columns registers] --csv out.csv
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import sys

import torch

from deft_tvm.bench import baselines, channels_last_copies, current_commit, tf32_mode
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules import kernel_spec
from deft_tvm.schedules.cuda_patch_forward import COLUMNS, PatchTiling, patch_forward_module, supports
from deft_tvm.tuning.stats import profile_halo_coverage
from deft_tvm.tuning.timing import gpu_ms
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

FIELDS = ("device", "workload", "dtype", "tf32", "profile", "provider", "columns", "halo", "coverage", "chosen",
          "gpu_ms", "vs_op_kernel", "vs_torchvision", "vs_cudnn_best", "matches_op", "commit")
PRECISIONS = ("float16", "bfloat16", "tf32")
CHOSEN_COVERAGE = 0.99  # the halo the profile chooses: the smallest covering this fraction of its samples


def _workload(name: str, precision: str):
    return get_workload(name, "float32" if precision == "tf32" else precision, tf32=precision == "tf32")


def _tilings(spec, halos, columns) -> list[PatchTiling]:
    tilings = [dataclasses.replace(PatchTiling.for_spec(spec, columns=c), halo=h) for c in columns for h in halos]
    return [t for t in tilings if supports(spec, t) is None]


def _rows(name: str, precision: str, halos, columns, kernels: dict, commit: str) -> list[dict]:
    workload = _workload(name, precision)
    target = target_for_device(torch.device("cuda"))
    spec = kernel_spec(workload.spec, target)
    inputs = workload.make_inputs(device="cuda")
    args = spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))
    out = torch.empty(spec.output_shape, dtype=args[0].dtype, device="cuda")
    op_kernel = kernel_cache.get_kernel(spec, torch.device("cuda"))
    op_kernel(*args, out)
    expected = out.clone()
    calls = {"deft_tvm_kernel": (None, lambda: op_kernel(*args, out))}
    tilings = _tilings(spec, halos, columns)
    for tiling in tilings:
        kernel = kernels[(name, precision, tiling)]
        patch_out = torch.empty_like(out)
        calls[f"patch_{tiling.columns}_halo{tiling.halo}"] = (tiling, lambda k=kernel, o=patch_out: k(*args, o),
                                                              patch_out)
    baseline = baselines(workload.spec, inputs, channels_last_copies(inputs), "cuda")  # torchvision, cuDNN
    calls.update({provider: (None, fn) for provider, fn in baseline.items()})
    times, matches = {}, {}
    for provider, (tiling, fn, *outputs) in calls.items():
        fn()
        if outputs:
            try:
                assert_close(outputs[0], expected.double(), tolerance_key(spec.dtype, spec.tf32))
                matches[provider] = True
            except AssertionError:
                matches[provider] = False
        times[provider] = gpu_ms(fn, 50)
    cudnn = min(times["cudnn_nchw"], times["cudnn_channels_last"])
    coverages = {}  # per tile shape: each halo's coverage, and the halo chosen
    for tile in dict.fromkeys((t.tile_h, t.tile_w) for t in tilings):
        coverage = profile_halo_coverage(workload.spec, workload.profile, tile)
        coverages[tile] = coverage, next((h for h in sorted(halos) if h < len(coverage)
                                          and coverage[h] >= CHOSEN_COVERAGE), max(halos))
    rows = []
    for provider, (tiling, *_rest) in calls.items():
        coverage, chosen = coverages[(tiling.tile_h, tiling.tile_w)] if tiling else (None, None)
        rows.append({
            "device": torch.cuda.get_device_name(), "workload": name, "dtype": spec.dtype,
            "tf32": "on" if spec.tf32 else ("off" if spec.dtype == "float32" else "n/a"),
            "profile": workload.profile, "provider": provider, "columns": tiling.columns if tiling else "",
            "halo": tiling.halo if tiling else "",
            "coverage": f"{coverage[min(tiling.halo, len(coverage) - 1)]:.4f}" if tiling else "",
            "chosen": ("yes" if tiling.halo == chosen else "") if tiling else "",
            "gpu_ms": f"{times[provider]:.4f}",
            "vs_op_kernel": f"{times['deft_tvm_kernel'] / times[provider]:.2f}",
            "vs_torchvision": f"{times['torchvision'] / times[provider]:.2f}" if "torchvision" in times else "",
            "vs_cudnn_best": f"{times[provider] / cudnn:.2f}",
            "matches_op": matches.get(provider, ""), "commit": commit})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(BENCHMARK_WORKLOADS), choices=list(BENCHMARK_WORKLOADS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--halos", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="patch halos (px)")
    parser.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS,
                        help="where the patch kernel interpolates the columns")
    parser.add_argument("--csv", required=True, help="output CSV")
    parser.add_argument("--commit", default=None, help="default: git rev-parse --short HEAD")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("patch_forward_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    target = target_for_device(torch.device("cuda"))
    jobs = []
    for name in args.workloads:
        for precision in args.precisions:
            spec = kernel_spec(_workload(name, precision).spec, target)
            jobs += [(name, precision, spec, t) for t in _tilings(spec, args.halos, args.columns)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # nvcc runs outside the GIL
        built = pool.map(lambda job: compile_kernel(patch_forward_module(job[2], job[3]), target)["forward"], jobs)
        # the op's kernels (committed records) built into the kernel cache beside them
        list(pool.map(lambda spec: kernel_cache.get_kernel(spec, torch.device("cuda")),
                      dict.fromkeys(spec for _, _, spec, _ in jobs)))
        kernels = {(name, precision, tiling): kernel for (name, precision, _, tiling), kernel in zip(jobs, built)}
    commit = args.commit or current_commit()
    rows = []
    for name, precision in dict.fromkeys((name, precision) for name, precision, _, _ in jobs):  # supported ones
        with tf32_mode("on" if precision == "tf32" else "n/a"):
            new = _rows(name, precision, args.halos, args.columns, kernels, commit)
        for row in new:
            print(" | ".join(str(row[c]) for c in FIELDS), flush=True)
        rows += new
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
