"""Shape-generic CPU kernels (issue 16): one forward and one backward kernel per layer
configuration, compiled on the first call; later calls of any batch and image size compile
nothing and match the float64 reference."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest
from deft_tvm.runtime import backward, kernel_cache
from deft_tvm.runtime.targets import target_for_device

from helpers import make_case

CONFIGURATIONS = {  # torchvision-style asymmetric hyper-parameters; DCNv1 without bias in float64
    "asymmetric_v2": DeformConvSpec(1, 6, 20, 20, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                    groups=2, offset_groups=3),
    "v1_no_bias": DeformConvSpec(1, 4, 20, 20, 6, 3, 3, padding=(1, 1), offset_groups=2, has_mask=False,
                                 has_bias=False, dtype="float64"),
}
NAMES = ("input", "offset", "weight", "bias", "mask")


def _case(spec: DeformConvSpec, seed: int) -> dict:
    """``make_case`` with offsets on a 1/64 px grid shifted by 1/128: no sampling coordinate lies
    within rounding of a pixel boundary, where the float32 kernel and the float64 reference could
    pick different corners (and differ in grad_offset by a whole pixel's slope)."""
    case = make_case(spec, seed=seed)
    case["offset"] = (case["offset"] * 64).round() / 64 + 1 / 128
    return case


def _check_call(spec: DeformConvSpec, seed: int) -> None:
    case = _case(spec, seed)
    leaves = {k: case[k].clone().requires_grad_(True) for k in NAMES if case[k] is not None}
    out = deft_tvm.deform_conv2d(**{**case, **leaves})
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(out.dtype))
    assert_close(out, deform_conv2d_reference(**case), spec.dtype)
    expected = deform_conv2d_reference_backward(grad_output, **case)._asdict()
    for name, grad in zip(leaves, grads):
        assert grad.shape == case[name].shape, name
        assert_close_to_largest(grad, expected[name], spec.dtype)


def _kernel_files(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*.so")}


@pytest.fixture
def fresh_cache(isolated_cache, monkeypatch):
    """``isolated_cache`` with the backward's kernels forgotten too (as in a new process)."""
    monkeypatch.setattr(backward, "_kernels", {})
    return isolated_cache


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_twenty_random_sizes_after_one_warm_up_call_compile_nothing(name, fresh_cache, monkeypatch):
    configuration = CONFIGURATIONS[name]
    _check_call(configuration, seed=0)  # the warm-up call: forward and backward of one size
    files = _kernel_files(fresh_cache)
    key = generic_spec(configuration).key()  # the forward, the gradient kernels and the scatter of the configuration
    assert {f.rsplit("-", 1)[0] for f in files} == {key, f"{key}_backward", f"{key}_scatter"}, files
    compiled = []
    for module in (kernel_cache, backward):
        monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
    sizes = random.Random(name)
    for seed in range(1, 21):
        spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                   width=sizes.randint(17, 300))
        _check_call(spec, seed)
    assert compiled == [] and _kernel_files(fresh_cache) == files


def test_a_new_process_loads_the_configurations_kernels_from_disk(fresh_cache, monkeypatch):
    configuration = CONFIGURATIONS["asymmetric_v2"]
    _check_call(configuration, seed=0)
    kernel_cache.clear_memory_cache()
    monkeypatch.setattr(backward, "_kernels", {})  # as in a fresh process
    compiled = []
    for module in (kernel_cache, backward):
        monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
    _check_call(dataclasses.replace(configuration, batch=3, height=31, width=45), seed=1)
    assert compiled == []


def test_the_generic_spec_is_one_object_per_configuration():
    spec = CONFIGURATIONS["asymmetric_v2"]
    generic = generic_spec(spec)
    assert generic is generic_spec(dataclasses.replace(spec, batch=4, height=99, width=17))
    assert generic is not generic_spec(dataclasses.replace(spec, dtype="float64"))
    assert generic.shape_generic and not spec.shape_generic and generic_spec(generic) is generic
    assert generic.key() == "nN_c6_hH_wW_o4_k3x2_s2x1_p1x0_d2x1_g2_og3_mb_float32"
    # The output sizes are variables of their own (as expressions of H and W, fused loops fail in TVM 0.27).
    assert (str(generic.out_h), str(generic.out_w)) == ("OH", "OW") and generic.out_h is generic_spec(spec).out_h


def test_calls_beyond_int32_indexing_or_with_a_tuned_record_keep_per_size_kernels(monkeypatch):
    target = target_for_device(torch.device("cpu"))
    spec = CONFIGURATIONS["asymmetric_v2"]
    assert kernel_cache.compiled_spec(spec, target) is generic_spec(spec)
    assert kernel_cache.compiled_spec(spec, target, "backward") is generic_spec(spec)
    huge = dataclasses.replace(spec, batch=64, height=4096, width=4096)
    assert huge.index_dtype == "int64" and kernel_cache.compiled_spec(huge, target) is huge
    monkeypatch.setattr(kernel_cache, "tuned_database", lambda *args: Path("a tuned record"))
    assert kernel_cache.compiled_spec(spec, target) is spec


def test_a_new_size_takes_its_gradient_buffers_from_the_configuration_s_compute(monkeypatch):
    """The gradient kernel's output buffers of a call are its configuration's compute with the
    call's sizes put in: the shapes of the size's own compute, with no TE build for a new size (one
    takes milliseconds); sizes past int32 indexing (kernels of their own) build their own."""
    configuration = CONFIGURATIONS["asymmetric_v2"]
    backward._output_layout(configuration)  # the configuration's compute, built once
    compute, built = backward.deform_conv2d_backward_te, []
    monkeypatch.setattr(backward, "deform_conv2d_backward_te", lambda spec: built.append(spec) or compute(spec))
    sizes = random.Random(1)
    for _ in range(5):
        spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                   width=sizes.randint(17, 300))
        own = tuple((o.op.name, tuple(int(d) for d in o.shape), str(o.dtype)) for o in compute(spec)[1])
        assert backward._output_layout(spec) == own
    assert built == []
    huge = dataclasses.replace(configuration, batch=64, height=4096, width=4096)
    assert backward._output_layout(huge)[0] == ("grad_columns", (64, 6, 3, 2, huge.out_h, huge.out_w), "float32")
    assert built == [huge]
    backward.clear_memory_cache()  # as a new process starts (the multi-scale benchmark's cached run): none kept
    assert backward._output_layout.cache_info().currsize == backward._compute_outputs.cache_info().currsize == 0
