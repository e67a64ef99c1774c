"""The unfused forward (columns kernel + cuBLAS GEMM) through the op on a real GPU (``pytest -m
gpu``), in float16, bfloat16 and TF32, against the float64 reference: a wide torchvision-style
asymmetric layer (kernel 3 x 2, stride (2, 1), padding (1, 0), dilation (2, 1), 2 offset groups)
with and without mask and bias, normal and extreme offsets (far outside, infinite, NaN), input given
NCHW and channels last; r50 c4/c5 on their profile inputs; the r50 c5 op captured in a CUDA graph
and replayed on new inputs. Skipped where there is no GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deft_tvm
from deft_tvm.bench import tf32_mode
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import kernel_spec, unfused_forward
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case, replayed_in_cuda_graph, with_extreme_offsets

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

PRECISIONS = ("float16", "bfloat16", "tf32")
LAYER = DeformConvSpec(2, 256, 11, 19, 256, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), offset_groups=2)


def _spec(spec: DeformConvSpec, precision: str) -> DeformConvSpec:
    tf32 = precision == "tf32"
    return dataclasses.replace(spec, dtype="float32" if tf32 else precision)


def _check(spec: DeformConvSpec, precision: str, case: dict, channels_last: bool = False) -> None:
    target = target_for_device(torch.device("cuda"))
    assert unfused_forward(kernel_spec(dataclasses.replace(spec, tf32=precision == "tf32"), target), target)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    if channels_last:
        args["input"] = args["input"].contiguous(memory_format=torch.channels_last)
    reference = deform_conv2d_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                           for k, v in args.items()})
    with tf32_mode("on" if precision == "tf32" else "off"):
        out = deft_tvm.deform_conv2d(**args)
    assert out.dtype == args["input"].dtype and out.shape == reference.shape and out.is_contiguous()
    assert_close(out, reference, tolerance_key(spec.dtype, precision == "tf32"))


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
@pytest.mark.parametrize("mask_bias", [True, False], ids=["mask_bias", "plain"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_asymmetric_wide_layer_matches_the_reference(precision, mask_bias, extreme):
    spec = dataclasses.replace(_spec(LAYER, precision), has_mask=mask_bias, has_bias=mask_bias)
    case = make_case(spec, seed=41, offset_scale=3.0)
    _check(spec, precision, with_extreme_offsets(case, 31) if extreme else case)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_channels_last_input_matches_the_reference(precision):
    spec = _spec(LAYER, precision)
    _check(spec, precision, make_case(spec, seed=42), channels_last=True)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["r50dcn_c4", "r50dcn_c5"])
def test_r50_wide_stages_match_the_reference(name, precision):
    workload = get_workload(name, "float32" if precision == "tf32" else precision)
    _check(workload.spec, precision, workload.make_inputs(seed=4))


def test_r50_c5_op_under_cuda_graph_capture_and_replay():
    # The unfused forward allocates its columns and rows on each call and multiplies through torch
    # (cuBLAS): captured after a warm-up, the graph replays it on new inputs.
    workload = get_workload("r50dcn_c5", "bfloat16")
    static = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in workload.make_inputs(seed=6).items()}
    fresh = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in workload.make_inputs(seed=7).items()}
    out = replayed_in_cuda_graph(lambda args: deft_tvm.deform_conv2d(**args), static, fresh)
    reference = deform_conv2d_reference(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                           for k, v in fresh.items()})
    assert_close(out, reference, tolerance_key("bfloat16", False))
