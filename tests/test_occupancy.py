"""Resident blocks an SM asked of CUDA kernels (``schedules/cuda_occupancy.py``): a layer
configuration's tensor-core forward of blocks of up to 256 threads is compiled with
``__launch_bounds__(threads, 4)``; a per-size kernel and larger blocks are not. Generated and
compiled with nvcc for sm_90, no GPU needed; the speed it buys: the module's measurements."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules.cuda_occupancy import with_min_blocks
from deft_tvm.schedules.cuda_tensorcore import (CONFIGURATION_MIN_BLOCKS, TensorCoreTiling,
                                                schedule_cuda_tensorcore)

TARGET = cuda_target("sm_90")
LAYER = DeformConvSpec(2, 64, 20, 24, 64, 3, 3, padding=(1, 1), dtype="float16", layout="NHWC")


def _launch_bounds(spec: DeformConvSpec, warps_co: int, warps_p: int) -> str:
    tiling = dataclasses.replace(TensorCoreTiling.for_spec(spec), warps_co=warps_co, frags_co=1, warps_p=warps_p,
                                 frags_p=1)
    sch = schedule_cuda_tensorcore(kernel_primfunc(spec), spec, tiling)
    (device_module,) = compile_kernel(sch.mod, TARGET).mod.imports
    return re.search(r"__launch_bounds__\(([^)]*)\) main_kernel", device_module.inspect_source()).group(1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("spec, warps_co, warps_p, expected", [
    (generic_spec(LAYER), 4, 2, f"256, {CONFIGURATION_MIN_BLOCKS}"),
    (generic_spec(LAYER), 4, 4, "512"),
    (LAYER, 4, 2, "256"),
], ids=["configuration_256_threads", "configuration_512_threads", "one_size_256_threads"])
def test_kernels_launch_bounds(spec, warps_co, warps_p, expected):
    assert _launch_bounds(spec, warps_co, warps_p) == expected


def test_fewer_than_one_block_is_rejected():
    with pytest.raises(ValueError, match="must be 1 or more, got 0"):
        with_min_blocks(kernel_primfunc(LAYER), 0)
