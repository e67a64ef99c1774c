"""Schedules for the deft_tvm compute, one module per target kind (installed as ``deft_tvm.schedules``).

The compute in ``deft_tvm.compute`` is pure; every fusion, tiling, parallelisation and binding
decision lives here.
"""

from __future__ import annotations

from tvm import s_tir

from .cpu import schedule_cpu
from .cuda import schedule_cuda

_DEFAULT_SCHEDULES = {"llvm": schedule_cpu, "cuda": schedule_cuda}


def default_schedule(mod, spec, target) -> s_tir.Schedule:
    """The untuned schedule for ``target``'s kind, applied to ``deform_conv2d_primfunc(spec)``."""
    kind = target.kind.name
    if kind not in _DEFAULT_SCHEDULES:
        raise NotImplementedError(
            f"no default deft_tvm schedule for target kind {kind!r}; have {sorted(_DEFAULT_SCHEDULES)}"
        )
    return _DEFAULT_SCHEDULES[kind](mod, spec)
