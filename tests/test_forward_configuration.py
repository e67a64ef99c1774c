"""Forward tiling records of a layer configuration (``deft-tvm tune --configuration``): the space of
a configuration's tensor-core tilings, the search from its default (GPU times stood in for:
``measure_configuration_forward`` times kernels on a GPU), its record, and the op's, the
library's and nvcc's use of it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import tvm_ffi

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import generic_spec, kernel_key
from deft_tvm.runtime import kernel_cache, records
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules import configuration_space, kernel_spec
from deft_tvm.schedules.cuda_tensorcore import ConfigurationTilings, TensorCoreTiling
from deft_tvm.tuning import forward_configuration, fused_backward
from deft_tvm.tuning.export import default_entries
from deft_tvm.tuning.forward_configuration import record_times, start_tilings, tune_forward_configuration
from deft_tvm.tuning.workloads import get_workload

from test_fused_backward_configuration import _InProcessPool

TARGET = cuda_target("sm_90")
PROFILE = "normal_2px"
SPEC = kernel_spec(get_workload("paper_64c_64x64_n8", "float16").spec, TARGET)
GENERIC = generic_spec(SPEC)


def _space() -> ConfigurationTilings:
    return configuration_space(GENERIC, TARGET)


def _fake_measure(fastest: TensorCoreTiling, calls: list, near: TensorCoreTiling | None = None):
    """Stand-in for ``measure_configuration_forward``: ``fastest`` 1 ms, ``near`` 1.5, the others 2
    (the third candidate of a call rejected); each call's candidates kept in ``calls``."""
    def measure(spec, profile, target, tilings):
        calls.append((spec, list(tilings)))
        return [1.0 if t == fastest else 1.5 if t == near else None if i == 2 else 2.0
                for i, t in enumerate(tilings)]

    return measure


def test_the_space_holds_the_default_and_its_neighbours_one_step_away():
    space = _space()
    default = space.default()
    assert space.admits(default) and not default.tap_points and default.k_splits == 1
    neighbours = space.neighbours(default)
    assert neighbours and default not in neighbours and len(set(neighbours)) == len(neighbours)
    fields = ("frags_co", "warps_co", "frags_p", "warps_p", "k_frags")
    for tiling in neighbours:
        ratios = {f: getattr(tiling, f) / getattr(default, f) for f in fields
                  if getattr(tiling, f) != getattr(default, f)}
        assert set(ratios.values()) <= {0.5, 2.0} and space.admits(tiling)
        # one count doubled or halved, or a block's channels (positions) kept on other warps
        assert len(ratios) == 1 or (sorted(ratios.values()) == [0.5, 2.0] and set(ratios) in (
            {"frags_co", "warps_co"}, {"frags_p", "warps_p"}))
    assert dataclasses.replace(default, warps_co=1, frags_co=4) in neighbours  # 2 warps of 2 -> 1 warp of 4
    # 64 channels: 4 fragments of output channels, 4 of reduction channels (float16: 16 each)
    assert not space.admits(dataclasses.replace(default, frags_co=4, warps_co=2))
    assert not space.admits(dataclasses.replace(default, k_frags=3))
    assert not space.admits(dataclasses.replace(default, tap_points=True))
    assert not space.admits(dataclasses.replace(default, k_splits=2))
    assert space.of_size(dataclasses.replace(default, tap_points=True, k_splits=2)) == default


def test_a_spec_of_one_size_and_a_family_without_a_search_are_refused():
    with pytest.raises(ValueError, match="is of one size; a configuration's tilings are of its generic_spec"):
        ConfigurationTilings(SPEC)
    with pytest.raises(ValueError, match="its forward at these sizes is unfused"):
        forward_configuration.tilings_space(kernel_spec(get_workload("r50dcn_c5", "float16").spec, TARGET), TARGET)
    stem = kernel_spec(get_workload("paper_64c_64x64_n8", "float16").spec, TARGET)
    stem = dataclasses.replace(stem, in_channels=1, layout="NCHW")  # one input channel: the SIMT forward
    with pytest.raises(ValueError, match=r"\(cuda_simt schedule\) has no tiling search"):
        forward_configuration.tilings_space(stem, TARGET)
    with pytest.raises(ValueError, match="is not a tiling of"):
        _space().schedule(kernel_primfunc(GENERIC), dataclasses.replace(_space().default(), k_frags=3))


def test_the_search_starts_at_the_default_and_the_sizes_record_and_climbs_to_the_fastest(monkeypatch):
    space = _space()
    start = start_tilings(SPEC, TARGET)
    assert start[0] == space.default()
    directory = records.tuned_database(SPEC, TARGET)
    assert directory is not None  # the committed record of paper N=8 float16
    recorded = TensorCoreTiling.of_trace(records.best_schedule(directory, TARGET)[1].trace, SPEC)
    assert space.of_size(recorded) in start
    one_step = space.neighbours(start[0])[0]
    fastest = next(t for t in space.neighbours(one_step) if t not in start and t not in space.neighbours(start[0]))
    calls = []
    record = tune_forward_configuration(SPEC, PROFILE, TARGET, "a GPU", measure=_fake_measure(fastest, calls, one_step))
    assert TensorCoreTiling(**record["tiling"]) == fastest
    assert all(spec == SPEC and tilings[0] == start[0] for spec, tilings in calls)  # checked against the default
    # the start, one_step's neighbours, the fastest's, which find nothing faster: the search ends there
    assert calls[0][1] == start and len(calls) == 4 < 1 + forward_configuration.ROUNDS
    assert record["spec"] == GENERIC.to_dict() and record["measured_at"] == SPEC.to_dict()
    assert (record["device"], record["target"], record["profile"]) == ("a GPU", "sm_90", PROFILE)
    tried = [TensorCoreTiling(**t) for t, _ in record["candidates"]]
    assert len(set(tried)) == len(tried) and tried[:len(start)] == start
    assert record_times(record) == (1.0, 2.0)
    assert any(ms is None for _, ms in record["candidates"])  # rejected candidates are recorded, never chosen


def _write_record(root, tiling: TensorCoreTiling):
    directory = records.database_dir(root, GENERIC, TARGET)
    return records.write_configuration_record(directory, GENERIC, {"tiling": _space().to_dict(tiling)})


def test_the_op_and_the_library_take_the_record_for_every_size(tmp_path, monkeypatch):
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path))
    shipped_sch, tuned = kernel_cache.schedule_for(GENERIC, TARGET)  # the committed record (an H100's)
    shipped = records.tuned_database(GENERIC, TARGET)
    assert tuned and shipped == records.database_dir(records.committed_root(), GENERIC, TARGET)
    shipped_tiling = TensorCoreTiling(**records.configuration_record(shipped)["tiling"])
    assert tvm_ffi.structural_equal(shipped_sch.mod, _space().schedule(kernel_primfunc(GENERIC), shipped_tiling).mod)
    inputs = kernel_cache._kernel_inputs(GENERIC, TARGET, "forward")
    tiling = next(t for t in _space().neighbours(_space().default()) if t != shipped_tiling)
    path = _write_record(tmp_path, tiling)  # the user's record wins over the shipped one
    assert path.parent == records.tuned_database(GENERIC, TARGET)
    assert records.read_kernel(path.parent) == (GENERIC, "forward")
    sch, tuned = kernel_cache.schedule_for(GENERIC, TARGET)
    assert tuned and tvm_ffi.structural_equal(sch.mod, _space().schedule(kernel_primfunc(GENERIC), tiling).mod)
    assert not tvm_ffi.structural_equal(sch.mod, shipped_sch.mod)
    assert kernel_cache._kernel_inputs(GENERIC, TARGET, "forward") != inputs  # the disk cache's index sees it
    other = dataclasses.replace(SPEC, batch=3, height=41, width=29)
    assert kernel_cache.compiled_spec(other, TARGET) is GENERIC
    assert kernel_cache.compiled_spec(SPEC, TARGET) == SPEC  # its own size keeps its tuned record
    workload = get_workload("paper_64c_64x64_n8", "float16")
    (entry,) = default_entries([workload], TARGET, [], backward=False, configurations=True)
    assert entry.spec is GENERIC and entry.origin.startswith("configuration record")
    assert tvm_ffi.structural_equal(entry.function, sch.mod["main"])


def test_a_recorded_non_default_tiling_compiles_with_nvcc_for_sm_90(tmp_path, monkeypatch):
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path))
    bfloat16 = generic_spec(kernel_spec(get_workload("paper_64c_64x64_n8", "bfloat16").spec, TARGET))
    space = configuration_space(bfloat16, TARGET)
    tiling = dataclasses.replace(space.default(), warps_p=2, frags_p=1)
    assert space.admits(tiling) and tiling != space.default()
    records.write_configuration_record(records.database_dir(tmp_path, bfloat16, TARGET), bfloat16,
                                       {"tiling": space.to_dict(tiling)})
    sch, tuned = kernel_cache.schedule_for(bfloat16, TARGET)
    assert tuned
    source = compile_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    assert "mma.sync.aligned.m16n8k16" in source and "bf16" in source


def test_the_command_writes_the_record_where_the_op_finds_it(tmp_path, monkeypatch, capsys):
    from deft_tvm import cli

    fastest = _space().neighbours(_space().default())[0]
    monkeypatch.setattr(forward_configuration, "measure_configuration_forward",
                        lambda *a, bar=None, pool=None: _fake_measure(fastest, [])(*a))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path))
    args = argparse.Namespace(logs=str(tmp_path))
    cli._tune_forward_configuration(args, TARGET, "paper_64c_64x64_n8", get_workload("paper_64c_64x64_n8", "float16"))
    out = capsys.readouterr().out
    assert f"paper_64c_64x64_n8 float16 configuration forward at {SPEC.key()}: 1.0000 ms fastest of" in out
    assert "(default 2.0000)" in out and kernel_key(GENERIC) in out
    recorded = records.configuration_record(records.tuned_database(GENERIC, TARGET))
    assert TensorCoreTiling(**recorded["tiling"]) == fastest
    with pytest.raises(cli.UsageError, match=r"--configuration without --fused-backward: .*is unfused"):
        cli._tune_forward_configuration(args, TARGET, "r50dcn_c5", get_workload("r50dcn_c5", "float16"))


def test_measure_runs_what_compiles_and_launches_and_checks_it_against_the_first(monkeypatch):
    from deft_tvm.tuning.workloads import Workload

    space = _space()
    tilings = [space.default(), *space.neighbours(space.default())[:4]]
    not_compiling, not_launching = tilings[1], tilings[2]
    _InProcessPool.jobs, _InProcessPool.failing, _InProcessPool.opened = [], ((not_compiling,),), []
    monkeypatch.setattr(fused_backward, "PopenPoolExecutor", _InProcessPool)
    launched = []

    def load(name, fingerprint, target, build, functions):
        # the configuration's kernel, run at SPEC's sizes, loaded by the fingerprint its compile returned
        assert name == kernel_key(GENERIC) and functions == ("main",)
        (tiling,) = fingerprint

        def kernel(*args):
            assert args[-1].shape == SPEC.output_shape and args[0].shape == SPEC.kernel_input_shape
            if tiling == not_launching:
                raise RuntimeError("CUDA_ERROR_INVALID_VALUE")
            launched.append(tiling)
        return kernel

    monkeypatch.setattr(kernel_cache, "load_or_build_library", lambda *a: [load(*a)])
    make_inputs = Workload.make_inputs
    monkeypatch.setattr(Workload, "make_inputs", lambda self, seed=0, device="cpu": make_inputs(self, seed))
    timed = []

    def time_checked(spec, calls, bar=None):
        assert spec is SPEC
        for make, args in calls:
            make(spec, *args)()
            timed.append(launched[-1])
        return [float(k) for k in range(len(calls))]

    monkeypatch.setattr(forward_configuration, "time_checked", time_checked)
    times = forward_configuration.measure_configuration_forward(SPEC, PROFILE, TARGET, tilings)
    assert [args[1:] for args in _InProcessPool.jobs] == [(TARGET, t) for t in tilings]
    assert timed == [tilings[0], *tilings[3:]]
    assert times == [0.0, None, None, 1.0, 2.0]
    assert len(_InProcessPool.opened) == 1 and _InProcessPool.opened[0].shut  # its own pool, shut down
    # a search's rounds share the pool it is given (its workers import TVM once), which they leave open
    _InProcessPool.opened = []
    with fused_backward.compile_pool() as pool:
        for _ in range(2):
            forward_configuration.measure_configuration_forward(SPEC, PROFILE, TARGET, tilings, pool=pool)
        assert _InProcessPool.opened == [pool] and not pool.shut
    assert pool.shut
    _InProcessPool.failing = ((tilings[0],),)
    with pytest.raises(RuntimeError, match="the configuration's kernel with .* did not compile or run"):
        forward_configuration.measure_configuration_forward(SPEC, PROFILE, TARGET, tilings)


def test_a_candidate_is_compiled_into_the_cache_under_the_fingerprint_it_returns(isolated_cache, monkeypatch):
    """The pool's job returns the fingerprint of the module it compiled, by which the search loads
    the library without scheduling the tiling again (the compile itself stood in for)."""
    tiling = _space().neighbours(_space().default())[0]

    class Executable:
        def export_library(self, path):
            Path(path).write_text("library")

    compiled = []
    monkeypatch.setattr(forward_configuration, "compile_kernel",
                        lambda mod, target: compiled.append(mod) or Executable())
    fingerprint = forward_configuration._compile_candidate(SPEC, TARGET, tiling)
    assert fingerprint == kernel_cache.module_fingerprint(_space().schedule(kernel_primfunc(GENERIC), tiling).mod)
    assert kernel_cache.library_path(kernel_key(GENERIC), fingerprint, TARGET).read_text() == "library"
    assert kernel_cache.module_fingerprint(compiled[0]) == fingerprint


def test_tune_model_searches_each_configurations_forward_and_resumes_it(tmp_path, monkeypatch):
    from deft_tvm.tuning import model

    workload, searched = get_workload("paper_64c_64x64_n8", "float16"), []
    fastest = _space().neighbours(_space().default())[1]
    monkeypatch.setattr(forward_configuration, "measure_configuration_forward",
                        lambda *a, bar=None, pool=None: searched.append(a[0]) or _fake_measure(fastest, [])(*a))
    entry, best, default = model._tune_forward_configuration(workload, TARGET, tmp_path, False, "a GPU")
    assert (best, default) == (1.0, 2.0) and searched and all(s == SPEC for s in searched)
    assert entry.spec is GENERIC and entry.origin == str(records.database_dir(tmp_path, GENERIC, TARGET))
    assert tvm_ffi.structural_equal(entry.function, _space().schedule(kernel_primfunc(GENERIC), fastest).mod["main"])
    count = len(searched)
    again = model._tune_forward_configuration(workload, TARGET, tmp_path, False, "a GPU")
    assert again[1:] == (1.0, 2.0) and len(searched) == count  # resumed: same statistics, same GPU
    model._tune_forward_configuration(workload, TARGET, tmp_path, False, "another GPU")
    assert len(searched) > count  # searched again on another GPU
    assert model._tune_forward_configuration(get_workload("r50dcn_c5", "float16"), TARGET, tmp_path, False,
                                             "a GPU") is None  # its forward is unfused at its sizes


def test_export_takes_the_configuration_records_under_logs(tmp_path, monkeypatch, capsys):
    from deft_tvm import cli
    from deft_tvm.runtime import library

    tiling = _space().neighbours(_space().default())[0]
    _write_record(tmp_path, tiling)
    assert records.database_dirs(tmp_path, TARGET) == []  # not a MetaSchedule database
    assert records.configuration_dirs(tmp_path, TARGET) == [records.database_dir(tmp_path, GENERIC, TARGET)]
    exported = []
    monkeypatch.setattr(library, "export_library", lambda entries, *a: exported.extend(entries) or tmp_path / "m")
    assert cli.main(["export", "--device", "cuda", "--arch", "sm_90", "--logs", str(tmp_path),
                     "--out", str(tmp_path / "lib")]) == 0
    entry, copies = exported  # the configuration's kernel and its channels-last copies' (a companion)
    assert copies.part == "channels_last" and copies.spec is GENERIC
    assert entry.spec is GENERIC and entry.part == "forward" and entry.origin == str(records.configuration_dirs(
        tmp_path, TARGET)[0])
    assert tvm_ffi.structural_equal(entry.function, _space().schedule(kernel_primfunc(GENERIC), tiling).mod["main"])
    assert f"kernel   {kernel_key(GENERIC)}" in capsys.readouterr().out
