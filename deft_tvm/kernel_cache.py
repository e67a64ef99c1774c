"""Compiled kernels, cached in memory and on disk.

The disk cache lives in ``$DEFT_TVM_CACHE_DIR`` (default ``~/.cache/deft_tvm``), one shared
library per (TVM version, target, workload). A corrupted or unloadable entry is rebuilt with a
warning. Writes are atomic, so concurrent processes never see a half-written library.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch
import tvm

from .compute import deform_conv2d_primfunc
from .library import loaded_kernel
from .spec import DeformConvSpec
from .targets import exact_cuda_compilation, target_for_device
from .tuning_db import target_tag

CACHE_DIR_ENV = "DEFT_TVM_CACHE_DIR"

_memory: dict[tuple[str, str], Callable] = {}
_lock = threading.Lock()


class UntunedKernelWarning(UserWarning):
    """A workload ran with the default schedule because no loaded library has a tuned kernel for it."""


def cache_dir() -> Path:
    """Root of the on-disk kernel cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "deft_tvm")


def _target_tag(target: tvm.target.Target) -> str:
    text = json.dumps(target.export(), sort_keys=True, default=str)
    return f"{target.kind.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def kernel_path(spec: DeformConvSpec, target: tvm.target.Target) -> Path:
    """Where the compiled library of ``spec`` for ``target`` is cached."""
    return cache_dir() / f"tvm-{tvm.__version__}" / _target_tag(target) / f"{spec.key()}.so"


def build(spec: DeformConvSpec, target: tvm.target.Target):
    """Compile ``spec`` with the default schedule of ``target``'s kind; returns a TVM Executable."""
    from deft_tvm.schedules import default_schedule

    sch = default_schedule(deform_conv2d_primfunc(spec), spec, target)
    with exact_cuda_compilation():
        return tvm.compile(sch.mod, target=target)


def _export_atomically(executable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_or_build(spec: DeformConvSpec, target: tvm.target.Target) -> Callable:
    path = kernel_path(spec, target)
    if path.exists():
        try:
            return tvm.runtime.load_module(str(path))["main"]
        except Exception as err:  # noqa: BLE001 - any failure to load means: rebuild it
            warnings.warn(
                f"deft_tvm: cached kernel {path} could not be loaded ({type(err).__name__}: {err}); rebuilding it",
                RuntimeWarning,
                stacklevel=3,
            )
            path.unlink(missing_ok=True)
    executable = build(spec, target)
    _export_atomically(executable, path)
    return executable["main"]


def get_kernel(spec: DeformConvSpec, device: torch.device) -> Callable:
    """The kernel for ``spec`` on ``device`` (a CPU or a CUDA GPU).

    A kernel from a library registered by ``deft_tvm.load_library`` wins; otherwise the default
    schedule is compiled (once, then cached in memory and on disk) with a one-time warning. The
    kernel takes ``(input, offset, mask?, weight, bias?, output)`` as contiguous tensors on the
    device and writes ``output`` in place.
    """
    target = target_for_device(device)
    key = spec.key()
    tuned = loaded_kernel(target.kind.name, key)
    if tuned is not None:
        return tuned
    memory_key = (key, str(target))
    kernel = _memory.get(memory_key)
    if kernel is None:
        with _lock:
            kernel = _memory.get(memory_key)
            if kernel is None:
                warnings.warn(
                    f"deft_tvm: no tuned kernel loaded for workload {key} on {target.kind.name} "
                    f"({target_tag(target)}); using the default schedule, compiled once and cached in "
                    f"{cache_dir()}. For a tuned one, export a library with `deft-tvm export` from its "
                    "tuning database and load it with deft_tvm.load_library().",
                    UntunedKernelWarning,
                    stacklevel=4,
                )
                kernel = _memory[memory_key] = _load_or_build(spec, target)
    return kernel


def prebuild(specs, device: torch.device, max_workers: int = 8) -> int:
    """Compile, in parallel, the default-schedule kernels of ``specs`` that the disk cache lacks.

    Compilation is mostly spent in nvcc/LLVM outside the GIL, so threads overlap it. Returns
    the number of kernels built.
    """
    target = target_for_device(device)
    missing = {s.key(): s for s in specs if loaded_kernel(target.kind.name, s.key()) is None
               and not kernel_path(s, target).exists()}

    def build_and_store(spec):
        _export_atomically(build(spec, target), kernel_path(spec, target))

    with exact_cuda_compilation(), concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        for future in [pool.submit(build_and_store, s) for s in missing.values()]:
            future.result()
    return len(missing)


def clear_memory_cache() -> None:
    """Forget the kernels loaded in this process (the disk cache stays)."""
    _memory.clear()
