"""The ``deft-tvm`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .spec import SUPPORTED_DTYPES
from .tolerances import assert_close
from .workloads import DEFAULT_WORKLOAD, PROFILES, WORKLOADS, get_workload


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _export_target(args):
    from .targets import cuda_target, target_for_device

    if args.device == "cuda" and args.arch:
        return cuda_target(args.arch)
    return target_for_device(args.device)


def cmd_export(args) -> int:
    """Compile tuned workloads (and optionally registry workloads with the default schedule) into one library."""
    from deft_tvm.schedules import default_schedule

    from .compute import deform_conv2d_primfunc
    from .library import KernelEntry, export_library
    from .tuning_db import best_schedule, database_dirs, target_tag

    target = _export_target(args)
    entries = []
    for directory in database_dirs(args.logs, target):
        spec, sch = best_schedule(directory, target)
        if sch is None:
            print(f"skipped  {directory}: no successful record for this target")
            continue
        entries.append(KernelEntry(spec, sch, origin=str(directory)))
    tuned = {e.spec.key() for e in entries}
    for name in args.workloads:
        for dtype in args.dtypes:
            spec = get_workload(name, dtype).spec
            if spec.key() not in tuned:
                sch = default_schedule(deform_conv2d_primfunc(spec), spec, target)
                entries.append(KernelEntry(spec, sch, origin="default schedule"))
    manifest = export_library(entries, target, args.out, args.name)
    for entry in entries:
        print(f"kernel   {entry.spec.key()}  ({entry.origin})")
    print(f"exported {len(entries)} kernels for {target_tag(target)} -> {manifest}")
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
    export = sub.add_parser("export", help="compile tuned workloads into one kernel library with a manifest")
    export.add_argument("--device", choices=["cpu", "cuda"], default=_device())
    export.add_argument("--arch", default=None, help="CUDA arch such as sm_90 (default: this machine's GPU)")
    export.add_argument("--logs", type=Path, default=Path("tuning_logs"), help="root of the tuning databases")
    export.add_argument("--workloads", nargs="*", default=[], choices=list(WORKLOADS),
                        help="also export these registry workloads (default schedule where not tuned)")
    export.add_argument("--dtypes", nargs="+", default=["float32"], choices=SUPPORTED_DTYPES)
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--name", default="deft_kernels", help="library file name, without extension")
    export.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
