"""Shape-generic CUDA kernels (issue 16) on a real GPU (``pytest -m gpu``): the tensor-core forward of
a layer configuration (fused, or unfused for wide layers: columns kernel, cuBLAS, output transpose;
the SIMT forward of a 1-channel stem),
its channels-last copies and its fused backward (with the default tilings, or those of a
configuration record), compiled on the first call, serve calls of 20
random batch and image sizes without a compile and match the float64 reference (forward and
gradients); so do the forward and fused backward of an exported library, loaded; skipped where
there is no GPU."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import deft_tvm
from deft_tvm.bench import deterministic_mode, tf32_mode
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest, tolerance_key
from deft_tvm import cli
from deft_tvm.runtime import backward, kernel_cache, library
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import unfused_forward
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

DEVICE = torch.device("cuda")
CONFIGURATIONS = {  # tensor-core layers (one group, channels in multiples of 16), asymmetric hyper-parameters; a stem
    "v2_float16": DeformConvSpec(1, 64, 20, 20, 64, 3, 3, padding=(1, 1), dtype="float16"),
    "asymmetric_bfloat16": DeformConvSpec(1, 32, 20, 20, 48, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                          offset_groups=2, dtype="bfloat16"),
    "v1_tf32_no_bias": DeformConvSpec(1, 16, 20, 20, 32, 3, 3, padding=(2, 2), dilation=(2, 2), has_mask=False,
                                      has_bias=False, dtype="float32"),
    "unfused_float16": DeformConvSpec(1, 256, 20, 20, 256, 3, 3, padding=(1, 1), dtype="float16"),
    "simt_stem_float32": DeformConvSpec(1, 1, 20, 20, 32, 3, 3, padding=(1, 1), dtype="float32"),  # SIMT forward
}
# The wide layer's sizes: those whose columns fit UNFUSED_MAX_COLUMNS_BYTES (N x H x W <= 58254 here), which the
# unfused forward takes; larger calls take the configuration's fused kernel, compiled on the first of them.
UNFUSED_SIZES = ((1, 2), (17, 160))


def _check_call(spec: DeformConvSpec, seed: int) -> None:
    case = make_case(spec, seed=seed)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    with torch.no_grad():
        out = deft_tvm.deform_conv2d(**args)
        reference = deft_tvm.deform_conv2d_reference(
            **{k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    assert_close(out, reference, tolerance_key(spec.dtype, tf32=spec.dtype == "float32"))


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_twenty_random_sizes_after_one_warm_up_call_compile_nothing(name, isolated_cache, monkeypatch):
    configuration = CONFIGURATIONS[name]
    with tf32_mode("on"):
        kernel = kernel_cache.forward_spec(configuration, DEVICE)
        target = target_for_device(DEVICE)
        part = "columns" if name.startswith("unfused") else "forward"
        assert kernel_cache.compiled_spec(kernel, target, part) is generic_spec(kernel)
        _check_call(configuration, seed=0)  # the warm-up call compiles the configuration's forward
        files = {p.name for p in isolated_cache.rglob("*.so")}
        assert files and all("nN_" in f for f in files), files  # the configuration's kernels only
        compiled = []
        monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *args: compiled.append(args))
        sizes = random.Random(name)
        (n_low, n_high), (low, high) = UNFUSED_SIZES if part == "columns" else ((1, 4), (17, 300))
        for seed in range(1, 21):
            spec = dataclasses.replace(configuration, batch=sizes.randint(n_low, n_high),
                                       height=sizes.randint(low, high), width=sizes.randint(low, high))
            assert unfused_forward(kernel_cache.forward_spec(spec, DEVICE), target) == (part == "columns")
            _check_call(spec, seed)
        assert compiled == [] and {p.name for p in isolated_cache.rglob("*.so")} == files


NAMES = ("input", "offset", "weight", "bias", "mask")


def _check_training_call(spec: DeformConvSpec, seed: int) -> None:
    """Forward and backward of one call against the float64 reference, offsets on a 1/64 px grid
    shifted by 1/128 (no sampling point within rounding of a pixel boundary, where float32 and
    float64 could pick different corners)."""
    case = make_case(spec, seed=seed)
    case["offset"] = ((case["offset"] * 64).round() / 64 + 1 / 128).to(case["offset"].dtype)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    leaves = {k: args[k].clone().requires_grad_(True) for k in NAMES if args[k] is not None}
    out = deft_tvm.deform_conv2d(**{**args, **leaves})
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(DEVICE, out.dtype))
    reference = {k: v.to(DEVICE, torch.float64) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    key = tolerance_key(spec.dtype, tf32=spec.dtype == "float32")
    assert_close(out, deform_conv2d_reference(**reference), key)
    expected = deform_conv2d_reference_backward(grad_output.to(DEVICE), **reference)._asdict()
    for name, grad in zip(leaves, grads):
        assert grad.shape == args[name].shape, name
        assert_close_to_largest(grad, expected[name], key)


@pytest.mark.parametrize("name", [n for n in CONFIGURATIONS if not n.startswith("unfused")])
def test_training_calls_of_twenty_random_sizes_compile_nothing_after_one(name, isolated_cache, monkeypatch):
    configuration = CONFIGURATIONS[name]
    monkeypatch.setattr(backward, "_kernels", {})  # as in a new process
    with tf32_mode("on"):
        target = target_for_device(DEVICE)
        call = kernel_cache.with_torch_tf32(configuration, DEVICE)  # the backward's spec (NCHW)
        assert backward.fused_choice(call, target, "fused")[0] is generic_spec(call)
        _check_training_call(configuration, seed=0)  # the warm-up call compiles the configuration's kernels
        files = {p.name for p in isolated_cache.rglob("*.so")}
        assert any("fused_backward" in f for f in files) and all("nN_" in f for f in files), files
        compiled = []
        for module in (kernel_cache, backward):
            monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
        sizes = random.Random(name)
        for seed in range(1, 21):
            spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                       width=sizes.randint(17, 300))
            _check_training_call(spec, seed)
        assert compiled == [] and {p.name for p in isolated_cache.rglob("*.so")} == files


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deterministic_training_calls_of_twenty_random_sizes_compile_nothing_after_one(dtype, isolated_cache,
                                                                                       monkeypatch):
    """The staged backward (gradient kernels and sorted gather) of a configuration: float32
    without TF32 and float64 in deterministic mode, asymmetric (one group: a grouped layer's
    forward is compiled per size)."""
    configuration = dataclasses.replace(CONFIGURATIONS["asymmetric_bfloat16"], dtype=dtype)
    monkeypatch.setattr(backward, "_kernels", {})
    with tf32_mode("off"), deterministic_mode(True):
        target = target_for_device(DEVICE)
        assert backward.backward_parts(configuration, "cuda", True) == ("gradients", "gather")
        assert kernel_cache.compiled_spec(configuration, target, "backward") is generic_spec(configuration)
        _check_training_call(configuration, seed=0)
        files = {p.name for p in isolated_cache.rglob("*.so")}
        assert any("_gather-" in f for f in files) and all("nN_" in f for f in files), files
        compiled = []
        for module in (kernel_cache, backward):
            monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
        sizes = random.Random(dtype)
        for seed in range(1, 21):
            spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                       width=sizes.randint(17, 300))
            _check_training_call(spec, seed)
        assert compiled == [] and {p.name for p in isolated_cache.rglob("*.so")} == files


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_loaded_librarys_kernels_train_at_twenty_random_sizes(dtype, tmp_path, isolated_cache, monkeypatch):
    """``deft-tvm export --backward`` (float32: ``--tf32``) of a workload without records, loaded
    in a process that has no kernels: 20 random training calls (N 1-4, H and W 17-300) take the
    library's forward, its channels-last copies and fused backward, compile nothing, and match the
    float64 reference."""
    out = tmp_path / "lib"
    assert cli.main(["export", "--device", "cuda", "--logs", str(tmp_path / "no_logs"), "--out", str(out),
                     "--workloads", "test_tensor_core_small", "--dtypes", dtype, "--backward"]
                    + ["--tf32"] * (dtype == "float32")) == 0
    backward.clear_memory_cache()
    loaded = library.load_library(out / "deft_kernels.json")
    try:
        configuration = get_workload("test_tensor_core_small", dtype).spec
        with tf32_mode("on"):
            call = kernel_cache.with_torch_tf32(configuration, DEVICE)
            entry = backward._kernel(call, target_for_device(DEVICE), "fused").entry
            assert entry is loaded.kernels[f"{generic_spec(call).key()}_fused_backward"]
            sizes = random.Random(dtype)
            for seed in range(20):
                spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4),
                                           height=sizes.randint(17, 300), width=sizes.randint(17, 300))
                _check_training_call(spec, seed)
        assert list(isolated_cache.rglob("*.so")) == []
    finally:
        library.unload_all()
        backward.clear_memory_cache()


def _tuned_tilings(configuration: DeformConvSpec, arch: str) -> tuple:
    """Tilings unlike the configuration's defaults, as ``deft-tvm tune --fused-backward
    --configuration`` may record them: its data space's last tensor-core tiling of a group of taps
    (else its last one) and its weight space's last tiling, at the configuration's default sizes."""
    from deft_tvm.compute.spec import GENERIC_DIMENSIONS
    from deft_tvm.schedules.cuda_backward_fused import CONFIGURATION_SIZES, default_tilings
    from deft_tvm.tuning.fused_backward import data_space, weight_space

    sized = dataclasses.replace(configuration, **dict(zip(GENERIC_DIMENSIONS, CONFIGURATION_SIZES)))
    defaults = default_tilings(generic_spec(configuration), arch)
    data = [t for t in data_space(sized) if t != defaults[0]]
    data = [t for t in data if t.tensor_cores and t.tap_group > 1] or data
    weight = [t for t in weight_space(sized) if t != defaults[1]] or [defaults[1]]
    return data[-1], weight[-1]


@pytest.mark.parametrize("name", ["v2_float16", "v1_tf32_no_bias"])
def test_a_configurations_tuned_tilings_train_twenty_random_sizes(name, tmp_path, isolated_cache, monkeypatch):
    """A configuration's fused-backward record (tilings unlike its defaults) in the user's tuning
    directory: the warm-up call compiles the configuration's entry with them, then 20 random
    training calls (N 1-4, H and W 17-300) compile nothing and match the float64 reference."""
    from deft_tvm.runtime import records

    configuration = CONFIGURATIONS[name]
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path / "logs"))
    monkeypatch.setattr(backward, "_kernels", {})
    with tf32_mode("on"):
        target = target_for_device(DEVICE)
        call = kernel_cache.with_torch_tf32(configuration, DEVICE)
        data, weight = _tuned_tilings(call, str(target.attrs["arch"]))
        records.write_fused_backward(records.fused_backward_dir(tmp_path / "logs", generic_spec(call), target), {
            "spec": generic_spec(call).to_dict(), "data": dataclasses.asdict(data),
            "weight": dataclasses.asdict(weight)})
        assert backward.fused_choice(call, target, "fused") == (generic_spec(call), data, weight)
        _check_training_call(configuration, seed=0)
        files = {p.name for p in isolated_cache.rglob("*.so")}
        assert any("fused_backward" in f for f in files) and all("nN_" in f for f in files), files
        compiled = []
        for module in (kernel_cache, backward):
            monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
        sizes = random.Random(name)
        for seed in range(1, 21):
            spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                       width=sizes.randint(17, 300))
            _check_training_call(spec, seed)
        assert compiled == [] and {p.name for p in isolated_cache.rglob("*.so")} == files


@pytest.mark.parametrize("name", ["v2_float16", "asymmetric_bfloat16", "v1_tf32_no_bias"])
def test_a_configurations_forward_record_serves_twenty_random_sizes(name, tmp_path, isolated_cache, monkeypatch):
    """A configuration's forward tiling record (``deft-tvm tune --configuration``; here a neighbour
    of its default tiling) in the user's tuning directory: the warm-up call compiles the
    configuration's kernel with it, then calls of 20 random sizes compile nothing and match the
    float64 reference."""
    import tvm_ffi

    from deft_tvm.compute.kernels import kernel_primfunc
    from deft_tvm.runtime import records
    from deft_tvm.schedules import configuration_space

    configuration = CONFIGURATIONS[name]
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path / "logs"))
    with tf32_mode("on"):
        target = target_for_device(DEVICE)
        generic = generic_spec(kernel_cache.forward_spec(configuration, DEVICE))
        space = configuration_space(generic, target)
        tiling = space.neighbours(space.default())[-1]
        records.write_configuration_record(records.database_dir(tmp_path / "logs", generic, target), generic,
                                           {"tiling": space.to_dict(tiling)})
        sch, tuned = kernel_cache.schedule_for(generic, target)
        assert tuned and tvm_ffi.structural_equal(sch.mod, space.schedule(kernel_primfunc(generic), tiling).mod)
        _check_call(configuration, seed=0)
        files = {p.name for p in isolated_cache.rglob("*.so")}
        assert files and all("nN_" in f for f in files), files
        compiled = []
        monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *args: compiled.append(args))
        sizes = random.Random(name)
        for seed in range(1, 21):
            spec = dataclasses.replace(configuration, batch=sizes.randint(1, 4), height=sizes.randint(17, 300),
                                       width=sizes.randint(17, 300))
            _check_call(spec, seed)
        assert compiled == [] and {p.name for p in isolated_cache.rglob("*.so")} == files
