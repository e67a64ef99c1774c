"""``tools/multiscale_bench.py`` on the CPU, tiny: sizes drawn as documented, one row per variant,
deft_tvm's compiles counted and timed inside the run, none for the plain convs nor for deft_tvm
again from the disk cache."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from deft_tvm.runtime import kernel_cache

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.fixture(scope="module")
def multiscale_bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS))
        import multiscale_bench

        yield multiscale_bench


def test_input_sizes_draw_the_shorter_side_and_both_orientations(multiscale_bench):
    sizes = multiscale_bench.input_sizes(200, range(480, 801, 32), 1333 / 800, seed=0)
    assert {min(s) for s in sizes} == set(range(480, 801, 32))
    assert all(max(s) % 32 == 0 and max(s) >= min(s) for s in sizes)
    assert any(h < w for h, w in sizes) and any(h > w for h, w in sizes)
    assert sizes == multiscale_bench.input_sizes(200, range(480, 801, 32), 1333 / 800, seed=0)


def test_a_tiny_run_times_deft_tvms_compiles(multiscale_bench, tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_cache.CACHE_DIR_ENV, str(tmp_path / "unused"))  # restored after the run's own
    rows = multiscale_bench.main(["--iterations", "3", "--short-sides", "32", "97", "32", "--downsample", "2",
                                  "--width", "4", "--device", "cpu", "--variants", "deft_tvm", "deft_tvm_cached",
                                  "plain", "--csv", str(tmp_path / "rows.csv")])
    deft, cached, plain = rows
    assert deft["variant"] == "deft_tvm" and plain["variant"] == "plain"
    assert deft["kernels"] > 0 and 0 < deft["compile_s"] < deft["total_s"]
    assert cached["variant"] == "deft_tvm_cached" and cached["dcn"]  # a new process's run: kernels from disk
    assert cached["kernels"] == 0 and cached["compile_s"] == 0
    assert plain["kernels"] == 0 and plain["compile_s"] == 0
    assert deft["iterations"] == 3 and deft["device"] == "cpu" and deft["tf32"] == "n/a"
    with open(tmp_path / "rows.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["deft_tvm", "deft_tvm_cached", "plain"]
    kernel_cache.clear_memory_cache()  # the run's kernels live in its own cache folder
