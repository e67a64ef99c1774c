"""The tensor-core forward's channels-last copies (``schedules.cuda_layout``, taken by
``runtime.kernel_cache.ForwardCall``): the copies are torch's permuted ones exactly (built
serially for the CPU), the runtime takes them from one call where it is given NCHW tensors and
torch's views where the input is already channels last, a layer configuration's copies
(``generic_spec``) serve every size, and the CUDA function compiles with nvcc for sm_90, in 64-bit
indices past 2**31 elements."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import tvm

from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules.cuda_layout import channels_last_primfunc

from test_fused_backward_codegen import _compile, needs_nvcc
from test_large_index import HUGE_FORWARD

HUGE = dataclasses.replace(HUGE_FORWARD, batch=9)  # 2.4e9 input elements: flat indices past int32
SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), groups=2, offset_groups=3,
                      layout="NHWC")
# Several transpose tiles each way, the last ones partial: 70 channels (64 + 6), 99 positions (3 x 32 + 3)
# and a weight of 70 channels per group by 3 x 3 taps.
TILED = DeformConvSpec(2, 70, 9, 11, 5, 3, 3, padding=(1, 1), layout="NHWC")


def _serial(spec):
    mod = tvm.IRModule({"channels_last": channels_last_primfunc(spec, bind_threads=False)})
    return tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))["channels_last"]


def _tensors(spec, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = {"input": spec.input_shape, "offset": spec.offset_shape, "mask": spec.mask_shape,
              "weight": spec.weight_shape, "bias": (spec.out_channels,)}
    return {k: torch.randn(shape, generator=gen).to(dtype) for k, shape in shapes.items()}


@pytest.mark.parametrize("base", [SPEC, TILED], ids=["one_tile", "tiles"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_copies_are_torchs_permuted_copies(base, dtype):
    spec = dataclasses.replace(base, dtype=dtype)
    t = _tensors(spec, getattr(torch, dtype))
    input_nhwc = torch.full(spec.kernel_input_shape, float("nan"), dtype=t["input"].dtype)
    weight_ohwi = torch.full(spec.kernel_weight_shape, float("nan"), dtype=t["input"].dtype)
    _serial(spec)(t["input"], t["weight"], input_nhwc, weight_ohwi)
    assert torch.equal(input_nhwc, t["input"].permute(0, 2, 3, 1))
    assert torch.equal(weight_ohwi, t["weight"].permute(0, 2, 3, 1))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_configurations_copies_serve_every_size(dtype):
    copies = _serial(generic_spec(dataclasses.replace(TILED, dtype=dtype)))
    for batch, height, width in ((1, 17, 5), (3, 40, 33)):
        spec = dataclasses.replace(TILED, batch=batch, height=height, width=width, dtype=dtype)
        t = _tensors(spec, getattr(torch, dtype))
        input_nhwc = torch.full(spec.kernel_input_shape, float("nan"), dtype=t["input"].dtype)
        weight_ohwi = torch.full(spec.kernel_weight_shape, float("nan"), dtype=t["input"].dtype)
        copies(t["input"], t["weight"], input_nhwc, weight_ohwi)
        assert torch.equal(input_nhwc, t["input"].permute(0, 2, 3, 1))
        assert torch.equal(weight_ohwi, t["weight"].permute(0, 2, 3, 1))


def _forward_call(spec, channels_last) -> kernel_cache.ForwardCall:
    return kernel_cache.ForwardCall(spec, None, channels_last)


def test_runtime_takes_one_call_for_nchw_tensors_and_views_for_channels_last():
    calls = []
    serial = _serial(SPEC)
    copies = _forward_call(SPEC, lambda *tensors: calls.append(len(tensors)) or serial(*tensors))
    t = _tensors(SPEC, torch.float32)  # CPU tensors stand in for CUDA ones: only the routing is under test
    expected = SPEC.kernel_arguments(t["input"], t["offset"], t["mask"], t["weight"], t["bias"])
    got = copies.arguments(t["input"], t["offset"], t["mask"], t["weight"], t["bias"])
    assert calls == [4] and len(got) == len(expected) == 5
    assert all(torch.equal(a, b) and a.is_contiguous() for a, b in zip(got, expected))

    channels_last = t["input"].contiguous(memory_format=torch.channels_last)
    got = copies.arguments(channels_last, t["offset"], t["mask"], t["weight"], t["bias"])
    assert calls == [4] and got[0].data_ptr() == channels_last.data_ptr()  # no copy, no call
    nchw = dataclasses.replace(SPEC, layout="NCHW")
    got = _forward_call(nchw, None).arguments(t["input"], t["offset"], None, t["weight"], None)
    assert calls == [4] and got[0] is t["input"] and len(got) == 3


def test_forward_call_takes_the_copies_for_channels_last_kernels_on_cuda_only(monkeypatch):
    monkeypatch.setattr(kernel_cache, "_forward_calls", {})
    monkeypatch.setattr(kernel_cache, "get_kernel", lambda spec, device: ("kernel", spec))
    monkeypatch.setattr(kernel_cache, "channels_last_kernel", lambda spec, target: ("copies", spec))
    monkeypatch.setattr(kernel_cache, "target_for_device", lambda device: cuda_target("sm_90"))
    nchw = dataclasses.replace(SPEC, layout="NCHW", dtype="float16", groups=1, out_channels=32, in_channels=32,
                               offset_groups=1)
    call = kernel_cache.forward_call(nchw, torch.device("cuda"))
    assert call.spec.layout == "NHWC" and call.kernel == ("kernel", call.spec)
    assert call.channels_last == ("copies", generic_spec(call.spec))  # an untuned layer: its configuration's
    assert call.output_shape == nchw.output_shape and call.copy_shapes == ((2, 9, 11, 32), (32, 3, 2, 32))
    assert kernel_cache.forward_call(nchw, torch.device("cuda")) is call  # looked up once
    monkeypatch.setattr(kernel_cache, "target_for_device", lambda device: tvm.target.Target("llvm"))
    assert kernel_cache.forward_call(nchw, torch.device("cpu")).channels_last is None


@needs_nvcc
@pytest.mark.parametrize("spec", [dataclasses.replace(SPEC, dtype="float16"), HUGE,
                                  generic_spec(dataclasses.replace(TILED, dtype="bfloat16"))],
                         ids=["small", "huge", "configuration"])
def test_cuda_copies_compile_with_nvcc(spec):
    source = compile_kernel(tvm.IRModule({"channels_last": channels_last_primfunc(spec)}),
                            cuda_target("sm_90")).mod.imports[0].inspect_source()
    assert len(re.findall(r"__global__ void [^;{]*\{", source)) == 2  # two kernel definitions
    kernels = source[source.index('extern "C"'):]
    assert ("int64_t" in kernels) == (spec is HUGE)
    assert _compile(source)[:4] == b"\x7fELF"
