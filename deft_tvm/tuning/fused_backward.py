"""Tiling search of the fused CUDA backward on profile-distributed offsets, beside the op.

The fused kernels (``schedules/cuda_backward_fused.py``) are TIR generated from a ``DataTiling``
(grad_input, grad_offset, grad_mask) and a ``WeightTiling`` (grad_weight, grad_bias); their design
space is ``data_space`` x ``weight_space``, tables of tilings around the defaults (each default a
point of its table; the data kernel's halos from the statistics of the offset profile's samples,
``profile_halos``). The two kernels are independent, so each is chosen on its own:
``tune_fused_backward`` compiles every candidate (in a pool of processes), runs
each kernel as the op does (with the sum of its splits' partial outputs, ``data_call``,
``weight_call``) on inputs whose offsets and mask follow the workload's offset profile, keeps
only the candidates whose gradients are the default's up to the dtype's tolerance (``agree``),
times those with CUDA events (``time_checked``), tries the fastest tilings with more loads in
flight (``refine_load_batch``), the fastest data tiling with other weight stages and tile shapes
(``refine_stages``, ``refine_tiles``) and with wider chunks in dynamic shared memory
(``refine_chunks``), and the fastest weight tiling with deeper steps in dynamic shared memory
(``refine_steps``), and returns the record of the fastest data and weight tilings with every
candidate's time (None: rejected; ``kernels``: one kernel searched, the other kept from an
earlier record), which ``deft-tvm tune --fused-backward`` writes where
``runtime.records.recorded_fused_tilings`` finds it (the runtime then takes it over the
defaults).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from collections.abc import Callable

import tvm
from tvm.support.popen_pool import PopenPoolExecutor

from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.tolerances import assert_close_to_largest, tolerance_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import compile_kernel
from deft_tvm.schedules.cuda_backward_fused import (
    DTYPE_BYTES,
    DYNAMIC_SHARED_BYTES,
    PARTIAL_FLOATS,
    SHARED_BYTES,
    TILE_SHAPES,
    DataTiling,
    WeightTiling,
    backward_mma,
    default_tilings,
    fingerprint,
    grad_data_primfunc,
    grad_weight_primfunc,
    padded_positions,
    prepare_primfunc,
)
from deft_tvm.tuning.stats import profile_digest
from deft_tvm.tuning.timing import gpu_ms

HALOS = (2, 3, 4)  # px, the data kernel's halos searched (with the default's) where no offset profile is given
# With an offset profile, the halos its samples call for (``profile_halos``): from the smallest whose patches cover
# HALO_FLOOR of the samples to the smallest that covers HALO_CEILING; staged candidates covering less are pruned
# (``data_space``).
HALO_FLOOR = 0.84
HALO_CEILING = 0.995
LOAD_BATCHES = (4, 8, 16)  # loads in flight per thread (DataTiling.load_batch) tried on the fastest data tilings
WEIGHT_LOAD_BATCHES = (2, 4)  # channels' corners in flight per thread (WeightTiling.load_batch), fastest weight tilings
REFINED = 3  # the fastest tilings of each kernel tried with each of its load batches
TILE_POSITIONS = (64, 96, 128)  # positions (threads) per block of the tile shapes refine_tiles tries: whole warps
TILE_VARIANTS = 3  # the tile shapes refine_tiles tries, those that pad the output least
CHUNK_FACTOR = 2  # channels per chunk of refine_chunks' variants, times the fastest data tiling's
CHUNK_HALOS = 3  # halos of refine_chunks' variants: the fastest data tiling's and up to 2 px less
STEP_FACTORS = (2, 4)  # positions per step of the fastest weight tiling's variants, times its own (refine_steps)
PREFETCH_BYTES = 128  # grad_output fragments per thread of a prefetching data tiling, both buffers (32 registers)


def _unique(tilings) -> list:
    return list(dict.fromkeys(tilings))


def profile_halos(coverage) -> list[int]:
    """The halos (px) the data space searches for a tile shape whose patches cover ``coverage[h]``
    of the profile's samples with halo ``h`` (``stats.halo_coverage``, h = 0, 1, ...): from the
    smallest covering ``HALO_FLOOR`` to the smallest covering ``HALO_CEILING`` (the table's last
    where none does). The bounds come from the committed records on offsets ~N(0, 2 px): their
    tunings chose halos whose tiles cover 0.849 (r50 c4 float16, 1 px on 4 x 32) to 0.997 (4 px on
    8 x 16) of the samples, and past 99.5 % a larger patch serves fewer than 1 sample in 200 more
    while every pixel of it takes shared memory. On that profile: 1-4 px on 8 x 16 tiles (the
    registry's layers; 0-4 on train_down and 128ch), 1-5 on 4 x 32 (2-5 on the video layer); on
    N(0, 0.5 px) 0-1 px; on N(0, 8 px) 5-8 px or 8 alone (on the paper layer 8 px covers 0.87 of the
    samples, 4 px 0.68)."""
    last = len(coverage) - 1
    low = next((h for h, covered in enumerate(coverage) if covered >= HALO_FLOOR), last)
    high = next((h for h, covered in enumerate(coverage) if covered >= HALO_CEILING), last)
    return list(range(low, max(low, high) + 1))


def data_space(spec: DeformConvSpec, profile: str | None = None) -> list[DataTiling]:
    """The default data tiling first, then: every halo of ``profile_halos`` that fits (of the
    default's tile shape on offsets drawn from the registry's offset ``profile``,
    ``stats.profile_halo_coverage``), and those of ``HALOS`` without a profile or where the
    default's patches cover less than ``HALO_FLOOR`` of its samples, x channel splits within 4x of
    the default's (divisors of the chunks), the other tile shapes of ``TILE_SHAPES``, weight stages
    of half and twice the default's output channels (where they divide the group's), half the
    chunk's channels, tensor-core grad_columns (``DataTiling.for_spec(tensor_cores=True)``, where
    the dtype has an mma: float32 as 3xTF32, ``backward_mma``) and the same with a kernel row's
    taps per ``mma.sync`` pass (``tap_group``; the tensor-core tiling's and half its output
    channels per stage, its halo and up to 2 px less), float patches where the default has
    fixed-point ones, no patches (every corner through global memory: faster on r50 c5, whose
    blocks take few chunks), and the SIMT sums of a kernel row's or
    of every tap in one pass over grad_output (``tap_group``) with the default's and half its
    channels per chunk and output channels per weight stage; the tensor-core tap groups with their
    weight stages double-buffered (``pipelined``) and those with the next stage's grad_output
    fragments in flight too (``prefetch``; stages of at most ``PREFETCH_BYTES`` // 2 of fragments
    per thread, as both buffers live in registers); the tensor-core groups of every tap
    (``tap_group``: grad_output's tile loaded once per block instead of once per kernel row;
    pipelined, the tensor-core tiling's half and quarter output channels per stage, its halo and 1
    px less) in dynamic shared memory; and each staged one of these with the branch-free loop for
    samples whose corners are all in the patch (``interior_path``); only tilings that fit
    (``fits``) and, with a profile whose samples the default's patches cover to ``HALO_FLOOR``, of
    the staged ones only those whose patches do too (the default always). Measured on an H200 (r50
    c5 data kernel, ms, record's tiling / every tap per pass, pipelined, 16 output channels per
    stage): TF32 0.418 / 0.394, float16 0.371 / 0.397 (not pipelined: 0.362), float32 0.786 (SIMT) /
    0.757 (3xTF32)
    (``tools/results/fused_backward_c5_taps_h200_834608e.txt``); a re-tune of c5 TF32 over this
    space chose every tap per pass, prefetched, 8 output channels per stage: 0.368
    (``tools/results/fused_backward_prefetch_c5_tf32_h200_2cc6cde.txt``)."""
    default = DataTiling.for_spec(spec)
    opg = spec.out_channels // spec.groups
    chunks = spec.in_channels // spec.offset_groups // default.chunk
    splits = [s for s in range(1, chunks + 1)
              if chunks % s == 0 and default.channel_splits <= 4 * s and s <= 4 * default.channel_splits]
    r = dataclasses.replace
    halos, prune = HALOS, False
    if profile is not None:
        from deft_tvm.tuning.stats import profile_halo_coverage

        prune = _covers_floor(spec, profile, default)
        table = profile_halo_coverage(spec, profile, (default.tile_h, default.tile_w))
        halos = [h for h in profile_halos(table) if fits(spec, r(default, halo=h))] + list(HALOS) * (not prune)
    candidates = [default] + [r(default, halo=h, channel_splits=s) for h in sorted({*halos, default.halo})
                              for s in splits]
    candidates += [r(default, tile_h=th, tile_w=tw) for th, tw in TILE_SHAPES]
    candidates += [r(default, o_step=o_step) for o_step in (default.o_step // 2, 2 * default.o_step)
                   if o_step and opg % o_step == 0]
    if default.chunk % 2 == 0:  # divides whatever the chunk divides
        candidates.append(r(default, chunk=default.chunk // 2))
    taps = spec.kernel_h * spec.kernel_w
    mma, _ = backward_mma(spec) or (None, False)
    if mma is not None:
        tensor_cores = DataTiling.for_spec(spec, tensor_cores=True)
        candidates.append(tensor_cores)
        if spec.kernel_w > 1:  # a kernel row's taps per multiply, the halo and up to 2 px less
            halos = range(tensor_cores.halo, max(tensor_cores.halo - 3, -1), -1)
            o_steps = [o for o in (tensor_cores.o_step, tensor_cores.o_step // 2) if o and o % mma.k == 0]
            candidates += [r(tensor_cores, tap_group=spec.kernel_w, halo=halo, o_step=o_step)
                           for halo in halos for o_step in o_steps]
        if taps > spec.kernel_w:  # every tap per multiply, the halo and 1 px less
            o_steps = [o for o in (tensor_cores.o_step // 2, tensor_cores.o_step // 4) if o and o % mma.k == 0]
            halos = range(tensor_cores.halo, max(tensor_cores.halo - 2, -1), -1)
            candidates += [r(tensor_cores, tap_group=taps, halo=halo, o_step=o_step, pipelined=True)
                           for halo in halos for o_step in o_steps]
    if default.fixed_point:
        candidates.append(r(default, fixed_point=False))
    candidates.append(r(default, staged=False, fixed_point=False))
    for group in dict.fromkeys((spec.kernel_w, taps)):  # a kernel row, every tap
        if 1 < group and taps % group == 0:
            group_chunks = dict.fromkeys((default.chunk, default.chunk // 2 * (default.chunk % 2 == 0)))
            candidates += [r(default, tap_group=group, chunk=chunk, o_step=o_step)
                           for chunk in group_chunks if chunk
                           for o_step in (default.o_step, default.o_step // 2) if o_step and opg % o_step == 0]
    candidates += [r(t, pipelined=True) for t in candidates if t.tensor_cores and t.tap_group > 1]
    item = DTYPE_BYTES[spec.dtype]  # a thread holds a stage's o_step fragment elements (two m16 tiles)
    candidates += [r(t, prefetch=True, o_step=min(t.o_step, PREFETCH_BYTES // 2 // item)) for t in candidates
                   if t.pipelined]
    candidates += [r(t, interior_path=True) for t in candidates if t.staged]
    return _unique(t for t in candidates if fits(spec, t)
                   and not (prune and t != default and t.staged and not _covers_floor(spec, profile, t)))


def patch_coverage(spec: DeformConvSpec, profile: str, tiling: DataTiling) -> float:
    """The fraction of ``spec``'s samples drawn from the offset ``profile`` that ``tiling``'s
    patches (its tile plus its halo, px) cover (``stats.profile_halo_coverage``)."""
    from deft_tvm.tuning.stats import profile_halo_coverage

    table = profile_halo_coverage(spec, profile, (tiling.tile_h, tiling.tile_w))
    return table[min(tiling.halo, len(table) - 1)]


def _covers_floor(spec: DeformConvSpec, profile: str, tiling: DataTiling) -> bool:
    """Whether ``tiling``'s patches cover at least ``HALO_FLOOR`` of the profile's samples."""
    return patch_coverage(spec, profile, tiling) >= HALO_FLOOR


def fits(spec: DeformConvSpec, tiling: DataTiling) -> bool:
    """Whether a data block's shared memory fits: 48 KB of static shared memory, or
    ``DYNAMIC_SHARED_BYTES`` for the tensor-core groups of every tap, whose parked sums take most
    of it (``data_space``)."""
    every_tap = tiling.tensor_cores and tiling.tap_group == spec.kernel_h * spec.kernel_w > spec.kernel_w
    return tiling.shared_bytes(spec) <= (DYNAMIC_SHARED_BYTES if every_tap else SHARED_BYTES)


def weight_space(spec: DeformConvSpec) -> list[WeightTiling]:
    """The default weight tiling first, then: SIMT (the default's splits twice and half as many and
    32 positions per step, where the default is SIMT: float64) and tensor cores (where the dtype has
    an mma for grad_weight, ``backward_mma``: float32 without TF32 as 3xTF32) in blocks of up to
    64, 128 and 256 output channels x 32 or 64 positions per step x the fewest-waves splits, twice
    and half as many; only tilings within 48 KB of shared memory and ``PARTIAL_FLOATS`` partial sums."""
    default = WeightTiling.for_spec(spec)
    r = dataclasses.replace
    bases = [] if default.tensor_cores else [default, r(default, positions=32)]
    if backward_mma(spec) is not None:
        cores = [r(WeightTiling.for_spec(spec, o_channels=o, tensor_cores=True), positions=p)
                 for o in (64, 128, 256) for p in (32, 64)]
        bases += [r(t, splits=t.fewest_waves(spec)) for t in cores if t.shared_bytes(spec) <= SHARED_BYTES]
    candidates = [default]
    for base in bases:
        candidates += [base.with_splits(spec, splits) for splits in (base.splits, 2 * base.splits, base.splits // 2)]
    weights = spec.out_channels * spec.in_channels // spec.groups * spec.kernel_h * spec.kernel_w
    return _unique(t for t in candidates
                   if t.shared_bytes(spec) <= SHARED_BYTES and t.splits * weights <= max(PARTIAL_FLOATS, weights))


_CANDIDATE_FUNCTIONS = {"grad_data": ("prepare", "grad_data"), "grad_weight": ("grad_weight",)}


def _candidate_module(spec: DeformConvSpec, kind: str, tiling) -> tvm.IRModule:
    """The IRModule of a candidate: ``prepare`` and ``grad_data`` of a data tiling, ``grad_weight``
    of a weight tiling (only the kernels measured: each PrimFunc is TVMScript parsed in Python)."""
    if kind == "grad_data":
        return tvm.IRModule({"prepare": prepare_primfunc(spec, tiling), "grad_data": grad_data_primfunc(spec, tiling)})
    return tvm.IRModule({"grad_weight": grad_weight_primfunc(spec, tiling)})


def _candidate_library(spec: DeformConvSpec, target: tvm.target.Target, kind: str, tiling) -> tuple[str, str]:
    """``(name, fingerprint)`` of a candidate's library in the kernel disk cache."""
    data, weight = (tiling, None) if kind == "grad_data" else (None, tiling)
    return f"{spec.key()}-candidate-{kind}", fingerprint(spec, data, weight, str(target.attrs["arch"]))


def _compile_candidate(spec: DeformConvSpec, target: tvm.target.Target, kind: str, tiling) -> None:
    """Compile a candidate into the kernel disk cache (a process pool's job)."""
    kernel_cache.build_into_cache(*_candidate_library(spec, target, kind, tiling), target,
                                  lambda: compile_kernel(_candidate_module(spec, kind, tiling), target))


def _candidate_jobs(data: list[DataTiling], weight: list[WeightTiling]) -> list[tuple[str, object]]:
    """``(kernel, tiling)`` of each data and then weight candidate, the order of their libraries."""
    return [("grad_data", t) for t in data] + [("grad_weight", t) for t in weight]


@contextlib.contextmanager
def compile_pool(pool: PopenPoolExecutor | None = None):
    """``pool`` where given (left open), else a new pool of compiling processes, one per CPU core
    (TVM's ``PopenPoolExecutor``: fresh interpreters that do not run the caller's main script again,
    as ``multiprocessing``'s spawned ones would), shut down on exit. A search keeps one for all its
    rounds (``deft-tvm tune``, ``tune_model``): its workers, kept alive, import TVM's tensor
    intrinsics once (~35 s a process on an H100 host's CPU), not once per round."""
    if pool is not None:
        yield pool
        return
    pool = PopenPoolExecutor(os.cpu_count() or 1)
    try:
        yield pool
    finally:
        pool.shutdown()


def compile_candidate_libraries(spec: DeformConvSpec, target: tvm.target.Target, data: list[DataTiling],
                                weight: list[WeightTiling], bar=None, pool=None) -> list[tuple[str, str]]:
    """``(name, fingerprint)`` of each data and then weight candidate's library in the kernel disk
    cache (``kernel_cache.library_path``), those not there compiled into it first by ``pool``
    (``compile_pool``'s; a new one where not given): TVMScript parsing and TIR lowering hold
    Python's GIL, ~0.6 s a candidate on a 2-core CPU, so threads ran them one at a time; the cache
    lets a resumed search (``tune_model`` called again) load what it compiled before. ``bar``
    (tqdm-like), if given, shows "compiled k/n" (the cached ones counted at once) as the candidates
    are compiled."""
    jobs = _candidate_jobs(data, weight)
    libraries = [_candidate_library(spec, target, kind, tiling) for kind, tiling in jobs]
    missing = [job for job, library in zip(jobs, libraries)
               if not kernel_cache.library_path(*library, target).exists()]
    compiled = len(jobs) - len(missing)
    if bar is not None:
        bar.set_postfix_str(f"compiled {compiled}/{len(jobs)}")
    if missing:
        with compile_pool(pool) as workers:
            futures = [workers.submit(_compile_candidate, spec, target, kind, tiling) for kind, tiling in missing]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                compiled += 1
                if bar is not None:
                    bar.set_postfix_str(f"compiled {compiled}/{len(jobs)}")
    return libraries


def compile_candidates(spec: DeformConvSpec, target: tvm.target.Target, data: list[DataTiling],
                       weight: list[WeightTiling], bar=None,
                       pool=None) -> tuple[list[dict[str, Callable]], list[Callable]]:
    """The compiled ``prepare`` and ``grad_data`` (a dict by name) of each data tiling and the
    ``grad_weight`` of each weight tiling, loaded here from the kernel disk cache
    (``compile_candidate_libraries`` compiles those not there; ``bar`` and ``pool`` as there)."""
    libraries = compile_candidate_libraries(spec, target, data, weight, bar, pool)
    kernels = []
    for (kind, tiling), library in zip(_candidate_jobs(data, weight), libraries):
        functions = _CANDIDATE_FUNCTIONS[kind]
        loaded = kernel_cache.load_or_build_library(
            *library, target, lambda: compile_kernel(_candidate_module(spec, kind, tiling), target), functions)
        kernels.append(dict(zip(functions, loaded)) if kind == "grad_data" else loaded[0])
    return kernels[:len(data)], kernels[len(data):]


def profile_inputs(spec: DeformConvSpec, profile: str, seed: int = 0, device: str = "cuda") -> dict:
    """The kernels' inputs on ``device`` (torch tensors): the workload's tensors (offsets and mask
    from ``profile``), the input flattened to ``[N, C, H * W]``, and a seeded random grad_output."""
    import torch

    from deft_tvm.tuning.workloads import Workload

    inputs = Workload("tuning", spec, profile).make_inputs(seed=seed, device=device)
    n, c, h, w = spec.input_shape
    gen = torch.Generator().manual_seed(seed + 1)
    return {**inputs, "input": inputs["input"].contiguous().view(n, c, h * w),
            "grad_output": torch.randn(spec.output_shape, generator=gen).to(inputs["input"].dtype).to(device)}


def data_arguments(spec: DeformConvSpec, tiling: DataTiling, inputs: dict, empty: Callable,
                   view: Callable) -> tuple[list, list, list]:
    """``(prepare's arguments, grad_data's arguments, [grad_input, grad_offset partials, grad_mask
    partials?])`` of a data tiling as the op passes them (``backward_entry``), the outputs made by
    ``empty(shape)`` (float32), ``view(tensor, shape)`` a view of one: grad_input ``[N, C, H * W]``
    (flat for ``prepare``, which zeroes it and writes the bound tables), the channel splits' partial
    sums of grad_offset and grad_mask (``[splits, *offset / mask shape]``), the bound tables."""
    n, c, h, w = spec.input_shape
    mask = [inputs["mask"]] * spec.has_mask
    grad_input = empty((n, c, h * w))
    partials = [empty((tiling.channel_splits, *spec.offset_shape))]
    partials += [empty((tiling.channel_splits, *spec.mask_shape))] * spec.has_mask
    tables = tiling.bound_elements(spec)
    bounds = [empty((tables,))] * (tables > 0)
    operands = [inputs["weight"], inputs["grad_output"]] * (tables > 0)
    prepare = [view(grad_input, (n * c * h * w,)), *operands, *bounds]
    grad_data = [inputs["input"], inputs["offset"], *mask, inputs["weight"], inputs["grad_output"], grad_input,
                 *partials, *bounds]
    return prepare, grad_data, [grad_input, *partials]


def weight_arguments(spec: DeformConvSpec, tiling: WeightTiling, inputs: dict, empty: Callable,
                     view: Callable) -> tuple[list, list]:
    """``(grad_weight's arguments, [grad_weight partials, grad_bias partials?])`` of a weight tiling,
    the partial sums of its splits (``[splits, O, C / groups, taps]``, ``[splits, O]``; float32)
    made by ``empty(shape)``, grad_output viewed (``view(tensor, shape)``) as ``[N, O, positions]``."""
    mask = [inputs["mask"]] * spec.has_mask
    o, ipg, taps = spec.out_channels, spec.in_channels // spec.groups, spec.kernel_h * spec.kernel_w
    partials = [empty((tiling.splits, o, ipg, taps))]
    partials += [empty((tiling.splits, o))] * spec.has_bias
    grad_output = view(inputs["grad_output"], (spec.batch, o, spec.out_h * spec.out_w))
    return [inputs["input"], inputs["offset"], *mask, grad_output, *partials], partials


def _cuda_empty(shape):
    import torch

    return torch.empty(shape, device="cuda")


def _torch_view(tensor, shape):
    return tensor.view(shape)


def data_call(spec: DeformConvSpec, kernels, tiling: DataTiling, inputs: dict) -> Callable:
    """A call of a compiled ``prepare`` and ``grad_data`` (``kernels``, one module) as the op makes
    it (``data_arguments``), the channel splits' grad_offset and grad_mask added up; the call
    returns ``[grad_input, grad_offset, grad_mask?]``."""
    prepare_args, data_args, (grad_input, *partials) = data_arguments(spec, tiling, inputs, _cuda_empty, _torch_view)
    prepare, grad_data = kernels["prepare"], kernels["grad_data"]

    def call():
        prepare(*prepare_args)
        grad_data(*data_args)
        return [grad_input, *(p[0] if len(p) == 1 else p.sum(0) for p in partials)]

    return call


def weight_call(spec: DeformConvSpec, kernel: Callable, tiling: WeightTiling, inputs: dict) -> Callable:
    """A call of a compiled ``grad_weight`` (``weight_arguments``) and the sum of its splits (a torch
    sum in place of the op's ``weight_reduce``); the call returns ``[grad_weight, grad_bias?]`` as
    partial-sum layouts summed over the splits."""
    arguments, partials = weight_arguments(spec, tiling, inputs, _cuda_empty, _torch_view)

    def call():
        kernel(*arguments)
        return [p.sum(0) for p in partials]

    return call


def agree(got: list, expected: list, key: str) -> bool:
    """Whether each of ``got`` equals ``expected``'s up to the tolerance row ``key``, relative to the
    largest |expected| (``tolerances.assert_close_to_largest``: gradients sum many samples), NaN
    where it has NaN."""
    try:
        for actual, wanted in zip(got, expected):
            assert_close_to_largest(actual, wanted, key)
    except AssertionError:
        return False
    return True


def time_checked(spec: DeformConvSpec, calls, bar=None) -> list[float | None]:
    """GPU time (ms, ``timing.gpu_ms``) of each of ``calls`` (``(make_call, args)`` pairs, the
    default's first), or None for a candidate whose gradients are not the default's (``agree``;
    such a candidate is never chosen); ``bar`` (tqdm-like), if given, advanced by one per call."""
    key = tolerance_key(spec.dtype, spec.tf32)
    expected, times = None, []
    for make, args in calls:
        call = make(spec, *args)
        got = call()
        if expected is None:
            expected = [t.clone() for t in got]
        times.append(gpu_ms(call) if agree(got, expected, key) else None)
        del call, got
        if bar is not None:
            bar.update(1)
    return times


def measure_candidates(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                       weight: list[WeightTiling], bar=None, pool=None) -> tuple[list[float | None],
                                                                                 list[float | None]]:
    """GPU time (ms) of each data and weight candidate, each kernel and the sum of its splits alone on
    ``profile_inputs``; None for a candidate whose gradients differ from the default's. ``bar``
    (tqdm-like, e.g. ``tune_fused_backward``'s ``measure=functools.partial(measure_candidates,
    bar=bar)``), if given: its total grows by the round's candidates, it shows their compiles
    (``compile_candidates``) and advances by one per candidate measured (``time_checked``).
    ``pool``: the search's compiling processes (``compile_pool``; a new one where not given)."""
    if bar is not None:
        bar.total += len(data) + len(weight)
        bar.refresh()
    data_kernels, weight_kernels = compile_candidates(spec, target, data, weight, bar, pool)
    inputs = profile_inputs(spec, profile)
    return (time_checked(spec, [(data_call, (k, t, inputs)) for k, t in zip(data_kernels, data)], bar),
            time_checked(spec, [(weight_call, (k, t, inputs)) for k, t in zip(weight_kernels, weight)], bar))


def _refine_round(spec: DeformConvSpec, profile: str, target: tvm.target.Target, tilings: list, times: list,
                  reference: int, variants: list, measure: Callable, kernel: str):
    """``(tilings, times, best)`` extended by ``variants`` (those not yet measured), measured in one
    round after ``tilings[reference]`` as it is (their reference: gradients checked against it, and
    the time a variant must beat, both from the same round); ``best`` the fastest variant that beats
    it, else ``reference``."""
    variants = [t for t in _unique(variants) if t not in tilings]
    if not variants:
        return tilings, times, reference
    candidates = [tilings[reference], *variants]
    measured = (measure(spec, profile, target, candidates, [])[0] if kernel == "data"
                else measure(spec, profile, target, [], candidates)[1])
    again, variant_ms = measured[0], measured[1:]
    better = [k for k, ms in enumerate(variant_ms) if ms is not None and again is not None and ms < again]
    best = len(tilings) + min(better, key=lambda k: variant_ms[k]) if better else reference
    return tilings + variants, times + variant_ms, best


def refine_load_batch(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list,
                      data_ms: list[float | None], measure: Callable = measure_candidates, kernel: str = "data"):
    """``(tilings, times, best)``: the ``kernel``'s tilings ("data" or "weight") and their times
    extended by the ``REFINED`` fastest ones with each of ``LOAD_BATCHES`` staging loads in flight
    per thread (weight: ``WEIGHT_LOAD_BATCHES`` channels' corners), measured in one round after the
    fastest (``_refine_round``), and the index of the fastest. Measured on an H200 (data kernel ms,
    records' tilings at 1 / 4 / 8 / 16 loads): r50 c5 fp16 0.587 / 0.555 / 0.604 / 0.586, TF32
    0.611 / 0.544 / 0.574 / 0.518, c4 TF32 0.656 / 0.610 / 0.511 / 0.495, paper N=32 TF32 1.050 /
    0.994 / 0.994 / 1.007, fp16 1.024 / 1.013 / 1.022 / 1.026
    (``tools/results/fused_backward_load_batch_h200.txt``); weight kernel ms at 1 / 2 / 4 corners:
    r50 c4 fp16 0.393 / 0.227 / 0.228, c5 fp16 0.352 / 0.345 / 0.364, paper N=32 TF32 0.515 /
    0.495 / 0.494 (``tools/results/fused_backward_stages_h200.txt``): which wins depends on the
    registers left (a batch can spill), so it is searched. The weight kernel's variants then come
    again with grad_output staged by asynchronous copies (``WeightTiling.async_copy``, where
    ``copies_async``): ncu of r50 c5's weight records (``tools/results/ncu_grad_weight_c5_h200_a6c0975.txt``)
    found 37-38 % of their warp-stall samples in the staging loop, each thread waiting on one
    grad_output load after another (long scoreboard)."""
    ranked = sorted((i for i, ms in enumerate(data_ms) if ms is not None), key=lambda i: data_ms[i])[:REFINED]
    batches = LOAD_BATCHES if kernel == "data" else WEIGHT_LOAD_BATCHES
    batched = [dataclasses.replace(data[i], load_batch=b) for i in ranked for b in batches]
    if kernel == "weight":
        batched += [dataclasses.replace(t, async_copy=True) for t in [data[i] for i in ranked] + batched
                    if t.copies_async(spec)]
    return _refine_round(spec, profile, target, data, data_ms, ranked[0], batched, measure, kernel)


def refine_stages(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                  data_ms: list[float | None], best: int, measure: Callable = measure_candidates):
    """``(tilings, times, best)``: the data tilings extended by ``data[best]``'s ``stage_variants``,
    measured in one round after it (``_refine_round``). The space holds half stages and the double
    buffer on its own tilings at one load in flight; with the staging loads batched the balance
    moves (an H200, data kernel ms, record's tiling / half stages / half and double-buffered: r50 c5
    fp16 0.555 / 0.511 / 0.529, c4 fp16 0.649 / 0.600 / 0.618, c5 TF32 0.513 / 0.514 / 0.474;
    ``tools/results/fused_backward_stages_h200.txt``)."""
    return _refine_round(spec, profile, target, data, data_ms, best, stage_variants(spec, data[best]), measure,
                         "data")


def refine_tiles(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                 data_ms: list[float | None], best: int, measure: Callable = measure_candidates):
    """``(tilings, times, best)``: the data tilings extended by ``data[best]``'s ``tile_variants``,
    measured in one round after it (``_refine_round``). The space's tiles are 128 positions, which
    pad maps such as r50 c5's 25 x 42 by up to 46 % (8 x 16 tiles cover 32 x 48): blocks of 64 or
    96 positions pad them less (2 x 48: 19 %), at the cost of a larger halo per position. Measured
    on an H200 (c5 data kernel ms, the record's 8 x 16 / its variants): float16 0.425 / 0.505 (2 x
    48), 0.455 (4 x 24), 0.583 (16 x 6); TF32 0.484 / 0.540 (4 x 24), 0.750 (16 x 6), 0.651 (4 x
    16) (``tools/results/fused_backward_tiles_h200.txt``): the halo won there."""
    return _refine_round(spec, profile, target, data, data_ms, best, tile_variants(spec, data[best]), measure,
                         "data")


def tile_variants(spec: DeformConvSpec, tiling: DataTiling) -> list[DataTiling]:
    """``tiling`` in the ``TILE_VARIANTS`` tile shapes of ``TILE_POSITIONS`` positions (at most 16
    rows, at least 4 columns) that pad the output least, of equals the larger blocks and fewer rows,
    only those that pad it less than ``tiling``'s own and fit 48 KB of shared memory."""
    own = padded_positions(spec, tiling.tile_h, tiling.tile_w)
    shapes = [(rows, positions // rows) for positions in TILE_POSITIONS for rows in range(1, 17)
              if positions % rows == 0 and positions // rows >= 4]
    shapes = sorted((s for s in shapes if padded_positions(spec, *s) < own),
                    key=lambda s: (padded_positions(spec, *s), -s[0] * s[1], s[0]))
    variants = [dataclasses.replace(tiling, tile_h=rows, tile_w=cols) for rows, cols in shapes]
    return [t for t in variants if fits(spec, t)][:TILE_VARIANTS]


def stage_variants(spec: DeformConvSpec, tiling: DataTiling) -> list[DataTiling]:
    """``tiling`` with weight stages of half its output channels (where they stay a multiple of the
    mma depth) and, for tensor-core tap groups, with its weight stages double-buffered or not and
    both, and double-buffered with grad_output's fragments prefetched (``prefetch``); only those
    that fit (``fits``)."""
    r = dataclasses.replace
    half = tiling.o_step // 2
    stages = [tiling]
    if tiling.o_step % 2 == 0 and not (tiling.tensor_cores and half % backward_mma(spec)[0].k):
        stages.append(r(tiling, o_step=half))
    variants = stages[1:]
    if tiling.tensor_cores and tiling.tap_group > 1:
        variants += [r(t, pipelined=not tiling.pipelined, prefetch=False) for t in stages]
        variants += [r(t, pipelined=True, prefetch=not tiling.prefetch) for t in stages]
    return [t for t in variants if fits(spec, t)]


def refine_chunks(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                  data_ms: list[float | None], best: int, measure: Callable = measure_candidates):
    """``(tilings, times, best)``: the data tilings extended by ``data[best]``'s ``chunk_variants``,
    measured in one round after it (``_refine_round``). Every chunk of a block multiplies the whole
    of grad_output's tile by the chunk's weights, so a block re-reads grad_output once per chunk:
    r50 c5's records take 8-channel chunks in 64 channel splits, 64 reads of each grad_output value
    for 512 channels. Chunks of twice the channels halve the reads (and the block barriers per
    channel), at the cost of patches past 48 KB of static shared memory (dynamic shared memory,
    fewer resident blocks); a smaller halo wins some of that back. Measured on an H200 over every
    committed record (data kernel ms, record's / fastest wider variant): r50 c5 TF32 0.469 / 0.596,
    float16 0.425 / 0.467, c4 TF32 0.494 / 0.803, paper N=32 float16 1.007 / 1.138, paper N=1
    float16 0.091 / 0.084 (``tools/results/fused_backward_chunks_h200_d54fe0e.txt``): the fewer
    resident blocks cost more than the re-reads save except on the smallest layer, so it is
    searched."""
    return _refine_round(spec, profile, target, data, data_ms, best, chunk_variants(spec, data[best]), measure,
                         "data")


def chunk_variants(spec: DeformConvSpec, tiling: DataTiling) -> list[DataTiling]:
    """``tiling`` with ``CHUNK_FACTOR`` times its channels per chunk (where they divide the offset
    group's and the group's channels), each with its channel splits and half as many (where they
    divide the wider chunks), its halo and up to ``CHUNK_HALOS`` - 1 px less; only those within
    ``DYNAMIC_SHARED_BYTES`` of shared memory."""
    chunk = tiling.chunk * CHUNK_FACTOR
    cpg, ipg = spec.in_channels // spec.offset_groups, spec.in_channels // spec.groups
    if cpg % chunk or ipg % chunk:
        return []
    splits = [s for s in dict.fromkeys((tiling.channel_splits, tiling.channel_splits // 2))
              if s and cpg // chunk % s == 0]
    halos = range(tiling.halo, max(tiling.halo - CHUNK_HALOS, -1), -1)
    variants = [dataclasses.replace(tiling, chunk=chunk, channel_splits=s, halo=h) for s in splits for h in halos]
    return [t for t in variants if t.shared_bytes(spec) <= DYNAMIC_SHARED_BYTES]


def refine_steps(spec: DeformConvSpec, profile: str, target: tvm.target.Target, weight: list[WeightTiling],
                 weight_ms: list[float | None], best: int, measure: Callable = measure_candidates):
    """``(tilings, times, best)``: the weight tilings extended by ``weight[best]``'s ``step_variants``,
    measured in one round after it (``_refine_round``). The space's steps fit 48 KB of static
    shared memory, which holds a TF32 block of 256 x 64 channels only 32 positions deep (ncu of r50
    c5's: three barriers per step, long-scoreboard and barrier stalls,
    ``tools/results/ncu_stalls_c5_h200_cf367c3.txt``); deeper steps take dynamic shared memory.
    Measured on an H200 (weight kernel ms, committed tiling / 2x / 4x deep): paper N=1 float16 0.050
    / 0.039 / 0.053, N=8 float16 0.151 / 0.154 / 0.134, c4 TF32 0.285 / 0.271 / 0.374, c5 TF32 0.389
    / 0.382 / 0.519, c3 float16 0.302 / 0.341 / 0.398 (``tools/results/fused_backward_steps_h200.txt``):
    small layers gain most, so it is searched."""
    return _refine_round(spec, profile, target, weight, weight_ms, best, step_variants(spec, weight[best]), measure,
                         "weight")


def step_variants(spec: DeformConvSpec, tiling: WeightTiling) -> list[WeightTiling]:
    """``tiling`` with ``STEP_FACTORS`` times its positions per step (tensor cores only), each with
    the fewest-waves splits (``WeightTiling.fewest_waves``, within ``PARTIAL_FLOATS`` partial sums),
    only those that fit a block (``WeightTiling.fits``: static tables within 48 KB, all within
    ``DYNAMIC_SHARED_BYTES``) and at most the layer's positions deep."""
    if not tiling.tensor_cores:
        return []
    total = spec.batch * spec.out_h * spec.out_w
    deeper = [dataclasses.replace(tiling, positions=tiling.positions * f) for f in STEP_FACTORS
              if tiling.positions * f <= total]
    return [dataclasses.replace(t, splits=t.fewest_waves(spec)) for t in deeper if t.fits(spec)]


KERNELS = ("data", "weight")  # the fused backward's two searched kernels (grad_data, grad_weight)


def _compile_configuration_entry(spec: DeformConvSpec, target: tvm.target.Target, data: DataTiling,
                                 weight: WeightTiling) -> None:
    """Compile the fused entry of ``spec``'s layer configuration with these tilings into the kernel
    disk cache, where the op then loads it (a process pool's job; a configuration's size variables
    are TVM objects of one process, so the worker takes ``spec``)."""
    from deft_tvm.runtime.backward import fused_library

    name, fingerprint_, build = fused_library(generic_spec(spec), target, data, weight)
    kernel_cache.build_into_cache(name, fingerprint_, target, build)


def entry_call(spec: DeformConvSpec, kernels, inputs: dict) -> Callable:
    """A call of a fused entry (``runtime.backward.FusedKernels``, of ``spec`` or of its layer
    configuration) as the op makes it (``runtime.backward.run_fused_backward``) on ``inputs``
    (``Workload.make_inputs``' and ``grad_output``); the call returns the gradients."""
    from deft_tvm.runtime.backward import run_fused_backward

    mask = inputs["mask"] if spec.has_mask else None

    def call():
        gradients = run_fused_backward(spec, kernels, inputs["grad_output"], inputs["input"], inputs["offset"], mask,
                                       inputs["weight"])
        return [g for g in gradients if g is not None]

    return call


def measure_configuration(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                          weight: list[WeightTiling], bar=None, pool=None) -> tuple[list[float | None],
                                                                                    list[float | None]]:
    """GPU time (ms) of each data and weight candidate of ``spec``'s layer configuration
    (``generic_spec``) at ``spec``'s sizes: its whole fused entry as the op runs it (``entry_call``;
    the kernels of a configuration bind its sizes in the entry, so they are not run alone), a data
    tiling beside the configuration's default weight tiling and a weight tiling beside its default
    data tiling (``default_tilings``), on inputs drawn from ``profile``; None for a candidate whose
    gradients differ from the first's, whose entry would not serve these sizes
    (``runtime.backward.serves``), as the op would not run it there, or whose entry does not compile
    for the configuration (e.g. a weight tiling's asynchronous copies of grad_output's runs, which
    need runs of 4 bytes or more: a configuration's are of unknown length). The entries are
    compiled by ``pool`` (``compile_pool``'s; a new one where not given) into the kernel disk cache,
    where the op finds the chosen one. ``bar``: as ``measure_candidates``'."""
    import torch

    from deft_tvm.runtime.backward import fused_kernels, serves
    from deft_tvm.tuning.workloads import Workload

    configuration = generic_spec(spec)
    data_default, weight_default = default_tilings(configuration, str(target.attrs["arch"]))
    pairs = [(t, weight_default) for t in data] + [(data_default, t) for t in weight]
    usable = [pair for pair in dict.fromkeys(pairs) if serves(spec, configuration, *pair)]
    if bar is not None:
        bar.total += len(pairs)
        bar.refresh()
    with compile_pool(pool) as workers:
        futures = [(workers.submit(_compile_configuration_entry, spec, target, *pair), pair) for pair in usable]
        for future, pair in futures:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a tiling the configuration's kernels cannot take is not run
                usable.remove(pair)
    inputs = Workload("tuning", spec, profile).make_inputs(device="cuda")
    generator = torch.Generator().manual_seed(1)
    inputs["grad_output"] = torch.randn(spec.output_shape, generator=generator).to(inputs["input"])
    kernels = [fused_kernels(configuration, target, *pair) for pair in usable]
    times = dict(zip(usable, time_checked(spec, [(entry_call, (k, inputs)) for k in kernels], bar)))
    if bar is not None:  # the candidates not run: repeated pairs and those that do not serve these sizes
        bar.update(len(pairs) - len(usable))
    measured = [times.get(pair) for pair in pairs]
    return measured[:len(data)], measured[len(data):]


def record_times(record: dict) -> tuple[float, float]:
    """``(best, default)`` time (ms) of a ``tune_fused_backward`` record: grad_data's plus
    grad_weight's fastest and default times, or of a configuration's record (``"times": "entry"``)
    the fastest entry measured and the entry with the default tilings."""
    times = [[ms for _, ms in record[f"{kind}_ms"]] for kind in KERNELS]
    if record.get("times") == "entry":
        return min(ms for kind in times for ms in kind if ms is not None), times[0][0]
    return sum(min(ms for ms in kind if ms is not None) for kind in times), sum(kind[0] for kind in times)


def tune_fused_backward(spec: DeformConvSpec, profile: str, target: tvm.target.Target, device_name: str,
                        measure: Callable = measure_candidates, kernels: tuple[str, ...] = KERNELS,
                        kept: dict | None = None, configuration: bool = False) -> dict:
    """The record of ``spec``'s fastest data and weight tilings on ``target`` (``measure``: the
    candidates' times, ``measure_candidates`` on a GPU; None for a rejected one): the spec, the
    profile (its name and statistics, ``tuning.stats.profile_digest``), the device, the two
    tilings, and every candidate with its time (ms, or None): the two spaces', then the fastest
    ones' with more loads in flight (``refine_load_batch``), then the fastest data tiling's with
    other weight stages (``refine_stages``), then in other tile shapes (``refine_tiles``), then with
    wider chunks (``refine_chunks``), and the fastest weight tiling's with deeper steps
    (``refine_steps``). Only the ``kernels`` named are searched ("data",
    "weight"); the other's tiling and times are those of ``kept``, an earlier record of the same
    spec (the two kernels are independent).

    With ``configuration``, the record is that of ``spec``'s layer configuration (``generic_spec``:
    the entry every batch and image size of it runs where no record of its own sizes is,
    ``runtime.backward.fused_choice``), searched over the configuration's default tilings
    (``default_tilings``) and then ``spec``'s spaces at ``spec``'s sizes (``measured_at``), with
    ``measure``: ``measure_configuration``, whose times are those of the whole entry
    (``"times": "entry"``).

    Raises ValueError for other kernel names, for a kernel left out without a record of the spec
    to keep it from, or with ``configuration`` where its entry does not serve ``spec``'s sizes
    (indices past int32)."""
    if not kernels or set(kernels) - set(KERNELS):
        raise ValueError(f"kernels: some of {KERNELS}, got {tuple(kernels)}")
    recorded = generic_spec(spec) if configuration else spec
    if set(kernels) != set(KERNELS) and (kept is None or DeformConvSpec.from_dict(kept["spec"]) != recorded):
        raise ValueError(f"searching only {', '.join(kernels)} keeps the other kernel's tiling from a record of "
                         f"{recorded.key()}, got {'none' if kept is None else kept['spec']}")
    data = data_space(spec, profile) if "data" in kernels else []
    weight = weight_space(spec) if "weight" in kernels else []
    if configuration:
        from deft_tvm.runtime.backward import serves

        arch = str(target.attrs["arch"])
        defaults = default_tilings(recorded, arch)
        if not serves(spec, recorded, *defaults):
            raise ValueError(f"{spec.key()}: its configuration's fused backward does not serve these sizes "
                             f"(indices past int32); tune a smaller size of it")
        data = _unique([defaults[0], *data]) if "data" in kernels else []
        weight = _unique([defaults[1], *weight]) if "weight" in kernels else []
    data_ms, weight_ms = measure(spec, profile, target, data, weight)
    record = {"spec": recorded.to_dict(), "profile": profile, "profile_digest": profile_digest(profile),
              "device": device_name, "target": str(target.attrs["arch"])}
    if configuration:
        record.update(measured_at=spec.to_dict(), times="entry")
    if "data" in kernels:
        data, data_ms, best_data = refine_load_batch(spec, profile, target, data, data_ms, measure)
        data, data_ms, best_data = refine_stages(spec, profile, target, data, data_ms, best_data, measure)
        data, data_ms, best_data = refine_tiles(spec, profile, target, data, data_ms, best_data, measure)
        data, data_ms, best_data = refine_chunks(spec, profile, target, data, data_ms, best_data, measure)
        record["data"] = dataclasses.asdict(data[best_data])
        record["data_ms"] = [[dataclasses.asdict(t), ms] for t, ms in zip(data, data_ms)]
    else:
        record["data"], record["data_ms"] = kept["data"], kept["data_ms"]
    if "weight" in kernels:
        weight, weight_ms, best_weight = refine_load_batch(spec, profile, target, weight, weight_ms, measure,
                                                           "weight")
        weight, weight_ms, best_weight = refine_steps(spec, profile, target, weight, weight_ms, best_weight, measure)
        record["weight"] = dataclasses.asdict(weight[best_weight])
        record["weight_ms"] = [[dataclasses.asdict(t), ms] for t, ms in zip(weight, weight_ms)]
    else:
        record["weight"], record["weight_ms"] = kept["weight"], kept["weight_ms"]
    return record
