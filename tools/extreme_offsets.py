"""Run the kernels on extreme offsets (+-inf, +-1e30, +-1e6, far outside, some NaN) for a memory checker.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/extreme_offsets.py [--backward]

Every registered test workload and dtype (float32 with TF32 off and on) runs on the current device (CUDA if present) with 40 %
of its offsets replaced by extreme values and 0.2 % by NaN; the outputs are checked against the float64 reference
(NaN where the reference has NaN) so a kernel that reads out of range fails here or under the tool. With ``--backward``
the gradients of every argument too, for a random grad_output, with torch's deterministic algorithms off (on CUDA: the
fused kernels, float atomics) and on (the fixed-point fused kernels or the staged backward), each against the float64
reference backward (NaN exactly where it has NaN, sums compared relative to the largest).
"""

from __future__ import annotations

import argparse
import math

import torch

import deft_tvm
from deft_tvm.bench import deterministic_mode, tf32_mode
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest, tolerance_key
from deft_tvm.tuning.workloads import TEST_WORKLOADS, get_workload

EXTREMES = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1e6, -1e6, 70.0, -70.0, -1.0])
NAN_FRACTION = 0.002  # a NaN poisons every output that reads it, so only a few
# (dtype, TF32 mode): float32 runs with TF32 off and on (the TF32 tensor-core kernels on a GPU).
PRECISIONS = [("float32", "off"), ("float32", "on"), ("float16", "n/a"), ("bfloat16", "n/a")]
GRADIENTS = ("input", "offset", "weight", "bias", "mask")  # the arguments with gradients, when given


def check_gradients(args: dict, on_device: dict, output_shape: torch.Size, key: str, seed: int) -> str:
    """Gradients of every given tensor argument, with deterministic algorithms off and on, against the float64
    reference backward; returns a summary."""
    gen = torch.Generator().manual_seed(seed)
    names = [k for k in GRADIENTS if args[k] is not None]
    grad_output = torch.randn(output_shape, generator=gen, dtype=torch.float64).to(args["input"].dtype)
    in_float64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    expected = deform_conv2d_reference_backward(grad_output.double(), **in_float64)._asdict()
    counts = []
    for deterministic in (False, True):
        leaves = {k: on_device[k].detach().clone().requires_grad_(True) for k in names}
        with deterministic_mode(deterministic):
            out = deft_tvm.deform_conv2d(**{**on_device, **leaves})
            grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(out.device))
        for name, grad in zip(names, grads):
            value, got = expected[name], grad.cpu()
            if not torch.equal(torch.isnan(got), torch.isnan(value)):
                raise AssertionError(f"grad_{name} (deterministic {deterministic}): NaN at other places than the "
                                     f"reference's ({int(torch.isnan(got).sum())} vs {int(torch.isnan(value).sum())})")
            assert_close_to_largest(got, value, key)
        counts.append(sum(int(torch.isnan(g).sum()) for g in grads))
    return f"gradients ok ({counts[0]} / {counts[1]} NaN, deterministic off / on)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward", action="store_true", help="also check the gradients (deterministic off and on)")
    backward = parser.parse_args().backward
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
            key = tolerance_key(dtype, tf32 == "on")
            assert_close(out.cpu(), deft_tvm.deform_conv2d_reference(**args), key)
            summary = ""
            if backward:
                with tf32_mode(tf32):
                    summary = ", " + check_gradients(args, on_device, out.shape, key, seed=2)
            print(f"{name:20s} {dtype:9s} TF32 {tf32:3s} ok ({torch.isnan(out).sum().item()} NaN outputs{summary}) on "
                  f"{device}", flush=True)


if __name__ == "__main__":
    main()
