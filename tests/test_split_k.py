"""Split-K in the tensor-core forward (``TensorCoreTiling.k_splits``): the default tiling's rule,
a decision of the design space that traces carry, and the two kernels it generates (CUDA source
compiled for sm_90 with nvcc; no GPU needed). Against torchvision on a GPU: test_gpu_split_k.py."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import tvm
from tvm.support import nvcc

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation
from deft_tvm.schedules import design_space, kernel_spec
from deft_tvm.schedules.cuda_tensorcore import (SPLIT_K_BLOCKS, TensorCoreTiling, schedule_cuda_tensorcore,
                                                split_k_candidates, supports_tensor_cores, tensorcore_schedule_at)
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

TARGET = cuda_target("sm_90")
SPEC = DeformConvSpec(1, 64, 6, 10, 32, 3, 3, padding=(1, 1), dtype="float16", layout="NHWC")
PRECISIONS = ("float16", "bfloat16", "tf32")


def _in(spec: DeformConvSpec, precision: str) -> DeformConvSpec:
    tf32 = precision == "tf32"
    return dataclasses.replace(spec, dtype="float32" if tf32 else precision, tf32=tf32)


def test_candidates_divide_the_channel_fragments():
    assert split_k_candidates(SPEC) == (1, 2, 4)  # 4 fragments of 16 channels
    assert split_k_candidates(dataclasses.replace(SPEC, in_channels=48)) == (1,)  # 3 fragments
    assert split_k_candidates(_in(dataclasses.replace(SPEC, in_channels=16), "tf32")) == (1, 2)  # 2 of 8


# The benchmark layers that run on tensor cores, in each precision.
TENSOR_CORE_LAYERS = [(name, precision) for name in BENCHMARK_WORKLOADS for precision in PRECISIONS
                      if supports_tensor_cores(_in(get_workload(name, "float16").spec, precision))]


@pytest.mark.parametrize(("name", "precision"), TENSOR_CORE_LAYERS)
def test_the_default_splits_only_layers_of_few_blocks(name, precision):
    spec = kernel_spec(_in(get_workload(name, "float16").spec, precision), TARGET)
    tiling = TensorCoreTiling.for_spec(spec)
    co_frags = spec.out_channels // 16
    p_frags = -(-spec.batch * spec.out_h * spec.out_w // 16)
    blocks = co_frags // (tiling.warps_co * tiling.frags_co) * p_frags // (tiling.warps_p * tiling.frags_p)
    if name == "r50dcn_c5":  # 512 channels on 25 x 42 x 2 positions: 66 blocks of 256 channels
        assert (tiling.k_splits, tiling.warps_co * tiling.frags_co * 16, blocks) == (4, 256, 66)
    else:
        assert tiling.k_splits == 1 and (blocks >= SPLIT_K_BLOCKS or spec.in_channels < 256), (tiling, blocks)
    # Each split holds whole chunks, and the weight tile stays within a third of 48 KB.
    assert (spec.in_channels // (16 if precision != "tf32" else 8) // tiling.k_splits) % tiling.k_frags == 0
    itemsize = 4 if precision == "tf32" else 2
    assert tiling.warps_co * tiling.frags_co * 16 * tiling.k_frags * (16 if itemsize == 2 else 8) * itemsize <= 16384


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_traces_carry_the_split(splits):
    tiling = dataclasses.replace(TensorCoreTiling.for_spec(SPEC), k_frags=1, k_splits=splits)
    sch = tensorcore_schedule_at(deform_conv2d_primfunc(SPEC), SPEC, tiling)
    assert TensorCoreTiling.of_trace(sch.trace, SPEC) == tiling


def test_the_design_space_samples_splits():
    sampled = set()
    for seed in range(1, 13):
        sch = tvm.s_tir.Schedule(deform_conv2d_primfunc(SPEC), seed=seed)
        design_space(SPEC, TARGET)(sch)
        sampled.add(TensorCoreTiling.of_trace(sch.trace, SPEC).k_splits)
    assert sampled == {1, 2, 4}


def _source(spec: DeformConvSpec, tiling: TensorCoreTiling) -> str:
    sch = schedule_cuda_tensorcore(deform_conv2d_primfunc(spec), spec, tiling)
    return compile_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_k_is_two_kernels_summing_float32_partials_in_order(precision):
    spec = _in(SPEC, precision)
    tiling = dataclasses.replace(TensorCoreTiling.for_spec(spec), k_frags=1, k_splits=4)
    source = _source(spec, tiling)
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)\s*\{", source)
    assert [name for name, _ in kernels] == ["main_kernel", "main_kernel_1"]
    (_, gemm), (_, total) = kernels
    partials = re.search(r"float\* __restrict__ (\w*rf\w*)", gemm).group(1)  # the GEMM writes them ...
    assert f"float* __restrict__ {partials}" in total and "output_ptr" in total and "output_ptr" not in gemm
    assert "atomic" not in source  # ... the second kernel reads them back in a fixed order
    with exact_cuda_compilation(), TARGET:
        assert nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")[:4] == b"\x7fELF"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_unsplit_tiling_is_one_kernel():
    source = _source(SPEC, dataclasses.replace(TensorCoreTiling.for_spec(SPEC), k_splits=1))
    assert source.count("__global__") == 2 and "rf" not in re.findall(r"__global__[^(]*\(([^)]*)\)", source)[0]
