"""``search.Measurement``: a kernel's tuning (``tune_kernel``: the seed, the search, today's
default, the refinements) measures with one MetaSchedule builder and one runner, each of which
starts a worker process to check itself, and stops the runner's worker when it is done."""

from __future__ import annotations

import os

from tvm.s_tir import meta_schedule as ms

from deft_tvm.runtime import records
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning import search
from deft_tvm.tuning.search import Measurement, tune_kernel
from deft_tvm.tuning.workloads import get_workload

SMALL = get_workload("test_paper_small")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_kernels_tuning_makes_one_builder_and_one_runner_and_stops_its_worker(tmp_path, monkeypatch):
    target = target_for_device("cpu")
    builders, runners = [], []
    local_builder, make_runner = ms.builder.LocalBuilder, search._runner
    monkeypatch.setattr(ms.builder, "LocalBuilder", lambda **kw: builders.append(local_builder(**kw)) or builders[-1])
    workers = []  # a runner's worker process, started by its own check

    def runner(*args):
        runners.append(make_runner(*args))
        workers.extend(w._proc.pid for w in runners[-1].pool._worker_map.values())
        return runners[-1]

    monkeypatch.setattr(search, "_runner", runner)

    done = tune_kernel(SMALL.spec, SMALL.profile, target, records.database_dir(tmp_path, SMALL.spec, target), 3)

    assert done.search.trials == 3 and done.best_s is not None and "refine" in done.measured
    assert len(builders) == 1 and len(runners) == 1
    assert len(workers) == 1 and not _alive(workers[0]) and runners[0].pool._shutdown


def test_a_measurement_keeps_a_runner_per_workload_and_part():
    target = target_for_device("cpu")
    other = get_workload("test_paper_small", "float64").spec
    with Measurement(target) as measurement:
        first = measurement.runner(SMALL.spec, SMALL.profile, "forward")
        assert measurement.runner(SMALL.spec, SMALL.profile, "forward") is first
        assert measurement.runner(other, SMALL.profile, "forward") is not first
        assert measurement.runner(SMALL.spec, SMALL.profile, "backward") is not first
        assert measurement.builder is measurement.builder
    assert first.pool._shutdown
