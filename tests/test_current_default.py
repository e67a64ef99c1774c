"""``search.current_default``: a folder tuned before the default schedule changed gets today's
default measured and stored as a record (so its best is never slower than the default), once; a
folder without a database is left to ``tune``."""

from __future__ import annotations

import deft_tvm.schedules
from deft_tvm.runtime import records
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.search import FAILED_SECONDS, current_default, measured_records, record_count, tune

from test_refine import SMALL, _other_point


def test_a_changed_default_is_measured_once_into_an_existing_folder(tmp_path, monkeypatch):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    tune(SMALL.spec, SMALL.profile, target, directory, trials=1)  # seeded with today's default
    folder = (SMALL.spec, SMALL.profile, directory)
    assert current_default([folder], target) == {}  # the default is held: nothing to measure

    newer = _other_point(SMALL.spec, target)  # the default of a later commit
    monkeypatch.setattr(deft_tvm.schedules, "search_start", lambda spec, target_, part="forward": newer)
    results = current_default([folder], target)
    assert list(results) == [directory] and list(results[directory]) == ["default"]
    seconds = results[directory]["default"]
    assert seconds is not None and 0 < seconds < FAILED_SECONDS
    assert record_count(directory) == 2
    assert str(newer.trace) in {str(r.trace) for r in measured_records(directory)}
    assert current_default([folder], target) == {}  # held now
    assert record_count(directory) == 2


def test_a_folder_without_a_database_is_left_to_tune(tmp_path):
    target = target_for_device("cpu")
    directory = records.database_dir(tmp_path, SMALL.spec, target)
    assert current_default([(SMALL.spec, SMALL.profile, directory)], target) == {}
    assert not (directory / "database_tuning_record.json").exists()
