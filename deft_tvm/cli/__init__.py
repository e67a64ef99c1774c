"""The ``deft-tvm`` command line.

A mistake in the command line or in the files it names (no GPU for ``--device cuda``, a missing
file, a bad ``--model``, an unknown choice) ends in one line on stderr and exit status 2;
``deft-tvm --debug ...`` shows the traceback instead. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from deft_tvm.cli.errors import ArgumentParser, UsageError
from deft_tvm.compute.spec import SUPPORTED_DTYPES, kernel_key
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime.records import TUNING_DIR_ENV, user_root
from deft_tvm.tuning.fused_backward import KERNELS as FUSED_KERNELS
from deft_tvm.tuning.workloads import DEFAULT_WORKLOAD, PROFILES, WORKLOADS, get_workload


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _require_gpu(args, remedy: str) -> None:
    """UsageError when ``--device cuda`` was asked for where torch sees no CUDA GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch sees no CUDA GPU on this machine; {remedy}")


def cmd_list(args) -> int:
    for name, workload in WORKLOADS.items():
        print(f"{name:28s} {workload.spec.key():70s} {workload.profile:16s} {workload.description}")
    print("profiles:", ", ".join(PROFILES))
    return 0


def _load_model(reference: str):
    """``MODULE:CALLABLE`` imported and called (no arguments): the model. UsageError naming what is
    missing."""
    import importlib

    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"--model {reference}: expected MODULE:CALLABLE, e.g. my_package.models:build_dcn_net")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"--model {reference}: cannot import {module_name} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"--model {reference}: {module_name} has no callable {attribute}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {reference}: {attribute}() returned a {type(model).__name__}, expected a "
                         "torch.nn.Module")
    return model


def cmd_build_model(args) -> int:
    """Build a model's kernels (forward, and backward unless --no-backward) ahead, in parallel."""
    from deft_tvm.frontend.model import build_model

    _require_gpu(args, "build for --device cpu, or on a machine with a GPU")
    model = _load_model(args.model).to(getattr(torch, args.input_dtype))
    example = torch.empty(args.input_shape, dtype=getattr(torch, args.input_dtype), device="meta")
    start = time.perf_counter()
    built = build_model(model, example, device=args.device, backward_kernels=not args.no_backward,
                        deterministic=args.deterministic)
    for spec in built.specs:
        print(f"layer    {spec.key()}")
    print(f"built    {built.forward_kernels} forward and {built.backward_kernels} backward kernels for "
          f"{len(built.specs)} layer calls on {args.device} in {time.perf_counter() - start:.1f} s "
          f"(cached ones not rebuilt)")
    return 0


def cmd_build(args) -> int:
    """Compile a workload for this machine's target and check it against the float64 reference."""
    if args.model:
        return cmd_build_model(args)
    from deft_tvm.runtime.kernel_cache import get_kernel, kernel_path
    from deft_tvm.runtime.targets import target_for_device

    device = _device()
    target = target_for_device(device)
    workload = get_workload(args.workload, args.dtype)
    spec = workload.for_target(target).spec
    print(f"workload {workload.name}: {spec.key()} (offsets: {workload.profile})")
    print(f"target   {target}")
    start = time.perf_counter()
    get_kernel(spec, device)
    print(f"kernel   ready in {time.perf_counter() - start:.2f} s, cached at {kernel_path(spec, target)}")
    err = _check_against_reference(workload, device, args.seed)
    print(f"check    matches the float64 reference (max abs error {err:.3g}, dtype {spec.dtype})")
    return 0


def _tf32(args, dtype: str) -> bool:
    """Whether ``--tf32`` asks for TF32 kernels of ``dtype`` (float32 only)."""
    return args.tf32 and dtype == "float32"


def _check_against_reference(workload, device: str, seed: int) -> float:
    from deft_tvm.bench import tf32_mode
    from deft_tvm.frontend.functional import deform_conv2d
    from deft_tvm.reference.forward import deform_conv2d_reference
    from deft_tvm.runtime.targets import target_for_device

    spec = workload.for_target(target_for_device(device)).spec  # tf32 only where the kernel is
    inputs = workload.make_inputs(seed=seed, device=device)
    with torch.no_grad(), tf32_mode("on" if spec.tf32 else "off"):
        out = deform_conv2d(**inputs)
        ref = deform_conv2d_reference(**inputs)
    assert_close(out, ref, tolerance_key(spec.dtype, spec.tf32))
    return (out.double() - ref).abs().max().item()


def _check_gradients_against_reference(workload, device: str, seed: int) -> float:
    """The op's gradients of every input vs the float64 reference backward; the largest error."""
    from deft_tvm.frontend.functional import deform_conv2d
    from deft_tvm.reference.backward import deform_conv2d_reference_backward

    inputs = workload.make_inputs(seed=seed, device=device)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out = deform_conv2d(**{**inputs, **leaves})
    gen = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(device=device, dtype=out.dtype))
    expected = deform_conv2d_reference_backward(grad_output.to(device), **inputs)._asdict()
    for name, grad in zip(leaves, grads):
        assert_close(grad, expected[name], workload.spec.dtype)
    return max((g.double() - expected[k]).abs().max().item() for k, g in zip(leaves, grads))


def write_readable_schedule(root: Path, tag: str, workload_name: str, spec, sch, part: str = "forward") -> Path:
    """The best schedule of a workload's ``part`` kernel as Python (its MetaSchedule trace), for
    people to read."""
    suffix = ("_tf32" if spec.tf32 else "") + ("" if part == "forward" else f"_{part}")
    path = root / tag / f"{workload_name}_{spec.dtype}{suffix}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'"""Best tuned schedule of {workload_name} ({kernel_key(spec, part)}) for {tag}, written by `deft-tvm tune`.\n\n'
        f'Apply it to ``deft_tvm.compute.kernels.kernel_primfunc(spec, {part!r})`` (CUDA tensor-core traces: call\n'
        f'``deft_tvm.schedules.register_tensor_intrinsics(target)`` first); the tuning record itself is in\n'
        f'tuning_logs/{tag}/{kernel_key(spec, part)}/."""\n\nfrom tvm import s_tir\n\n{sch.trace}\n'
    )
    return path


def _parts(args, workload, target, columns: bool) -> tuple[str, ...]:
    """The kernels of ``workload`` to tune or export: the forward, the backward's with
    ``--backward`` and, with ``columns``, the unfused forward's columns kernel where ``target`` runs
    the workload's forward unfused (``schedules.unfused_forward``)."""
    from deft_tvm.schedules import unfused_forward

    columns = columns and unfused_forward(workload.for_target(target).spec, target)
    return ("forward",) + (("backward",) if args.backward else ()) + (("columns",) if columns else ())


def _default_entries(args, target, entries) -> list:
    """``KernelEntry``s of the default schedule for the kernels of ``args``' workloads that
    ``entries`` lack (``_parts``, the columns kernel included where the forward is unfused), so
    that a library serves every kernel the op runs: where the target's default kernel is
    shape-generic (``schedules.shape_generic``), that of
    the workload's layer configuration, which serves every batch and image size."""
    from deft_tvm.compute.kernels import kernel_primfunc
    from deft_tvm.compute.spec import generic_spec
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.schedules import default_schedule, shape_generic

    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype, _tf32(args, dtype))
            for part in _parts(args, workload, target, columns=True):
                spec = _part_spec(workload, target, part)
                if kernel_key(spec, part) in have:
                    continue
                if shape_generic(spec, target, part):
                    spec = generic_spec(spec)
                if kernel_key(spec, part) not in have:
                    have.add(kernel_key(spec, part))
                    sch = default_schedule(kernel_primfunc(spec, part), spec, target, part)
                    extra.append(KernelEntry(spec, sch.mod["main"], origin="default schedule", part=part))
    return extra


def _fused_specs(args, target) -> list:
    """The specs of the fused CUDA backward that ``args`` export: with ``--backward`` on CUDA, that
    of each of ``--workloads`` in each of ``--dtypes`` (the op's backward spec, NCHW); else none."""
    if not args.backward or target.kind.name != "cuda":
        return []
    return [dataclasses.replace(get_workload(name, dtype, _tf32(args, dtype)).spec, layout="NCHW")
            for name in args.workloads for dtype in args.dtypes]


def _fused_entries(args, target, specs, entries) -> list:
    """``KernelEntry``s of the fused CUDA backward of ``specs`` that ``entries`` lack: the atomic
    entry and, where deterministic calls take it (``runtime.backward.takes_fixed_point``), the
    deterministic one, each with the tilings a call would compile
    (``runtime.backward.fused_choice``: the spec's record under ``--logs``, the user's tuning
    directory or the shipped records, else its layer configuration's defaults, an entry for every
    batch and image size), which the manifest keeps for the runtime."""
    from deft_tvm.runtime import backward
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import fused_backward_path, record_roots
    from deft_tvm.schedules.cuda_backward_fused import backward_entry

    roots = [Path(args.logs), *record_roots()]
    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for spec in dict.fromkeys(specs):
        for part in ("fused", "fused_deterministic") if backward.takes_fixed_point(spec) else ("fused",):
            compiled, data, weight = backward.fused_choice(spec, target, part, roots)
            library_part = backward.FUSED_PARTS[part]
            if kernel_key(compiled, library_part) in have:
                continue
            have.add(kernel_key(compiled, library_part))
            record = fused_backward_path(compiled, target, roots)
            extra.append(KernelEntry(compiled, backward_entry(compiled, data, weight),
                                     origin=str(record.parent) if record is not None else "default tilings",
                                     part=library_part,
                                     tilings={"data": dataclasses.asdict(data), "weight": dataclasses.asdict(weight)}))
    return extra


def _companion_entries(target, entries) -> list:
    """``KernelEntry``s of the kernels the op runs on CUDA beside those of ``entries`` that
    ``entries`` lack, for the spec each was compiled for (its configuration's where it is one): the
    channels-last copies of input and weight (``schedules.cuda_layout``) of channels-last forward
    and columns kernels, the output transpose of columns kernels (the unfused forward), and the
    sorted gather (grad_input of deterministic calls) of gradient kernels."""
    from deft_tvm.compute.backward import sorted_gather_primfunc
    from deft_tvm.runtime import kernel_cache
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.schedules.cuda_backward import THREADS
    from deft_tvm.schedules.cuda_layout import channels_first_output_primfunc, channels_last_primfunc

    if target.kind.name != "cuda":
        return []
    primfuncs = {"channels_last": channels_last_primfunc, "channels_first_output": channels_first_output_primfunc,
                 "gather": lambda spec: sorted_gather_primfunc(spec, THREADS)}
    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for entry in entries:
        wanted = {"channels_last": entry.part in ("forward", "columns") and entry.spec.layout == "NHWC",
                  "channels_first_output": entry.part == "columns", "gather": entry.part == "backward"}
        for part in (p for p, needed in wanted.items() if needed):
            if kernel_key(entry.spec, part) not in have:
                have.add(kernel_key(entry.spec, part))
                function = kernel_cache.scripted(lambda: primfuncs[part](entry.spec))
                extra.append(KernelEntry(entry.spec, function, origin="companion kernel", part=part))
    return extra


def _part_spec(workload, target, part: str):
    """The spec of ``workload``'s ``part`` kernel on ``target``: the forward's and the columns
    kernel's is the kernel spec (``Workload.for_target``); the backward reads NCHW tensors in full
    precision."""
    if part in ("forward", "columns"):
        return workload.for_target(target).spec
    return dataclasses.replace(workload.spec, layout="NCHW", tf32=False)


SEED_FROM_TF32 = "tf32"  # --seed-from's name for float32 records tuned with TF32 on


def _seed_source(args, name: str, spec, target, part: str):
    """The spec of the records ``--seed-from`` offers ``spec``'s search (``spec``: ``name``'s
    ``part`` kernel on ``target``): the same workload in that dtype (``tf32``: float32 tuned with
    TF32 on, whose m16n8k8 tilings float32 without TF32 takes as 3xTF32; another dtype: with
    ``--tf32`` as the tuned one), or None where none is asked for or it is ``spec`` itself."""
    if args.seed_from is None:
        return None
    dtype, tf32 = (("float32", True) if args.seed_from == SEED_FROM_TF32
                   else (args.seed_from, _tf32(args, args.seed_from)))
    source = _part_spec(get_workload(name, dtype, tf32), target, part)
    return None if source == spec else source


def _tune_kernel(args, target, name: str, workload, part: str):
    """Tune one kernel of a workload and write its readable schedule; its ``KernelEntry``, or None
    when no candidate ran."""
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import best_schedule, database_dir, target_tag
    from deft_tvm.tuning.search import best_time, current_default, record_count, refine, transfer, tune

    tag = target_tag(target)
    spec = _part_spec(workload, target, part)
    directory = database_dir(args.logs, spec, target, part)
    label = f"{name} {spec.dtype}" + ("" if part == "forward" else f" {part}")
    print(f"tune     {label} on {tag}: {kernel_key(spec, part)} (offsets: {workload.profile}) -> {directory}")
    result = tune(spec, workload.profile, target, directory, args.trials,
                  trials_per_round=args.trials_per_round, seed=args.seed, part=part)
    measured = {}
    source = _seed_source(args, name, spec, target, part)
    if source is not None:
        folder = (spec, workload.profile, directory, source, database_dir(args.logs, source, target, part))
        measured["transfer"] = transfer([folder], target, part).get(directory, {})
    measured["default"] = current_default([(spec, workload.profile, directory)], target, part).get(directory, {})
    measured["refine"] = refine([(spec, workload.profile, directory)], target, part).get(directory, {})
    for step, candidates in measured.items():
        for candidate, seconds in candidates.items():
            print(f"{step:<8} {candidate}: " + (f"{seconds * 1e3:.4f} ms" if seconds is not None else "failed to build or run"))
    _, sch = best_schedule(directory, target)
    if sch is None:
        print(f"error    no successful candidate for {label} in {result.trials} trials")
        return None
    readable = write_readable_schedule(args.schedules, tag, name, spec, sch, part)
    best_s = best_time(directory)  # refinements included
    best = f"{best_s * 1e3:.4f} ms" if best_s is not None else "n/a"
    print(f"best     {best} of {record_count(directory)} records ({result.new_trials} new from the search in "
          f"{result.seconds:.0f} s); schedule: {readable}")
    return KernelEntry(spec, sch.mod["main"], origin=str(directory), part=part)


def _kept_fused_record(args, target, name: str, spec) -> dict | None:
    """The record whose other kernel a ``--kernels`` search of one kernel keeps: the workload's under
    ``--logs``, else the committed one; None when both kernels are searched. UsageError if there is
    none."""
    from deft_tvm.runtime.records import fused_backward_record, record_roots

    if set(args.kernels) == set(FUSED_KERNELS):
        return None
    kept = fused_backward_record(spec, target, [Path(args.logs), *record_roots()])
    if kept is None:
        raise UsageError(f"--kernels {' '.join(args.kernels)}: {name} {spec.dtype}{' tf32' * spec.tf32} has no "
                         f"fused-backward record under {args.logs} or committed to keep the other kernel's from; "
                         f"tune both kernels first")
    return kept


def _tune_fused_backward(args, target, name: str, workload) -> None:
    """Search the fused backward's tilings of a workload and write the record."""
    from deft_tvm.runtime.records import fused_backward_dir, write_fused_backward
    from deft_tvm.schedules.cuda_backward_fused import DataTiling
    from deft_tvm.tuning.fused_backward import patch_coverage, tune_fused_backward

    spec = dataclasses.replace(workload.spec, layout="NCHW")  # the op's backward spec (NCHW view)
    record = tune_fused_backward(spec, workload.profile, target, torch.cuda.get_device_name(),
                                 kernels=tuple(args.kernels), kept=_kept_fused_record(args, target, name, spec))
    path = write_fused_backward(fused_backward_dir(args.logs, spec, target), record)
    times = {kind: min(ms for _, ms in record[f"{kind}_ms"] if ms is not None) for kind in FUSED_KERNELS}
    defaults = {kind: record[f"{kind}_ms"][0][1] for kind in FUSED_KERNELS}
    rejected = sum(ms is None for kind in FUSED_KERNELS for _, ms in record[f"{kind}_ms"])
    data = DataTiling(**record["data"])
    print(f"fused    {name} {spec.dtype}{' tf32' * spec.tf32}: grad_data {times['data']:.3f} ms (default "
          f"{defaults['data']:.3f}; halo {data.halo} px, its patches cover "
          f"{patch_coverage(spec, workload.profile, data):.1%} of {workload.profile}'s samples), grad_weight "
          f"{times['weight']:.3f} ms (default {defaults['weight']:.3f}), {rejected} candidates rejected "
          f"(gradients not the default's) -> {path}")


def cmd_tune(args) -> int:
    """Tune workloads on the DefT design space, export them as one library, check it."""
    from deft_tvm.runtime.library import export_library, load_library
    from deft_tvm.runtime.records import target_tag
    from deft_tvm.runtime.targets import target_for_device

    _require_gpu(args, "tuning measures on the GPU, so run it where there is one, or pass --device cpu")
    if args.fused_backward and args.device != "cuda":
        raise UsageError("--fused-backward: the fused backward is a CUDA kernel; tune it with --device cuda on a GPU")
    if set(args.kernels) != set(FUSED_KERNELS) and not args.fused_backward:
        raise UsageError(f"--kernels {' '.join(args.kernels)}: names the fused backward's kernels; "
                         f"add --fused-backward")
    target = target_for_device(args.device)
    if args.fused_backward:
        for name in args.workloads:
            for dtype in args.dtypes:
                _tune_fused_backward(args, target, name, get_workload(name, dtype, _tf32(args, dtype)))
        return 0
    entries = []
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype, _tf32(args, dtype))
            for part in _parts(args, workload, target, args.columns):
                entry = _tune_kernel(args, target, name, workload, part)
                if entry is None:
                    return 1
                entries.append(entry)
    entries += _default_entries(args, target, entries)  # the columns kernels not tuned (--columns)
    entries += _fused_entries(args, target, _fused_specs(args, target), entries)
    entries += _companion_entries(target, entries)
    manifest = export_library(entries, target, args.out, "deft_kernels")
    print(f"exported {len(entries)} kernels for {target_tag(target)} -> {manifest}")
    load_library(manifest)
    for name in args.workloads:
        for dtype in args.dtypes:
            workload = get_workload(name, dtype, _tf32(args, dtype))
            err = _check_against_reference(workload, args.device, args.seed or 0)
            print(f"check    {name} {dtype}: the exported kernel matches the float64 reference (max abs error {err:.3g})")
            if args.backward:
                err = _check_gradients_against_reference(workload, args.device, args.seed or 0)
                print(f"check    {name} {dtype}: the exported backward's gradients match the float64 reference "
                      f"(max abs error {err:.3g})")
    return 0


def _export_target(args):
    from deft_tvm.runtime.targets import cuda_target, target_for_device

    if args.device == "cuda" and args.arch:
        return cuda_target(args.arch)
    _require_gpu(args, "pass --arch (e.g. --arch sm_90) to compile for a GPU elsewhere, or --device cpu")
    return target_for_device(args.device)


def cmd_export(args) -> int:
    """Compile tuned workloads (MetaSchedule records and fused-backward tilings under ``--logs``,
    and optionally registry workloads with the default schedule) into one library."""
    from deft_tvm.runtime.library import KernelEntry, export_library
    from deft_tvm.runtime.records import best_schedule, database_dirs, fused_backward_specs, read_part, target_tag

    target = _export_target(args)
    entries = []
    for directory in database_dirs(args.logs, target):
        spec, sch = best_schedule(directory, target)
        if sch is None:
            print(f"skipped  {directory}: no successful record for this target")
            continue
        entries.append(KernelEntry(spec, sch.mod["main"], origin=str(directory), part=read_part(directory)))
    entries += _default_entries(args, target, entries)
    entries += _fused_entries(args, target, fused_backward_specs(args.logs, target) + _fused_specs(args, target),
                              entries)
    entries += _companion_entries(target, entries)
    if not entries:
        raise UsageError(
            f"nothing to export: --logs {args.logs} holds no tuning records for {target_tag(target)} and no "
            f"--workloads were given; tune first (deft-tvm tune), point --logs at the records, or pass --workloads"
        )
    manifest = export_library(entries, target, args.out, args.name)
    for entry in entries:
        print(f"kernel   {kernel_key(entry.spec, entry.part)}  ({entry.origin})")
    print(f"exported {len(entries)} kernels for {target_tag(target)} -> {manifest}")
    return 0


def main(argv=None) -> int:
    """Run ``deft-tvm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Raises:
        SystemExit: status 2 after a one-line message, for arguments argparse rejects.
        UsageError: under ``--debug`` only; otherwise its one line goes to stderr and 2 is returned.
    """
    parser = ArgumentParser(prog="deft-tvm", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a usage error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered workloads and offset profiles").set_defaults(func=cmd_list)
    build = sub.add_parser("build", help="compile a workload for this machine and check it against the reference")
    build.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=list(WORKLOADS))
    build.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None, help="default: the workload's dtype")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--model", metavar="MODULE:CALLABLE",
                       help="instead of --workload: build the kernels of the model CALLABLE() returns, traced on "
                            "the meta device with an input of --input-shape (forward and backward, in parallel)")
    build.add_argument("--input-shape", type=int, nargs="+", default=[1, 3, 224, 224], metavar="SIZE",
                       help="with --model: the example input's shape (default 1 3 224 224)")
    build.add_argument("--input-dtype", choices=SUPPORTED_DTYPES, default="float32",
                       help="with --model: the dtype of the model and its input")
    build.add_argument("--device", choices=["cpu", "cuda"], default=_device(),
                       help="with --model: default cuda if there is a GPU")
    build.add_argument("--no-backward", action="store_true", help="with --model: the forward kernels only")
    build.add_argument("--deterministic", action="store_true",
                       help="with --model: the backward kernels of torch.use_deterministic_algorithms(True)")
    build.set_defaults(func=cmd_build)
    tune = sub.add_parser("tune", help="tune workloads with MetaSchedule, export the kernel library and check it")
    tune.add_argument("--workloads", nargs="+", default=[DEFAULT_WORKLOAD], choices=list(WORKLOADS))
    tune.add_argument("--dtypes", nargs="+", default=["float32"], choices=SUPPORTED_DTYPES)
    tune.add_argument("--device", choices=["cpu", "cuda"], default=_device(), help="default: cuda if there is a GPU")
    tune.add_argument("--tf32", action="store_true",
                      help="float32 kernels for TF32 tensor cores, the ones the op runs where "
                      "torch.backends.cuda.matmul.allow_tf32 (CUDA; other dtypes unaffected)")
    tune.add_argument("--backward", action="store_true",
                      help="also tune the backward's gradient kernels of each workload (in folders ending _backward); "
                      "on CUDA the library also gets each workload's fused backward (its record's tilings, else its "
                      "layer configuration's defaults)")
    tune.add_argument("--columns", action="store_true",
                      help="also tune the columns kernel of each workload whose CUDA forward is unfused (wide "
                           "layers: im2col + cuBLAS GEMM; folders ending _columns); others have none")
    tune.add_argument("--fused-backward", action="store_true",
                      help="instead, search the fused CUDA backward's tilings of each workload (records in folders "
                      "ending _fused_backward, which the op takes over the defaults once committed)")
    tune.add_argument("--kernels", nargs="+", choices=FUSED_KERNELS, default=list(FUSED_KERNELS),
                      help="with --fused-backward: the kernels to search (default both); the other keeps its tiling "
                      "and times from the workload's record under --logs, else the committed one")
    tune.add_argument("--trials", type=int, default=8,
                      help="records each workload's database should hold; tuning resumes up to it (default 8)")
    tune.add_argument("--trials-per-round", type=int, default=32)
    tune.add_argument("--seed-from", choices=(*SUPPORTED_DTYPES, SEED_FROM_TF32), default=None, metavar="DTYPE",
                      help="before refining, also measure the tilings of the 3 fastest records of the same "
                      "workload in DTYPE under --logs (float16 for bfloat16: the same fragments; tf32, float32 "
                      "tuned with --tf32, for float32 without it; a family or dtype that cannot take them adds none)")
    tune.add_argument("--seed", type=int, default=None)
    tune.add_argument("--logs", type=Path, default=user_root(),
                      help=f"root of the tuning databases, where the op finds them from any folder (default "
                      f"{user_root()}: ${TUNING_DIR_ENV}, else the XDG data directory)")
    tune.add_argument("--schedules", type=Path, default=user_root().parent / "schedules",
                      help="where the best schedules are written in readable form")
    tune.add_argument("--out", type=Path, default=Path("deft_kernels"), help="folder of the exported library")
    tune.set_defaults(func=cmd_tune)
    from deft_tvm.bench import register_cli as register_bench
    from deft_tvm.cli.stats import register_cli as register_stats

    register_stats(sub)
    register_bench(sub)
    export = sub.add_parser("export", help="compile tuned workloads into one kernel library with a manifest")
    export.add_argument("--device", choices=["cpu", "cuda"], default=_device())
    export.add_argument("--arch", default=None, help="CUDA arch such as sm_90 (default: this machine's GPU)")
    export.add_argument("--logs", type=Path, default=user_root(),
                        help=f"root of the tuning databases (default {user_root()})")
    export.add_argument("--workloads", nargs="*", default=[], choices=list(WORKLOADS),
                        help="also export these registry workloads (default schedule where not tuned)")
    export.add_argument("--dtypes", nargs="+", default=["float32"], choices=SUPPORTED_DTYPES)
    export.add_argument("--tf32", action="store_true",
                        help="float32 kernels for TF32 tensor cores, the ones the op runs where "
                      "torch.backends.cuda.matmul.allow_tf32 (CUDA; other dtypes unaffected)")
    export.add_argument("--backward", action="store_true",
                        help="also export the backward's gradient kernels of --workloads (default schedule where "
                        "not tuned) and, on CUDA, their fused backward (record's tilings, else the layer "
                        "configuration's defaults; fused-backward records under --logs are exported without it)")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--name", default="deft_kernels", help="library file name, without extension")
    export.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"deft-tvm {args.command}: error: {err}", file=sys.stderr)
        return 2
