"""The unscheduled PrimFunc of a workload's kernel part, forward or backward."""

from __future__ import annotations

import tvm

from deft_tvm.compute.backward import deform_conv2d_backward_primfunc
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec, kernel_key


def kernel_primfunc(spec: DeformConvSpec, part: str = "forward") -> tvm.IRModule:
    """The unscheduled ``main`` PrimFunc (in an IRModule) of ``spec``'s ``part``: the forward
    (``forward.deform_conv2d_primfunc``) or every backward stage but grad_input's scatter
    (``backward.deform_conv2d_backward_primfunc``). ValueError for an unknown part."""
    kernel_key(spec, part)  # rejects unknown parts
    return deform_conv2d_primfunc(spec) if part == "forward" else deform_conv2d_backward_primfunc(spec)
