"""Tuning efficiency: the DefT design space against MetaSchedule's generic space on the same TE
compute, each searched from an empty database with the same trial budget and seed (issue 15).

``compare_spaces`` tunes a workload's forward in both spaces and returns each search's curve (best
time after every round against trials and tuning wall seconds: builds, measurements and the
search itself) and ``summarize`` reads off, per space, the best time within each budget and the
trials and seconds it took to come within ``WITHIN`` (10 %) of the best time either space found.
A budget below the run's is the first rounds of the same search (MetaSchedule measures rounds of
``trials_per_round`` candidates, so budgets are best multiples of it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tvm

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.tuning.search import SPACES, record_count, tune

WITHIN = 1.10  # "within 10 % of the best": at most 1.1 times its time


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """A search after one round: trials so far, tuning wall seconds so far and the best time so far
    (ms; None while no candidate has run)."""

    trials: int
    seconds: float
    best_ms: float | None


def curve(rounds: list[dict]) -> list[CurvePoint]:
    """The cumulative curve of ``TuningResult.rounds``."""
    points, trials, seconds = [], 0, 0.0
    for r in rounds:
        trials, seconds = trials + r["candidates"], seconds + r["seconds"]
        points.append(CurvePoint(trials, round(seconds, 2), r["best_ms"]))
    return points


def best_within(points: list[CurvePoint], budget: int) -> float | None:
    """The best time (ms) a search had after at most ``budget`` trials (None: none had run)."""
    times = [p.best_ms for p in points if p.trials <= budget and p.best_ms is not None]
    return min(times) if times else None


def reach(points: list[CurvePoint], target_ms: float) -> CurvePoint | None:
    """The first point whose best time is at most ``target_ms``, or None."""
    return next((p for p in points if p.best_ms is not None and p.best_ms <= target_ms), None)


def compare_spaces(spec: DeformConvSpec, profile: str, target: tvm.target.Target, out: Path, trials: int, *,
                   seed: int = 0, trials_per_round: int = 32, population: int = 128,
                   spaces: tuple[str, ...] = SPACES) -> dict[str, list[CurvePoint]]:
    """Space -> curve of tuning ``spec``'s forward for ``trials`` trials in each of ``spaces`` (of
    ``SPACES``; one per process lets each search run on its own GPU), in ``out/<space>/`` (fresh
    folders: ValueError naming a folder that already holds records, whose search would resume rather
    than start), with ``tune``'s search settings."""
    unknown = sorted(set(spaces) - set(SPACES))
    if unknown or not spaces:
        raise ValueError(f"spaces {list(spaces)}: choose from {', '.join(SPACES)}")
    directories = {space: Path(out) / space / spec.key() for space in spaces}
    for directory in directories.values():  # checked before either space is tuned
        if record_count(directory):
            raise ValueError(f"{directory} already holds {record_count(directory)} records; "
                             "a comparison starts each space from an empty database")
    return {space: curve(tune(spec, profile, target, directory, trials, space=space, seed=seed,
                              trials_per_round=trials_per_round, population=population).rounds)
            for space, directory in directories.items()}


def summarize(curves: dict[str, list[CurvePoint]], budgets: tuple[int, ...]) -> list[dict]:
    """One row per space: the trials it ran (a budget past them reads its last best time: a search
    that ran fewer, or a space with fewer candidates), the best time (ms) within each budget
    (``best_ms_<budget>``), the best time either space found (``overall_best_ms``), and the trials
    and seconds the space took to come within ``WITHIN`` of it (None where it never did)."""
    finals = [p.best_ms for points in curves.values() for p in points if p.best_ms is not None]
    overall = min(finals) if finals else None
    rows = []
    for space, points in curves.items():
        reached = reach(points, overall * WITHIN) if overall is not None else None
        rows.append({
            "space": space,
            "trials": points[-1].trials if points else 0,
            **{f"best_ms_{b}": best_within(points, b) for b in budgets},
            "overall_best_ms": overall,
            "trials_to_within_10pct": None if reached is None else reached.trials,
            "seconds_to_within_10pct": None if reached is None else reached.seconds,
        })
    return rows
