"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh, empty on-disk and in-memory kernel cache for one test."""
    from deft_tvm.runtime import kernel_cache

    monkeypatch.setenv(kernel_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    kernel_cache.clear_memory_cache()
    yield tmp_path / "cache"
    kernel_cache.clear_memory_cache()
