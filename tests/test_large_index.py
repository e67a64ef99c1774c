"""64-bit indexing: kernels whose index spaces pass 2**31 - 1 build (CPU and CUDA, forward and
backward) and compute what the 32-bit ones do; every other kernel keeps 32-bit indices."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import tvm

import deft_tvm
from deft_tvm.compute.backward import scatter_primfunc, sorted_gather_primfunc
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import backward, kernel_cache
from deft_tvm.runtime.targets import compile_kernel, cuda_target, target_for_device
from deft_tvm.schedules import default_schedule, kernel_spec
from deft_tvm.schedules.cuda_backward import THREADS
from deft_tvm.schedules.cuda_backward_fused import backward_entry, default_tilings
from deft_tvm.tuning.workloads import WORKLOADS

from helpers import TENSOR_ARGUMENTS, grad_leaves, make_case

# The two shapes of issue 12 that failed with "Literal value 2147483648 exceeds range of int32":
# a forward of input (8, 256, 1024, 1024) and a backward of (8, 128, 512, 512).
HUGE_FORWARD = DeformConvSpec(8, 256, 1024, 1024, 256, 3, 3, padding=(1, 1), dtype="float16")
HUGE_BACKWARD = DeformConvSpec(8, 128, 512, 512, 128, 3, 3, padding=(1, 1), dtype="float16")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def test_index_dtype_is_int64_only_past_int32():
    assert HUGE_FORWARD.index_dtype == HUGE_BACKWARD.index_dtype == "int64"
    assert {w.spec.index_dtype for w in WORKLOADS.values()} == {"int32"}
    # 1 x 1 x 2**15 x 2**14 input: its 2**29 corner samples * 4 fit; one more row of 2**14 does not.
    at_limit = DeformConvSpec(1, 1, 2**15 - 1, 2**14, 1, 1, 1)
    assert at_limit.index_dtype == "int32"
    assert dataclasses.replace(at_limit, height=2**15).index_dtype == "int64"
    assert "int64" in kernel_primfunc(HUGE_FORWARD).script()
    assert "int64" not in kernel_primfunc(dataclasses.replace(HUGE_FORWARD, batch=1, height=64, width=64)).script()


def _huge_kernels(spec: DeformConvSpec, target, part: str) -> list[tvm.IRModule]:
    if part == "forward":
        spec = kernel_spec(spec, target)
        return [default_schedule(kernel_primfunc(spec), spec, target).mod]
    gradients = default_schedule(kernel_primfunc(spec, "backward"), spec, target, "backward").mod
    if target.kind.name == "llvm":
        return [gradients, tvm.IRModule({"scatter": scatter_primfunc(spec)}),
                tvm.IRModule({"gather": sorted_gather_primfunc(spec)})]
    fused = tvm.IRModule({"backward": backward_entry(spec, *default_tilings(spec))})
    return [gradients, fused, tvm.IRModule({"gather": sorted_gather_primfunc(spec, THREADS)})]


@pytest.mark.parametrize("spec, part", [(HUGE_FORWARD, "forward"), (HUGE_BACKWARD, "backward")])
def test_huge_kernels_build_for_the_cpu(spec, part):
    for mod in _huge_kernels(dataclasses.replace(spec, dtype="float32"), target_for_device("cpu"), part):
        compile_kernel(mod, target_for_device("cpu"))


@needs_nvcc
@pytest.mark.parametrize("spec, part, dtype, tf32", [
    (HUGE_FORWARD, "forward", "float16", False),  # tensor cores, channels last
    (HUGE_FORWARD, "forward", "float32", True),  # TF32 tensor cores
    (HUGE_FORWARD, "forward", "bfloat16", False),  # bfloat16 tensor cores (warp fragments)
    (HUGE_FORWARD, "forward", "float32", False),  # SIMT
    (HUGE_BACKWARD, "backward", "float16", False),
    (HUGE_BACKWARD, "backward", "float32", False),
])
def test_huge_kernels_compile_with_nvcc_and_index_in_64_bits(spec, part, dtype, tf32):
    target = cuda_target("sm_90")
    for mod in _huge_kernels(dataclasses.replace(spec, dtype=dtype, tf32=tf32), target, part):
        source = compile_kernel(mod, target).mod.imports[0].inspect_source()  # nvcc compiles it
        assert "int64_t" in source


def test_int64_kernels_compute_what_int32_ones_do(isolated_cache, monkeypatch):
    """The 64-bit code path, forced on a small layer, against the float64 reference (forward and
    every gradient, the CPU plane scatter included)."""
    spec = DeformConvSpec(2, 4, 7, 6, 6, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2,
                          offset_groups=2)
    monkeypatch.setattr(DeformConvSpec, "index_dtype", property(lambda self: "int64"))
    monkeypatch.setattr(backward, "_kernels", {})  # kernels built with 32-bit indices are not reused
    kernel_cache.clear_memory_cache()
    assert "int64" in kernel_primfunc(spec).script() and "int64" in kernel_primfunc(spec, "backward").script()
    args = make_case(spec)
    leaves = grad_leaves(args)
    out = deft_tvm.deform_conv2d(**{**args, **leaves})
    assert_close(out, deft_tvm.deform_conv2d_reference(**args), spec.dtype)
    grad_output = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.float())
    expected = deform_conv2d_reference_backward(grad_output, **args)._asdict()
    for name, grad in zip(leaves, grads):
        assert_close(grad, expected[name], spec.dtype)
    assert set(leaves) == set(TENSOR_ARGUMENTS)
