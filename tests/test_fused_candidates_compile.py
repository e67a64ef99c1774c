"""The fused backward search compiles its candidates in a pool of processes into the kernel disk
cache (``fused_backward.compile_candidates``): every candidate's library is written once, the
caller gets the kernels it times by name, and a second search of the same candidates (a resumed
``tune_model``) compiles nothing."""

from __future__ import annotations

import concurrent.futures
import os

from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import cuda_target
from deft_tvm.tuning.fused_backward import compile_candidates, data_space, weight_space
from deft_tvm.tuning.workloads import get_workload

TARGET = cuda_target("sm_90")


def _loaded(name, fingerprint, target, build_library, functions):
    """Stand-in for loading a cached CUDA library (this CPU has no CUDA runtime to load one): the
    functions' names, after checking the library is on disk."""
    assert kernel_cache.library_path(name, fingerprint, target).exists(), name
    return [f"{name}-{fingerprint}:{function}" for function in functions]


def test_candidates_compile_once_into_the_disk_cache(isolated_cache, monkeypatch):
    spec = get_workload("test_paper_small", "float16").spec
    data, weight = data_space(spec)[:2], weight_space(spec)[:1]
    monkeypatch.setattr(kernel_cache, "load_or_build_library", _loaded)
    pools, process_pool = [], concurrent.futures.ProcessPoolExecutor

    def counted_pool(workers, context):
        pools.append(workers)
        return process_pool(workers, context)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", counted_pool)

    data_kernels, weight_kernels = compile_candidates(spec, TARGET, data, weight)

    assert [sorted(k) for k in data_kernels] == [["grad_data", "prepare"]] * 2
    assert data_kernels[0]["grad_data"].endswith(":grad_data") and "-candidate-grad_data-" in data_kernels[0]["prepare"]
    assert data_kernels[0] != data_kernels[1]
    assert [k.rsplit(":", 1)[1] for k in weight_kernels] == ["grad_weight"]
    assert len(list(isolated_cache.rglob("*-candidate-*.so"))) == 3
    assert pools == [min(3, os.cpu_count())]
    # searched again (a resumed tune_model): all cached, no pool
    assert compile_candidates(spec, TARGET, data, weight) == (data_kernels, weight_kernels)
    assert pools == [min(3, os.cpu_count())]
    # one new tiling beside a cached one: only it is compiled
    compile_candidates(spec, TARGET, data_space(spec)[1:3], [])
    assert pools == [min(3, os.cpu_count()), 1]
    assert len(list(isolated_cache.rglob("*-candidate-*.so"))) == 4
