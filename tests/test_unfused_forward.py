"""The unfused forward (columns kernel + GEMM, ``deft_tvm.runtime.columns``) without a GPU: which
layers take it, the columns kernel's compute and the GEMM glue against the float64 reference on the
CPU (torchvision-style asymmetric layer, offset groups, with and without mask and bias, extreme
offsets; a layer configuration's kernels at several sizes), and its CUDA schedule (16-byte corner
loads and stores) and output transpose compiling with nvcc for sm_90 on the layers it takes (a
configuration's too)."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch
import tvm

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime.columns import unfused_forward_kernel
from deft_tvm.runtime.targets import compile_kernel, cuda_target, target_for_device
from deft_tvm.schedules import kernel_spec, schedule_family, unfused_forward
from deft_tvm.schedules.cuda_columns import ColumnsTiling, columns_cuda_space, schedule_columns_cuda
from deft_tvm.schedules.cuda_layout import channels_first_output_primfunc
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case, with_extreme_offsets

CPU = target_for_device("cpu")
SM90 = cuda_target("sm_90")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
LAYER = DeformConvSpec(2, 12, 9, 11, 10, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), offset_groups=2,
                       layout="NHWC")
WIDE_LAYER = dataclasses.replace(LAYER, in_channels=256, out_channels=256)  # test_gpu_unfused_forward.py's
PRECISIONS = {"float16": ("float16", False), "bfloat16": ("bfloat16", False), "tf32": ("float32", True),
              "float32": ("float32", False)}


def _kernel_spec(name: str, precision: str) -> DeformConvSpec:
    dtype, tf32 = PRECISIONS[precision]
    return kernel_spec(get_workload(name, dtype, tf32=tf32).spec, SM90)


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("name", ["r50dcn_c4", "r50dcn_c5"])
def test_wide_layers_on_tensor_cores_take_the_unfused_forward(name, precision):
    spec = _kernel_spec(name, precision)
    assert unfused_forward(spec, SM90)
    assert schedule_family(spec, SM90, "columns").name == "cuda_columns"


@pytest.mark.parametrize("name, precision", [("r50dcn_c5", "float32"), ("r50dcn_c3", "float16"),
                                             ("r50dcn_c3", "tf32"), ("paper_64c_64x64_n32", "float16"),
                                             ("video_64c_180x320_og8", "bfloat16")])
def test_narrow_layers_and_float32_keep_the_fused_forward(name, precision):
    assert not unfused_forward(_kernel_spec(name, precision), SM90)


def test_grouped_layers_and_the_cpu_keep_the_fused_forward():
    wide = _kernel_spec("r50dcn_c5", "float16")
    assert not unfused_forward(dataclasses.replace(wide, groups=2), SM90)
    assert not unfused_forward(wide, CPU)


def test_layers_whose_columns_pass_256_mib_keep_the_fused_forward():
    wide = _kernel_spec("r50dcn_c5", "float16")  # 2 x 25 x 42 positions x 4608 values: 19 MB
    assert unfused_forward(dataclasses.replace(wide, batch=26), SM90)  # 252 MB
    assert not unfused_forward(dataclasses.replace(wide, batch=28), SM90)  # 271 MB


def test_the_glue_refuses_layers_it_cannot_multiply():
    with pytest.raises(ValueError, match="NHWC layers of one group, got layout 'NCHW' and 1 groups"):
        unfused_forward_kernel(dataclasses.replace(LAYER, layout="NCHW"), None, None)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
@pytest.mark.parametrize("with_mask_and_bias", [True, False], ids=["mask_bias", "plain"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_columns_times_the_weight_is_the_reference_forward(dtype, with_mask_and_bias, extreme):
    spec = dataclasses.replace(LAYER, dtype=dtype, has_mask=with_mask_and_bias, has_bias=with_mask_and_bias)
    case = make_case(spec, seed=7, offset_scale=3.0)
    case = with_extreme_offsets(case, 5) if extreme else case
    columns = compile_kernel(kernel_primfunc(spec, "columns"), CPU)["main"]
    transpose = compile_kernel(tvm.IRModule({"f": channels_first_output_primfunc(spec, bind_threads=False)}), CPU)
    forward = unfused_forward_kernel(spec, columns, transpose["channels_first_output"])
    args = spec.kernel_arguments(*(case[k] for k in ("input", "offset", "mask", "weight", "bias")))
    output = torch.full(spec.output_shape, math.nan, dtype=args[0].dtype)
    forward(*args, output)
    reference = deform_conv2d_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                           for k, v in case.items()})
    assert_close(output, reference, tolerance_key(spec.dtype, spec.tf32))


def test_a_configurations_columns_and_transpose_serve_every_size():
    generic = generic_spec(dataclasses.replace(LAYER, dtype="float64"))
    columns = compile_kernel(kernel_primfunc(generic, "columns"), CPU)["main"]
    transpose = compile_kernel(tvm.IRModule({"f": channels_first_output_primfunc(generic, bind_threads=False)}), CPU)
    for seed, (batch, height, width) in enumerate(((1, 9, 11), (3, 17, 6))):
        spec = dataclasses.replace(LAYER, batch=batch, height=height, width=width, dtype="float64")
        forward = unfused_forward_kernel(spec, columns, transpose["channels_first_output"])
        case = make_case(spec, seed=seed)
        args = spec.kernel_arguments(*(case[k] for k in ("input", "offset", "mask", "weight", "bias")))
        output = torch.full(spec.output_shape, math.nan, dtype=torch.float64)
        forward(*args, output)
        assert_close(output, deform_conv2d_reference(**case), "float64")


@needs_nvcc
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("name", ["r50dcn_c4", "r50dcn_c5", "r50dcn_c5_configuration", "asymmetric_configuration"])
def test_the_columns_kernel_compiles_for_sm90_with_16_byte_loads_and_stores(name, precision):
    if name.startswith("asymmetric"):  # outputs smaller than the input (TVM 0.27 failed on the configuration's)
        dtype, tf32 = PRECISIONS[precision]
        spec = kernel_spec(dataclasses.replace(WIDE_LAYER, dtype=dtype, tf32=tf32), SM90)
    else:
        spec = _kernel_spec(name.removesuffix("_configuration"), precision)
    spec = generic_spec(spec) if name.endswith("_configuration") else spec
    sch = schedule_columns_cuda(kernel_primfunc(spec, "columns"), spec)
    source = compile_kernel(sch.mod, SM90).mod.imports[0].inspect_source()
    assert ColumnsTiling.for_spec(spec).vector * (2 if spec.dtype != "float32" else 4) == 16
    vector = "float4" if spec.dtype == "float32" else "uint4"
    assert f"*({vector}*)(input_ptr" in source.replace(" ", "")  # each corner's channels: one load
    assert f"*({vector}*)(columns_ptr" in source.replace(" ", "")  # each thread's channels: one store


@needs_nvcc
@pytest.mark.parametrize("configuration", [False, True], ids=["sizes", "configuration"])
@pytest.mark.parametrize("precision", ["float16", "tf32"])
def test_the_output_transpose_compiles_for_sm90_through_shared_memory(precision, configuration):
    spec = _kernel_spec("r50dcn_c5", precision)
    spec = generic_spec(spec) if configuration else spec
    module = tvm.IRModule({"channels_first_output": channels_first_output_primfunc(spec)})
    source = compile_kernel(module, SM90).mod.imports[0].inspect_source()
    assert "__shared__" in source and "__syncthreads()" in source


def test_the_design_space_holds_the_default():
    spec = _kernel_spec("r50dcn_c5", "float16")
    from tvm import s_tir

    sch = s_tir.Schedule(kernel_primfunc(spec, "columns"))
    columns_cuda_space(spec)(sch)
    assert "sample_categorical" in str(sch.trace)
