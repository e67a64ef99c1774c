"""Tuning through TVM's RPC tracker (``deft-tvm tune --rpc-tracker HOST:PORT --rpc-key KEY``): a
tracker and two CPU servers on loopback, started and stopped here; a search's seed (the default
schedule) and candidates run on both servers, and the command line names a bad tracker address."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from deft_tvm import cli
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.search import best_time, record_count, rpc_config, rpc_devices, tune
from deft_tvm.tuning.workloads import get_workload

KEY = "deft-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, name: str, *args: str) -> subprocess.Popen:
    """A TVM RPC process in a process group of its own: the tracker and the servers run in popen
    workers of theirs, which outlive them unless the whole group is stopped."""
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture
def tracker(tmp_path):
    """``(RPCConfig, server log paths)`` of a tracker with two CPU servers under ``KEY``."""
    port = _free_port()
    processes = [_start(tmp_path, "tracker", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                        "--port-end", str(port + 1))]
    try:
        config = rpc_config(f"127.0.0.1:{port}", KEY)
        for i in range(2):
            server_port = _free_port()
            processes.append(_start(tmp_path, f"server{i}", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                    "--key", KEY, "--host", "127.0.0.1", "--port", str(server_port),
                                    "--port-end", str(server_port + 1)))
        deadline = time.monotonic() + 60
        while True:
            try:
                if rpc_devices(config) == 2:
                    break
            except (RuntimeError, OSError):
                pass
            assert time.monotonic() < deadline, "the tracker did not register two servers in 60 s"
            time.sleep(0.5)
        yield config, [tmp_path / f"server{i}.log" for i in range(2)]
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


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
    with pytest.raises(RuntimeError, match=rf"has no server under key 'other'; keys: {KEY}"):
        rpc_devices(rpc_config(f"{config.tracker_host}:{config.tracker_port}", "other"))


@pytest.mark.parametrize("argv, message", [
    (["--rpc-tracker", "localhost"], r"--rpc-tracker localhost --rpc-key None: give both"),
    (["--rpc-tracker", "localhost", "--rpc-key", "gpu"],
     r"--rpc-tracker: RPC tracker 'localhost': expected HOST:PORT, e.g. 127.0.0.1:9190"),
])
def test_bad_rpc_arguments_name_the_observed_values(argv, message, capsys):
    assert cli.main(["tune", "--device", "cpu", "--workloads", "test_paper_small", "--logs", "unused", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
