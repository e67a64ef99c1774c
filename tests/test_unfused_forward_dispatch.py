"""Where the unfused forward's columns kernel comes from, without a GPU: the op's choice between a
loaded library's kernels and the unfused path, the columns kernel as a tuning workload (its
measurement inputs, its search start, its sampled design space compiling for sm_90) and the kernels
``deft-tvm tune`` / ``export`` put in a library."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import tvm
from tvm import s_tir

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import generic_spec, kernel_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.library import KernelEntry
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules import default_schedule, design_space, kernel_spec, search_start
from deft_tvm.tuning.export import default_entries, kernel_parts
from deft_tvm.tuning.search import ProfileInputs
from deft_tvm.tuning.workloads import get_workload

SM90 = cuda_target("sm_90")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
WIDE = kernel_spec(dataclasses.replace(get_workload("r50dcn_c5", "float16").spec, batch=1, height=7, width=9),
                   SM90)


def _library(monkeypatch, keys: set[str]) -> None:
    """A loaded library holding the kernels ``keys`` (each returned as ``("library", key)``)."""
    monkeypatch.setattr(kernel_cache, "_memory", {})
    monkeypatch.setattr(kernel_cache, "target_for_device", lambda device: SM90)
    monkeypatch.setattr(kernel_cache, "loaded_kernel", lambda kind, key: ("library", key) if key in keys else None)
    monkeypatch.setattr(kernel_cache, "channels_first_output_kernel", lambda spec, target: "transpose")


def test_a_library_with_the_fused_forward_only_keeps_it(monkeypatch):
    _library(monkeypatch, {WIDE.key()})
    assert kernel_cache.forward_kernel(WIDE, torch.device("cuda")) == ("library", WIDE.key())


def test_a_library_with_the_columns_kernel_runs_the_unfused_forward(monkeypatch):
    _library(monkeypatch, {WIDE.key(), kernel_key(WIDE, "columns")})
    built = {}
    monkeypatch.setattr(kernel_cache, "unfused_forward_kernel",
                        lambda spec, columns, output: built.setdefault("args", (spec, columns, output)))
    kernel_cache.forward_kernel(WIDE, torch.device("cuda"))
    assert built["args"] == (WIDE, ("library", kernel_key(WIDE, "columns")), "transpose")


def test_columns_measurement_inputs_follow_the_kernel():
    mod = kernel_primfunc(WIDE, "columns")
    args_info = [info.as_json() for info in s_tir.meta_schedule.arg_info.ArgInfo.from_prim_func(mod["main"])]
    args = ProfileInputs(WIDE, "normal_2px", part="columns")(tvm.cpu(), args_info, 1)[0]
    assert [tuple(a.shape) for a in args] == [tuple(info[2]) for info in args_info]
    assert torch.from_dlpack(args[1]).float().std() > 0.5  # profile offsets, not zeros
    with pytest.raises(ValueError, match=r"arguments .* do not match the kernel's"):
        ProfileInputs(WIDE, "normal_2px")(tvm.cpu(), args_info, 1)  # the forward's arguments


def test_columns_search_starts_from_the_default_schedule():
    start = search_start(WIDE, SM90, "columns")
    assert "sample_categorical" in str(start.trace)  # mutable by the search
    default = default_schedule(kernel_primfunc(WIDE, "columns"), WIDE, SM90, "columns")
    tvm.ir.assert_structural_equal(start.mod, default.mod)


@needs_nvcc
def test_columns_space_samples_points_per_block_and_compiles():
    sources = set()
    for seed in (1, 2, 3, 4):
        sch = s_tir.Schedule(kernel_primfunc(WIDE, "columns"), seed=seed)
        design_space(WIDE, SM90, "columns")(sch)
        sources.add(compile_kernel(sch.mod, SM90).mod.imports[0].inspect_source())
    assert len(sources) > 1


def test_tune_searches_the_columns_kernel_only_when_asked_and_where_the_forward_is_unfused():
    c5, c3 = get_workload("r50dcn_c5", "float16"), get_workload("r50dcn_c3", "float16")
    assert kernel_parts(c5, SM90, backward=False, columns=True) == ("forward", "columns")
    assert kernel_parts(c5, SM90, backward=True, columns=False) == ("forward", "backward")
    assert kernel_parts(c3, SM90, backward=False, columns=True) == ("forward",)


def test_a_tuned_library_gets_the_default_columns_kernel_of_unfused_workloads():
    c5, c3 = (get_workload(n, "float16").for_target(SM90).spec for n in ("r50dcn_c5", "r50dcn_c3"))
    tuned = [KernelEntry(spec, None, origin="tuned") for spec in (c5, c3)]  # the forwards, tuned
    workloads = [get_workload(n, "float16") for n in ("r50dcn_c5", "r50dcn_c3")]
    entries = default_entries(workloads, SM90, tuned, backward=False)
    # the configuration's columns kernel, which serves every size
    assert [(e.part, e.spec.key(), e.origin) for e in entries] == [("columns", generic_spec(c5).key(),
                                                                     "default schedule")]
    assert default_entries(workloads, SM90, tuned + entries, backward=False) == []

