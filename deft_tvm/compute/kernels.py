"""The unscheduled PrimFunc of a workload's kernel part, forward or backward."""

from __future__ import annotations

import tvm

from deft_tvm.compute.backward import deform_conv2d_backward_primfunc
from deft_tvm.compute.forward import deform_columns_primfunc, deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec


def kernel_primfunc(spec: DeformConvSpec, part: str = "forward") -> tvm.IRModule:
    """The unscheduled ``main`` PrimFunc (in an IRModule) of ``spec``'s ``part``: the forward
    (``forward.deform_conv2d_primfunc``), every backward stage but grad_input's scatter
    (``backward.deform_conv2d_backward_primfunc``) or the unfused forward's columns
    (``forward.deform_columns_primfunc``). ValueError for another part (the fused backward's entry
    is TIR written by ``schedules/cuda_backward_fused.py``, not a compute to schedule)."""
    builders = {"forward": deform_conv2d_primfunc, "backward": deform_conv2d_backward_primfunc,
                "columns": deform_columns_primfunc}
    if part not in builders:
        raise ValueError(f"no compute for kernel part {part!r}; expected one of {', '.join(builders)}")
    return builders[part](spec)
