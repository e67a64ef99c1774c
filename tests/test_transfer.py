"""Records of one dtype as a search's start in another (``schedules.transferred``,
``search.transfer``, ``deft-tvm tune --seed-from``): a float16 tensor-core record's tiling is the
same point of the bfloat16 space (the same m16n8k16 fragments), as a TF32 record's is of float32
without TF32 (3xTF32: the same m16n8k8 fragments); TF32 from float16, another layer and the CPU
family take none; the transfer measures the source's fastest records in rank order, at most
``top``, stores them and skips those held. The transferred bfloat16 and 3xTF32 kernels compile
with nvcc; ``--seed-from`` names the source spec (``tf32``: float32 tuned with TF32 on)."""

from __future__ import annotations

import dataclasses

import pytest
from tvm import s_tir

import deft_tvm.schedules
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.runtime import records
from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation, target_for_device
from deft_tvm.schedules import register_tensor_intrinsics, search_start, transferred
from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling
from deft_tvm.tuning.search import FAILED_SECONDS, measured_records, record_count, transfer, tune
from deft_tvm.tuning.workloads import get_workload

from test_fused_backward_codegen import _compile, needs_nvcc
from test_refine import SMALL, _other_point

TARGET = cuda_target("sm_90")


def _c4(dtype: str, tf32: bool = False):
    return get_workload("r50dcn_c4", dtype, tf32).for_target(TARGET).spec


def _best_committed(spec):
    """``spec`` and the trace of its fastest committed forward record (a tensor-core trace)."""
    register_tensor_intrinsics(TARGET)
    directory = records.tuned_database(spec, TARGET)
    assert directory is not None, f"r50dcn_c4's {spec.dtype} forward record is committed"
    return spec, min(measured_records(directory), key=lambda r: float(r.run_secs[0])).trace


@pytest.fixture(scope="module")
def float16_record():
    """The committed float16 forward record of r50 c4 and its spec."""
    return _best_committed(_c4("float16"))


@pytest.fixture(scope="module")
def tf32_record():
    """The committed TF32 forward record of r50 c4 and its spec."""
    return _best_committed(_c4("float32", tf32=True))


def test_float16_tilings_are_the_same_points_in_bfloat16(float16_record):
    source, trace = float16_record
    spec = _c4("bfloat16")
    sch = transferred(spec, TARGET, source, trace)
    assert sch is not None
    assert TensorCoreTiling.of_trace(sch.trace, spec) == TensorCoreTiling.of_trace(trace, source)
    assert "bfloat16" in sch.mod.script() and "float16" not in sch.mod.script().replace("bfloat16", "")


def test_tf32_tilings_are_the_same_points_in_float32_without_tf32(tf32_record):
    source, trace = tf32_record
    spec = _c4("float32")
    assert not spec.tf32 and spec.layout == "NHWC"  # float32 without TF32 on the tensor-core family
    sch = transferred(spec, TARGET, source, trace)
    assert sch is not None
    assert TensorCoreTiling.of_trace(sch.trace, spec) == TensorCoreTiling.of_trace(trace, source)
    assert transferred(_c4("bfloat16"), TARGET, source, trace) is None  # m16n8k16: another fragment


@needs_nvcc
def test_transferred_3xtf32_kernel_compiles(tf32_record):
    source, trace = tf32_record
    sch = transferred(_c4("float32"), TARGET, source, trace)
    with exact_cuda_compilation():
        cuda = compile_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    assert "mma.sync" in cuda and ".tf32" in cuda
    assert _compile(cuda)[:4] == b"\x7fELF"


def test_seed_from_names_the_source_spec():
    from argparse import Namespace

    from deft_tvm.cli import _seed_source

    float32 = _c4("float32")
    assert _seed_source(Namespace(seed_from="tf32", tf32=False), "r50dcn_c4", float32, TARGET, "forward") == _c4(
        "float32", tf32=True)
    assert _seed_source(Namespace(seed_from="float16", tf32=False), "r50dcn_c4", _c4("bfloat16"), TARGET,
                        "forward") == _c4("float16")
    assert _seed_source(Namespace(seed_from="float32", tf32=False), "r50dcn_c4", float32, TARGET, "forward") is None
    assert _seed_source(Namespace(seed_from=None, tf32=False), "r50dcn_c4", float32, TARGET, "forward") is None


def test_other_fragments_layers_and_families_take_none(float16_record):
    source, trace = float16_record
    assert transferred(_c4("float32", tf32=True), TARGET, source, trace) is None  # TF32: k = 8
    other_layer = dataclasses.replace(_c4("bfloat16"), out_channels=128)
    assert transferred(other_layer, TARGET, source, trace) is None
    cpu = target_for_device("cpu")
    assert transferred(SMALL.spec, cpu, dataclasses.replace(SMALL.spec, dtype="float64"),
                       search_start(SMALL.spec, cpu).trace) is None


@needs_nvcc
def test_transferred_bfloat16_kernel_compiles(float16_record):
    source, trace = float16_record
    sch = transferred(_c4("bfloat16"), TARGET, source, trace)
    with exact_cuda_compilation():
        cuda = compile_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    assert "nv_bfloat16" in cuda and "mma.sync" in cuda
    assert _compile(cuda)[:4] == b"\x7fELF"


def test_transfer_measures_the_fastest_source_records_in_order(tmp_path, monkeypatch):
    target = target_for_device("cpu")
    source = dataclasses.replace(SMALL.spec, dtype="float64")
    source_dir = records.database_dir(tmp_path, source, target)
    points = {"fast": _other_point(source, target), "slow": search_start(source, target)}
    for seconds, name in ((2e-3, "slow"), (1e-3, "fast")):  # stored slowest first: ranked by time
        records.commit_schedule(source_dir, source, points[name], target, seconds)
    records.commit_schedule(source_dir, source, s_tir.Schedule(deform_conv2d_primfunc(source)), target,
                            FAILED_SECONDS)  # failed: never offered
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    tune(SMALL.spec, SMALL.profile, target, directory, trials=1)  # holds the default schedule
    offered = []
    other = _other_point(SMALL.spec, target)

    def transferred_(spec, target_, source_, trace, part="forward"):
        offered.append(str(trace))
        # The fast record maps to a new point, the slow one to the default the folder holds (skipped).
        return other if str(trace) == str(points["fast"].trace) else search_start(spec, target_)

    monkeypatch.setattr(deft_tvm.schedules, "transferred", transferred_)
    results = transfer([(SMALL.spec, SMALL.profile, directory, source, source_dir)], target)
    assert offered == [str(points["fast"].trace), str(points["slow"].trace)]
    assert list(results[directory]) == ["float64 record 1 (1.0000 ms)"]
    assert 0 < results[directory]["float64 record 1 (1.0000 ms)"] < FAILED_SECONDS
    assert record_count(directory) == 2 and str(other.trace) in {str(r.trace) for r in measured_records(directory)}

    offered.clear()
    results = transfer([(SMALL.spec, SMALL.profile, directory, source, source_dir)], target, top=1)
    assert results == {} and record_count(directory) == 2  # both held now


def test_top_limits_the_records_measured(tmp_path, monkeypatch):
    import deft_tvm.tuning.search as search

    target = target_for_device("cpu")
    source = dataclasses.replace(SMALL.spec, dtype="float64")
    source_dir = records.database_dir(tmp_path, source, target)
    fast = _other_point(source, target)
    records.commit_schedule(source_dir, source, fast, target, 1e-3)
    records.commit_schedule(source_dir, source, search_start(source, target), target, 2e-3)
    other = _other_point(SMALL.spec, target)
    monkeypatch.setattr(deft_tvm.schedules, "transferred", lambda spec, target_, source_, trace, part="forward":
                        other if str(trace) == str(fast.trace) else search_start(spec, target_))
    measured = []
    monkeypatch.setattr(search, "_measure_candidates",
                        lambda jobs, target_, part, rpc, measurement: measured.append(jobs) or {})
    for top in (1, 2):
        transfer([(SMALL.spec, SMALL.profile, tmp_path / "new", source, source_dir)], target, top=top)
    labels = [[label for label, _ in candidates] for jobs in measured for _, _, candidates in jobs.values()]
    assert labels == [["float64 record 1 (1.0000 ms)"], ["float64 record 1 (1.0000 ms)", "float64 record 2 (2.0000 ms)"]]


def test_tune_command_seeds_from_another_dtype(tmp_path, isolated_cache, monkeypatch, capsys):
    from deft_tvm import cli

    target = target_for_device("cpu")
    source = dataclasses.replace(SMALL.spec, dtype="float64")
    records.commit_schedule(records.database_dir(tmp_path / "logs", source, target), source,
                            search_start(source, target), target, 1e-3)
    other = _other_point(SMALL.spec, target)
    monkeypatch.setattr(deft_tvm.schedules, "transferred", lambda spec, target_, source_, trace, part="forward": other)
    assert cli.main(["tune", "--device", "cpu", "--workloads", "test_paper_small", "--trials", "1",
                     "--seed-from", "float64", "--logs", str(tmp_path / "logs"),
                     "--schedules", str(tmp_path / "schedules"), "--out", str(tmp_path / "lib")]) == 0
    printed = capsys.readouterr().out
    assert "transfer float64 record 1 (1.0000 ms): " in printed and "the exported kernel matches" in printed
    directory = records.database_dir(tmp_path / "logs", SMALL.spec, target)
    assert str(other.trace) in {str(r.trace) for r in measured_records(directory)}
