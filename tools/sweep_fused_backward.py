"""Time tilings of the fused CUDA backward's kernels side by side (to choose their defaults).

    python tools/sweep_fused_backward.py [--workloads ...] [--dtypes float16 tf32 ...]

For each workload: ``grad_data`` with its default ``DataTiling`` and variants (tile shapes,
weight stage, halo, channel splits, patches not staged, one-pixel flushes, tensor-core
grad_columns, quad patches) and ``grad_weight`` with its default ``WeightTiling`` and variants
(threads x registers, splits, positions per step, SIMT instead of tensor cores), each timed alone
with CUDA events over 20 back-to-back calls on the workload's profile inputs (dtype ``tf32``:
float32 on TF32 tensor cores). The measured figures that chose the defaults are in
``tools/results/fused_backward_sweep_h200.txt`` and ``fused_backward_tensor_cores_h200.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import tvm

from deft_tvm.bench import gpu_ms
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling, fused_backward_module
from deft_tvm.schedules.cuda_mma import mma_shape
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload


def data_variants(spec) -> dict[str, DataTiling]:
    """The default data tiling and its neighbours that divide the layer."""
    d = DataTiling.for_spec(spec)
    r = dataclasses.replace
    variants = {"default": d, "unstaged": r(d, staged=False), "halo2": r(d, halo=2),
                "stage32": r(d, o_step=32), "8x32": r(d, tile_h=8, tile_w=32), "16x16": r(d, tile_h=16, tile_w=16),
                "splits*2": r(d, channel_splits=2 * d.channel_splits)}
    chunks = spec.in_channels // spec.offset_groups // d.chunk
    opg = spec.out_channels // spec.groups
    variants = {k: v for k, v in variants.items() if chunks % v.channel_splits == 0 and opg % v.o_step == 0}
    variants["flush1"] = r(d, flush_width=1)
    if spec.dtype != "float64":
        variants["quad"] = DataTiling.for_spec(spec, quad_patch=True)
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
    if w.tensor_cores:  # the SIMT tiling of the same layer
        variants["simt"] = WeightTiling.for_spec(r(spec, dtype="float32", tf32=False))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(BENCHMARK_WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "tf32"])
    args = parser.parse_args()
    target = target_for_device("cuda")
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, "float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
            spec, inputs = workload.spec, workload.make_inputs(device="cuda")
            n, c, h, w = spec.input_shape
            acc = torch.float64 if dtype == "float64" else torch.float32
            flat = inputs["input"].contiguous().view(n, c, h * w)
            mask = [inputs["mask"]] * spec.has_mask
            grad_output = torch.randn(spec.output_shape, device="cuda").to(flat.dtype)
            print(f"== {name} {dtype}", flush=True)
            for label, tiling in data_variants(spec).items():
                module, _, _ = fused_backward_module(spec, tiling)
                kernel = compile_kernel(tvm.IRModule({"grad_data": module["grad_data"]}), target)["grad_data"]
                outputs = [torch.zeros((n, c, h * w), dtype=acc, device="cuda"),
                           torch.empty((tiling.channel_splits, *spec.offset_shape), dtype=acc, device="cuda")]
                outputs += [torch.empty((tiling.channel_splits, *spec.mask_shape), dtype=acc,
                                        device="cuda")] * spec.has_mask
                ms = gpu_ms(lambda: kernel(flat, inputs["offset"], *mask, inputs["weight"], grad_output, *outputs))
                print(f"  grad_data   {label:12s} {ms:7.3f} ms  {tiling}", flush=True)
            for label, tiling in weight_variants(spec).items():
                module, _, _ = fused_backward_module(spec, weight=tiling)
                kernel = compile_kernel(tvm.IRModule({"grad_weight": module["grad_weight"]}), target)["grad_weight"]
                outputs = [torch.empty((tiling.splits, spec.out_channels, c // spec.groups,
                                        spec.kernel_h * spec.kernel_w), dtype=acc, device="cuda")]
                outputs += [torch.empty((tiling.splits, spec.out_channels), dtype=acc, device="cuda")] * spec.has_bias
                ms = gpu_ms(lambda: kernel(flat, inputs["offset"], *mask,
                                           grad_output.view(n, spec.out_channels, -1), *outputs))
                print(f"  grad_weight {label:12s} {ms:7.3f} ms  {tiling}", flush=True)


if __name__ == "__main__":
    main()
