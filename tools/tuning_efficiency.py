"""Tuning efficiency: the DefT design space against MetaSchedule's generic space, equal budgets.

    python tools/tuning_efficiency.py --workload NAME [--dtype float16] [--tf32 off|on]
                                      [--device cpu|cuda] [--budgets 64 256] [--out DIR]
                                      [--csv PATH] [--summary PATH] [--plot PATH] [--seed 0]
                                      [--trials-per-round 32] [--population 128]

Tunes the workload's forward (offsets from its profile) from empty databases under ``--out``, once
per space, for the largest budget (``deft_tvm.tuning.efficiency.compare_spaces``), prints per space
the best time within each budget and the trials and tuning seconds it took to come within 10 % of
the best either space found, and writes the curves (best time after every round against trials
and seconds; ``--csv``), that table (``--summary``) and a plot of the curves (``--plot``, needs
matplotlib). Every row names the device, workload, dtype, TF32 setting, profile and commit.
"""

from __future__ import annotations

import argparse
import csv
import platform
from pathlib import Path

import torch

from deft_tvm.bench import current_commit, int_at_least
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.efficiency import compare_spaces, summarize
from deft_tvm.tuning.workloads import WORKLOADS, get_workload


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, curves: dict, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    by_trials, by_seconds = figure.subplots(1, 2, sharey=True)
    for space, points in curves.items():
        shown = [p for p in points if p.best_ms is not None]
        by_trials.step([p.trials for p in shown], [p.best_ms for p in shown], where="post", label=space)
        by_seconds.step([p.seconds for p in shown], [p.best_ms for p in shown], where="post", label=space)
    by_trials.set(xlabel="trials", ylabel="best kernel time (ms)", yscale="log", title=title)
    by_seconds.set(xlabel="tuning wall time (s)")
    by_trials.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=list(WORKLOADS))
    parser.add_argument("--dtype", default=None, help="default: the workload's")
    parser.add_argument("--tf32", choices=("off", "on"), default="off")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", type=int_at_least(1), nargs="+", default=[64, 256])
    parser.add_argument("--out", type=Path, default=Path("tuning_efficiency"), help="the databases' folder")
    parser.add_argument("--csv", type=Path, help="the curves")
    parser.add_argument("--summary", type=Path, help="the table")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials-per-round", type=int_at_least(1), default=32)
    parser.add_argument("--population", type=int_at_least(2), default=128, help="the evolutionary search's")
    args = parser.parse_args(argv)

    workload = get_workload(args.workload, args.dtype, args.tf32 == "on")
    target = target_for_device(torch.device(args.device))
    workload = workload.for_target(target)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    context = {"device": device, "workload": workload.name, "dtype": workload.spec.dtype, "tf32": args.tf32,
               "profile": workload.profile, "commit": current_commit()}
    curves = compare_spaces(workload.spec, workload.profile, target, args.out, max(args.budgets), seed=args.seed,
                            trials_per_round=args.trials_per_round, population=args.population)
    summary = [{**context, **row} for row in summarize(curves, tuple(args.budgets))]
    for row in summary:
        print(" | ".join(f"{k} {v}" for k, v in row.items() if k not in context))
    if args.csv:
        _write(args.csv, [{**context, "space": space, "trials": p.trials, "seconds": p.seconds, "best_ms": p.best_ms}
                          for space, points in curves.items() for p in points])
    if args.summary:
        _write(args.summary, summary)
    if args.plot:
        _plot(args.plot, curves, f"{workload.name} {workload.spec.dtype} on {device}")


if __name__ == "__main__":
    main()
