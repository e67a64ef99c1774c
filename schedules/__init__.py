"""Schedules for the deft_tvm compute, one module per target kind (installed as ``deft_tvm.schedules``).

The compute in ``deft_tvm.compute`` is pure; every fusion, tiling, parallelisation and binding
decision lives here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tvm import s_tir

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import kernel_key

from .cpu import deft_cpu_space, schedule_cpu, seed_cpu_schedule
from .cpu_backward import backward_cpu_space, schedule_backward_cpu, seed_backward_cpu_schedule
from .cuda import deft_cuda_space, schedule_cuda, seed_cuda_schedule
from .cuda_backward import backward_cuda_space, schedule_backward_cuda, seed_backward_cuda_schedule
from .cuda_columns import columns_bytes, columns_cuda_space, schedule_columns_cuda, seed_columns_cuda_schedule
from .cuda_tensorcore import (
    ConfigurationTilings,
    deft_cuda_tensorcore_space,
    schedule_cuda_tensorcore,
    seed_tensorcore_schedule,
    supports_tensor_cores,
    tensorcore_refinements,
    tensorcore_transfer,
)


def _takes_tensor_cores(spec) -> bool:
    """Whether ``spec``'s CUDA kernel is the tensor-core schedule: the layer tiles into its
    fragments and the kernel gathers from channels-last tensors (``kernel_spec``)."""
    return supports_tensor_cores(spec) and spec.layout == "NHWC"


# Fewest input and output channels of a layer whose CUDA forward is unfused (``_takes_columns``),
# and the most bytes its columns may take (a temporary of each call).
UNFUSED_MIN_CHANNELS = 256
UNFUSED_MAX_COLUMNS_BYTES = 256 << 20


def _takes_columns(spec) -> bool:
    """Whether ``spec``'s CUDA forward is unfused: the columns kernel, then cuBLAS's GEMM of the
    columns and the weight (``deft_tvm.runtime.columns``). Taken by tensor-core layers
    (``_takes_tensor_cores``) of one group that multiply in float16, bfloat16 or TF32 and have
    at least ``UNFUSED_MIN_CHANNELS`` input and output channels, whose columns take at most
    ``UNFUSED_MAX_COLUMNS_BYTES`` (r50 c4 in TF32: 77 MB; a ``generic_spec``'s columns kernel, of
    every size, is compiled for the calls whose columns fit). There the fused kernel gathers
    every sample again for each block of output channels, while the columns (``in_channels x
    taps`` values per position) are small: on an H200
    (tools/results/unfused_forward_kernels_h200_255cf6c.txt) the unfused kernels took
    0.055-0.084 ms on r50dcn_c4/c5 against the fused 0.093-0.185 ms, and lost on every narrower
    registry layer (128 and 64 channels) and in float32 without TF32 (cuBLAS's SGEMM alone
    0.20-0.26 ms against the fused 3xTF32 0.23-0.30 ms)."""
    return (_takes_tensor_cores(spec) and spec.groups == 1 and (spec.dtype != "float32" or spec.tf32)
            and min(spec.in_channels, spec.out_channels) >= UNFUSED_MIN_CHANNELS
            and (spec.shape_generic or columns_bytes(spec) <= UNFUSED_MAX_COLUMNS_BYTES))


def _any_spec(spec) -> bool:
    return True


def _no_spec(spec) -> bool:
    return False


def _one_group(spec) -> bool:
    return spec.groups == 1


def _no_refinements(mod, spec, trace) -> dict:
    return {}


def _no_transfer(mod, spec, source, trace) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class ScheduleFamily:
    """One schedule structure and the kernels it applies to.

    ``applies(spec)`` narrows (``target_kind``, ``part``) further; ``default(mod, spec)`` schedules
    the unscheduled ``kernel_primfunc(spec, part)`` with fixed tiles; ``space(spec)`` is its DefT
    design space (a function scheduling a ``Schedule`` in place with sampled tiles);
    ``search_start(mod, spec)`` is the default expressed as decisions of that space;
    ``refinements(mod, spec, trace)`` gives ``{label: schedule}``, points of the space near a tuning
    record's trace that its search does not reach by mutating tile sizes (measured after it);
    ``transfer(mod, spec, source, trace)`` the point a record of the same layer in another dtype
    (``source``'s spec) decided, as a schedule of ``mod``, or None where there is none (a search's
    start from another dtype's records, ``deft-tvm tune --seed-from``); ``shape_generic(spec)``:
    whether ``default`` also schedules the PrimFunc of ``spec``'s ``compute.spec.generic_spec``
    (batch, height and width TIR variables; the tiles of their loops fixed and their tails
    predicated or padded), so that one kernel serves every size of a layer configuration
    (``shape_generic``); ``configuration_space(generic spec)``: where a configuration's kernel is
    searched (``deft-tvm tune --configuration``), its tilings (``default()``, ``admits``,
    ``neighbours``, ``schedule(mod, tiling)``, ``to_dict`` / ``from_dict``), else None.
    """

    name: str
    target_kind: str
    part: str
    applies: Callable
    default: Callable
    space: Callable
    search_start: Callable
    refinements: Callable = _no_refinements
    transfer: Callable = _no_transfer
    shape_generic: Callable = _no_spec  # default() also takes the spec's generic_spec: one kernel for every size
    configuration_space: Callable | None = None  # (generic spec) -> the tilings its configuration search tries


# The first family that applies to a kernel is its family (tensor cores before SIMT).
FAMILIES = (
    ScheduleFamily("cpu", "llvm", "forward", _any_spec, schedule_cpu, deft_cpu_space, seed_cpu_schedule,
                   shape_generic=_any_spec),
    ScheduleFamily("cpu_backward", "llvm", "backward", _any_spec, schedule_backward_cpu, backward_cpu_space,
                   seed_backward_cpu_schedule, shape_generic=_any_spec),
    ScheduleFamily("cuda_tensorcore", "cuda", "forward", _takes_tensor_cores, schedule_cuda_tensorcore,
                   deft_cuda_tensorcore_space, seed_tensorcore_schedule, tensorcore_refinements, tensorcore_transfer,
                   shape_generic=_any_spec, configuration_space=ConfigurationTilings),
    ScheduleFamily("cuda_simt", "cuda", "forward", _any_spec, schedule_cuda, deft_cuda_space, seed_cuda_schedule,
                   shape_generic=_one_group),
    ScheduleFamily("cuda_backward", "cuda", "backward", _any_spec, schedule_backward_cuda, backward_cuda_space,
                   seed_backward_cuda_schedule, shape_generic=_any_spec),
    ScheduleFamily("cuda_columns", "cuda", "columns", _takes_columns, schedule_columns_cuda, columns_cuda_space,
                   seed_columns_cuda_schedule, shape_generic=_any_spec),
)


def schedule_family(spec, target, part: str = "forward") -> ScheduleFamily:
    """The family of ``spec``'s ``part`` kernel on ``target``: the first of ``FAMILIES`` that
    applies. ValueError for an unknown part, NotImplementedError for a target kind without one."""
    kernel_key(spec, part)  # rejects unknown parts
    kind = target.kind.name
    for family in FAMILIES:
        if family.target_kind == kind and family.part == part and family.applies(spec):
            return family
    raise NotImplementedError(
        f"no deft_tvm schedule for target kind {kind!r}; have {sorted({f.target_kind for f in FAMILIES})}"
    )


def shape_generic(spec, target, part: str = "forward") -> bool:
    """Whether the default ``part`` kernel of ``spec`` on ``target`` can be the one of its layer
    configuration (``compute.spec.generic_spec``), which runs every batch and image size: its
    family's ``shape_generic`` (the CPU's forward and backward, the CUDA tensor-core forward and
    columns kernel, the SIMT forward of one group, the CUDA staged backward's gradient kernels),
    and the call's sizes indexable in int32 (the generic kernel's index type). The CUDA backward's
    fused kernels: ``runtime.backward.fused_choice``."""
    return schedule_family(spec, target, part).shape_generic(spec) and spec.index_dtype == "int32"


def configuration_space(spec, target, part: str = "forward"):
    """The tilings a search of the layer configuration ``spec`` (a ``generic_spec``) tries for its
    ``part`` kernel on ``target``: its family's ``configuration_space(spec)``, or None where the
    family has none (the tensor-core forward has one)."""
    space = schedule_family(spec, target, part).configuration_space
    return None if space is None else space(spec)


def unfused_forward(spec, target) -> bool:
    """Whether the forward of ``spec`` (a ``kernel_spec``) on ``target`` is unfused: a columns
    kernel (part ``columns``, whose family applies) and a library GEMM, instead of one kernel."""
    kind = target.kind.name
    return any(f.target_kind == kind and f.part == "columns" and f.applies(spec) for f in FAMILIES)


def register_tensor_intrinsics(target) -> None:
    """Register the tensor intrinsics ``target``'s schedules may use, before replaying a stored
    trace (a tuning record) that tensorizes: imported only then, as registering them is slow."""
    if target.kind.name == "cuda":
        from .cuda_warp_mma import register_warp_mma_intrinsics

        register_warp_mma_intrinsics()  # and TVM's WMMA/MMA intrinsics, which it imports


def kernel_spec(spec, target):
    """The spec of the kernel ``target`` runs for the call ``spec`` describes: on CUDA, layers the
    tensor-core schedule takes (``supports_tensor_cores``: float16, bfloat16, float32 on TF32 where
    ``spec.tf32`` allows it, else 3xTF32) gather from channels-last input and weight
    (``layout="NHWC"``); everything else reads NCHW in full precision."""
    channels_last = target.kind.name == "cuda" and supports_tensor_cores(spec)
    layout, tf32 = ("NHWC", spec.tf32) if channels_last else ("NCHW", False)
    # The op asks on every call: keep the spec (and its cached key) when it already fits.
    if (spec.layout, spec.tf32) == (layout, tf32):
        return spec
    return dataclasses.replace(spec, layout=layout, tf32=tf32)


def default_schedule(mod, spec, target, part: str = "forward") -> s_tir.Schedule:
    """The untuned schedule of ``spec``'s family, applied to ``kernel_primfunc(spec, part)``."""
    return schedule_family(spec, target, part).default(mod, spec)


def search_start(spec, target, part: str = "forward") -> s_tir.Schedule:
    """The schedule a search of ``design_space`` starts from: the default one, expressed (where
    it lies in the space) as decisions of the space's sampling instructions, so that the search
    can mutate it."""
    return schedule_family(spec, target, part).search_start(kernel_primfunc(spec, part), spec)


def refinements(spec, target, trace, part: str = "forward") -> dict:
    """``{label: schedule}`` of ``kernel_primfunc(spec, part)``: the points of ``design_space`` near
    ``trace`` (a tuning record's) that ``spec``'s family measures after its search (none for most)."""
    return schedule_family(spec, target, part).refinements(kernel_primfunc(spec, part), spec, trace)


def transferred(spec, target, source, trace, part: str = "forward"):
    """``kernel_primfunc(spec, part)`` scheduled as a record of ``source`` (the same layer in another
    dtype; ``trace``) decided, where ``spec``'s family can take it (``ScheduleFamily.transfer``):
    a schedule, or None."""
    return schedule_family(spec, target, part).transfer(kernel_primfunc(spec, part), spec, source, trace)


def design_space(spec, target, part: str = "forward"):
    """The DefT design space of ``spec``'s family: a function that schedules a ``Schedule`` of
    ``kernel_primfunc(spec, part)`` in place with tile sizes (threads per block for the CUDA
    backward) sampled by MetaSchedule."""
    return schedule_family(spec, target, part).space(spec)
