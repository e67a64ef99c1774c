"""Exported kernel libraries: export, manifest checks, loading without the compiler, dispatch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import deft_tvm
from deft_tvm import cli
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import kernel_cache, library
from deft_tvm.runtime.records import commit_schedule, database_dir
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import default_schedule

from helpers import make_case

SPECS = [
    DeformConvSpec(2, 4, 7, 8, 6, 3, 3, padding=(1, 1)),
    DeformConvSpec(1, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3,
                   has_mask=False, dtype="bfloat16"),
]


@pytest.fixture(autouse=True)
def _forget_loaded_libraries():
    library.unload_all()
    yield
    library.unload_all()


def _entries(target):
    return [library.KernelEntry(s, default_schedule(deform_conv2d_primfunc(s), s, target).mod["main"],
            "default schedule") for s in SPECS]


@pytest.fixture
def exported(tmp_path):
    target = target_for_device("cpu")
    return library.export_library(_entries(target), target, tmp_path / "lib")


def test_export_writes_one_library_and_a_manifest(exported):
    manifest = json.loads(exported.read_text())
    assert manifest["library"] == "deft_kernels.so" and (exported.parent / "deft_kernels.so").is_file()
    assert list(exported.parent.glob("*.so")) == [exported.parent / "deft_kernels.so"]
    assert [k["workload"] for k in manifest["kernels"]] == [s.key() for s in SPECS]
    assert {k["dtype"] for k in manifest["kernels"]} == {"float32", "bfloat16"}
    assert manifest["target"]["kind"] == "llvm" and manifest["tvm_version"] and manifest["tvm_ffi_version"]
    assert len(manifest["sha256"]) == 64


def test_loaded_kernels_are_dispatched_and_correct(exported, isolated_cache, monkeypatch):
    loaded = deft_tvm.load_library(exported)
    assert set(loaded.kernels) == {s.key() for s in SPECS}
    monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *a: pytest.fail("a library kernel was rebuilt"))
    for spec in SPECS:
        assert kernel_cache.get_kernel(spec, torch.device("cpu")) is loaded.kernels[spec.key()]
        args = make_case(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("error", kernel_cache.UntunedKernelWarning)
            out = deft_tvm.deform_conv2d(**args)
        assert_close(out, deft_tvm.deform_conv2d_reference(**args), spec.dtype)


def test_a_library_loaded_after_a_call_takes_the_next_calls(exported, isolated_cache):
    spec, cpu = SPECS[0], torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kernel_cache.UntunedKernelWarning)
        deft_tvm.deform_conv2d(**make_case(spec))
    compiled = kernel_cache.forward_call(spec, cpu).kernel
    loaded = deft_tvm.load_library(exported)
    assert compiled is not loaded.kernels[spec.key()]
    assert kernel_cache.forward_call(spec, cpu).kernel is loaded.kernels[spec.key()]
    library.unload_all()
    assert kernel_cache.forward_call(spec, cpu).kernel is compiled


def _edit_manifest(path, **changes):
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("tvm_version", "0.1.0", r"TVM version is '.*' here but '0.1.0' in its manifest"),
        ("tvm_ffi_version", "9.9.9", r"tvm-ffi version is '.*' here but '9.9.9' in its manifest"),
        ("arch", "aarch64-linux-gnu", r"llvm architecture is '.*' here but 'aarch64-linux-gnu' in its manifest"),
        ("format", 2, r"manifest format 2, expected 1"),
    ],
)
def test_manifest_mismatch_is_refused(exported, field, value, match):
    _edit_manifest(exported, **{field: value})
    with pytest.raises(ValueError, match=match):
        deft_tvm.load_library(exported)


def test_tampered_library_is_refused(exported):
    lib = exported.parent / "deft_kernels.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"sha256 of deft_kernels.so is '[0-9a-f]{64}' here but"):
        deft_tvm.load_library(exported)


def test_cuda_library_needs_a_gpu(exported):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines without one")
    _edit_manifest(exported, target_kind="cuda", arch="sm_90")
    with pytest.raises(RuntimeError, match="this kernel library is for CUDA, but no CUDA GPU is available"):
        deft_tvm.load_library(exported)


def test_calling_a_loaded_library_needs_no_compiler(exported, tmp_path):
    # A fresh interpreter where every way into TVM's compiler raises: loading and calling must work.
    script = textwrap.dedent(f"""
        import warnings
        import torch, tvm
        import deft_tvm
        from deft_tvm.runtime import kernel_cache
        from deft_tvm.compute.spec import DeformConvSpec

        def forbidden(*args, **kwargs):
            raise AssertionError("the TVM compiler was invoked")

        tvm.compile = forbidden
        tvm.s_tir.Schedule = forbidden
        kernel_cache.build = forbidden
        warnings.simplefilter("error")
        deft_tvm.load_library({str(exported)!r})
        spec = DeformConvSpec(**{dataclasses.asdict(SPECS[0])!r})
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(spec.input_shape, generator=gen)
        offset = torch.randn(spec.offset_shape, generator=gen)
        mask = torch.rand(spec.mask_shape, generator=gen)
        weight = torch.randn(spec.weight_shape, generator=gen)
        bias = torch.randn(spec.out_channels, generator=gen)
        out = deft_tvm.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
        ref = deft_tvm.deform_conv2d_reference(x, offset, weight, bias, padding=1, mask=mask)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
        print("ran without the compiler")
    """)
    env = {"DEFT_TVM_CACHE_DIR": str(tmp_path / "empty_cache"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran without the compiler" in result.stdout


def test_untuned_workload_warns_once(isolated_cache):
    spec = DeformConvSpec(1, 2, 5, 5, 2, 3, 3, padding=(1, 1))
    args = make_case(spec)
    with pytest.warns(kernel_cache.UntunedKernelWarning, match=rf"no tuned kernel for workload {spec.key()}"):
        deft_tvm.deform_conv2d(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernel_cache.UntunedKernelWarning)
        deft_tvm.deform_conv2d(**args)


def test_export_command_compiles_tuning_databases(tmp_path, capsys):
    target = target_for_device("cpu")
    spec = SPECS[0]
    directory = database_dir(tmp_path / "logs", spec, target)
    commit_schedule(directory, spec, default_schedule(deform_conv2d_primfunc(spec), spec, target), target, 1e-4)
    out = tmp_path / "out"
    assert cli.main(["export", "--device", "cpu", "--logs", str(tmp_path / "logs"), "--out", str(out),
                     "--workloads", "test_paper_small"]) == 0
    manifest = json.loads((out / "deft_kernels.json").read_text())
    origins = {k["workload"]: k["origin"] for k in manifest["kernels"]}
    assert origins[spec.key()] == str(directory)
    assert list(origins.values()).count("default schedule") == 1
    assert "exported 2 kernels for llvm" in capsys.readouterr().out
