"""``search.refine``: the schedule family's refinements of a folder's best record are measured as
the tuning runner measures, stored as records (the faster one becomes the best), and never twice."""

from __future__ import annotations

import tvm_ffi
from tvm import s_tir

import deft_tvm.schedules
from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.runtime import records
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import design_space, search_start
from deft_tvm.tuning.search import FAILED_SECONDS, measured_records, record_count, refine, tune
from deft_tvm.tuning.workloads import get_workload

SMALL = get_workload("test_paper_small")


def _other_point(spec, target):
    """A seeded sample of the design space whose trace is not the default's."""
    start = tvm_ffi.structural_hash(search_start(spec, target).mod)
    for seed in range(1, 50):
        sch = s_tir.Schedule(deform_conv2d_primfunc(spec), seed=seed)
        design_space(spec, target)(sch)
        if tvm_ffi.structural_hash(sch.mod) != start:
            return sch
    raise AssertionError("49 samples of the space all equal the default schedule")


def test_refinements_are_measured_stored_and_not_repeated(tmp_path, monkeypatch):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    tune(SMALL.spec, SMALL.profile, target, directory, trials=1)  # the default schedule, measured
    other = _other_point(SMALL.spec, target)
    offered = []

    def refinements(spec, target_, trace, part="forward"):
        offered.append(str(trace))
        # The folder's own record (skipped: already held) and a new point of the space.
        return {"held": search_start(spec, target_), "other": other}

    monkeypatch.setattr(deft_tvm.schedules, "refinements", refinements)
    results = refine([(SMALL.spec, SMALL.profile, directory)], target)
    assert offered == [str(search_start(SMALL.spec, target).trace)]  # refined from the best (only) record
    assert list(results) == [directory] and list(results[directory]) == ["other"]
    seconds = results[directory]["other"]
    assert seconds is not None and 0 < seconds < FAILED_SECONDS
    assert record_count(directory) == 2
    assert str(other.trace) in {str(r.trace) for r in measured_records(directory)}

    assert refine([(SMALL.spec, SMALL.profile, directory)], target) == {}  # both held now: nothing to measure
    assert record_count(directory) == 2


def test_families_without_refinements_offer_none():
    target = target_for_device("cpu")
    assert deft_tvm.schedules.refinements(SMALL.spec, target, search_start(SMALL.spec, target).trace) == {}


def test_a_folder_without_a_database_is_skipped(tmp_path):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    assert refine([(SMALL.spec, SMALL.profile, directory)], target) == {}
    assert not directory.exists()
