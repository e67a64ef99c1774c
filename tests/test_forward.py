"""deft_tvm.deform_conv2d on the CPU target against the float64 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deft_tvm
from deft_tvm import deform_conv2d_reference
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime.kernel_cache import get_kernel

from helpers import DTYPES, make_case

SHAPES = {
    "3x3_pad1": DeformConvSpec(2, 4, 7, 8, 5, 3, 3, padding=(1, 1)),
    "asymmetric": DeformConvSpec(
        2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3
    ),
    "1x1": DeformConvSpec(1, 3, 5, 4, 2, 1, 1),
    "batch33_small": DeformConvSpec(33, 2, 3, 5, 3, 2, 2, padding=(0, 1)),
}


def _check(spec: DeformConvSpec, **overrides):
    args = make_case(spec)
    args.update(overrides)
    with torch.no_grad():
        out = deft_tvm.deform_conv2d(**args)
    ref = deform_conv2d_reference(**args)
    assert out.dtype == args["input"].dtype
    assert out.shape == spec.output_shape
    assert_close(out, ref, spec.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_mask", [True, False], ids=["v2_mask", "v1_no_mask"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference(shape, has_mask, dtype):
    _check(dataclasses.replace(SHAPES[shape], has_mask=has_mask, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_bias(dtype):
    _check(dataclasses.replace(SHAPES["asymmetric"], has_bias=False, dtype=dtype))


@pytest.mark.parametrize("has_mask", [True, False])
def test_batch_zero(has_mask):
    spec = dataclasses.replace(SHAPES["asymmetric"], batch=0, has_mask=has_mask)
    out = _check(spec)
    assert out.shape == (0, 4, spec.out_h, spec.out_w)


def test_int_and_pair_hyper_parameters_agree():
    spec = DeformConvSpec(1, 2, 6, 6, 2, 3, 3, stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    args = make_case(spec)
    as_pairs = deft_tvm.deform_conv2d(**args)
    args.update(stride=2, padding=1, dilation=1)
    assert torch.equal(deft_tvm.deform_conv2d(**args), as_pairs)


def test_non_contiguous_inputs():
    spec = SHAPES["asymmetric"]
    args = make_case(spec)
    # Same values, other memory layouts: a transposed copy viewed back, channels_last, a strided view.
    args["input"] = args["input"].transpose(2, 3).contiguous().transpose(2, 3)
    args["offset"] = args["offset"].contiguous(memory_format=torch.channels_last)
    interleaved = torch.zeros(*spec.mask_shape, 2, dtype=args["mask"].dtype)
    interleaved[..., 0] = args["mask"]
    args["mask"] = interleaved[..., 0]
    args["weight"] = args["weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert not any(args[k].is_contiguous() for k in ("input", "offset", "mask", "weight"))
    _check(spec, **{k: args[k] for k in ("input", "offset", "mask", "weight")})


def test_output_does_not_alias_inputs_and_inputs_are_untouched():
    spec = SHAPES["3x3_pad1"]
    args = make_case(spec)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    deft_tvm.deform_conv2d(**args)
    for name, value in before.items():
        assert torch.equal(args[name], value), name


@pytest.mark.parametrize("shape", ["asymmetric", "1x1", "batch33_small"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_channels_last_input_kernel_matches_reference(shape, memory_format):
    # The compute with layout="NHWC" (what the CUDA tensor-core kernels gather from), on the
    # CPU target, fed as the custom op feeds it from either memory format.
    spec = dataclasses.replace(SHAPES[shape], layout="NHWC")
    args = make_case(spec)
    kernel = get_kernel(spec, torch.device("cpu"))
    out = torch.empty(spec.output_shape, dtype=args["input"].dtype)
    source = args["input"].contiguous(memory_format=memory_format)
    kernel(*spec.kernel_arguments(source, args["offset"], args["mask"], args["weight"], args["bias"]), out)
    assert_close(out, deform_conv2d_reference(**args), spec.dtype)


def test_kernel_layout_is_part_of_the_key():
    spec = SHAPES["asymmetric"]
    nhwc = dataclasses.replace(spec, layout="NHWC")
    assert nhwc.key() == spec.key() + "_nhwc"
    assert nhwc.kernel_input_shape == (2, 9, 11, 6)
    with pytest.raises(ValueError, match="layout 'CHWN' is not supported"):
        dataclasses.replace(spec, layout="CHWN")


def test_tf32_is_part_of_the_key_and_float32_only():
    spec = SHAPES["asymmetric"]
    assert dataclasses.replace(spec, tf32=True).key() == spec.key() + "_tf32"
    with pytest.raises(ValueError, match="tf32 applies to float32 only, got dtype 'float16'"):
        dataclasses.replace(spec, dtype="float16", tf32=True)
    assert tolerance_key("float32", tf32=True) == "tf32" and tolerance_key("float16", tf32=True) == "float16"


def test_allowing_tf32_leaves_cpu_kernels_in_full_float32():
    # TF32 applies to CUDA tensor cores only: on the CPU the float32 tolerance still holds.
    args = make_case(SHAPES["3x3_pad1"])
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = deft_tvm.deform_conv2d(**args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert_close(out, deform_conv2d_reference(**args), "float32")
