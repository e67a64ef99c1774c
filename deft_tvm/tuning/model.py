"""Tune a user's own model: ``tune_model`` records the offset statistics of its DCN layers on real
batches, tunes each distinct layer call's kernels on inputs drawn from its own layers' statistics,
exports one library whose manifest names the model, its layers and their profile, and checks
every kernel of it against the float64 reference."""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from deft_tvm.compute.spec import DeformConvSpec, generic_spec, kernel_key
from deft_tvm.tuning.workloads import Workload

LIBRARY_NAME = "deft_kernels"
PROFILE_FILE = "profile.json"


@dataclasses.dataclass
class ModelTuning:
    """What ``tune_model`` did: the library's manifest, the offset profile it recorded (file), one
    workload per distinct layer call (its profile: its layers' statistics, ``offset_profile``),
    which workload each layer runs, and each tuned kernel's best and default time (ms; None where
    it was not measured), by kernel key."""

    manifest: Path
    profile: Path
    workloads: list[Workload]
    layers: dict[str, str]
    best_ms: dict[str, float | None]
    default_ms: dict[str, float | None]


def format_ms(value: float | None) -> str:
    """A time in ms as ``tune_model``'s progress and ``deft-tvm tune --model`` show it."""
    return "n/a" if value is None else f"{value:.4f} ms"


def _batches(inputs, max_batches: int | None) -> list:
    """``inputs`` as a list of batches: a tensor or a tuple of a model's positional arguments is one
    batch; anything else is iterated (a data loader), ``max_batches`` of it at most."""
    if isinstance(inputs, (torch.Tensor, tuple)):
        return [inputs]
    batches = []
    for batch in inputs:
        if max_batches is not None and len(batches) == max_batches:
            break
        batches.append(batch)
    if not batches:
        raise ValueError("tune_model: inputs gave no batch; pass a tensor, a tuple of the model's arguments, "
                         "or an iterable of them")
    return batches


def _layer_workloads(profile, profile_path: Path, model_name: str,
                     device: torch.device) -> tuple[list[Workload], dict[str, str]]:
    """One workload per distinct call spec of the profile's layers (float32 on TF32 where torch's
    matmuls are on ``device``), measured on the pooled statistics of the layers that make it."""
    from deft_tvm.runtime.kernel_cache import with_torch_tf32
    from deft_tvm.tuning.stats import layer_spec

    by_spec: dict[DeformConvSpec, list[str]] = {}
    for layer, stats in profile.layers.items():
        by_spec.setdefault(with_torch_tf32(layer_spec(stats), device), []).append(layer)
    workloads, layers = [], {}
    for spec, names in by_spec.items():
        name = f"{model_name}.{names[0]}"
        workloads.append(Workload(name, spec, f"{profile_path}#{'+'.join(names)}",
                                  f"layers {', '.join(names)} of {model_name}"))
        layers.update(dict.fromkeys(names, name))
    return workloads, layers


def _tune_part(workload: Workload, target, part: str, logs: Path, trials: int, trials_per_round: int,
               seed: int | None, progress: bool, rpc, verbose: bool):
    """MetaSchedule's search of ``workload``'s ``part`` kernel into its database under ``logs``, the
    day's default measured and the best refined (as ``deft-tvm tune``), with a progress bar of its
    trials where ``progress``; returns ``(KernelEntry or None, best ms, default ms)``."""
    from tqdm import tqdm

    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import database_dir
    from deft_tvm.tuning.export import part_spec
    from deft_tvm.tuning.search import tune_kernel

    spec = part_spec(workload, target, part)
    directory = database_dir(logs, spec, target, part)
    with tqdm(total=trials, desc=f"{workload.name} {part}", unit="trial", disable=not progress) as bar:
        done = tune_kernel(spec, workload.profile, target, directory, trials, trials_per_round=trials_per_round,
                           seed=seed, part=part, bar=bar, rpc=rpc, verbose=verbose)
        best, default = (None if s is None else s * 1e3 for s in (done.best_s, done.default_s))
        bar.set_postfix_str(f"best {format_ms(best)}, default {format_ms(default)}")
    entry = None if done.schedule is None else KernelEntry(spec, done.schedule.mod["main"], origin=str(directory),
                                                           part=part)
    return entry, best, default


def _tune_fused(workload: Workload, target, logs: Path, progress: bool, measured_on: tuple[str, Callable],
                configuration: bool = False) -> tuple[float, float]:
    """The fused CUDA backward's tilings of ``workload`` (with ``configuration``: of its layer
    configuration, measured at its sizes) searched on its profile and recorded under ``logs``, or
    the record there resumed where it was searched on the same statistics
    (``tuning.stats.profile_digest``) and the same GPU, with a progress bar of its candidates
    (compiled, measured, then the best and default time) where ``progress``; ``measured_on``: the
    device name and measure of ``tuning.fused_rpc.fused_measure`` (this machine's GPU or a tracker's;
    a configuration's search measures its entries on this machine's GPU, ``measure_configuration``).
    Returns (best, default) grad_data + grad_weight time (ms); of a configuration, the fastest entry
    measured and the entry with the default tilings (``tuning.fused_backward.record_times``)."""
    from tqdm import tqdm

    from deft_tvm.runtime.records import fused_backward_dir, fused_backward_record, write_fused_backward
    from deft_tvm.tuning.fused_backward import compile_pool, measure_configuration, record_times, tune_fused_backward
    from deft_tvm.tuning.stats import profile_digest

    spec, (device_name, measure) = dataclasses.replace(workload.spec, layout="NCHW"), measured_on
    recorded = generic_spec(spec) if configuration else spec
    measure = measure_configuration if configuration else measure
    record = fused_backward_record(recorded, target, [logs])
    searched_on = (profile_digest(workload.profile), device_name)
    description = f"{workload.name}{' configuration' * configuration} fused backward"
    with tqdm(total=0, desc=description, unit="candidate", disable=not progress) as bar:
        if record is None or (record.get("profile_digest"), record["device"]) != searched_on:
            with compile_pool() as pool:
                record = tune_fused_backward(spec, workload.profile, target, device_name,
                                             measure=functools.partial(measure, bar=bar, pool=pool),
                                             configuration=configuration)
            write_fused_backward(fused_backward_dir(logs, recorded, target), record)
        best, default = record_times(record)
        what = "entry" if configuration else "grad_data + grad_weight"
        bar.set_postfix_str(f"best {format_ms(best)}, default {format_ms(default)} ({what})")
    return best, default


def _tune_forward_configuration(workload: Workload, target, logs: Path, progress: bool, device_name: str):
    """The forward tiling of ``workload``'s layer configuration searched at its sizes on its profile
    (``tuning.forward_configuration``) and recorded under ``logs``, or the record there resumed
    where it was searched on the same statistics and the same GPU, with a progress bar where
    ``progress``. Returns ``(KernelEntry of the configuration's kernel with the recorded tiling,
    best ms, default ms)``, or None where the configuration has no tiling search at these sizes
    (``forward_configuration.tilings_space``)."""
    from tqdm import tqdm

    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import (CONFIGURATION_FILE, configuration_record, configuration_schedule,
                                          database_dir, write_configuration_record)
    from deft_tvm.tuning.export import part_spec
    from deft_tvm.tuning.forward_configuration import (measure_configuration_forward, record_times, tilings_space,
                                                       tune_forward_configuration)
    from deft_tvm.tuning.fused_backward import compile_pool
    from deft_tvm.tuning.stats import profile_digest

    spec = part_spec(workload, target, "forward")
    try:
        tilings_space(spec, target)
    except ValueError:
        return None
    configuration = generic_spec(spec)
    directory = database_dir(logs, configuration, target)
    record = configuration_record(directory) if (directory / CONFIGURATION_FILE).exists() else None
    with tqdm(total=0, desc=f"{workload.name} configuration forward", unit="candidate", disable=not progress) as bar:
        if record is None or (record.get("profile_digest"), record["device"]) != (profile_digest(workload.profile),
                                                                                   device_name):
            with compile_pool() as pool:
                record = tune_forward_configuration(spec, workload.profile, target, device_name,
                                                    measure=functools.partial(measure_configuration_forward, bar=bar,
                                                                              pool=pool))
            write_configuration_record(directory, configuration, record)
        best, default = record_times(record)
        bar.set_postfix_str(f"best {format_ms(best)}, default {format_ms(default)}")
    sch = configuration_schedule(directory, target)[2]
    return KernelEntry(configuration, sch.mod["main"], origin=str(directory)), best, default


def library_workloads(manifest_path: str | Path) -> list[Workload]:
    """The workloads a ``tune_model`` library was tuned for, from its manifest's ``"model"`` entry:
    one per distinct layer call, named and profiled as ``tune_model`` named them (the recorded
    profile, ``PATH#LAYER+LAYER``), their specs the layers' (dtype and TF32 included).

    Raises:
        ValueError: the manifest has no ``"model"`` entry (a library not made by ``tune_model``).
    """
    import json

    manifest = json.loads(Path(manifest_path).read_text())
    model = manifest.get("model")
    if not model:
        raise ValueError(f"{manifest_path}: no \"model\" entry; a library of deft_tvm.tune_model or "
                         f"`deft-tvm tune --model` has one")
    layers: dict[str, list[str]] = {}
    specs = {}
    for layer, entry in model["layers"].items():
        layers.setdefault(entry["workload"], []).append(layer)
        specs[entry["workload"]] = DeformConvSpec.from_dict(entry["spec"])
    return [Workload(name, specs[name], f"{model['profile']}#{'+'.join(names)}",
                     f"layers {', '.join(names)} of {model['name']}") for name, names in layers.items()]


def tune_model(model: torch.nn.Module, inputs, *, trials: int = 32, out: str | Path = LIBRARY_NAME,
               device: str | torch.device | None = None, backward: bool = True, logs: str | Path | None = None,
               max_batches: int | None = None, trials_per_round: int = 32, seed: int | None = None,
               check_seed: int = 0, progress: bool = True, rpc=None, verbose: bool = False,
               configurations: bool = False) -> ModelTuning:
    """Tune ``model``'s deformable convolutions on their own offsets and export them as one library.

    ``inputs``: one batch (a tensor, or a tuple of the model's positional arguments) or an iterable
    of batches (a data loader; ``max_batches`` of it at most), on the model's device, which is the
    tuning's (``device``, default: CUDA if there is a GPU, else the CPU). Every DCN layer
    (deft_tvm's, torchvision's, and mmcv-style packs, on a converted copy: ``convert_model``) is
    hooked and the model run on the batches under ``torch.no_grad()``; the layers' offset and mask
    statistics (``tuning.stats.collect``) are saved as ``out/profile.json``. Each distinct layer
    call (its spec: sizes of its first call, dtype, float32 on TF32 where torch's matmuls are) is
    one workload, measured on offsets and masks drawn from the pooled statistics of the layers that
    make it. Its forward is tuned by MetaSchedule (``trials`` records per kernel, databases under
    ``logs``, default: the user's tuning directory, ``records.user_root``), and with ``backward``
    its backward too (CUDA: the fused backward's tilings, ``tuning.fused_backward``; CPU: the
    gradient kernels). A call resumes what an earlier one left under ``logs`` on the same
    statistics: the databases up to ``trials`` records, the fused searches done on the same GPU.
    The tuned kernels, the defaults of the rest (the configurations' kernels that serve other
    sizes) and the kernels run beside them go into ``out/deft_kernels.so``, with a manifest
    (``out/deft_kernels.json``) whose ``"model"`` names the model, each layer's kernel spec and
    the profile; the library is loaded (``deft_tvm.load_library``) and every workload's
    forward (and gradients) checked against the float64 reference on its profile's inputs
    (AssertionError past the dtype's tolerance). ``progress``: a tqdm bar per tuned kernel (its
    trials, then its best and default time) instead of a line per search round. ``rpc``
    (``tuning.search.rpc_config``): the searches' candidates (the forward's and the fused
    backward's) run on a TVM RPC tracker's devices, as many at once as it has servers; ``verbose``:
    MetaSchedule's own log on the console. ``configurations`` (CUDA): also search the forward
    tiling of each layer configuration (``compute.spec.generic_spec``: the kernel the library
    serves other batch and image sizes with; ``tuning.forward_configuration``, where its forward
    is the tensor-core one) and with ``backward`` its fused backward, measured at its first
    workload's sizes.

    Raises:
        ValueError: the model has no DCN layer, or none was called, or ``inputs`` gave no batch, or
            ``configurations`` with ``rpc`` (a configuration's entries are measured on this GPU).
    """
    from deft_tvm.frontend.convert import convert_model
    from deft_tvm.runtime.kernel_cache import UntunedKernelWarning
    from deft_tvm.runtime.library import export_library, load_library
    from deft_tvm.runtime.records import record_roots, user_root
    from deft_tvm.runtime.targets import target_for_device
    from deft_tvm.tuning.export import check_forward, check_gradients, kernel_parts, library_entries, part_spec
    from deft_tvm.tuning.stats import collect

    if configurations and rpc is not None:
        raise ValueError("tune_model: configurations are searched on this machine's GPU (their whole fused entry "
                         "is measured, not through the RPC tracker); pass rpc=None or configurations=False")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = target_for_device(device)
    out, logs = Path(out).resolve(), Path(logs or user_root())
    model_name = type(model).__name__
    with warnings.catch_warnings():  # the layers run untuned here: that is what this call is about to change
        warnings.simplefilter("ignore", UntunedKernelWarning)
        profile = collect(convert_model(copy.deepcopy(model)), _batches(inputs, max_batches), seed=check_seed,
                          source=f"tune_model({model_name})")
    profile_path = profile.save(out / PROFILE_FILE)
    workloads, layers = _layer_workloads(profile, profile_path, model_name, device)
    cuda = target.kind.name == "cuda"
    if backward and cuda:
        from deft_tvm.tuning.fused_rpc import fused_measure

        measured_on = fused_measure(target, rpc)  # one session asks a tracker's server for its GPU's name
    entries, best_ms, default_ms = [], {}, {}
    for workload in workloads:
        for part in kernel_parts(workload, target, backward and not cuda, columns=False):
            key = kernel_key(part_spec(workload, target, part), part)
            entry, best_ms[key], default_ms[key] = _tune_part(workload, target, part, logs, trials,
                                                              trials_per_round, seed, progress, rpc, verbose)
            if entry is not None:
                entries.append(entry)
        if backward and cuda:
            key = kernel_key(dataclasses.replace(workload.spec, layout="NCHW"), "fused_backward")
            best_ms[key], default_ms[key] = _tune_fused(workload, target, logs, progress, measured_on)
    if cuda and configurations:
        firsts = {}  # each configuration's first workload (its forward kernel spec's configuration)
        for workload in workloads:
            firsts.setdefault(generic_spec(part_spec(workload, target, "forward")), workload)
        for configuration, workload in firsts.items():
            tuned = _tune_forward_configuration(workload, target, logs, progress, torch.cuda.get_device_name(device))
            if tuned is not None:
                entries.append(tuned[0])
                best_ms[kernel_key(configuration)], default_ms[kernel_key(configuration)] = tuned[1:]
            if backward:
                key = kernel_key(generic_spec(dataclasses.replace(workload.spec, layout="NCHW")), "fused_backward")
                best_ms[key], default_ms[key] = _tune_fused(workload, target, logs, progress, measured_on, True)
    specs = {w.name: w.spec for w in workloads}
    description = {"name": model_name, "profile": str(profile_path),
                   "layers": {layer: {"workload": name, "spec": specs[name].to_dict()}
                              for layer, name in layers.items()}}
    entries = library_entries(workloads, target, entries, backward, [logs, *record_roots()], configurations=True)
    manifest = export_library(entries, target, out, LIBRARY_NAME, model=description)
    load_library(manifest)
    for workload in workloads:
        check_forward(workload, device.type, check_seed)
        if backward:
            check_gradients(workload, device.type, check_seed)
    return ModelTuning(manifest, profile_path, workloads, layers, best_ms, default_ms)
