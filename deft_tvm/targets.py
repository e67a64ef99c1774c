"""TVM targets for the devices torch tensors live on."""

from __future__ import annotations

import functools
import os

import tvm


@functools.lru_cache(maxsize=None)
def target_for_device(device_type: str) -> tvm.target.Target:
    """The TVM target that kernels for tensors on ``device_type`` are compiled for."""
    if device_type == "cpu":
        return tvm.target.Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})
    raise NotImplementedError(
        f"deft_tvm has no kernels for device type {device_type!r} yet; supported: 'cpu' "
        "(CUDA kernels are being added)"
    )
