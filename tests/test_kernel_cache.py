"""The in-memory and on-disk kernel cache."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import target_for_device

from helpers import make_case

SPEC = DeformConvSpec(1, 2, 5, 6, 3, 3, 3, padding=(1, 1))


def _run_and_check():
    args = make_case(SPEC)
    assert_close(deft_tvm.deform_conv2d(**args), deft_tvm.deform_conv2d_reference(**args), SPEC.dtype)


def test_kernel_is_written_to_disk_and_reloaded_without_building(isolated_cache, monkeypatch):
    _run_and_check()
    path = kernel_cache.kernel_path(SPEC, target_for_device("cpu"))
    assert path.is_file() and path.is_relative_to(isolated_cache)
    assert f"tvm-{__import__('tvm').__version__}" in str(path)

    kernel_cache.clear_memory_cache()
    monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *a: pytest.fail("a cached kernel was rebuilt"))
    _run_and_check()


def test_memory_cache_returns_the_same_kernel(isolated_cache):
    assert kernel_cache.get_kernel(SPEC, torch.device("cpu")) is kernel_cache.get_kernel(SPEC, torch.device("cpu"))


@pytest.mark.parametrize("garbage", [b"", b"not a shared library\x00" * 50])
def test_corrupted_entry_is_rebuilt_with_a_warning(isolated_cache, garbage):
    path = kernel_cache.kernel_path(SPEC, target_for_device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    with pytest.warns(RuntimeWarning, match=r"could not be loaded .* rebuilding it"):
        _run_and_check()
    assert path.stat().st_size > 1000


def test_unsupported_device_type_says_why():
    with pytest.raises(NotImplementedError, match=r"no kernels for device type 'meta'; supported: 'cpu', 'cuda'"):
        target_for_device("meta")


def test_batch_zero_needs_no_kernel(isolated_cache, monkeypatch):
    monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *a: pytest.fail("batch 0 compiled a kernel"))
    args = make_case(DeformConvSpec(0, 2, 5, 6, 3, 3, 3, padding=(1, 1)))
    assert deft_tvm.deform_conv2d(**args).shape == (0, 3, 5, 6)


def test_untuned_warning_points_at_the_callers_line(isolated_cache):
    kernel_cache.clear_memory_cache()
    args = make_case(SPEC)
    layer = deft_tvm.DeformConv2d(SPEC.in_channels, SPEC.out_channels, 3, padding=1)
    with pytest.warns(kernel_cache.UntunedKernelWarning) as functional_call:
        deft_tvm.deform_conv2d(**args)
    kernel_cache.clear_memory_cache()
    with pytest.warns(kernel_cache.UntunedKernelWarning) as module_call:
        with torch.no_grad():
            layer(args["input"], args["offset"], args["mask"])
    for record in (*functional_call, *module_call):
        assert record.filename == __file__, record.filename


def _two_function_module():
    from tvm.script import tirx as T

    f32 = "float32"

    @T.prim_func
    def double(a: T.Buffer((4,), f32), b: T.Buffer((4,), f32)):
        for i in range(4):
            b[i] = a[i] * T.float32(2)

    @T.prim_func
    def negate(a: T.Buffer((4,), f32), b: T.Buffer((4,), f32)):
        for i in range(4):
            b[i] = -a[i]

    import tvm

    return tvm.IRModule({"double": double.with_attr("global_symbol", "double"),
                         "negate": negate.with_attr("global_symbol", "negate")})


def test_a_library_is_cached_under_its_name_and_fingerprint(isolated_cache):
    """The fused backward's path: a multi-function library keyed by a caller's fingerprint, built
    once, then loaded from disk without building (or making) its module."""
    from deft_tvm.runtime.targets import compile_kernel

    target = target_for_device("cpu")
    built = []

    def build_library():
        built.append(1)
        return compile_kernel(_two_function_module(), target)

    def run(functions):
        a, out = torch.arange(4, dtype=torch.float32), torch.empty(4)
        return [(f(a, out), out.tolist())[1] for f in functions]

    first = kernel_cache.load_or_build_library("pair", "0123abcd", target, build_library, ("double", "negate"))
    assert run(first) == [[0.0, 2.0, 4.0, 6.0], [-0.0, -1.0, -2.0, -3.0]] and built == [1]
    path = kernel_cache.library_path("pair", "0123abcd", target)
    assert path.is_file() and path.is_relative_to(isolated_cache) and path.name == "pair-0123abcd.so"
    again = kernel_cache.load_or_build_library("pair", "0123abcd", target, build_library, ("negate",))
    assert run(again) == [[-0.0, -1.0, -2.0, -3.0]] and built == [1]
    kernel_cache.load_or_build_library("pair", "another", target, build_library, ("double",))
    assert built == [1, 1]
