"""A model's deformable convolutions: the calls it makes (``layer_specs``, traced on the meta
device) and their kernels built ahead of its first call (``build_model``)."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend.ops import recording_specs
from deft_tvm.runtime import kernel_cache


def layer_specs(model: torch.nn.Module, *example_inputs) -> list[DeformConvSpec]:
    """The distinct calls of ``deft_tvm``'s op (its layers and ``deft_tvm.deform_conv2d``) that
    ``model(*example_inputs)`` makes, in call order, as NCHW call specs.

    The model runs once on the meta device (``torch.func.functional_call`` with meta copies of its
    parameters and buffers, tensors of ``example_inputs`` replaced by meta tensors of their shape
    and dtype; other arguments passed as they are): no memory, no computation, no compile. A model
    whose forward needs real values (``.item()``, data-dependent shapes) cannot be traced so and
    raises what torch raises on meta tensors."""
    state = {name: torch.empty_like(t, device="meta")
             for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x
                   for x in example_inputs)
    with recording_specs() as specs, torch.no_grad():
        torch.func.functional_call(model, state, inputs)
    return list(dict.fromkeys(specs))


class ModelBuild(NamedTuple):
    """What ``build_model`` did: the model's call specs and how many forward and backward kernels it
    loaded or compiled (0 where the caches already held them)."""

    specs: list[DeformConvSpec]
    forward_kernels: int
    backward_kernels: int


def _progress_bar(description: str):
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc=description, unit="kernel")


def build_model(model: torch.nn.Module, *example_inputs, device: str | torch.device | None = None,
                backward_kernels: bool = True, deterministic: bool = False, max_workers: int = 8,
                progress: bool = True) -> ModelBuild:
    """Build, in parallel, the kernels ``model(*example_inputs)`` runs on ``device`` (default: CUDA
    if there is a GPU, else the CPU): the forward of each call ``layer_specs`` finds
    (``kernel_cache.forward_spec``: TF32 where torch's matmuls are, the target's layout) and, with
    ``backward_kernels``, the backward's (``runtime.backward.backward_parts``, the deterministic
    mode's with ``deterministic``), into the memory and disk caches, so that neither the first call
    nor the first backward compiles. A loaded library's kernels and cached ones are not built
    again. ``progress``: a tqdm bar per kind of kernel. On the CPU the kernels are those of each
    layer configuration, which serve every size; on CUDA those of the example's sizes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = layer_specs(model, *example_inputs)
    forward_specs = list(dict.fromkeys(kernel_cache.forward_spec(s, device) for s in specs))
    built = kernel_cache.prebuild(forward_specs, device, max_workers,
                                  _progress_bar("forward kernels") if progress else None)
    built_backward = 0
    if backward_kernels:
        from deft_tvm.runtime import backward  # imported on use, as the op does: it loads the backward compute

        backward_specs = list(dict.fromkeys(kernel_cache.with_torch_tf32(s, device) for s in specs))
        built_backward = backward.prebuild(backward_specs, device, deterministic=deterministic,
                                           max_workers=max_workers,
                                           progress=_progress_bar("backward kernels") if progress else None)
    return ModelBuild(specs, built, built_backward)
