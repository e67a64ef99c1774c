"""Tuning records in the user's data directory (issue 17): ``deft-tvm tune`` writes there by
default, and the op finds them from any working directory, before the records shipped with the
package."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tvm import s_tir

import deft_tvm
from deft_tvm import cli
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.runtime import kernel_cache, records
from deft_tvm.runtime.targets import cuda_target, target_for_device
from deft_tvm.schedules import kernel_spec
from deft_tvm.tuning.workloads import get_workload

TARGET = target_for_device("cpu")


def test_the_user_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path / "mine"))
    assert records.user_root() == tmp_path / "mine"
    monkeypatch.delenv(records.TUNING_DIR_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert records.user_root() == tmp_path / "data" / "deft_tvm" / "tuning_logs"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert records.user_root() == Path.home() / ".local" / "share" / "deft_tvm" / "tuning_logs"
    assert records.record_roots() == [records.user_root(), records.committed_root()]


def test_a_users_record_wins_over_the_shipped_one(monkeypatch, tmp_path):
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path / "mine"))
    sm90 = cuda_target("sm_90")
    spec = kernel_spec(get_workload("paper_64c_64x64_n32", "float16").spec, sm90)
    assert records.tuned_database(spec, sm90) == records.database_dir(records.committed_root(), spec, sm90)
    mine = records.database_dir(records.user_root(), spec, sm90)
    records.commit_schedule(mine, spec, s_tir.Schedule(kernel_primfunc(spec)), sm90, 1e-3)
    assert records.tuned_database(spec, sm90) == mine


def test_tune_writes_into_the_user_directory_and_the_op_finds_it_from_elsewhere(monkeypatch, tmp_path,
                                                                                 isolated_cache, capsys):
    monkeypatch.setenv(records.TUNING_DIR_ENV, str(tmp_path / "user" / "tuning_logs"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tune", "--device", "cpu", "--workloads", "test_paper_small", "--trials", "1",
                     "--out", str(tmp_path / "lib")]) == 0
    spec = get_workload("test_paper_small").spec
    directory = records.database_dir(records.user_root(), spec, TARGET)
    assert f"-> {directory}" in capsys.readouterr().out
    assert (directory / "database_tuning_record.json").is_file()
    assert (tmp_path / "user" / "schedules" / "llvm" / "test_paper_small_float32.py").is_file()
    assert not (tmp_path / "tuning_logs").exists() and not (tmp_path / "schedules").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    kernel_cache.clear_memory_cache()
    assert records.tuned_database(spec, TARGET) == directory and kernel_cache.schedule_for(spec, TARGET)[1]
    assert kernel_cache.compiled_spec(spec, TARGET) is spec  # its own sizes' tuned kernel, not the configuration's
    args = get_workload("test_paper_small").make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernel_cache.UntunedKernelWarning)
        with torch.no_grad():
            deft_tvm.deform_conv2d(**args)
