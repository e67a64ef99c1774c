"""The fused backward search compiles its candidates in a pool of processes into the kernel disk
cache (``fused_backward.compile_candidates``): every candidate's library is written once, the
caller gets the kernels it times by name, a progress bar counts the compiles, and a second search
of the same candidates (a resumed ``tune_model``) compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import cuda_target
from deft_tvm.tuning import fused_backward
from deft_tvm.tuning.fused_backward import compile_candidates, compile_pool, data_space, weight_space
from deft_tvm.tuning.workloads import get_workload

TARGET = cuda_target("sm_90")


def _loaded(name, fingerprint, target, build_library, functions):
    """Stand-in for loading a cached CUDA library (this CPU has no CUDA runtime to load one): the
    functions' names, after checking the library is on disk."""
    assert kernel_cache.library_path(name, fingerprint, target).exists(), name
    return [f"{name}-{fingerprint}:{function}" for function in functions]


class _Bar:
    """A tqdm stand-in that keeps its postfixes."""

    def __init__(self):
        self.postfixes = []

    def set_postfix_str(self, text):
        self.postfixes.append(text)


def test_candidates_compile_once_into_the_disk_cache(isolated_cache, monkeypatch):
    spec = get_workload("test_paper_small", "float16").spec
    data, weight = data_space(spec)[:2], weight_space(spec)[:1]
    monkeypatch.setattr(kernel_cache, "load_or_build_library", _loaded)
    pools, process_pool = [], fused_backward.PopenPoolExecutor

    def counted_pool(workers):
        pools.append(workers)
        return process_pool(workers)

    monkeypatch.setattr(fused_backward, "PopenPoolExecutor", counted_pool)

    bar = _Bar()
    data_kernels, weight_kernels = compile_candidates(spec, TARGET, data, weight, bar)

    assert bar.postfixes == ["compiled 0/3", "compiled 1/3", "compiled 2/3", "compiled 3/3"]
    assert [sorted(k) for k in data_kernels] == [["grad_data", "prepare"]] * 2
    assert data_kernels[0]["grad_data"].endswith(":grad_data") and "-candidate-grad_data-" in data_kernels[0]["prepare"]
    assert data_kernels[0] != data_kernels[1]
    assert [k.rsplit(":", 1)[1] for k in weight_kernels] == ["grad_weight"]
    assert len(list(isolated_cache.rglob("*-candidate-*.so"))) == 3
    assert pools == [os.cpu_count()]
    # searched again (a resumed tune_model): all cached, no pool
    assert compile_candidates(spec, TARGET, data, weight) == (data_kernels, weight_kernels)
    assert pools == [os.cpu_count()]
    # one new tiling beside a cached one, in a search's pool: only it is compiled (the cached one counted at once)
    with compile_pool() as pool:
        compile_candidates(spec, TARGET, data_space(spec)[1:3], [], bar, pool)
    assert bar.postfixes[4:] == ["compiled 1/2", "compiled 2/2"]
    assert pools == [os.cpu_count()] * 2
    assert len(list(isolated_cache.rglob("*-candidate-*.so"))) == 4


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path):
    """The pool's workers are fresh interpreters: a user's script that tunes at its top level (no
    ``if __name__ == "__main__"``) runs once, as a spawned ``multiprocessing`` pool would not."""
    script = tmp_path / "tune_at_top_level.py"
    script.write_text(textwrap.dedent(f"""
        from deft_tvm.runtime.targets import cuda_target
        from deft_tvm.tuning.fused_backward import compile_candidates, data_space
        from deft_tvm.tuning.workloads import get_workload
        with open({str(tmp_path / "runs")!r}, "a") as runs:
            runs.write("run\\n")
        spec = get_workload("test_paper_small", "float16").spec
        try:
            compile_candidates(spec, cuda_target("sm_90"), data_space(spec)[:2], [])
        except Exception as err:  # loading a CUDA library needs a CUDA runtime, this CPU has none
            print(type(err).__name__)
    """))
    env = dict(os.environ, DEFT_TVM_CACHE_DIR=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300, capture_output=True)
    assert (tmp_path / "runs").read_text() == "run\n"
    assert len(list((tmp_path / "cache").rglob("*-candidate-grad_data-*.so"))) == 2
