"""The ``deft-tvm`` command line.

A mistake in the command line or in the files it names (no GPU for ``--device cuda``, a missing
file, a bad ``--model``, an unknown choice) ends in one line on stderr and exit status 2;
``deft-tvm --debug ...`` shows the traceback instead. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import torch

from deft_tvm.cli.errors import ArgumentParser, UsageError
from deft_tvm.compute.spec import SUPPORTED_DTYPES, generic_spec, kernel_key
from deft_tvm.runtime.records import TUNING_DIR_ENV, user_root
from deft_tvm.tuning.export import check_forward, check_gradients, kernel_parts, library_entries, part_spec
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


def _call_reference(reference: str, option: str):
    """``MODULE:CALLABLE`` imported and called (no arguments): its result. UsageError naming what is
    missing."""
    import importlib

    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{option} {reference}: expected MODULE:CALLABLE, e.g. my_package.models:build_dcn_net")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"{option} {reference}: cannot import {module_name} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"{option} {reference}: {module_name} has no callable {attribute}")
    return factory()


def _load_model(reference: str):
    """``--model MODULE:CALLABLE``: the model it builds; UsageError unless a torch.nn.Module."""
    model = _call_reference(reference, "--model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {reference}: {reference.partition(':')[2]}() returned a {type(model).__name__}, "
                         "expected a torch.nn.Module")
    return model


def _data_batches(reference: str, count: int) -> list[torch.Tensor]:
    """``--data MODULE:CALLABLE``: the first ``count`` input batches of the iterable it returns
    (tensors, or sequences whose first item is the input tensor, as a data loader's
    ``(images, labels)``). UsageError naming what it gave otherwise."""
    data = _call_reference(reference, "--data")
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise UsageError(f"--data {reference}: returned a {type(data).__name__}, expected an iterable of batches "
                         "(tensors, or (input, ...) sequences as a data loader gives)")
    batches = []
    for item in data:
        if len(batches) == count:
            break
        batch = item[0] if isinstance(item, (list, tuple)) and item else item
        if not isinstance(batch, torch.Tensor):
            raise UsageError(f"--data {reference}: batch {len(batches)} is a {type(item).__name__}, expected a "
                             "tensor or an (input, ...) sequence whose first item is a tensor")
        batches.append(batch)
    if not batches:
        raise UsageError(f"--data {reference}: gave no batch")
    return batches


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
    err = check_forward(workload, device, args.seed)
    print(f"check    matches the float64 reference (max abs error {err:.3g}, dtype {spec.dtype})")
    return 0


def _tf32(args, dtype: str) -> bool:
    """Whether ``--tf32`` asks for TF32 kernels of ``dtype`` (float32 only)."""
    return args.tf32 and dtype == "float32"


def _workloads(args) -> list:
    """``--workloads`` in each of ``--dtypes`` (float32 with ``--tf32``: TF32)."""
    return [get_workload(name, dtype, _tf32(args, dtype)) for name in args.workloads for dtype in args.dtypes]


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
    source = part_spec(get_workload(name, dtype, tf32), target, part)
    return None if source == spec else source


def _rpc(args):
    """The RPC configuration of ``--rpc-tracker`` and ``--rpc-key`` (``tuning.search.rpc_config``),
    or None without them. UsageError for one without the other or a tracker not ``HOST:PORT``."""
    from deft_tvm.tuning.search import rpc_config

    if args.rpc_tracker is None and args.rpc_key is None:
        return None
    if args.rpc_tracker is None or args.rpc_key is None:
        raise UsageError(f"--rpc-tracker {args.rpc_tracker} --rpc-key {args.rpc_key}: give both (the tracker's "
                         f"HOST:PORT and the key its servers registered under), or neither")
    try:
        return rpc_config(args.rpc_tracker, args.rpc_key)
    except ValueError as err:
        raise UsageError(f"--rpc-tracker: {err}") from None


def _tune_kernel(args, target, name: str, workload, part: str):
    """Tune one kernel of a workload and write its readable schedule; its ``KernelEntry``, or None
    when no candidate ran."""
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import database_dir, target_tag
    from deft_tvm.tuning.search import record_count, tune_kernel

    tag = target_tag(target)
    spec = part_spec(workload, target, part)
    directory = database_dir(args.logs, spec, target, part)
    label = f"{name} {spec.dtype}" + ("" if part == "forward" else f" {part}")
    print(f"tune     {label} on {tag}: {kernel_key(spec, part)} (offsets: {workload.profile}) -> {directory}")
    source = _seed_source(args, name, spec, target, part)
    done = tune_kernel(spec, workload.profile, target, directory, args.trials, trials_per_round=args.trials_per_round,
                       seed=args.seed, part=part, rpc=_rpc(args), verbose=args.verbose,
                       seed_from=None if source is None else (source, database_dir(args.logs, source, target, part)))
    for step, candidates in done.measured.items():
        for candidate, seconds in candidates.items():
            print(f"{step:<8} {candidate}: " + (f"{seconds * 1e3:.4f} ms" if seconds is not None else "failed to build or run"))
    if done.schedule is None:
        print(f"error    no successful candidate for {label} in {done.search.trials} trials")
        return None
    readable = write_readable_schedule(args.schedules, tag, name, spec, done.schedule, part)
    best = f"{done.best_s * 1e3:.4f} ms" if done.best_s is not None else "n/a"  # refinements included
    print(f"best     {best} of {record_count(directory)} records ({done.search.new_trials} new from the search in "
          f"{done.search.seconds:.0f} s); schedule: {readable}")
    return KernelEntry(spec, done.schedule.mod["main"], origin=str(directory), part=part)


def _kept_fused_record(args, target, name: str, spec) -> dict | None:
    """The record whose other kernel a ``--kernels`` search of one kernel keeps: the spec's (the
    workload's, or with ``--configuration`` its configuration's) under ``--logs``, else the committed
    one; None when both kernels are searched. UsageError if there is none."""
    from deft_tvm.runtime.records import fused_backward_record, record_roots

    if set(args.kernels) == set(FUSED_KERNELS):
        return None
    kept = fused_backward_record(spec, target, [Path(args.logs), *record_roots()])
    if kept is None:
        raise UsageError(f"--kernels {' '.join(args.kernels)}: {name} {spec.dtype}{' tf32' * spec.tf32} has no "
                         f"fused-backward record under {args.logs} or committed to keep the other kernel's from; "
                         f"tune both kernels first")
    return kept


def _tune_fused_backward(args, target, name: str, workload, rpc=None) -> None:
    """Search the fused backward's tilings of a workload (on this GPU, or with ``rpc`` on the RPC
    tracker's), or with ``--configuration`` of its layer configuration (on this GPU), and write the
    record."""
    from deft_tvm.runtime.records import fused_backward_dir, write_fused_backward
    from deft_tvm.schedules.cuda_backward_fused import DataTiling
    from tqdm import tqdm

    from deft_tvm.tuning.fused_backward import (compile_pool, measure_configuration, patch_coverage, record_times,
                                                tune_fused_backward)
    from deft_tvm.tuning.fused_rpc import fused_measure

    spec = dataclasses.replace(workload.spec, layout="NCHW")  # the op's backward spec (NCHW view)
    recorded = generic_spec(spec) if args.configuration else spec
    kept = _kept_fused_record(args, target, name, recorded)
    device_name, measure = fused_measure(target, rpc)
    if args.configuration:
        measure = measure_configuration
    what = " configuration" * args.configuration
    label = f"{name} {spec.dtype}{' tf32' * spec.tf32}{what} fused backward"
    with compile_pool() as pool, tqdm(total=0, desc=label, unit="candidate") as bar:
        record = tune_fused_backward(spec, workload.profile, target, device_name,
                                     measure=functools.partial(measure, bar=bar, pool=pool),
                                     kernels=tuple(args.kernels), kept=kept, configuration=args.configuration)
    path = write_fused_backward(fused_backward_dir(args.logs, recorded, target), record)
    rejected = sum(ms is None for kind in FUSED_KERNELS for _, ms in record[f"{kind}_ms"])
    data = DataTiling(**record["data"])
    coverage = (f"halo {data.halo} px, its patches cover {patch_coverage(spec, workload.profile, data):.1%} of "
                f"{workload.profile}'s samples")
    if args.configuration:
        best, default = record_times(record)
        print(f"fused    {name} {spec.dtype}{' tf32' * spec.tf32} configuration at {spec.key()}: entry "
              f"{best:.3f} ms fastest measured (default tilings {default:.3f}; {coverage}), {rejected} candidates "
              f"rejected (gradients not the default's, not serving these sizes, or not compiling) -> {path}")
        return
    times = {kind: min(ms for _, ms in record[f"{kind}_ms"] if ms is not None) for kind in FUSED_KERNELS}
    defaults = {kind: record[f"{kind}_ms"][0][1] for kind in FUSED_KERNELS}
    print(f"fused    {name} {spec.dtype}{' tf32' * spec.tf32}: grad_data {times['data']:.3f} ms (default "
          f"{defaults['data']:.3f}; {coverage}), grad_weight "
          f"{times['weight']:.3f} ms (default {defaults['weight']:.3f}), {rejected} candidates rejected "
          f"(gradients not the default's) -> {path}")


def _tune_forward_configuration(args, target, name: str, workload) -> None:
    """Search the forward tiling of a workload's layer configuration on this GPU, measured at the
    workload's sizes, and write the record under ``--logs``."""
    from deft_tvm.runtime.records import database_dir, write_configuration_record
    from deft_tvm.tuning.forward_configuration import measure_configuration_forward, record_times
    from deft_tvm.tuning.forward_configuration import tune_forward_configuration
    from deft_tvm.tuning.fused_backward import compile_pool
    from tqdm import tqdm

    spec = workload.for_target(target).spec
    label = f"{name} {spec.dtype}{' tf32' * spec.tf32} configuration forward"
    try:
        with compile_pool() as pool, tqdm(total=0, desc=label, unit="candidate") as bar:
            measure = functools.partial(measure_configuration_forward, bar=bar, pool=pool)
            record = tune_forward_configuration(spec, workload.profile, target, torch.cuda.get_device_name(),
                                                measure=measure)
    except ValueError as error:
        raise UsageError(f"--configuration without --fused-backward: {error}") from None
    path = write_configuration_record(database_dir(args.logs, generic_spec(spec), target), generic_spec(spec), record)
    best, default = record_times(record)
    rejected = sum(ms is None for _, ms in record["candidates"])
    print(f"forward  {label} at {spec.key()}: {best:.4f} ms fastest of {len(record['candidates'])} tilings "
          f"(default {default:.4f}), {rejected} rejected (not compiling or running, or output not the "
          f"default's) -> {path}")


def cmd_tune_model(args) -> int:
    """Tune a model's own DCN layers on their own statistics, export them as one library, check it."""
    from deft_tvm.tuning.model import format_ms, tune_model

    _require_gpu(args, "tuning measures on the GPU, so run it where there is one, or pass --device cpu")
    if args.data is not None and args.input_shape is not None:
        raise UsageError(f"--model takes its batches from --data {args.data} or random ones of --input-shape "
                         f"{' '.join(map(str, args.input_shape))}, not both")
    if args.data is None and (args.input_shape is None or min(args.input_shape) < 1):
        raise UsageError(f"--model needs --data MODULE:CALLABLE or --input-shape N C H W (four positive sizes), "
                         f"got {args.input_shape}")
    if args.batches < 1:
        raise UsageError(f"--batches {args.batches}: expected at least 1")
    if args.configuration and not (args.device == "cuda" and args.rpc_tracker is None):
        raise UsageError("--configuration with --model: searches each layer configuration's CUDA kernels on this "
                         "machine's GPU; tune on a GPU (--device cuda), no --rpc-tracker")
    dtype = getattr(torch, args.input_dtype)
    model = _load_model(args.model).to(args.device, dtype)
    if args.data is not None:
        batches = [batch.to(args.device, dtype) for batch in _data_batches(args.data, args.batches)]
    else:
        generator = torch.Generator().manual_seed(args.seed or 0)
        batches = [torch.randn(args.input_shape, generator=generator).to(args.device, dtype)
                   for _ in range(args.batches)]
    result = tune_model(model, batches, trials=args.trials, out=args.out, device=args.device, backward=args.backward,
                        logs=args.logs, trials_per_round=args.trials_per_round, seed=args.seed, rpc=_rpc(args),
                        verbose=args.verbose, configurations=args.configuration)
    for layer, name in result.layers.items():
        print(f"layer    {layer}: {name}")
    for key, best in result.best_ms.items():
        print(f"kernel   {key}: best {format_ms(best)}, default {format_ms(result.default_ms.get(key))}")
    print(f"profile  {result.profile}")
    print(f"exported {result.manifest} (checked against the float64 reference; load it with "
          f"deft_tvm.load_library)")
    return 0


def cmd_tune(args) -> int:
    """Tune workloads on the DefT design space, export them as one library, check it."""
    if args.model:
        return cmd_tune_model(args)
    from deft_tvm.runtime.library import export_library, load_library
    from deft_tvm.runtime.records import record_roots, target_tag
    from deft_tvm.runtime.targets import target_for_device

    _require_gpu(args, "tuning measures on the GPU, so run it where there is one, or pass --device cpu")
    rpc = _rpc(args)  # a bad --rpc-tracker / --rpc-key fails before any work
    if args.fused_backward and args.device != "cuda":
        raise UsageError("--fused-backward: the fused backward is a CUDA kernel; tune it with --device cuda on a GPU")
    if set(args.kernels) != set(FUSED_KERNELS) and not args.fused_backward:
        raise UsageError(f"--kernels {' '.join(args.kernels)}: names the fused backward's kernels; "
                         f"add --fused-backward")
    if args.configuration and args.device != "cuda":
        raise UsageError("--configuration: searches the tilings of a layer configuration's CUDA kernels; tune it "
                         "with --device cuda on a GPU")
    if args.configuration and rpc is not None:
        raise UsageError("--configuration: a configuration's kernels are measured on this machine's GPU, "
                         "not through --rpc-tracker; drop one of them")
    target = target_for_device(args.device)
    if args.configuration and not args.fused_backward:
        for workload in _workloads(args):
            _tune_forward_configuration(args, target, workload.name, workload)
        return 0
    if args.fused_backward:
        for name in args.workloads:
            for dtype in args.dtypes:
                _tune_fused_backward(args, target, name, get_workload(name, dtype, _tf32(args, dtype)), rpc)
        return 0
    entries = []
    for workload in _workloads(args):
        for part in kernel_parts(workload, target, args.backward, args.columns):
            entry = _tune_kernel(args, target, workload.name, workload, part)
            if entry is None:
                return 1
            entries.append(entry)
    # the columns kernels not tuned (--columns), the fused backward, the companion kernels
    entries = library_entries(_workloads(args), target, entries, args.backward, [Path(args.logs), *record_roots()])
    manifest = export_library(entries, target, args.out, "deft_kernels")
    print(f"exported {len(entries)} kernels for {target_tag(target)} -> {manifest}")
    load_library(manifest)
    for workload in _workloads(args):
        name, dtype = workload.name, workload.spec.dtype
        err = check_forward(workload, args.device, args.seed or 0)
        print(f"check    {name} {dtype}: the exported kernel matches the float64 reference (max abs error {err:.3g})")
        if args.backward:
            err = check_gradients(workload, args.device, args.seed or 0)
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
    """Compile tuned workloads (MetaSchedule records, layer configurations' tiling records and
    fused-backward tilings under ``--logs``, and optionally registry workloads with the default
    schedule) into one library."""
    from deft_tvm.runtime.library import KernelEntry, export_library
    from deft_tvm.runtime.records import (best_schedule, configuration_dirs, configuration_schedule, database_dirs,
                                         fused_backward_specs, read_part, record_roots, target_tag)

    target = _export_target(args)
    entries = []
    for directory in database_dirs(args.logs, target):
        spec, sch = best_schedule(directory, target)
        if sch is None:
            print(f"skipped  {directory}: no successful record for this target")
            continue
        entries.append(KernelEntry(spec, sch.mod["main"], origin=str(directory), part=read_part(directory)))
    for directory in configuration_dirs(args.logs, target):  # layer configurations' tiling records
        spec, part, sch = configuration_schedule(directory, target)
        entries.append(KernelEntry(spec, sch.mod["main"], origin=str(directory), part=part))
    entries = library_entries(_workloads(args), target, entries, args.backward, [Path(args.logs), *record_roots()],
                              fused=fused_backward_specs(args.logs, target))
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
    tune.add_argument("--configuration", action="store_true",
                      help="search the CUDA forward's tiling of each workload's layer configuration (the kernel "
                      "every batch and image size of it runs where no record of its own sizes is; the tensor-core "
                      "forward), measured at the workload's sizes; with --fused-backward: the fused backward's "
                      "tilings of the configuration instead; with --model on CUDA: each layer configuration's "
                      "forward tiling (and with --backward its fused backward's) too, at its first layer call's "
                      "sizes")
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
    tune.add_argument("--model", metavar="MODULE:CALLABLE",
                      help="tune this model's own DCN layers (deft_tvm.tune_model) instead of --workloads: "
                      "MODULE.CALLABLE() builds it, --batches of --data or random ones of --input-shape run it")
    tune.add_argument("--input-shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                      help="with --model: the shape of its input batches")
    tune.add_argument("--input-dtype", choices=SUPPORTED_DTYPES, default="float32",
                      help="with --model: the dtype of the model and its inputs")
    tune.add_argument("--data", metavar="MODULE:CALLABLE", default=None,
                      help="with --model: real input batches instead of random ones: MODULE.CALLABLE() returns "
                      "an iterable of input tensors or (input, ...) sequences (a data loader), of which --batches "
                      "are taken")
    tune.add_argument("--batches", type=int, default=4,
                      help="with --model: batches its statistics are recorded on (random ones, or the first of --data)")
    tune.add_argument("--rpc-tracker", metavar="HOST:PORT", default=None,
                      help="measure the searches' candidates (the fused backward's too) on the devices registered "
                      "with this TVM RPC tracker (python -m tvm.exec.rpc_tracker; one python -m tvm.exec.rpc_server "
                      "--tracker ... per GPU), "
                      "as many at once as it has servers under --rpc-key; builds stay here, in parallel")
    tune.add_argument("--rpc-key", default=None, help="with --rpc-tracker: the key its servers registered under")
    tune.add_argument("--verbose", action="store_true",
                      help="show MetaSchedule's own log (task tables, cost-model lines) on the console")
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
