"""CUDA code generation and nvcc compilation of the default schedule, on machines without a GPU too."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.support import nvcc

from deft_tvm.compute.backward import sorted_gather_primfunc
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime.records import best_schedule, committed_root, database_dir, database_dirs
from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation
from deft_tvm.schedules import default_schedule, design_space, kernel_spec
from deft_tvm.schedules.cuda_backward import THREADS, BackwardTiling
from deft_tvm.schedules.cuda_tensorcore import supports_tensor_cores
from deft_tvm.schedules.cuda_warp_mma import TF32_MASK
from deft_tvm.tuning.search import _build as tuning_build
from deft_tvm.tuning.workloads import get_workload

from helpers import DTYPES, TENSOR_CORE_SHAPES

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

SHAPES = {
    "paper_small": DeformConvSpec(2, 16, 12, 12, 16, 3, 3, padding=(1, 1)),
    "asymmetric": DeformConvSpec(
        2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3,
        has_bias=False,
    ),
}


TENSOR_CORE_SPEC = get_workload("test_tensor_core_small", "float16").for_target(cuda_target("sm_90")).spec


def _cuda_source(spec: DeformConvSpec, arch: str, sch=None) -> str:
    target = cuda_target(arch)
    sch = sch or default_schedule(deform_conv2d_primfunc(spec), spec, target)
    executable = compile_kernel(sch.mod, target)
    (device_module,) = executable.mod.imports
    return device_module.inspect_source()


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_default_schedule_compiles_with_nvcc(shape, dtype, arch):
    spec = dataclasses.replace(SHAPES[shape], dtype=dtype)
    source = _cuda_source(spec, arch)
    assert "__global__" in source
    assert "__shared__" in source  # interpolated tiles and weights are staged in shared memory
    with exact_cuda_compilation(), cuda_target(arch):
        cubin = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
    assert len(cubin) > 1000 and cubin[:4] == b"\x7fELF"


def test_no_global_columns_buffer():
    # The only global buffers of the kernel are its arguments: the sampled columns never leave the chip.
    source = _cuda_source(SHAPES["paper_small"], "sm_90")
    assert source.count("__global__") == 2  # the kernel's declaration and its definition
    kernel_params = re.search(r"__global__ void __launch_bounds__\(\d+\) main_kernel\(([^)]*)\)", source).group(1)
    assert kernel_params.count("float* __restrict__") == 6  # input, offset, mask, weight, bias, output
    assert "__shared__ alignas(64) float sampled_shared" in source and "float weight_acc_shared" in source


def test_exact_cuda_compilation_restores_the_environment(monkeypatch):
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvrtc")
    monkeypatch.delenv("TVM_CUDA_NVCC_NO_FAST_MATH", raising=False)
    import os

    with exact_cuda_compilation():
        assert os.environ["TVM_CUDA_COMPILE_MODE"] == "nvcc" and os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] == "1"
    assert os.environ["TVM_CUDA_COMPILE_MODE"] == "nvrtc" and "TVM_CUDA_NVCC_NO_FAST_MATH" not in os.environ


def test_one_thread_leaving_exact_compilation_keeps_it_for_another_still_compiling(monkeypatch):
    """Two threads' contexts overlapping (a thread pool of compiles): the first to enter leaves
    first, and must not restore TVM's defaults (NVRTC, fast math) under the other; the last to
    leave restores them."""
    import os
    import threading

    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvrtc")
    monkeypatch.delenv("TVM_CUDA_NVCC_NO_FAST_MATH", raising=False)
    entered, second_entered = threading.Event(), threading.Event()

    def first():
        with exact_cuda_compilation():
            entered.set()
            assert second_entered.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    with exact_cuda_compilation():
        second_entered.set()
        thread.join()  # the first has left
        assert os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc"
        assert os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH") == "1"
    assert os.environ["TVM_CUDA_COMPILE_MODE"] == "nvrtc" and "TVM_CUDA_NVCC_NO_FAST_MATH" not in os.environ


def _compile_cubin(source: str, arch: str) -> bytes:
    with exact_cuda_compilation(), cuda_target(arch):
        return nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")


@pytest.mark.parametrize(
    "spec, expected",
    [
        (TENSOR_CORE_SPEC, True),
        (dataclasses.replace(TENSOR_CORE_SPEC, dtype="float32"), True),  # full float32: 3xTF32
        (dataclasses.replace(TENSOR_CORE_SPEC, dtype="float32", tf32=True), True),
        (dataclasses.replace(TENSOR_CORE_SPEC, dtype="float64"), False),
        (dataclasses.replace(TENSOR_CORE_SPEC, dtype="bfloat16"), True),
        (dataclasses.replace(TENSOR_CORE_SPEC, width=13), True),  # positions padded to whole fragments
        (dataclasses.replace(TENSOR_CORE_SPEC, width=12), True),  # rows need not be whole fragments
        (dataclasses.replace(TENSOR_CORE_SPEC, out_channels=24), False),  # out_channels % 16
        (dataclasses.replace(TENSOR_CORE_SPEC, groups=2), False),
    ],
    ids=["fp16", "fp32", "fp32_tf32", "fp64", "bf16", "width13", "width12", "cout24", "groups2"],
)
def test_which_layers_take_tensor_cores(spec, expected):
    assert supports_tensor_cores(spec) is expected
    # Those layers' CUDA kernels gather from a channels-last input; CPU kernels read NCHW.
    # TF32 stays only where the kernel uses tensor cores.
    nchw = dataclasses.replace(spec, layout="NCHW")
    cuda = kernel_spec(nchw, cuda_target("sm_90"))
    assert cuda.layout == ("NHWC" if expected else "NCHW") and cuda.tf32 == (expected and spec.tf32)
    cpu = kernel_spec(nchw, tvm.target.Target("llvm"))
    assert cpu.layout == "NCHW" and not cpu.tf32


# What a tensor-core kernel's source multiplies with, per precision: WMMA (float16), PTX mma
# m16n8k16 (bfloat16), m16n8k8 (TF32, and float32 as 3xTF32).
MMA_INSTRUCTION = {"float16": "nvcuda::wmma::mma_sync",
                   "bfloat16": "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "tf32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                   "float32": "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"}
PRECISIONS = list(MMA_INSTRUCTION)


def _in_precision(spec: DeformConvSpec, precision: str) -> DeformConvSpec:
    tf32 = precision == "tf32"
    return dataclasses.replace(spec, dtype="float32" if tf32 else precision, tf32=tf32)


def _precision(spec: DeformConvSpec) -> str:
    return "tf32" if spec.tf32 else spec.dtype


def _multiplies_with(source: str, precision: str) -> bool:
    """The source multiplies with ``precision``'s instruction and no other's (TF32's m16n8k8 is
    float32's too, which splits its operands: the TF32 mask in the source)."""
    used = {p for p in PRECISIONS if MMA_INSTRUCTION[p] in source}
    if "tf32" in used:
        used = used - {"tf32", "float32"} | {"float32" if str(TF32_MASK) in source else "tf32"}
    return used == {precision}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", list(TENSOR_CORE_SHAPES))
def test_tensor_core_schedule_compiles_for_asymmetric_layers(shape, precision):
    spec = kernel_spec(_in_precision(TENSOR_CORE_SHAPES[shape], precision), cuda_target("sm_90"))
    assert spec.layout == "NHWC" and spec.tf32 == (precision == "tf32")
    source = _cuda_source(spec, "sm_90")
    assert _multiplies_with(source, precision)
    assert _compile_cubin(source, "sm_90")[:4] == b"\x7fELF"


def test_float16_nchw_input_takes_the_simt_schedule():
    spec = dataclasses.replace(TENSOR_CORE_SPEC, layout="NCHW")
    assert "mma_sync" not in _cuda_source(spec, "sm_90")


def test_float16_default_uses_tensor_cores_and_compiles_with_nvcc():
    source = _cuda_source(TENSOR_CORE_SPEC, "sm_90")
    assert source.count("nvcuda::wmma::mma_sync") >= 1
    assert "*(uint4*)(input_ptr" in source  # 8 channels of a corner per 16-byte read (channels last)
    assert "*(uint4*)(weight_ptr" in source
    cubin = _compile_cubin(source, "sm_90")
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tensor_core_design_space_samples_compile_with_nvcc(precision):
    spec, target = _in_precision(TENSOR_CORE_SPEC, precision), cuda_target("sm_90")
    mod = deform_conv2d_primfunc(spec)
    decisions = set()
    for seed in (1, 2, 3):
        sch = tvm.s_tir.Schedule(mod, seed=seed)
        design_space(spec, target)(sch)
        decisions.add(str(list(sch.trace.decisions.values())))
        assert _multiplies_with(_cuda_source(spec, "sm_90", sch), precision)
    assert len(decisions) > 1  # the tiles really are sampled
    assert _compile_cubin(_cuda_source(spec, "sm_90", sch), "sm_90")[:4] == b"\x7fELF"


@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_tuning_builder_builds_warp_fragment_samples(precision):
    # The builder's workers compile without TVM's tensor intrinsics imported; the TF32 and bfloat16
    # kernels' accumulator store still needs its layout there.
    spec, target = _in_precision(TENSOR_CORE_SPEC, precision), cuda_target("sm_90")
    sch = tvm.s_tir.Schedule(deform_conv2d_primfunc(spec), seed=1)
    design_space(spec, target)(sch)
    builder = ms.builder.LocalBuilder(f_build=tuning_build, max_workers=1, timeout_sec=300)
    (result,) = builder.build([ms.builder.BuilderInput(sch.mod, target)])
    assert result.error_msg is None, result.error_msg


def test_committed_cuda_records_replay_and_compile():
    # Tuning records replay tensorize instructions: the intrinsics must be registered first.
    target = cuda_target("sm_90")
    directories = database_dirs(committed_root(), target)
    assert directories, "no committed CUDA tuning record"
    for directory in directories:
        spec, sch = best_schedule(directory, target)
        assert sch is not None, directory
        source = _cuda_source(spec, "sm_90", sch)
        tensor_cores = supports_tensor_cores(spec) and spec.layout == "NHWC"
        if tensor_cores:
            assert _multiplies_with(source, _precision(spec)), directory
        else:
            assert not any(instruction in source for instruction in MMA_INSTRUCTION.values()), directory


def test_committed_readable_schedules_replay_their_records():
    target = cuda_target("sm_90")
    readable = sorted((Path(__file__).parents[1] / "schedules" / "tuned" / "cuda-sm_90").glob("*.py"))
    assert len(readable) == len(database_dirs(committed_root(), target))
    for path in readable:
        name, precision = path.stem.rsplit("_", 1)  # <workload>_<dtype> or <workload>_float32_tf32
        tf32 = precision == "tf32"
        name, dtype = name.rsplit("_", 1) if tf32 else (name, precision)
        spec = get_workload(name, dtype, tf32).for_target(target).spec
        _, recorded = best_schedule(database_dir(committed_root(), spec, target), target)
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        replayed = tvm.s_tir.Schedule(deform_conv2d_primfunc(spec))
        namespace["apply_trace"](replayed)
        tvm.ir.assert_structural_equal(replayed.mod, recorded.mod)


def _backward_sources(spec: DeformConvSpec) -> dict[str, str]:
    funcs = {
        "gradients": default_schedule(kernel_primfunc(spec, "backward"), spec, cuda_target("sm_90"), "backward").mod,
        "gather": tvm.IRModule({"gather": sorted_gather_primfunc(spec, THREADS)}),
    }
    return {name: compile_kernel(m, cuda_target("sm_90")).mod.imports[0].inspect_source() for name, m in funcs.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_backward_kernels_compile_with_nvcc(shape, dtype):
    spec = dataclasses.replace(SHAPES[shape], dtype=dtype)
    sources = _backward_sources(spec)
    # One kernel per stage: corner indices, shares, grad_columns, grad_offset, grad_mask?, grad_weight's
    # partial sums and their sum, grad_bias.
    assert len(re.findall(r"__global__ void[^;{]*\{", sources["gradients"])) == 7 + spec.has_mask
    # grad_weight interpolates into shared memory, once per block for all its output channels.
    assert re.search(r"__shared__ [^;]* sampled_columns_shared", sources["gradients"])
    # grad_columns is a tiled GEMM: both operands staged in shared memory, each thread's tile in
    # registers (c_regs x p_regs, no bounding box of other threads' positions).
    tiling = BackwardTiling.for_spec(spec)
    assert re.search(r"__shared__ [^;]* weight_shared", sources["gradients"])
    assert re.search(r"__shared__ [^;]* grad_output_shared", sources["gradients"])
    assert f"grad_columns_local_ptr[{tiling.c_regs * tiling.p_regs}]" in sources["gradients"]
    assert "atomicAdd" not in sources["gather"]
    for source in sources.values():
        assert _compile_cubin(source, "sm_90")[:4] == b"\x7fELF"
