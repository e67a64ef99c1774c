"""Tuning through TVM's RPC tracker (``deft-tvm tune --rpc-tracker HOST:PORT --rpc-key KEY``): a
tracker and two CPU servers on loopback, started and stopped here; a search's seed (the default
schedule) and candidates run on both servers, and the command line names a bad tracker address."""

from __future__ import annotations

import re

import pytest

from deft_tvm import cli
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.search import best_time, record_count, rpc_config, rpc_devices, tune
from deft_tvm.tuning.workloads import get_workload


def test_a_search_measures_its_seed_and_candidates_on_every_server_of_the_key(tracker, tmp_path):
    config, server_logs = tracker
    workload = get_workload("test_paper_small")
    directory = tmp_path / "db"
    result = tune(workload.spec, workload.profile, target_for_device("cpu"), directory, 5, trials_per_round=4,
                  rpc=config)
    assert result.new_trials == 4 and record_count(directory) == 5 and best_time(directory) is not None
    # One uploaded candidate per session: the default schedule (the search's seed; measured as the day's default
    # and the refinements are, search._measure_candidates) and the 4 searched, on both servers.
    sessions = [len(re.findall(r"load_module", log.read_text())) for log in server_logs]
    assert sum(sessions) == 5 and min(sessions) >= 1, sessions


def test_a_tracker_without_servers_under_the_key_says_which_keys_it_has(tracker):
    config, _ = tracker
    with pytest.raises(RuntimeError, match=rf"has no server under key 'other'; keys: {config.tracker_key}"):
        rpc_devices(rpc_config(f"{config.tracker_host}:{config.tracker_port}", "other"))


@pytest.mark.parametrize("argv, message", [
    (["--rpc-tracker", "localhost"], r"--rpc-tracker localhost --rpc-key None: give both"),
    (["--rpc-tracker", "localhost", "--rpc-key", "gpu"],
     r"--rpc-tracker: RPC tracker 'localhost': expected HOST:PORT, e.g. 127.0.0.1:9190"),
])
def test_bad_rpc_arguments_name_the_observed_values(argv, message, capsys):
    assert cli.main(["tune", "--device", "cpu", "--workloads", "test_paper_small", "--logs", "unused", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
