"""The backward's gradient kernels as tunable workload kernels: CPU and CUDA schedules and their
design spaces, tuning on profile inputs, export in the kernel library and dispatch from it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import tvm
from tvm import s_tir

import deft_tvm
from deft_tvm import cli
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, kernel_key
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import backward, library
from deft_tvm.runtime.records import best_schedule, database_dir, read_part
from deft_tvm.runtime.targets import compile_kernel, cuda_target, target_for_device
from deft_tvm.schedules import default_schedule, design_space, search_start
from deft_tvm.tuning.search import ProfileInputs, measured_records, tune
from deft_tvm.tuning.workloads import get_workload

from helpers import TENSOR_ARGUMENTS, grad_leaves, make_case

CPU = target_for_device("cpu")
ASYMMETRIC = get_workload("test_asymmetric")


@pytest.fixture(autouse=True)
def _forget_loaded_libraries():
    library.unload_all()
    yield
    library.unload_all()


def _gradients(kernel, spec: DeformConvSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every output of the gradient kernel ``kernel`` on profile inputs of ``spec``."""
    mod = kernel_primfunc(spec, "backward")
    args_info = [info.as_json() for info in tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(mod["main"])]
    args = ProfileInputs(spec, "student_t3_2px", seed=seed, part="backward")(tvm.cpu(), args_info, 1)[0]
    kernel(*args)
    names = [b.name for b in mod["main"].params][-len(backward._output_layout(spec)):]
    return {name: torch.from_dlpack(a) for name, a in zip(names, args[-len(names):])}


def test_unknown_kernel_part_is_refused():
    with pytest.raises(ValueError, match=r"unknown kernel part 'sideways'; expected one of forward, backward"):
        kernel_key(ASYMMETRIC.spec, "sideways")
    assert kernel_key(ASYMMETRIC.spec, "backward") == ASYMMETRIC.spec.key() + "_backward"
    with pytest.raises(ValueError, match=r"no compute for kernel part 'fused_backward'; expected one of forward"):
        kernel_primfunc(ASYMMETRIC.spec, "fused_backward")  # the fused backward's entry is TIR of its own


@pytest.mark.parametrize("seed", [1, 2])
def test_cpu_backward_schedules_compute_the_unscheduled_gradients(seed):
    spec = ASYMMETRIC.spec
    unscheduled = compile_kernel(kernel_primfunc(spec, "backward"), CPU)["main"]
    expected = _gradients(unscheduled, spec)
    sampled = s_tir.Schedule(kernel_primfunc(spec, "backward"), seed=seed)
    design_space(spec, CPU, "backward")(sampled)
    for sch in (default_schedule(kernel_primfunc(spec, "backward"), spec, CPU, "backward"), sampled):
        got = _gradients(compile_kernel(sch.mod, CPU)["main"], spec)
        assert list(got) == list(expected)
        assert torch.equal(got.pop("coord_index"), expected["coord_index"])
        for name, value in got.items():
            assert_close(value, expected[name].double(), "float32")


def test_cpu_backward_interpolates_rows_inside_the_weight_reduction():
    """No materialised sampled-columns buffer: each row is interpolated inside grad_weight's loop
    nest, once per (output-channel tile, input channel, tap, batch, row)."""
    spec = get_workload("test_paper_small").spec
    sch = default_schedule(kernel_primfunc(spec, "backward"), spec, CPU, "backward")
    row_loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("sampled_columns"))]
    weight_loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("grad_weight_acc_rf_update"))]
    assert row_loops[:5] == weight_loops[:5]  # parallel (tile, channel), ky, kx, batch, row
    assert [int(loop.extent) for loop in row_loops[5:]] == [1, 1, 1, 1, 1, spec.out_w]


@pytest.mark.parametrize("target", [CPU, cuda_target("sm_90")], ids=["llvm", "cuda"])
def test_backward_search_starts_from_the_default_schedule(target):
    spec = ASYMMETRIC.spec
    start = search_start(spec, target, "backward")
    sampling = "sample_categorical" if target.kind.name == "cuda" else "sample_perfect_tile"
    assert sampling in str(start.trace)  # mutable by the search
    default = default_schedule(kernel_primfunc(spec, "backward"), spec, target, "backward")
    tvm.ir.assert_structural_equal(start.mod, default.mod)


def test_cuda_backward_space_samples_threads_and_compiles():
    spec = dataclasses.replace(ASYMMETRIC.spec, dtype="float16")
    target = cuda_target("sm_90")
    sources = set()
    for seed in (1, 2, 3):
        sch = s_tir.Schedule(kernel_primfunc(spec, "backward"), seed=seed)
        design_space(spec, target, "backward")(sch)
        sources.add(compile_kernel(sch.mod, target).mod.imports[0].inspect_source())
    assert len(sources) > 1  # the threads per block really are sampled


def test_backward_measurement_inputs_follow_the_kernel():
    spec = ASYMMETRIC.spec
    mod = kernel_primfunc(spec, "backward")
    args_info = [info.as_json() for info in tvm.s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(mod["main"])]
    args = ProfileInputs(spec, "student_t3_2px", part="backward")(tvm.cpu(), args_info, 1)[0]
    assert [tuple(a.shape) for a in args] == [tuple(info[2]) for info in args_info]
    grad_output = torch.from_dlpack(args[4])
    assert grad_output.shape == spec.output_shape and grad_output.std() > 0.5
    with pytest.raises(ValueError, match=r"arguments .* do not match the kernel's"):
        ProfileInputs(spec, "student_t3_2px")(tvm.cpu(), args_info, 1)  # the forward's arguments


def test_generic_space_is_for_the_forward_only(tmp_path):
    with pytest.raises(ValueError, match=r"the generic space is the forward's ablation"):
        tune(ASYMMETRIC.spec, ASYMMETRIC.profile, CPU, tmp_path, trials=1, space="generic", part="backward")


def test_tuned_backward_is_exported_loaded_and_used(tmp_path, isolated_cache, monkeypatch):
    spec = ASYMMETRIC.spec
    directory = database_dir(tmp_path / "logs", spec, CPU, "backward")
    assert directory.name == spec.key() + "_backward"
    result = tune(spec, ASYMMETRIC.profile, CPU, directory, trials=2, trials_per_round=1, seed=1, part="backward")
    assert result.trials == 2 and read_part(directory) == "backward"
    assert all("sample_perfect_tile" in str(r.trace) for r in measured_records(directory))
    assert best_schedule(directory, CPU)[1] is not None

    out = tmp_path / "lib"
    assert cli.main(["export", "--device", "cpu", "--logs", str(tmp_path / "logs"), "--out", str(out)]) == 0
    manifest = json.loads((out / "deft_kernels.json").read_text())
    assert [(k["workload"], k["part"], k["origin"]) for k in manifest["kernels"]] == [
        (spec.key() + "_backward", "backward", str(directory)), (spec.key() + "_scatter", "scatter", "companion kernel")]

    deft_tvm.load_library(out / "deft_kernels.json")
    args = make_case(spec, seed=4)
    leaves = grad_leaves(args)
    tensors = {k: args[k] for k in TENSOR_ARGUMENTS}
    out_tensor = deft_tvm.deform_conv2d(**{**tensors, **leaves}, stride=spec.stride, padding=spec.padding,
                                        dilation=spec.dilation)  # the forward is compiled: not in the library
    monkeypatch.setattr(backward.kernel_cache, "compile_kernel", lambda *a: pytest.fail("compiled, not loaded"))
    monkeypatch.setattr(backward, "_kernels", {})
    grads = torch.autograd.grad(out_tensor.sum(), list(leaves.values()))
    from deft_tvm.reference.backward import deform_conv2d_reference_backward

    expected = deform_conv2d_reference_backward(torch.ones(out_tensor.shape, dtype=torch.float64), **args)._asdict()
    for name, grad in zip(leaves, grads):
        assert_close(grad, expected[name], "float32")


def test_tune_command_tunes_exports_and_checks_the_backward(tmp_path, isolated_cache, capsys):
    assert cli.main(["tune", "--device", "cpu", "--workloads", "test_asymmetric", "--backward", "--trials", "1",
                     "--logs", str(tmp_path / "logs"), "--schedules", str(tmp_path / "schedules"),
                     "--out", str(tmp_path / "lib")]) == 0
    printed = capsys.readouterr().out
    assert "exported 3 kernels for llvm" in printed  # forward, gradients, their scatter
    assert "the exported backward's gradients match the float64 reference" in printed
    assert (tmp_path / "schedules" / "llvm" / "test_asymmetric_float32_backward.py").is_file()
