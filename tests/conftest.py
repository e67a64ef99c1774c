"""Fixtures shared by the tests."""

from __future__ import annotations

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
