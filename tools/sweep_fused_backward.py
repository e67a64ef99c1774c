"""Time tilings of the fused CUDA backward's kernels side by side (to choose their defaults).

    python tools/sweep_fused_backward.py [--workloads ...] [--dtypes float16 tf32 ...] [--variants ...]

For each workload: ``grad_data`` with its default ``DataTiling`` and variants (tile shapes,
weight stage, halo, channel splits, patches not staged, one-pixel flushes, tensor-core
grad_columns, dynamic shared memory past 48 KB, float patches) and ``grad_weight`` with its default
``WeightTiling`` and variants (threads x registers, splits, positions per step, 64 or 128 output
channels per block, SIMT instead of tensor cores), each timed alone with the sum of its splits
(``deft_tvm.tuning.fused_backward.time_checked``: CUDA events over 20 back-to-back calls, a
variant whose gradients differ from the first variant's is reported, not timed) on the workload's
profile inputs (dtype ``tf32``: float32 on TF32 tensor cores). The measured figures that chose the defaults are in ``tools/results/``
``fused_backward_sweep_h200.txt``, ``fused_backward_tensor_cores_h200.txt`` and
``fused_backward_patches_h200.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses

from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling
from deft_tvm.schedules.cuda_mma import mma_shape
from deft_tvm.tuning.fused_backward import compile_candidates, data_call, profile_inputs, time_checked, weight_call
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload


def data_variants(spec) -> dict[str, DataTiling]:
    """The default data tiling and its neighbours that divide the layer."""
    d = DataTiling.for_spec(spec)
    r = dataclasses.replace
    variants = {"default": d, "unstaged": r(d, staged=False), "halo2": r(d, halo=2), "halo4": r(d, halo=4),
                "splits/2": r(d, channel_splits=max(1, d.channel_splits // 2)),
                "stage32": r(d, o_step=32), "8x32": r(d, tile_h=8, tile_w=32), "16x16": r(d, tile_h=16, tile_w=16),
                "splits*2": r(d, channel_splits=2 * d.channel_splits)}
    chunks = spec.in_channels // spec.offset_groups // d.chunk
    opg = spec.out_channels // spec.groups
    variants = {k: v for k, v in variants.items() if chunks % v.channel_splits == 0 and opg % v.o_step == 0}
    variants["flush1"] = r(d, flush_width=1)
    variants["halo8"] = r(d, halo=8)  # dynamic shared memory where the patches pass 48 KB
    if d.fixed_point:
        variants["float_patches"] = r(d, fixed_point=False)
    if mma_shape(spec) is not None:
        variants["tensor_cores"] = DataTiling.for_spec(spec, tensor_cores=True)
    return variants


def weight_variants(spec) -> dict[str, WeightTiling]:
    w = WeightTiling.for_spec(spec)
    r = dataclasses.replace
    variants = {"default": w, "splits*2": r(w, splits=2 * w.splits), "splits/2": r(w, splits=max(1, w.splits // 2)),
                "positions32": r(w, positions=32)}
    if w.o_regs == 4 and w.o_threads % 2 == 0:
        variants["o_regs8"] = r(w, o_threads=w.o_threads // 2, o_regs=8)
    if w.o_regs == 8:
        variants["o_regs4"] = r(w, o_threads=w.o_threads * 2, o_regs=4)
    for o_channels in (64, 128):
        narrower = WeightTiling.for_spec(spec, o_channels=o_channels)
        if narrower.o_tile < w.o_tile and narrower not in variants.values():
            variants[f"o{o_channels}"] = narrower
    if w.tensor_cores:  # the SIMT tiling of the same layer
        variants["simt"] = WeightTiling.for_spec(r(spec, dtype="float32", tf32=False))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(BENCHMARK_WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "tf32"])
    parser.add_argument("--variants", nargs="+", help="only these variants' labels (default: all)")
    args = parser.parse_args()
    target = target_for_device("cuda")
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, "float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
            spec = workload.spec
            data, weight = ({label: t for label, t in variants(spec).items()
                             if args.variants is None or label in args.variants}
                            for variants in (data_variants, weight_variants))
            data_kernels, weight_kernels = compile_candidates(spec, target, list(data.values()), list(weight.values()))
            inputs = profile_inputs(spec, workload.profile)
            print(f"== {name} {dtype}", flush=True)
            for kind, tilings, kernels, call in (("grad_data", data, data_kernels, data_call),
                                                 ("grad_weight", weight, weight_kernels, weight_call)):
                times = time_checked(spec, [(call, (k, t, inputs)) for k, t in zip(kernels, tilings.values())])
                for (label, tiling), ms in zip(tilings.items(), times):
                    shown = f"{ms:7.3f} ms" if ms is not None else "differs from the first variant's gradients"
                    print(f"  {kind:11s} {label:12s} {shown}  {tiling}", flush=True)


if __name__ == "__main__":
    main()
