"""The ``deft-tvm`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .spec import SUPPORTED_DTYPES
from .tolerances import assert_close
from .workloads import DEFAULT_WORKLOAD, PROFILES, WORKLOADS, get_workload


def _device() -> str:
    # CUDA kernels are not built yet: every machine uses its CPU target for now.
    return "cpu"


def cmd_list(args) -> int:
    for name, workload in WORKLOADS.items():
        print(f"{name:28s} {workload.spec.key():70s} {workload.profile:16s} {workload.description}")
    print("profiles:", ", ".join(PROFILES))
    return 0


def cmd_build(args) -> int:
    """Compile a workload for this machine's target and check it against the float64 reference."""
    from . import deform_conv2d, deform_conv2d_reference
    from .kernel_cache import get_kernel, kernel_path
    from .targets import target_for_device

    device = _device()
    workload = get_workload(args.workload, args.dtype)
    spec = workload.spec
    target = target_for_device(device)
    print(f"workload {workload.name}: {spec.key()} (offsets: {workload.profile})")
    print(f"target   {target}")
    start = time.perf_counter()
    get_kernel(spec, device)
    print(f"kernel   ready in {time.perf_counter() - start:.2f} s, cached at {kernel_path(spec, target)}")
    inputs = workload.make_inputs(seed=args.seed, device=device)
    with torch.no_grad():
        out = deform_conv2d(**inputs)
        ref = deform_conv2d_reference(**inputs)
    assert_close(out, ref, spec.dtype)
    err = (out.double() - ref).abs().max().item()
    print(f"check    matches the float64 reference (max abs error {err:.3g}, dtype {spec.dtype})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deft-tvm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered workloads and offset profiles").set_defaults(func=cmd_list)
    build = sub.add_parser("build", help="compile a workload for this machine and check it against the reference")
    build.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=list(WORKLOADS))
    build.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="default: the workload's dtype")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
