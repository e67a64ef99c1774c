"""Run the kernels on extreme offsets (+-inf, +-1e30, +-1e6, far outside, some NaN) for a memory checker.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/extreme_offsets.py

Every registered test workload and dtype (float32 with TF32 off and on) runs on the current device (CUDA if present) with 40 %
of its offsets replaced by extreme values and 0.2 % by NaN; the outputs are checked against the float64 reference
(NaN where the reference has NaN) so a kernel that reads out of range fails here or under the tool.
"""

from __future__ import annotations

import math

import torch

import deft_tvm
from deft_tvm.bench import tf32_mode
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.tuning.workloads import TEST_WORKLOADS, get_workload

EXTREMES = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1e6, -1e6, 70.0, -70.0, -1.0])
NAN_FRACTION = 0.002  # a NaN poisons every output that reads it, so only a few
# (dtype, TF32 mode): float32 runs with TF32 off and on (the TF32 tensor-core kernels on a GPU).
PRECISIONS = [("float32", "off"), ("float32", "on"), ("float16", "n/a"), ("bfloat16", "n/a")]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    for name in TEST_WORKLOADS:
        for dtype, tf32 in PRECISIONS:
            workload = get_workload(name, dtype)
            args = workload.make_inputs(seed=1)
            offset = args["offset"]
            pick = EXTREMES[torch.randint(0, len(EXTREMES), offset.shape, generator=gen)].to(offset.dtype)
            offset = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset)
            args["offset"] = torch.where(torch.rand(offset.shape, generator=gen) < NAN_FRACTION, math.nan, offset)
            on_device = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
            with tf32_mode(tf32):
                out = deft_tvm.deform_conv2d(**on_device)
            assert_close(out.cpu(), deft_tvm.deform_conv2d_reference(**args), tolerance_key(dtype, tf32 == "on"))
            print(f"{name:20s} {dtype:9s} TF32 {tf32:3s} ok ({torch.isnan(out).sum().item()} NaN outputs) on {device}")


if __name__ == "__main__":
    main()
