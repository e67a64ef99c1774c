"""Schedules for the deft_tvm compute, one module per target kind (installed as ``deft_tvm.schedules``).

The compute in ``deft_tvm.compute`` is pure; every fusion, tiling, parallelisation and binding
decision lives here.
"""

from __future__ import annotations

from tvm import s_tir

from .cpu import deft_cpu_space, schedule_cpu
from .cuda import deft_cuda_space, schedule_cuda
from .cuda_tensorcore import deft_cuda_tensorcore_space, schedule_cuda_tensorcore, supports_tensor_cores


def _schedule_cuda(mod, spec) -> s_tir.Schedule:
    """Tensor cores where the layer tiles into their fragments, the SIMT schedule otherwise."""
    if supports_tensor_cores(spec):
        return schedule_cuda_tensorcore(mod, spec)
    return schedule_cuda(mod, spec)


def _cuda_space(spec):
    """The tensor-core space where the layer tiles into their fragments, the SIMT space otherwise."""
    if supports_tensor_cores(spec):
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
        from tvm.s_tir.tensor_intrin import cuda  # noqa: F401 - registers the WMMA intrinsics


def default_schedule(mod, spec, target) -> s_tir.Schedule:
    """The untuned schedule for ``target``'s kind, applied to ``deform_conv2d_primfunc(spec)``."""
    _check_kind(target.kind.name)
    return _DEFAULT_SCHEDULES[target.kind.name](mod, spec)


def design_space(spec, target):
    """The DefT design space of ``target``'s kind: a function that schedules a ``Schedule`` of
    ``deform_conv2d_primfunc(spec)`` in place with tile sizes sampled by MetaSchedule."""
    _check_kind(target.kind.name)
    return _DESIGN_SPACES[target.kind.name](spec)
