"""Tuning efficiency: the DefT design space against MetaSchedule's generic space, equal budgets.

    python tools/tuning_efficiency.py --workload NAME [--dtype float16] [--tf32 off|on]
                                      [--device cpu|cuda] [--budgets 64 256] [--out DIR]
                                      [--csv PATH] [--summary PATH] [--plot PATH] [--seed 0]
                                      [--trials-per-round 32] [--population 128]
                                      [--spaces deft generic]
    python tools/tuning_efficiency.py --curves CSV [CSV ...] [--budgets ...] [--summary PATH]
                                      [--plot PATH]

Tunes the workload's forward (offsets from its profile) from empty databases under ``--out``, once
per space, for the largest budget (``deft_tvm.tuning.efficiency.compare_spaces``), prints per space
the best time within each budget and the trials and tuning seconds it took to come within 10 % of
the best either space found, and writes the curves (best time after every round against trials
and seconds; ``--csv``), that table (``--summary``) and a plot of the curves (``--plot``, needs
matplotlib). Every row names the device, workload, dtype, TF32 setting, profile and commit.

With ``--spaces`` one process tunes some of the spaces (e.g. each on its own GPU,
``CUDA_VISIBLE_DEVICES``); ``--curves`` then reads their ``--csv`` files (one workload, dtype, TF32
setting, profile and device: ValueError otherwise) and writes the table and plot of all of them.
"""

from __future__ import annotations

import argparse
import csv
import platform
from pathlib import Path

import torch

from deft_tvm.bench import current_commit, int_at_least
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.efficiency import CurvePoint, compare_spaces, summarize
from deft_tvm.tuning.search import SPACES
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


# The columns naming a run, which every curve read with --curves must share.
RUN_COLUMNS = ("device", "workload", "dtype", "tf32", "profile")


def read_curves(paths: list[Path]) -> tuple[dict, dict[str, list[CurvePoint]]]:
    """The run context (``RUN_COLUMNS`` and the commits) and the curves of ``--csv`` files."""
    rows = [row for path in paths for row in csv.DictReader(open(path))]
    if not rows:
        raise ValueError(f"no curve rows in {', '.join(map(str, paths))}")
    runs = {tuple(row[c] for c in RUN_COLUMNS) for row in rows}
    if len(runs) > 1:
        raise ValueError(f"the curves are of {len(runs)} runs ({', '.join(RUN_COLUMNS)}: {sorted(runs)}); "
                         "expected one")
    context = {c: rows[0][c] for c in RUN_COLUMNS}
    context["commit"] = "+".join(sorted({row["commit"] for row in rows}))
    curves: dict[str, list[CurvePoint]] = {}
    for row in rows:
        best = float(row["best_ms"]) if row["best_ms"] else None
        curves.setdefault(row["space"], []).append(CurvePoint(int(row["trials"]), float(row["seconds"]), best))
    return context, curves


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), help="required unless --curves")
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
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(SPACES), help="the spaces this run tunes")
    parser.add_argument("--curves", type=Path, nargs="+", help="summarize these --csv files instead of tuning")
    args = parser.parse_args(argv)
    if args.curves:
        context, curves = read_curves(args.curves)
        _report(args, context, curves, f"{context['workload']} {context['dtype']} on {context['device']}")
        return
    if args.workload is None:
        parser.error("--workload is required unless --curves is given")

    workload = get_workload(args.workload, args.dtype, args.tf32 == "on")
    target = target_for_device(torch.device(args.device))
    workload = workload.for_target(target)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    context = {"device": device, "workload": workload.name, "dtype": workload.spec.dtype, "tf32": args.tf32,
               "profile": workload.profile, "commit": current_commit()}
    curves = compare_spaces(workload.spec, workload.profile, target, args.out, max(args.budgets), seed=args.seed,
                            trials_per_round=args.trials_per_round, population=args.population,
                            spaces=tuple(args.spaces))
    if args.csv:
        _write(args.csv, [{**context, "space": space, "trials": p.trials, "seconds": p.seconds, "best_ms": p.best_ms}
                          for space, points in curves.items() for p in points])
    _report(args, context, curves, f"{workload.name} {workload.spec.dtype} on {device}")


def _report(args, context: dict, curves: dict[str, list[CurvePoint]], title: str) -> None:
    """Print and write (``--summary``, ``--plot``) the table of ``curves``."""
    summary = [{**context, **row} for row in summarize(curves, tuple(args.budgets))]
    for row in summary:
        print(" | ".join(f"{k} {v}" for k, v in row.items() if k not in context))
    if args.summary:
        _write(args.summary, summary)
    if args.plot:
        _plot(args.plot, curves, title)


if __name__ == "__main__":
    main()
