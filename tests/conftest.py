"""Fixtures shared by the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture(autouse=True, scope="session")
def _empty_user_tuning_dir(tmp_path_factory):
    """Every test's user tuning directory (``records.user_root``) is an empty folder of its own
    session, not the machine's, whose records would change which kernels the op compiles."""
    from deft_tvm.runtime.records import TUNING_DIR_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TUNING_DIR_ENV, str(tmp_path_factory.mktemp("user_tuning_logs")))
        yield


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh, empty on-disk and in-memory kernel cache for one test."""
    from deft_tvm.runtime import kernel_cache

    monkeypatch.setenv(kernel_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    kernel_cache.clear_memory_cache()
    yield tmp_path / "cache"
    kernel_cache.clear_memory_cache()


RPC_KEY = "deft-test"


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
    """``(RPCConfig, server log paths)`` of a tracker with two CPU servers under ``RPC_KEY``."""
    from deft_tvm.tuning.search import rpc_config, rpc_devices

    port = _free_port()
    processes = [_start(tmp_path, "tracker", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                        "--port-end", str(port + 1))]
    try:
        config = rpc_config(f"127.0.0.1:{port}", RPC_KEY)
        for i in range(2):
            server_port = _free_port()
            processes.append(_start(tmp_path, f"server{i}", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                    "--key", RPC_KEY, "--host", "127.0.0.1", "--port", str(server_port),
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
