"""The forward benchmark (``deft_tvm.bench``) on the CPU: rows, CSV, markdown, plot, argument errors."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from deft_tvm import bench, cli
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import backward, records
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import default_schedule
from deft_tvm.tuning.search import TuningResult
from deft_tvm.tuning.workloads import TEST_WORKLOADS, get_workload

WORKLOAD = "test_paper_small"
GPU = "NVIDIA H100 80GB HBM3"


def _row(provider, gpu_ms, *, workload="paper_64c_64x64_n32", dtype="float32", tf32="off", commit="abc1234",
         device=GPU):
    return {**dict.fromkeys(bench.COLUMNS, ""), "device": device, "workload": workload, "dtype": dtype,
            "tf32": tf32, "profile": "normal_2px", "provider": provider, "mode": "forward", "gpu_ms": gpu_ms,
            "cold_median_ms": gpu_ms, "cold_p20_ms": gpu_ms, "cold_p80_ms": gpu_ms, "latency_ms": gpu_ms + 0.01,
            "commit": commit}


def _gpu_rows():
    """Handcrafted GPU rows: deft_tvm 2 ms, torchvision 1 ms, best cuDNN 0.25 ms (fp32); no torchvision in fp16."""
    return [
        _row("deft_tvm", 2.0), _row("deft_tvm_default", 1.5), _row("generic_ms", 4.0), _row("torchvision", 1.0),
        _row("cudnn_nchw", 0.5), _row("cudnn_channels_last", 0.25),
        _row("deft_tvm", 0.3, dtype="float16", tf32="n/a"), _row("cudnn_nchw", 0.1, dtype="float16", tf32="n/a"),
    ]


@pytest.fixture
def gpu_csv(tmp_path):
    path = tmp_path / "gpu.csv"
    bench.write_csv(path, _gpu_rows())
    return path


@pytest.fixture(scope="module")
def cpu_rows():
    """One CPU run of the benchmark on a test workload, shared by the tests that read it."""
    assert WORKLOAD in TEST_WORKLOADS
    return bench.run([WORKLOAD], ["float32"], ["off", "on"], iters=2, device="cpu", commit="test")


def test_cpu_run_times_every_provider_once(cpu_rows):
    assert [r["provider"] for r in cpu_rows] == ["deft_tvm", "reference_float64", "dense_conv2d"]
    for row in cpu_rows:
        assert set(row) == set(bench.COLUMNS)
        assert (row["workload"], row["dtype"], row["tf32"], row["mode"], row["commit"]) == (
            WORKLOAD, "float32", "n/a", "forward", "test")
        assert all(math.isnan(row[c]) for c in ("gpu_ms", "cold_median_ms", "cold_p20_ms", "cold_p80_ms"))
        assert row["latency_ms"] > 0 and math.isnan(row["vs_torchvision"])
    deft, _, dense = cpu_rows
    assert deft["schedule"] == "default" and dense["vs_dense"] == 1.0
    assert deft["vs_dense"] == pytest.approx(deft["latency_ms"] / dense["latency_ms"], abs=0.01)


def test_a_tuned_layer_also_times_the_ops_own_kernel_called_directly(monkeypatch):
    workload = get_workload(WORKLOAD)
    asked = []
    monkeypatch.setattr(bench.kernel_cache, "get_kernel", lambda spec, device: asked.append((spec, device.type)) or "own")
    monkeypatch.setattr(bench.kernel_cache, "load_or_build", lambda spec, target, sch: "default")
    kernels = bench.deft_kernels(workload, "cpu", True, 0, Path("unused"))
    assert kernels == {"deft_tvm_kernel": ("own", "tuned"), "deft_tvm_default": ("default", "default")}
    assert asked == [(workload.spec, "cpu")]
    assert bench.deft_kernels(workload, "cpu", False, 0, Path("unused")) == {}  # untuned on a CPU: the op alone


def test_forward_backward_calls_compute_the_gradients_of_every_input():
    workload = get_workload("test_asymmetric")
    calls = bench.providers(workload, "cpu", {"deft_tvm_default": (None, "default")}, bench.FORWARD_BACKWARD)
    assert list(calls) == ["deft_tvm", "reference_float64", "dense_conv2d"]  # no direct kernels
    with torch.enable_grad():
        deft, reference, dense = (calls[name]() for name in calls)
    # leaves: input, offset, weight, bias, mask, then the channels_last copies of input and weight
    assert [g is not None for g in deft] == [True] * 5 + [False] * 2 == [g is not None for g in reference]
    assert [g is not None for g in dense] == [True, False, True, True, False, False, False]
    for own, expected in zip(deft[:5], reference[:5]):
        assert_close(own, expected.double(), "float32")
    assert not any(g.abs().max() == 0 for g in deft[:5])


def test_cpu_run_in_every_mode_gives_one_table_per_mode(monkeypatch):
    prebuilt = []
    monkeypatch.setattr(backward, "prebuild", lambda specs, device, deterministic: prebuilt.append(
        ([s.key() for s in specs], device.type, deterministic)))
    rows = bench.run([WORKLOAD], ["float32"], ["off"], iters=1, device="cpu", commit="test",
                     modes=bench.MODES)
    # The backward kernels are built ahead, for both backward modes, as the op takes them.
    key = get_workload(WORKLOAD, "float32").spec.key()
    assert prebuilt == [([key], "cpu", False), ([key], "cpu", True)]
    assert [(r["mode"], r["provider"]) for r in rows] == [
        (mode, provider) for mode in bench.MODES for provider in ("deft_tvm", "reference_float64", "dense_conv2d")]
    assert all(r["latency_ms"] > 0 for r in rows)
    titles = [line for line in bench.markdown(rows).splitlines() if line.startswith("cpu, commit test")]
    assert [t.split(": ")[1].split(" host")[0] for t in titles] == [
        "forward", "forward+backward", "forward+backward, deterministic algorithms"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_run_cut_short_keeps_the_rows_it_measured_in_its_csv(tmp_path, monkeypatch):
    path = tmp_path / "bench.csv"
    calls = []
    measured = bench.measure

    def measure_then_fail(fn, device, iters, flush):  # the second mode's first provider fails
        calls.append(fn)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return measured(fn, device, iters, flush)

    monkeypatch.setattr(bench, "measure", measure_then_fail)
    with pytest.raises(KeyboardInterrupt):
        bench.run([WORKLOAD], ["float32"], ["off"], iters=1, device="cpu", commit="test", modes=bench.MODES,
                  csv_path=path)
    assert [(r["mode"], r["provider"]) for r in bench.read_csv(path)] == [
        ("forward", provider) for provider in ("deft_tvm", "reference_float64", "dense_conv2d")]


def test_deterministic_mode_is_on_inside_and_restored_after():
    with bench.deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with bench.deterministic_mode(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_csv_round_trip_merges_by_key(tmp_path, cpu_rows):
    path = tmp_path / "out" / "bench.csv"
    bench.write_csv(path, cpu_rows)
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == bench.COLUMNS
    assert bench.read_csv(path) == [{c: str(r[c]) for c in bench.COLUMNS} for r in cpu_rows]

    remeasured = {**cpu_rows[0], "latency_ms": 123.0}
    other_commit = {**cpu_rows[1], "commit": "other"}
    bench.write_csv(path, [remeasured, other_commit])
    rows = bench.read_csv(path)
    assert len(rows) == 4  # same key replaced, new key added
    assert [r["latency_ms"] for r in rows if r["provider"] == "deft_tvm"] == ["123.0"]
    assert {r["commit"] for r in rows if r["provider"] == "reference_float64"} == {"test", "other"}


def test_read_csv_fills_older_columns_and_refuses_other_files(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("device,workload,dtype,tf32,profile,provider,gpu_ms,latency_ms,vs_dense,commit\n"
                   f"{GPU},paper_64c_64x64_n1,float32,off,normal_2px,deft_tvm,0.1256,0.1877,4.04,e9ee9e8\n")
    (row,) = bench.read_csv(old)
    assert row["mode"] == "forward" and row["cold_median_ms"] == "nan" and row["schedule"] == ""
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="is not a bench CSV"):
        bench.read_csv(other)


def test_markdown_ratios_from_a_handcrafted_csv(gpu_csv):
    text = bench.markdown(bench.read_csv(gpu_csv))
    lines = text.splitlines()
    assert lines[0] == f"{GPU}, commit abc1234, offset profile normal_2px: forward GPU time per call " \
                       "(CUDA events, back-to-back calls)"
    assert "| deft_tvm ms | torchvision ms | cuDNN best ms | deft speedup over torchvision | " \
           "deft slowdown vs cuDNN best |" in lines[2]
    assert "| paper_64c_64x64_n32 | float32 | off | 2 | 1 | 0.25 | 0.50x | 8.00x |" in lines
    assert "| paper_64c_64x64_n32 | float16 | n/a | 0.3 | — | 0.1 | — | 3.00x |" in lines
    assert len(lines) == 6


def test_markdown_of_a_cpu_run_compares_with_the_dense_conv(cpu_rows):
    lines = bench.markdown(cpu_rows).splitlines()
    assert lines[0].startswith("cpu, commit test, offset profile normal_2px: forward host latency")
    deft, _, dense = cpu_rows
    deft_ms, dense_ms = deft["latency_ms"], dense["latency_ms"]
    assert lines[-1] == f"| {WORKLOAD} | float32 | n/a | {deft_ms:.4g} | — | {dense_ms:.4g} | — | " \
                        f"{deft_ms / dense_ms:.2f}x |"


def test_speedups_over_torchvision():
    labels, bars = bench.speedups(_gpu_rows())
    assert labels == ["paper_64c_64x64_n32\nfloat32 TF32 off"]  # fp16 has no torchvision row
    both_modes = _gpu_rows() + [{**r, "mode": "forward_backward"} for r in _gpu_rows()]
    assert bench.speedups(both_modes)[0] == [labels[0], labels[0] + "\nforward+backward"]
    assert bars == {"deft_tvm": [0.5], "deft_tvm_default": [pytest.approx(2 / 3)], "generic_ms": [0.25]}
    with pytest.raises(ValueError, match="no torchvision rows"):
        bench.speedups([r for r in _gpu_rows() if r["provider"] != "torchvision"])


def test_from_csv_writes_markdown_and_plot(tmp_path, gpu_csv):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "out" / "table.md", tmp_path / "out" / "speedup.png"
    assert bench.main(["--from-csv", str(gpu_csv), "--markdown", str(md), "--plot", str(png)]) == 0
    assert md.read_text() == bench.markdown(bench.read_csv(gpu_csv))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_subcommand_delegates(tmp_path, gpu_csv):
    md = tmp_path / "table.md"
    assert cli.main(["bench", "--from-csv", str(gpu_csv), "--markdown", str(md)]) == 0
    assert "| 0.50x | 8.00x |" in md.read_text()


def test_main_runs_the_benchmark_into_csv_and_markdown(tmp_path, capsys):
    path, md = tmp_path / "bench.csv", tmp_path / "bench.md"
    assert bench.main(["--workloads", WORKLOAD, "--iters", "1", "--commit", "c0ffee", "--csv", str(path),
                       "--markdown", str(md)]) == 0
    rows = bench.read_csv(path)
    assert [r["provider"] for r in rows] == ["deft_tvm", "reference_float64", "dense_conv2d"]
    assert {r["commit"] for r in rows} == {"c0ffee"}
    assert f"| {WORKLOAD} | float32 | n/a |" in md.read_text()
    assert " | ".join(bench.COLUMNS) in capsys.readouterr().out


def test_generic_provider_times_the_generic_database(tmp_path, monkeypatch):
    """generic_ms is the best record of ``--generic-dir``'s database (tuning itself is in test_tuning)."""
    calls = []

    def fake_tune(spec, profile, target, directory, trials, **kwargs):
        calls.append((directory, trials, kwargs))
        sch = default_schedule(deform_conv2d_primfunc(spec), spec, target)
        records.commit_schedule(directory, spec, sch, target, 1e-3)
        return TuningResult(directory, trials, trials, 1e-3, 0.0, [])

    monkeypatch.setattr(bench, "tune", fake_tune)
    rows = bench.run([WORKLOAD], ["float32"], ["off"], iters=1, device="cpu", commit="test",
                     generic_trials=3, generic_dir=tmp_path / "generic")
    assert [r["provider"] for r in rows] == ["deft_tvm", "generic_ms", "reference_float64", "dense_conv2d"]
    assert rows[1]["schedule"] == "generic (3 trials)" and rows[1]["latency_ms"] > 0
    (directory, trials, kwargs), = calls
    assert trials == 3 and kwargs == {"space": "generic"}
    assert directory == records.database_dir(tmp_path / "generic", get_workload(WORKLOAD).spec,
                                               target_for_device("cpu"))


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "must be at least 1"),
    (["--generic-trials", "-1"], "must be at least 0"),
    (["--workloads", "no_such_layer"], "invalid choice"),
    (["--generic-trials", "2", "--generic-dir", "tuning_logs/generic"], "inside a tuning directory whose records"),
    (["--generic-trials", "2", "--generic-dir", "{user}/generic"], "inside a tuning directory whose records"),
    (["--from-csv", "missing.csv", "--markdown", "t.md"], "no such file"),
    (["--from-csv", "{csv}"], "needs --markdown and/or --plot"),
    (["--from-csv", "{csv}", "--markdown", "t.md", "--csv", "new.csv"], "no new rows for --csv"),
])
def test_argument_errors(args, message, gpu_csv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([a.format(csv=gpu_csv, user=records.user_root()) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(gpu_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(SystemExit):
        bench.main(["--from-csv", str(gpu_csv), "--plot", str(tmp_path / "p.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_tf32_mode_is_restored():
    before = torch.backends.cudnn.allow_tf32
    with bench.tf32_mode("on" if not before else "off"):
        assert torch.backends.cudnn.allow_tf32 is not before
    with bench.tf32_mode("n/a"):
        assert torch.backends.cudnn.allow_tf32 is before
    assert torch.backends.cudnn.allow_tf32 is before


def test_tools_script_keeps_gpu_ms(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "tools"))
    import bench as tools_bench  # what tools/sweep_cuda_tiling.py does

    assert tools_bench.gpu_ms is bench.gpu_ms and tools_bench.main is bench.main
