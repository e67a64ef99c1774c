"""The tensor-core forward keeps its warp fragments in registers, in every precision, for the default
tiling and the design space's samples: ptxas gives its kernels no stack frame bigger than a few
spilled registers, where a fragment left in local memory is a whole warp's tile in every thread
(at least FRAGMENT_BYTES). A fragment in local memory costs ~50x (the bfloat16 forward before its
operands were loaded with ldmatrix: 2096 bytes of stack, 11.3 ms for the paper layer at N=32 on an
H200, float16 0.20 ms)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest
import tvm

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules import default_schedule, design_space, kernel_spec
from deft_tvm.tuning.workloads import get_workload

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

PRECISIONS = ("float16", "bfloat16", "tf32", "float32")  # float32: 3xTF32
FRAGMENT_BYTES = 16 * 8 * 4  # the smallest operand tile, 16 x 8 TF32 channels


def _spec(workload: str, precision: str):
    tf32 = precision == "tf32"
    spec = get_workload(workload, "float32" if tf32 else precision, tf32=tf32).spec
    return kernel_spec(spec, cuda_target("sm_90"))


def _stack_bytes(sch, tmp_path) -> list[int]:
    """ptxas's stack frame (bytes) of each kernel of ``sch``'s module, compiled for sm_90."""
    source = compile_kernel(sch.mod, cuda_target("sm_90")).mod.imports[0].inspect_source()
    path = tmp_path / "kernel.cu"
    path.write_text(source)
    report = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", str(path), "-o",
                             str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True).stderr
    return [int(n) for n in re.findall(r"(\d+) bytes stack frame", report)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("workload", ["test_tensor_core_small", "paper_64c_64x64_n32"])
def test_default_tiling_keeps_fragments_in_registers(workload, precision, tmp_path):
    spec = _spec(workload, precision)
    assert spec.layout == "NHWC" and spec.tf32 == (precision == "tf32")  # the tensor-core schedule
    stacks = _stack_bytes(default_schedule(deform_conv2d_primfunc(spec), spec, cuda_target("sm_90")), tmp_path)
    assert stacks and max(stacks) < FRAGMENT_BYTES, stacks


@pytest.mark.parametrize("precision", ["bfloat16", "tf32", "float32"])
def test_design_space_samples_keep_fragments_in_registers(precision, tmp_path):
    spec = _spec("test_tensor_core_small", precision)
    for seed in (1, 2):
        sch = tvm.s_tir.Schedule(deform_conv2d_primfunc(spec), seed=seed)
        design_space(spec, cuda_target("sm_90"))(sch)
        stacks = _stack_bytes(sch, tmp_path)
        assert stacks and max(stacks) < FRAGMENT_BYTES, (stacks, sch.trace.decisions)  # split-K: two kernels
