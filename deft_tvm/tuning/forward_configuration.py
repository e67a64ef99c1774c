"""Tiling search of a layer configuration's forward kernel on profile-distributed offsets.

A layer configuration (``compute.spec.generic_spec``: batch, height and width as TIR variables)
has one forward kernel for every size, which the op runs for every size without a tuned record of
its own (``runtime.kernel_cache.compiled_spec``). Its tilings are its schedule family's
``configuration_space`` (the tensor-core forward's:
``schedules.cuda_tensorcore.ConfigurationTilings``).
``tune_forward_configuration`` measures the configuration's default tiling and the tiling of the
tuned record of the workload's own size (where there is one and the space has it), then climbs
from the fastest to its neighbours (one fragment, warp or chunk count doubled or halved, or warps
traded for fragments) for at most ``rounds`` rounds (until one finds nothing faster): each
candidate compiled by a pool of processes (the caller's, kept for the search:
``fused_backward.compile_pool``) into the kernel disk cache (where the op then finds the chosen
one), run as the op runs it on the workload's sizes and inputs drawn
from its offset profile, kept only where its output is the default's up to the dtype's tolerance,
and timed with CUDA events (``fused_backward.time_checked``). The record (the fastest tiling and
every candidate's time, the size measured at, the profile and the device) is written in the
configuration's database folder (``runtime.records.write_configuration_record``), where
``runtime.kernel_cache.schedule_for`` takes it over the default.
"""

from __future__ import annotations

from collections.abc import Callable

import tvm

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec, kernel_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.records import best_schedule, tuned_database
from deft_tvm.runtime.targets import compile_kernel
from deft_tvm.schedules import configuration_space
from deft_tvm.tuning.fused_backward import compile_pool, time_checked
from deft_tvm.tuning.stats import profile_digest

# Neighbourhood rounds after the start, at most (each: the untried neighbours of the fastest tiling so far; a round
# that finds nothing faster ends the search, as the next would have nothing new to try).
ROUNDS = 4


def tilings_space(spec: DeformConvSpec, target: tvm.target.Target):
    """The configuration space of ``spec``'s (a kernel spec of one size) layer configuration.
    Raises ValueError where the op's forward at ``spec``'s sizes is unfused (a columns kernel and a
    GEMM, ``schedules.unfused_forward``: the configuration's fused kernel does not run there), or
    where its forward family has none (the SIMT forward, the CPU's)."""
    from deft_tvm.schedules import schedule_family, unfused_forward

    if unfused_forward(spec, target):
        raise ValueError(f"{spec.key()}: its forward at these sizes is unfused (a columns kernel and a GEMM), so "
                         f"its configuration's fused kernel is not what runs there")
    configuration = generic_spec(spec)
    space = configuration_space(configuration, target)
    if space is None:
        family = schedule_family(configuration, target).name
        raise ValueError(f"{spec.key()}: its configuration's forward ({family} schedule) has no tiling search; "
                         f"the tensor-core forward has one")
    return space


def _configuration_schedule(spec: DeformConvSpec, target: tvm.target.Target, tiling):
    configuration = generic_spec(spec)
    return tilings_space(spec, target).schedule(kernel_primfunc(configuration), tiling)


def _compile_candidate(spec: DeformConvSpec, target: tvm.target.Target, tiling) -> str:
    """Compile the configuration's kernel with ``tiling`` into the kernel disk cache (a process
    pool's job: a configuration's size variables are TVM objects of one process); returns its
    library's fingerprint (``kernel_cache.module_fingerprint``), by which the caller loads it
    without scheduling it again."""
    sch = _configuration_schedule(spec, target, tiling)
    fingerprint = kernel_cache.module_fingerprint(sch.mod)
    kernel_cache.build_into_cache(kernel_key(generic_spec(spec)), fingerprint, target,
                                  lambda: compile_kernel(sch.mod, target))
    return fingerprint


def forward_call(spec: DeformConvSpec, kernel: Callable, inputs: dict) -> Callable:
    """A call of a forward kernel of ``spec``'s sizes (``spec``: a kernel spec) on ``inputs``
    (``Workload.make_inputs``'), as the op makes it; the call returns ``[output]``."""
    import torch

    args = spec.kernel_arguments(*(inputs[k] for k in ("input", "offset", "mask", "weight", "bias")))

    def call():
        output = torch.empty(spec.output_shape, dtype=args[0].dtype, device=args[0].device)
        kernel(*args, output)
        return [output]

    return call


def measure_configuration_forward(spec: DeformConvSpec, profile: str, target: tvm.target.Target, tilings: list,
                                  bar=None, pool=None) -> list[float | None]:
    """GPU time (ms) of the configuration's kernel with each of ``tilings`` (the first: the one the
    others' outputs are checked against) at ``spec``'s sizes, on inputs drawn from ``profile``;
    None for a tiling whose kernel does not compile or launch, or whose output is not the first's.
    ``bar`` (tqdm-like), if given: its total grows by the candidates, advanced by one per
    candidate. ``pool``: the search's compiling processes (``fused_backward.compile_pool``; a new
    one where not given)."""
    from deft_tvm.tuning.workloads import Workload

    if bar is not None:
        bar.total += len(tilings)
        bar.refresh()
    with compile_pool(pool) as workers:
        futures = [workers.submit(_compile_candidate, spec, target, t) for t in tilings]
        fingerprints = []
        for future in futures:
            try:
                fingerprints.append(future.result())
            except Exception:  # noqa: BLE001 - a tiling the configuration's kernel cannot take is not run
                fingerprints.append(None)
    inputs = Workload("tuning", spec, profile).make_inputs(device="cuda")
    runs = {}
    for index, (tiling, fingerprint) in enumerate(zip(tilings, fingerprints)):
        if fingerprint is None:
            continue
        kernel = kernel_cache.load_or_build_library(
            kernel_key(generic_spec(spec)), fingerprint, target,
            lambda t=tiling: compile_kernel(_configuration_schedule(spec, target, t).mod, target), ("main",))[0]
        call = forward_call(spec, kernel, inputs)
        try:
            call()
        except Exception:  # noqa: BLE001 - e.g. more shared memory than a block may have: not run
            continue
        runs[index] = call
    if 0 not in runs:
        raise RuntimeError(f"{spec.key()}: the configuration's kernel with {tilings[0]} did not compile or run")
    order = sorted(runs)
    times = dict(zip(order, time_checked(spec, [((lambda s, c: c), (runs[i],)) for i in order])))
    if bar is not None:
        bar.update(len(tilings))
    return [times.get(i) for i in range(len(tilings))]


def start_tilings(spec: DeformConvSpec, target: tvm.target.Target) -> list:
    """The search's start: the configuration's default tiling, then the tiling of the tuned record
    of ``spec``'s own size (``runtime.records.tuned_database``) where there is one and the
    configuration's space has it (``of_size``)."""
    from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling

    space = tilings_space(spec, target)
    start = [space.default()]
    directory = tuned_database(spec, target)
    if directory is not None:
        _, sch = best_schedule(directory, target)
        recorded = None if sch is None else TensorCoreTiling.of_trace(sch.trace, spec)
        tiling = None if recorded is None else space.of_size(recorded)
        if tiling is not None and tiling not in start:
            start.append(tiling)
    return start


def tune_forward_configuration(spec: DeformConvSpec, profile: str, target: tvm.target.Target, device_name: str,
                               measure: Callable = measure_configuration_forward, rounds: int = ROUNDS) -> dict:
    """The record of the fastest tiling of ``spec``'s layer configuration's forward (``spec``: a
    kernel spec of one size, ``schedules.kernel_spec``; the times are at its sizes): the
    configuration's spec, the size measured at (``measured_at``), the profile (its name and
    statistics, ``tuning.stats.profile_digest``), the device, the tiling and every candidate with
    its time (ms, or None: rejected), searched as the module docstring says. ``measure``:
    ``measure_configuration_forward`` on a GPU. Raises ValueError where the configuration has no
    tiling search (``tilings_space``), RuntimeError where its default does not run."""
    space = tilings_space(spec, target)
    tried = start_tilings(spec, target)
    times = measure(spec, profile, target, tried)
    for _ in range(rounds):
        best = min((i for i, ms in enumerate(times) if ms is not None), key=times.__getitem__)
        new = [t for t in space.neighbours(tried[best]) if t not in tried]
        if not new:
            break
        # The default first again: the candidates' outputs are checked against it.
        measured = measure(spec, profile, target, [tried[0], *new])
        tried, times = tried + new, times + measured[1:]
    best = min((i for i, ms in enumerate(times) if ms is not None), key=times.__getitem__)
    return {"spec": generic_spec(spec).to_dict(), "measured_at": spec.to_dict(), "profile": profile,
            "profile_digest": profile_digest(profile), "device": device_name, "target": str(target.attrs["arch"]),
            "tiling": space.to_dict(tried[best]),
            "candidates": [[space.to_dict(t), None if ms is None else round(ms, 5)] for t, ms in zip(tried, times)]}


def record_times(record: dict) -> tuple[float, float]:
    """``(best, default)`` time (ms) of a ``tune_forward_configuration`` record."""
    times = [ms for _, ms in record["candidates"]]
    return min(ms for ms in times if ms is not None), times[0]
