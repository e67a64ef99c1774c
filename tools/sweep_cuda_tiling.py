"""Time hand-picked tilings of the default CUDA schedule side by side (to choose its defaults).

    python tools/sweep_cuda_tiling.py [--workloads ...] [--dtypes ...]

Builds every candidate in parallel (nvcc runs in threads), then times each with CUDA events over
20 back-to-back calls next to torchvision and cuDNN on the same inputs. Tuning proper is
MetaSchedule's job; this only picks a sound untuned fallback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses

import torch
import torch.nn.functional as F
import tvm
from bench import gpu_ms  # tools/ is on sys.path when this script runs

from deft_tvm.compute import deform_conv2d_primfunc
from deft_tvm.schedules.cuda import CudaTiling, schedule_cuda
from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling, schedule_cuda_tensorcore, supports_tensor_cores
from deft_tvm.targets import exact_cuda_compilation, target_for_device
from deft_tvm.workloads import get_workload

CANDIDATES = [
    None,  # CudaTiling.for_spec
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=4, frags_ox=4, k_frags=2, fill_unroll=4),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=4, frags_ox=4, k_frags=2, fill_unroll=8),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=4, frags_ox=4, k_frags=2, fill_unroll=2),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=4, frags_ox=4, k_frags=1, fill_unroll=4),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=4, frags_ox=2, k_frags=2, fill_unroll=4),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=2, frags_ox=4, k_frags=2, fill_unroll=4),
    TensorCoreTiling(warps_co=2, frags_co=2, warps_oy=8, frags_ox=2, k_frags=2, fill_unroll=4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", nargs="+", default=["paper_64c_64x64_n32", "r50dcn_c4"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    args = parser.parse_args()
    target = target_for_device("cuda")
    jobs = {}
    with exact_cuda_compilation(), concurrent.futures.ThreadPoolExecutor(8) as pool:
        for name in args.workloads:
            for dtype in args.dtypes:
                spec = get_workload(name, dtype).spec
                for i, tiling in enumerate(CANDIDATES):
                    tensor_cores = isinstance(tiling, TensorCoreTiling)
                    if tensor_cores and not supports_tensor_cores(spec):
                        continue
                    schedule = schedule_cuda_tensorcore if tensor_cores else schedule_cuda

                    def build(spec=spec, tiling=tiling, schedule=schedule):
                        sch = schedule(deform_conv2d_primfunc(spec), spec, tiling)
                        return tvm.compile(sch.mod, target=target)["main"]
                    jobs[(name, dtype, i)] = pool.submit(build)
    from torchvision.ops import deform_conv2d as tv

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype)
            spec = workload.spec
            inputs = workload.make_inputs(device="cuda")
            out = torch.empty(spec.output_shape, dtype=inputs["input"].dtype, device="cuda")
            tensors = workload.kernel_tensors(inputs)
            base = {"torchvision": gpu_ms(lambda: tv(**inputs)),
                    "cudnn": gpu_ms(lambda: F.conv2d(inputs["input"], inputs["weight"], inputs["bias"], padding=1))}
            print(f"{name} {dtype}: torchvision {base['torchvision']:.3f} ms, cuDNN NCHW {base['cudnn']:.3f} ms")
            for i, tiling in enumerate(CANDIDATES):
                if (name, dtype, i) not in jobs:
                    continue
                try:
                    fn = jobs[(name, dtype, i)].result()
                except Exception as err:  # noqa: BLE001 - report and go on with the other candidates
                    print(f"  {i} build failed: {str(err).splitlines()[-1][:200]}")
                    continue
                ms = gpu_ms(lambda: fn(*tensors, out))
                shown = f"{type(tiling or CudaTiling()).__name__} {dataclasses.astuple(tiling or CudaTiling.for_spec(spec))}"
                print(f"  {i} {shown} {ms:.3f} ms  ({ms / base['torchvision']:.2f}x torchvision)")


if __name__ == "__main__":
    main()
