"""Time tilings of the default CUDA schedules side by side (to choose their defaults).

    python tools/sweep_cuda_tiling.py [--workloads ...] [--dtypes ...] [--samples N]

For each workload: the default tiling, plus (tensor-core layers) up to ``--samples`` other valid
``TensorCoreTiling``s drawn with a fixed seed. Builds every candidate in parallel (nvcc runs in
threads), then times each with CUDA events over 20 back-to-back calls next to torchvision and
cuDNN on the same inputs. Tuning proper is MetaSchedule's job; this only picks a sound untuned
fallback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import random

import torch
import torch.nn.functional as F
from bench import gpu_ms  # tools/ is on sys.path when this script runs

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules import default_schedule
from deft_tvm.schedules.cuda_tensorcore import FRAGMENT, TensorCoreTiling, schedule_cuda_tensorcore
from deft_tvm.tuning.workloads import get_workload


def tensor_core_tilings(spec, samples: int, seed: int = 0) -> list[TensorCoreTiling]:
    """Up to ``samples`` valid tilings of a tensor-core layer (at most 8 warps and 8 accumulator
    fragments per warp), drawn reproducibly."""
    co_frags = spec.out_channels // spec.groups // FRAGMENT
    p_frags = spec.batch * spec.out_h * spec.out_w // FRAGMENT
    k_frags = spec.in_channels // spec.groups // FRAGMENT
    default = TensorCoreTiling.for_spec(spec)
    valid = [
        dataclasses.replace(default, warps_co=wc, frags_co=fc, warps_p=wp, frags_p=fp, k_frags=k)
        for wc, fc, wp, fp, k in itertools.product((1, 2, 4), (1, 2, 4), (1, 2, 4, 8), (1, 2, 4), (1, 2, 4))
        if co_frags % (wc * fc) == 0 and p_frags % (wp * fp) == 0 and k_frags % k == 0
        and 2 <= wc * wp <= 8 and fc * fp <= 8
    ]
    return random.Random(seed).sample(valid, min(samples, len(valid)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", nargs="+", default=["paper_64c_64x64_n32", "r50dcn_c4"])
    parser.add_argument("--dtypes", nargs="+", default=["float16"])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    target = target_for_device("cuda")
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for name in args.workloads:
            for dtype in args.dtypes:
                spec = get_workload(name, dtype).for_target(target).spec
                jobs[(name, dtype, "default")] = pool.submit(
                    lambda spec=spec: compile_kernel(default_schedule(deform_conv2d_primfunc(spec), spec, target).mod,
                                                     target)["main"])
                if spec.layout != "NHWC":
                    continue
                for tiling in tensor_core_tilings(spec, args.samples):
                    jobs[(name, dtype, tiling)] = pool.submit(
                        lambda spec=spec, tiling=tiling: compile_kernel(
                            schedule_cuda_tensorcore(deform_conv2d_primfunc(spec), spec, tiling).mod, target)["main"])
    from torchvision.ops import deform_conv2d as tv

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype).for_target(target)
            spec = workload.spec
            inputs = workload.make_inputs(device="cuda")
            out = torch.empty(spec.output_shape, dtype=inputs["input"].dtype, device="cuda")
            tensors = workload.kernel_tensors(inputs)
            base = {"torchvision": gpu_ms(lambda: tv(**inputs)),
                    "cudnn": gpu_ms(lambda: F.conv2d(inputs["input"], inputs["weight"], inputs["bias"], padding=1))}
            print(f"{name} {dtype}: torchvision {base['torchvision']:.3f} ms, cuDNN NCHW {base['cudnn']:.3f} ms")
            results = []
            for (n, d, tiling), job in jobs.items():
                if (n, d) != (name, dtype):
                    continue
                try:
                    fn = job.result()
                except Exception as err:  # noqa: BLE001 - report and go on with the other candidates
                    print(f"  {tiling} build failed: {str(err).splitlines()[-1][:200]}")
                    continue
                results.append((gpu_ms(lambda: fn(*tensors, out)), tiling))
            for ms, tiling in sorted(results, key=lambda r: r[0]):
                print(f"  {ms:.4f} ms ({base['torchvision'] / ms:.2f}x over torchvision)  {tiling}")


if __name__ == "__main__":
    main()
