"""Tuning efficiency (``deft_tvm.tuning.efficiency``, ``tools/tuning_efficiency.py``): the curves
and the table read off them, and a real comparison of both spaces on the CPU at a tiny budget."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from deft_tvm.tuning.efficiency import CurvePoint, best_within, curve, reach, summarize

TOOLS = Path(__file__).parents[1] / "tools"

ROUNDS = {
    "deft": [{"candidates": 1, "failed": 0, "seconds": 2.0, "best_ms": 1.0},  # the seeded default
             {"candidates": 4, "failed": 1, "seconds": 10.0, "best_ms": 0.5},
             {"candidates": 4, "failed": 0, "seconds": 8.0, "best_ms": 0.45}],
    "generic": [{"candidates": 4, "failed": 4, "seconds": 6.0, "best_ms": None},
                {"candidates": 4, "failed": 0, "seconds": 6.0, "best_ms": 3.0},
                {"candidates": 4, "failed": 0, "seconds": 7.0, "best_ms": 0.9}],
}


def test_curves_accumulate_trials_and_seconds():
    assert curve(ROUNDS["deft"]) == [CurvePoint(1, 2.0, 1.0), CurvePoint(5, 12.0, 0.5), CurvePoint(9, 20.0, 0.45)]
    generic = curve(ROUNDS["generic"])
    assert best_within(generic, 4) is None and best_within(generic, 8) == 3.0 and best_within(generic, 12) == 0.9
    assert reach(generic, 1.0) == CurvePoint(12, 19.0, 0.9) and reach(generic, 0.5) is None


def test_summary_reads_budgets_and_time_to_within_ten_percent_of_the_best():
    rows = summarize({space: curve(r) for space, r in ROUNDS.items()}, (4, 8))
    deft, generic = rows
    assert deft == {"space": "deft", "trials": 9, "best_ms_4": 1.0, "best_ms_8": 0.5, "overall_best_ms": 0.45,
                    "trials_to_within_10pct": 9, "seconds_to_within_10pct": 20.0}
    assert generic["best_ms_4"] is None and generic["best_ms_8"] == 3.0
    assert generic["trials_to_within_10pct"] is None  # 0.9 ms never came within 10 % of 0.45


def test_the_tool_tunes_each_space_from_an_empty_database_and_writes_curves_table_and_plot(tmp_path, monkeypatch):
    # tune itself is tested in test_tuning.py (both spaces); here it answers with ROUNDS
    from deft_tvm.tuning import efficiency
    from deft_tvm.tuning.search import TuningResult

    monkeypatch.syspath_prepend(str(TOOLS))
    import tuning_efficiency

    calls = []

    def fake_tune(spec, profile, target, directory, trials, *, space, seed, trials_per_round, population):
        calls.append((spec.key(), profile, str(target.kind.name), directory, trials, space, trials_per_round,
                      population))
        return TuningResult(directory, trials, trials, None, 0.0, ROUNDS[space])

    monkeypatch.setattr(efficiency, "tune", fake_tune)
    paths = {name: tmp_path / f"{name}.csv" for name in ("curves", "summary")}
    argv = ["--workload", "test_paper_small", "--device", "cpu", "--budgets", "4", "12", "--trials-per-round", "4",
            "--population", "8", "--out", str(tmp_path / "db"), "--csv", str(paths["curves"]),
            "--summary", str(paths["summary"]), "--plot", str(tmp_path / "curves.png")]
    tuning_efficiency.main(argv)
    key = "n2_c8_h12_w12_o8_k3x3_s1x1_p1x1_d1x1_g1_og1_mb_float32"
    assert calls == [(key, "normal_2px", "llvm", tmp_path / "db" / space / key, 12, space, 4, 8)
                     for space in ("deft", "generic")]
    curves = list(csv.DictReader(open(paths["curves"])))
    assert [(r["space"], int(r["trials"]), r["best_ms"]) for r in curves] == [
        ("deft", 1, "1.0"), ("deft", 5, "0.5"), ("deft", 9, "0.45"),
        ("generic", 4, ""), ("generic", 8, "3.0"), ("generic", 12, "0.9")]
    summary = list(csv.DictReader(open(paths["summary"])))
    assert [(r["space"], r["best_ms_4"], r["best_ms_12"], r["trials_to_within_10pct"]) for r in summary] == [
        ("deft", "1.0", "0.45", "9"), ("generic", "", "0.9", "")]
    assert all(r["workload"] == "test_paper_small" and r["dtype"] == "float32" and r["tf32"] == "off"
               and r["profile"] == "normal_2px" and r["commit"] for r in curves + summary)
    assert (tmp_path / "curves.png").stat().st_size > 0

    database = tmp_path / "db" / "generic" / key / "database_tuning_record.json"
    database.parent.mkdir(parents=True, exist_ok=True)
    database.write_text("{}\n{}\n")
    calls.clear()
    with pytest.raises(ValueError, match=r"already holds 2 records; a comparison starts each space from an empty"):
        tuning_efficiency.main(argv)
    assert calls == []  # refused before tuning either space


def test_spaces_tuned_in_separate_runs_are_summarized_together(tmp_path, monkeypatch):
    from deft_tvm.tuning import efficiency
    from deft_tvm.tuning.search import TuningResult

    monkeypatch.syspath_prepend(str(TOOLS))
    import tuning_efficiency

    spaces = []

    def fake_tune(spec, profile, target, directory, trials, *, space, seed, trials_per_round, population):
        spaces.append(space)
        return TuningResult(directory, trials, trials, None, 0.0, ROUNDS[space])

    monkeypatch.setattr(efficiency, "tune", fake_tune)
    common = ["--workload", "test_paper_small", "--device", "cpu", "--budgets", "4", "12",
              "--out", str(tmp_path / "db")]
    for space in ("generic", "deft"):  # e.g. each on its own GPU
        tuning_efficiency.main(common + ["--spaces", space, "--csv", str(tmp_path / f"{space}.csv")])
    assert spaces == ["generic", "deft"]
    summary = tmp_path / "summary.csv"
    tuning_efficiency.main(["--curves", str(tmp_path / "deft.csv"), str(tmp_path / "generic.csv"),
                            "--budgets", "4", "12", "--summary", str(summary)])
    rows = list(csv.DictReader(open(summary)))
    assert [(r["space"], r["trials"], r["best_ms_4"], r["best_ms_12"], r["overall_best_ms"],
             r["trials_to_within_10pct"]) for r in rows] == [
        ("deft", "9", "1.0", "0.45", "0.45", "9"), ("generic", "12", "", "0.9", "0.45", "")]
    assert all(r["workload"] == "test_paper_small" and r["profile"] == "normal_2px" for r in rows)

    other = tmp_path / "other.csv"
    other.write_text(open(tmp_path / "generic.csv").read().replace("float32", "float16"))
    with pytest.raises(ValueError, match=r"the curves are of 2 runs .*expected one"):
        tuning_efficiency.main(["--curves", str(tmp_path / "deft.csv"), str(other)])
    with pytest.raises(SystemExit):  # tuning needs a workload
        tuning_efficiency.main(["--device", "cpu"])


def test_compare_spaces_refuses_unknown_spaces(tmp_path):
    from deft_tvm.runtime.targets import target_for_device
    from deft_tvm.tuning.efficiency import compare_spaces
    from deft_tvm.tuning.workloads import get_workload

    import torch

    spec = get_workload("test_paper_small").spec
    with pytest.raises(ValueError, match=r"spaces \['dft'\]: choose from deft, generic"):
        compare_spaces(spec, "normal_2px", target_for_device(torch.device("cpu")), tmp_path, 4, spaces=("dft",))
