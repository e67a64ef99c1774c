"""TVM targets for the devices torch tensors live on."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import tvm


def cuda_target(arch: str) -> tvm.target.Target:
    """CUDA target for a compute capability such as ``"sm_90"``, host code for the CPU, with the
    per-block limits every sm_70+ GPU has (MetaSchedule's ``VerifyGPUCode`` checks them)."""
    return tvm.target.Target(
        {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
         "thread_warp_size": 32, "registers_per_block": 65536},
        host={"kind": "llvm"},
    )


# TVM's NVRTC path always adds --use_fast_math; its nvcc path does unless told not to. Fast math
# lets the compiler assume no NaN, which changes torchvision's NaN-offset semantics, and flushes
# denormals, so deft_tvm compiles CUDA with nvcc and IEEE-exact float semantics.
_EXACT_CUDA_ENV = {"TVM_CUDA_COMPILE_MODE": "nvcc", "TVM_CUDA_NVCC_NO_FAST_MATH": "1"}


_exact = {"lock": threading.Lock(), "active": 0, "saved": {}}  # contexts active in this process, and what they replaced


@contextlib.contextmanager
def exact_cuda_compilation():
    """While active, TVM compiles CUDA source with nvcc and without ``--use_fast_math``. Safe
    across threads (e.g. a thread pool of ``compile_kernel`` calls): the variables are set by the
    first context to enter and restored by the last to leave, so one thread leaving does not
    unset them under another's compile, which then took TVM's defaults (NVRTC, fast math)."""
    with _exact["lock"]:
        if _exact["active"] == 0:
            _exact["saved"] = {name: os.environ.get(name) for name in _EXACT_CUDA_ENV}
            os.environ.update(_EXACT_CUDA_ENV)
        _exact["active"] += 1
    try:
        yield
    finally:
        with _exact["lock"]:
            _exact["active"] -= 1
            if _exact["active"] == 0:
                for name, value in _exact["saved"].items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value


@contextlib.contextmanager
def kernel_compilation():
    """While active, TVM builds kernels as deft_tvm does (CUDA compiled with nvcc without fast
    math, ``exact_cuda_compilation``)."""
    with exact_cuda_compilation():
        yield


def compile_kernel(mod: tvm.IRModule, target: tvm.target.Target):
    """``tvm.compile`` of a scheduled kernel module under ``kernel_compilation``, on the TIR pipeline
    that launches the kernels that wait on their predecessor programmatically (``cuda_launch``)."""
    from deft_tvm.schedules.cuda_launch import pipeline_for

    with kernel_compilation():
        return tvm.compile(mod, target=target, tir_pipeline=pipeline_for(target))


def device_arch(device: torch.device | str | int | None = None) -> str:
    """The CUDA arch name (``"sm_90"``) of ``device``, by default the current CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def target_for_device(device: torch.device | str) -> tvm.target.Target:
    """The TVM target that kernels for tensors on ``device`` are compiled for."""
    device = torch.device(device)
    if device.type == "cpu":
        return tvm.target.Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})
    if device.type == "cuda":
        return cuda_target(device_arch(device))
    raise NotImplementedError(
        f"deft_tvm has no kernels for device type {device.type!r}; supported: 'cpu', 'cuda'"
    )
