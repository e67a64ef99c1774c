"""Schedules for the deft_tvm compute, one module per target kind (installed as ``deft_tvm.schedules``).

The compute in ``deft_tvm.compute`` is pure; every fusion, tiling, parallelisation and binding
decision lives here.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from deft_tvm.compute import kernel_primfunc

from .cpu import deft_cpu_space, schedule_cpu, seed_cpu_schedule
from .cpu_backward import backward_cpu_space, schedule_backward_cpu, seed_backward_cpu_schedule
from .cuda import deft_cuda_space, schedule_cuda, seed_cuda_schedule
from .cuda_backward import backward_cuda_space, schedule_backward_cuda, seed_backward_cuda_schedule
from .cuda_tensorcore import (
    deft_cuda_tensorcore_space,
    schedule_cuda_tensorcore,
    seed_tensorcore_schedule,
    supports_tensor_cores,
)


def _takes_tensor_cores(spec) -> bool:
    """Whether ``spec``'s CUDA kernel is the tensor-core schedule: the layer tiles into its
    fragments and the kernel gathers from channels-last tensors (``kernel_spec``)."""
    return supports_tensor_cores(spec) and spec.layout == "NHWC"


def _schedule_cuda(mod, spec) -> s_tir.Schedule:
    """The tensor-core schedule where ``_takes_tensor_cores``, the SIMT schedule otherwise."""
    if _takes_tensor_cores(spec):
        return schedule_cuda_tensorcore(mod, spec)
    return schedule_cuda(mod, spec)


def _cuda_space(spec):
    """The tensor-core space where ``_takes_tensor_cores``, the SIMT space otherwise."""
    if _takes_tensor_cores(spec):
        return deft_cuda_tensorcore_space(spec)
    return deft_cuda_space(spec)


_DEFAULT_SCHEDULES = {"llvm": schedule_cpu, "cuda": _schedule_cuda}
_DESIGN_SPACES = {"llvm": deft_cpu_space, "cuda": _cuda_space}


def _check_kind(kind: str) -> None:
    if kind not in _DEFAULT_SCHEDULES:
        raise NotImplementedError(
            f"no deft_tvm schedule for target kind {kind!r}; have {sorted(_DEFAULT_SCHEDULES)}"
        )


def register_tensor_intrinsics(target) -> None:
    """Register the tensor intrinsics ``target``'s schedules may use, before replaying a stored
    trace (a tuning record) that tensorizes: imported only then, as registering them is slow."""
    if target.kind.name == "cuda":
        from .cuda_tf32 import register_tf32_intrinsics

        register_tf32_intrinsics()  # and TVM's WMMA/MMA intrinsics, which it imports


def kernel_spec(spec, target):
    """The spec of the kernel ``target`` runs for the call ``spec`` describes: on CUDA, layers the
    tensor-core schedule takes (float16; float32 where ``spec.tf32`` allows TF32) gather from
    channels-last input and weight (``layout="NHWC"``); everything else reads NCHW in full
    precision."""
    channels_last = target.kind.name == "cuda" and supports_tensor_cores(spec)
    layout, tf32 = ("NHWC", spec.tf32) if channels_last else ("NCHW", False)
    # The op asks on every call: keep the spec (and its cached key) when it already fits.
    if (spec.layout, spec.tf32) == (layout, tf32):
        return spec
    return dataclasses.replace(spec, layout=layout, tf32=tf32)


_BACKWARD = {
    "llvm": (schedule_backward_cpu, backward_cpu_space, seed_backward_cpu_schedule),
    "cuda": (schedule_backward_cuda, backward_cuda_space, seed_backward_cuda_schedule),
}


def default_schedule(mod, spec, target, part: str = "forward") -> s_tir.Schedule:
    """The untuned schedule for ``target``'s kind, applied to ``kernel_primfunc(spec, part)``."""
    _check_kind(target.kind.name)
    if part == "backward":
        return _BACKWARD[target.kind.name][0](mod, spec)
    return _DEFAULT_SCHEDULES[target.kind.name](mod, spec)


def search_start(spec, target, part: str = "forward") -> s_tir.Schedule:
    """The schedule a search of ``design_space`` starts from: the default one, expressed (where
    it lies in the space) as decisions of the space's sampling instructions, so that the search
    can mutate it."""
    _check_kind(target.kind.name)
    mod = kernel_primfunc(spec, part)
    if part == "backward":
        return _BACKWARD[target.kind.name][2](mod, spec)
    if target.kind.name != "cuda":
        return seed_cpu_schedule(mod, spec)
    if _takes_tensor_cores(spec):
        return seed_tensorcore_schedule(mod, spec)
    return seed_cuda_schedule(mod, spec)


def design_space(spec, target, part: str = "forward"):
    """The DefT design space of ``target``'s kind: a function that schedules a ``Schedule`` of
    ``kernel_primfunc(spec, part)`` in place with tile sizes (threads per block for the CUDA
    backward) sampled by MetaSchedule."""
    _check_kind(target.kind.name)
    if part == "backward":
        return _BACKWARD[target.kind.name][1](spec)
    return _DESIGN_SPACES[target.kind.name](spec)
