"""The backward kernels, on the CPU only so far: ``compute_backward`` compiled for llvm without a
schedule (the scatter parallel over (batch, channel) planes), kept in memory per workload.

``deform_conv2d_backward`` returns torchvision's gradients of every argument; on CUDA it raises.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import tvm
from tvm import te

from .compute_backward import deform_conv2d_backward_te, scatter_primfunc
from .reference_backward import DeformConvGrads
from .spec import DeformConvSpec, accumulate_dtype

_kernels: dict[str, tuple[Callable, Callable, list]] = {}
_lock = threading.Lock()


def _kernels_for(spec: DeformConvSpec):
    with _lock:
        if spec.key() not in _kernels:
            inputs, outputs = deform_conv2d_backward_te(spec)
            gradients = tvm.compile(tvm.IRModule({"main": te.create_prim_func(inputs + outputs)}), target="llvm")
            scatter = tvm.compile(tvm.IRModule({"scatter": scatter_primfunc(spec)}), target="llvm")
            shapes = [(o.op.name, tuple(int(s) for s in o.shape), str(o.dtype)) for o in outputs]
            _kernels[spec.key()] = (gradients["main"], scatter["scatter"], shapes)
        return _kernels[spec.key()]


def deform_conv2d_backward(spec: DeformConvSpec, grad_output, input, offset, mask, weight) -> DeformConvGrads:
    """Gradients of every argument of the forward call ``spec`` describes (CPU tensors of the
    spec's dtype; NCHW)."""
    if input.device.type != "cpu":
        raise NotImplementedError(
            f"deft_tvm.deform_conv2d has no backward on {input.device.type} yet (only on the CPU); "
            "use torchvision.ops.deform_conv2d for training on GPUs"
        )
    gradients, scatter, shapes = _kernels_for(spec)
    results = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, shape, dtype in shapes}
    given = [t.contiguous() for t in (input, offset, mask, weight, grad_output) if t is not None]
    gradients(*[tvm.runtime.from_dlpack(t) for t in given + list(results.values())])
    n, c, h, w = spec.input_shape
    grad_input = torch.empty((n, c, h * w), dtype=getattr(torch, accumulate_dtype(spec.dtype)))
    scatter(*[tvm.runtime.from_dlpack(results[k]) for k in ("grad_columns", "coord_index", "coord_share")],
            tvm.runtime.from_dlpack(grad_input))
    dtype = input.dtype
    return DeformConvGrads(
        input=grad_input.reshape(spec.input_shape).to(dtype),
        offset=results["grad_offset"],
        weight=results["grad_weight"],
        bias=results["grad_bias_acc"].to(dtype) if spec.has_bias else None,
        mask=results["grad_mask"] if spec.has_mask else None,
    )
