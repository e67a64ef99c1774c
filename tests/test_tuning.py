"""MetaSchedule tuning on the DefT design spaces: measurement inputs, resumable databases, the generic
space kept apart, committed records picked up by the kernel cache, and sampled CUDA schedules that
compile."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import tvm
import tvm_ffi
from tvm import s_tir
from tvm.s_tir import meta_schedule as ms

import deft_tvm
from deft_tvm.cli import write_readable_schedule
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import kernel_cache, records
from deft_tvm.runtime.targets import compile_kernel, cuda_target, target_for_device
from deft_tvm.schedules import default_schedule, design_space, search_start
from deft_tvm.tuning.search import TUNING_FILE, ProfileInputs, measured_records, record_count, space_generator, tune
from deft_tvm.tuning.workloads import PROFILES, get_workload

from helpers import make_case

SMALL = get_workload("test_paper_small")
RECORDED_PROFILE = Path(__file__).parents[1] / "tuning_logs" / "profiles" / "digits_dcn.json"  # two layers


def _args_info(spec):
    return [["TENSOR", a.dtype, list(a.shape)] for a in ms.arg_info.ArgInfo.from_prim_func(deform_conv2d_primfunc(spec)["main"])]


def test_measurement_inputs_follow_the_offset_profile():
    spec = dataclasses.replace(SMALL.spec, batch=8)
    (args,) = ProfileInputs(spec, "normal_8px")(tvm.cpu(), _args_info(spec), 1)
    offset = torch.from_dlpack(args[1])
    assert tuple(offset.shape) == spec.offset_shape
    # 8 * 18 * 12 * 12 = 20736 draws of N(0, 8 px): the sample std is within 2 % (>5 standard errors).
    assert offset.std().item() == pytest.approx(PROFILES["normal_8px"].sigma, rel=0.02)
    mask = torch.from_dlpack(args[2])
    assert 0 < mask.min().item() and mask.max().item() < 1  # sigmoid of a normal, not the runner's uniform [1, 10]


def test_measurement_inputs_refuse_another_kernel():
    other = dataclasses.replace(SMALL.spec, in_channels=SMALL.spec.in_channels * 2)
    with pytest.raises(ValueError, match=r"arguments .* do not match the kernel's"):
        ProfileInputs(SMALL.spec, "normal_2px")(tvm.cpu(), _args_info(other), 1)


def test_cpu_tuning_writes_a_resumable_database(tmp_path, isolated_cache):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    result = tune(SMALL.spec, SMALL.profile, target, directory, trials=3, trials_per_round=2, seed=1)
    # The first record is the default schedule (the search's start), the next two the search's.
    assert result.new_trials == 2 and record_count(directory) == 3 and result.best_s is not None
    measured = measured_records(directory)
    assert len(measured) == 3 and all("sample_perfect_tile" in str(r.trace) for r in measured)  # points of the space
    spec, sch = records.best_schedule(directory, target)
    assert spec == SMALL.spec and sch is not None
    assert json.loads((directory / TUNING_FILE).read_text())["space"] == "deft"

    again = tune(SMALL.spec, SMALL.profile, target, directory, trials=3, seed=1)
    assert again.new_trials == 0 and record_count(directory) == 3  # resumed: nothing left to run
    with pytest.raises(ValueError, match=r"tuned with offset profile 'normal_2px', not 'normal_8px'"):
        tune(SMALL.spec, "normal_8px", target, directory, trials=4)


def test_a_database_knows_a_recorded_profile_by_its_statistics_not_its_path(tmp_path, isolated_cache):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path / "logs", SMALL.spec, target)
    saved = json.loads(RECORDED_PROFILE.read_text())
    first, moved, retrained = (tmp_path / name / "profile.json" for name in ("first", "moved", "retrained"))
    for path, layers in ((first, saved["layers"]), (moved, saved["layers"]),
                         (retrained, {"4": saved["layers"]["8"]})):  # another layer's offsets under the name "4"
        path.parent.mkdir()
        path.write_text(json.dumps({**saved, "layers": layers}))
    assert tune(SMALL.spec, f"{first}#4", target, directory, trials=1).trials == 1  # the default schedule
    # The same statistics saved elsewhere (another checkout, another --out) resume the folder ...
    again = tune(SMALL.spec, f"{moved}#4", target, directory, trials=1)
    assert again.new_trials == 0 and again.trials == 1
    # ... other statistics do not, whatever the path.
    with pytest.raises(ValueError, match=r"tuned with offset profile '.*first/profile.json#4' \(statistics "
                                         r"sha256:[0-9a-f]{16}\), not '.*retrained/profile.json#4' \(statistics "
                                         r"sha256:[0-9a-f]{16}\); use another folder"):
        tune(SMALL.spec, f"{retrained}#4", target, directory, trials=2)


@pytest.mark.parametrize("name", ["test_paper_small", "test_asymmetric"])
def test_cpu_search_starts_from_the_default_schedule_as_a_point_of_the_space(name):
    target = target_for_device("cpu")
    spec = get_workload(name).spec
    start = search_start(spec, target)
    assert "sample_perfect_tile" in str(start.trace)  # mutable by the search
    tvm.ir.assert_structural_equal(start.mod, default_schedule(deform_conv2d_primfunc(spec), spec, target).mod)


@pytest.mark.parametrize("dtype", ["float16", "float32"], ids=["tensor_cores", "simt"])
def test_cuda_search_starts_from_the_default_schedule_as_a_point_of_the_space(dtype):
    target = cuda_target("sm_90")
    spec = get_workload("paper_64c_64x64_n32", dtype).for_target(target).spec
    start = search_start(spec, target)
    assert "sample_perfect_tile" in str(start.trace)  # mutable by the search
    tvm.ir.assert_structural_equal(start.mod, default_schedule(deform_conv2d_primfunc(spec), spec, target).mod)


def test_generic_space_is_metaschedules_default_and_kept_apart(tmp_path):
    target = target_for_device("cpu")
    assert space_generator("generic", SMALL.spec, target) == "post-order-apply"
    assert isinstance(space_generator("deft", SMALL.spec, target), ms.space_generator.ScheduleFn)
    with pytest.raises(ValueError, match=r"unknown design space 'ansor'"):
        tune(SMALL.spec, SMALL.profile, target, tmp_path / "x", trials=1, space="ansor")

    generic, older = tmp_path / "generic", tmp_path / "older"
    for directory, meta in ((generic, {"space": "generic"}), (older, {})):  # older folders record no space
        directory.mkdir()
        (directory / TUNING_FILE).write_text(json.dumps({"profile": SMALL.profile, "sessions": [], **meta}))
    with pytest.raises(ValueError, match=r"tuned with design space 'generic', not 'deft'"):
        tune(SMALL.spec, SMALL.profile, target, generic, trials=1)
    with pytest.raises(ValueError, match=r"tuned with design space 'deft', not 'generic'"):
        tune(SMALL.spec, SMALL.profile, target, older, trials=1, space="generic")


def _default(spec, target):
    return default_schedule(deform_conv2d_primfunc(spec), spec, target)


def _point_other_than_default(spec, target):
    """The first seeded sample of the design space that is not the default schedule (the default is
    itself a point of the space, so a single random sample can coincide with it)."""
    default = tvm_ffi.structural_hash(_default(spec, target).mod)
    for seed in range(1, 50):
        sch = s_tir.Schedule(deform_conv2d_primfunc(spec), seed=seed)
        design_space(spec, target)(sch)
        if tvm_ffi.structural_hash(sch.mod) != default:
            return sch
    raise AssertionError(f"49 samples of the design space of {spec.key()} all equal the default schedule")


def test_committed_record_is_used_without_warning(tmp_path, isolated_cache, monkeypatch):
    spec = dataclasses.replace(SMALL.spec, batch=1)
    target = target_for_device("cpu")
    sch = _point_other_than_default(spec, target)  # stands for a tuned record
    records.commit_schedule(records.database_dir(tmp_path, spec, target), spec, sch, target, 1e-3)
    monkeypatch.setattr(records, "committed_root", lambda: tmp_path)

    picked, tuned = kernel_cache.schedule_for(spec, target)
    assert tuned and str(picked.trace) == str(sch.trace)
    assert kernel_cache.kernel_path(spec, target) != kernel_cache.kernel_path(spec, target, _default(spec, target))

    args = make_case(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernel_cache.UntunedKernelWarning)
        out = deft_tvm.deform_conv2d(**args)
    assert_close(out, deft_tvm.deform_conv2d_reference(**args), spec.dtype)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_cuda_schedules_generate_code(seed):
    spec = dataclasses.replace(SMALL.spec, dtype="float16")
    sch = s_tir.Schedule(deform_conv2d_primfunc(spec), seed=seed)
    design_space(spec, cuda_target("sm_90"))(sch)
    decisions = [tuple(int(x) for x in d) for d in sch.trace.decisions.values()]
    assert len(decisions) == 4  # output channels, rows, columns, input-channel chunk
    source = compile_kernel(sch.mod, cuda_target("sm_90")).mod.imports[0].inspect_source()
    assert "__shared__" in source and "__global__" in source


def test_readable_schedule_replays_the_schedule(tmp_path):
    spec = get_workload("test_asymmetric").spec
    target = target_for_device("cpu")
    sch = default_schedule(deform_conv2d_primfunc(spec), spec, target)
    path = write_readable_schedule(tmp_path, "llvm", "test_asymmetric", spec, sch)
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    replayed = s_tir.Schedule(deform_conv2d_primfunc(spec))
    namespace["apply_trace"](replayed)
    tvm.ir.assert_structural_equal(replayed.mod, sch.mod)
