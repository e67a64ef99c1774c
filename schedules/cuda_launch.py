"""Programmatic dependent launch (PDL) of TVM 0.27 CUDA kernels on sm_90 and later.

A kernel launched with programmatic stream serialization may start while the kernel before it in
the stream still runs, as soon as every block of that kernel has executed
``griddepcontrol.launch_dependents`` (or exited); it must execute ``griddepcontrol.wait`` before
it relies on that kernel's writes or completion (CUDA C++ Programming Guide, "Programmatic
Dependent Launch and Synchronization"; PTX ISA, "griddepcontrol"). Here a kernel whose body calls
``grid_dependency_wait`` is launched so.

TVM 0.27's CUDA runtime launches a kernel with that attribute when its launch parameters hold the
tag ``tirx.use_programtic_dependent_launch`` (sic), which neither a PrimFunc attribute nor a
statement attribute sets (checked on 0.27.0.post1); ``PIPELINE`` is the ``s_tir`` pipeline followed
by ``cuda_sizes.positive_sizes`` (configuration kernels' sizes known positive),
``cuda_occupancy.min_blocks_per_sm`` (the resident blocks a schedule asked for) and
``programmatic_launch``, the module pass that adds the tag to such kernels.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import tvm

from deft_tvm.schedules.cuda import compute_capability
from deft_tvm.schedules import cuda_occupancy, cuda_sizes

TAG = "tirx.use_programtic_dependent_launch"
_DYNAMIC_SHARED = "tirx.use_dyn_shared_memory"  # the runtime wants this tag last
_WAIT = "deft_grid_dependency_wait"
_LAUNCH = "deft_launch_dependents"
PIPELINE = "deft_s_tir_pdl"
MIN_ARCH = 90  # compute capability (x10) of the first GPUs with PDL


def _device_function(name: str, instruction: str) -> str:
    """An inline device function executing ``instruction`` where the architecture has it."""
    return (f"__device__ __forceinline__ void {name}() {{\n#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= {MIN_ARCH}0\n"
            f'  asm volatile("{instruction};" ::: "memory");\n#endif\n}}\n')


def launch_dependents():
    """A call that lets the next kernel in the stream start, if launched programmatically, once every
    block of this one has made it (or exited)."""
    from tvm.script import tirx as T

    return T.cuda.func_call(_LAUNCH, source_code=_device_function(_LAUNCH, "griddepcontrol.launch_dependents"))


def grid_dependency_wait():
    """A call that waits until the kernel before this one in the stream has completed and its writes
    are visible; its kernel is launched programmatically (``programmatic_launch``)."""
    from tvm.script import tirx as T

    return T.cuda.func_call(_WAIT, source_code=_device_function(_WAIT, "griddepcontrol.wait"))


@tvm.transform.module_pass(opt_level=0, name="ProgrammaticLaunch")
def programmatic_launch(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Adds ``TAG`` to the launch parameters of every device kernel that calls
    ``grid_dependency_wait`` (TVM 0.27's Python has no TIR visitor: the kernel's printed form is
    searched)."""
    updates = {}
    for global_var, func in mod.functions.items():
        params = func.attrs.get("tirx.kernel_launch_params") if func.attrs else None
        if params is None or _WAIT not in func.script():
            continue
        tags = [str(p) for p in params]
        tags.insert(len(tags) - (tags[-1] == _DYNAMIC_SHARED), TAG)
        updates[global_var] = func.with_attr("tirx.kernel_launch_params", tags)
    for global_var, func in updates.items():
        mod[global_var] = func
    return mod


def _pipeline(**kwargs):
    lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir", **kwargs)
    passes = tvm.transform.Sequential([lower, cuda_sizes.positive_sizes, cuda_occupancy.min_blocks_per_sm,
                                       programmatic_launch])
    return passes, finalize_host, finalize_device


tvm.tirx.register_tir_pipeline(PIPELINE, _pipeline)


@functools.lru_cache(maxsize=1)
def pipeline_digest() -> str:
    """A hash of the source of the passes ``PIPELINE`` adds (this module, ``cuda_sizes`` and
    ``cuda_occupancy``): what a kernel compiled on it is a function of besides its module, TVM and
    the target."""
    digest = hashlib.sha256()
    for module in (sys.modules[__name__], cuda_sizes, cuda_occupancy):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def pipeline_for(target: tvm.target.Target) -> str:
    """The TIR pipeline ``tvm.compile`` takes for ``target``: ``PIPELINE`` on CUDA GPUs with PDL."""
    arch = str(target.attrs.get("arch", "")) if target.kind.name == "cuda" else ""
    return PIPELINE if arch.startswith("sm_") and compute_capability(arch) >= MIN_ARCH else "default"
