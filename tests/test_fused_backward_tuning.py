"""The fused backward's tiling search (``deft_tvm.tuning.fused_backward``) and its records: the
design spaces start at the defaults and hold only tilings that fit; the search keeps the fastest
candidate of each kernel whose gradients are the default's (times from a stand-in for the GPU);
the op takes a committed record over the defaults."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math

import pytest
import torch
import tvm

from deft_tvm.runtime import backward, kernel_cache, records
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules.cuda_backward_fused import (DTYPE_BYTES, DYNAMIC_SHARED_BYTES, SHARED_BYTES, DataTiling,
                                                     WeightTiling, backward_mma, fused_backward_module)
from deft_tvm.tuning import fused_backward
from deft_tvm.tuning.fused_backward import (CHUNK_FACTOR, HALO_FLOOR, HALOS, LOAD_BATCHES, PREFETCH_BYTES,
                                            STEP_FACTORS, TILE_POSITIONS, WEIGHT_LOAD_BATCHES, agree, chunk_variants,
                                            data_space, fits, profile_halos, refine_load_batch, stage_variants,
                                            step_variants, tile_variants, time_checked, tune_fused_backward,
                                            weight_space)
from deft_tvm.tuning.stats import profile_halo_coverage
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, WORKLOADS, get_workload

from test_cli_errors import error_line
from test_fused_backward_codegen import _compile, needs_nvcc

SPECS = [get_workload(name, dtype, tf32=tf32).spec for name in BENCHMARK_WORKLOADS
         for dtype, tf32 in (("float16", False), ("bfloat16", False), ("float32", True), ("float32", False))]
TARGET = cuda_target("sm_90")
PROFILE = "normal_2px"  # the offset profile the searches below tune on (their data space's halos come from it)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key())
def test_design_spaces_start_at_the_defaults_and_fit(spec):
    data, weight = data_space(spec), weight_space(spec)
    assert data[0] == DataTiling.for_spec(spec) and weight[0] == WeightTiling.for_spec(spec)
    assert len(set(data)) == len(data) > 1 and len(set(weight)) == len(weight)
    cpg = spec.in_channels // spec.offset_groups
    taps = spec.kernel_h * spec.kernel_w
    for tiling in data:
        every_tap = tiling.tensor_cores and tiling.tap_group == taps
        assert tiling.shared_bytes(spec) <= (DYNAMIC_SHARED_BYTES if every_tap else SHARED_BYTES)
        assert cpg % (tiling.chunk * tiling.channel_splits) == 0
        if tiling.prefetch:  # both fragment buffers within PREFETCH_BYTES per thread
            assert tiling.pipelined and 2 * tiling.o_step * DTYPE_BYTES[spec.dtype] <= PREFETCH_BYTES
    assert any(t.prefetch for t in data) == (backward_mma(spec) is not None)
    positions = spec.batch * spec.out_h * spec.out_w
    for tiling in weight:
        assert tiling.shared_bytes(spec) <= SHARED_BYTES
        covered = tiling.steps(spec) * tiling.positions
        assert (tiling.splits - 1) * covered < positions <= tiling.splits * covered  # no empty split


def test_profile_halos_run_from_the_floor_to_the_ceiling():
    """From the smallest halo whose patches cover ``HALO_FLOOR`` of the samples to the smallest
    covering ``HALO_CEILING``; the table's last halo where none reaches a bound."""
    assert profile_halos([0.5, 0.83, 0.85, 0.99, 0.996, 0.999, 1.0, 1.0, 1.0]) == [2, 3, 4]
    assert profile_halos([0.9] + [1.0] * 8) == [0, 1]
    assert profile_halos([0.996] * 9) == [0]
    assert profile_halos([0.4] * 4 + [0.9] * 5) == [4, 5, 6, 7, 8]
    assert profile_halos([0.1] * 9) == [8]


def _grid_halos(spec, space) -> set[int]:
    """The halos of ``space``'s default tiling with other halos and channel splits only."""
    default = space[0]
    return {t.halo for t in space if t == dataclasses.replace(default, halo=t.halo, channel_splits=t.channel_splits)}


@pytest.mark.parametrize("name", ["r50dcn_c4", "r50dcn_c5"])
def test_data_space_halos_follow_the_offset_profile(name):
    """With an offset profile, the default's halo x splits grid takes the fitting halos of
    ``profile_halos`` of the default's tile shape on the profile's samples, and every staged
    candidate but the default covers at least ``HALO_FLOOR`` of them; narrower offsets take smaller
    halos. Where the default's patches cover less (N(0, 8 px)), ``HALOS`` are searched too and
    nothing is pruned; without a profile, ``HALOS`` alone."""
    spec = get_workload(name, "float16").spec
    default = DataTiling.for_spec(spec)
    assert _grid_halos(spec, data_space(spec)) == {*HALOS, default.halo}
    grids = {}
    for profile in ("normal_0.5px", "normal_2px", "normal_8px"):
        space = data_space(spec, profile)
        assert space[0] == default

        def coverage(t):
            return profile_halo_coverage(spec, profile, (t.tile_h, t.tile_w))[t.halo]

        wanted = profile_halos(profile_halo_coverage(spec, profile, (default.tile_h, default.tile_w)))
        fitting = {h for h in wanted if fits(spec, dataclasses.replace(default, halo=h))}
        grids[profile] = _grid_halos(spec, space)
        if coverage(default) >= HALO_FLOOR:
            assert grids[profile] == fitting | {default.halo}
            assert all(coverage(t) >= HALO_FLOOR for t in space[1:] if t.staged)
        else:
            assert profile == "normal_8px" and grids[profile] == fitting | {*HALOS, default.halo}
            assert any(coverage(t) < HALO_FLOOR for t in space if t.staged)
    assert max(grids["normal_0.5px"] - {default.halo}) < max(grids["normal_2px"])


def test_float32_weight_space_is_tf32s_on_3xtf32_tensor_cores():
    """float32 without TF32: the tensor-core tilings (3xTF32, ``backward_mma``) TF32's space takes,
    from the same default; float64 stays on SIMT cores, its default and variants."""
    spec = get_workload("r50dcn_c5", "float32").spec
    space = weight_space(spec)
    assert space == weight_space(dataclasses.replace(spec, tf32=True)) and space[0] == WeightTiling.for_spec(spec)
    assert all(t.tensor_cores for t in space) and {t.o_tile for t in space} == {64, 128, 256}
    double = weight_space(dataclasses.replace(spec, dtype="float64"))
    assert len(double) > 1 and not any(t.tensor_cores for t in double)


@pytest.mark.parametrize("name", ["r50dcn_c5", "video_64c_180x320_og8"])
def test_float32_data_space_takes_tf32s_tensor_core_tilings_with_float_patches(name):
    """float32 without TF32: the data space's tensor-core tilings (3xTF32, ``backward_mma``) are
    TF32's, with float patches (float32's tolerance rules out fixed point); float64 has none."""
    spec = get_workload(name, "float32").spec
    cores = [t for t in data_space(spec) if t.tensor_cores]
    tf32 = [dataclasses.replace(t, fixed_point=False) for t in data_space(dataclasses.replace(spec, tf32=True))
            if t.tensor_cores]
    assert cores and cores == tf32
    assert not any(t.tensor_cores for t in data_space(dataclasses.replace(spec, dtype="float64")))


def _source(spec, data, weight) -> str:
    module, _, _ = fused_backward_module(spec, data, weight)
    return compile_kernel(module, TARGET).mod.imports[0].inspect_source()


def _fake_measure(fastest_data: int, fastest_weight: int, data_ms: dict | None = None):
    """Stand-in for ``measure_candidates``: the data space's tiling ``fastest_data`` and the weight
    candidate ``fastest_weight`` take 1 ms, the tilings in ``data_ms`` their time, the others 2."""
    def measure(spec, profile, target, data, weight):
        fast, fast_weight = data_space(spec, PROFILE)[fastest_data], weight_space(spec)[fastest_weight]
        return ([(data_ms or {}).get(t, 1.0 if t == fast else 2.0) for t in data],
                [1.0 if t == fast_weight else 2.0 for t in weight])

    return measure


def test_search_keeps_each_kernels_fastest_candidate_and_every_time():
    spec = get_workload("r50dcn_c4", "float16").spec
    data, weight = data_space(spec, PROFILE), weight_space(spec)
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(3, 2))
    assert DataTiling(**record["data"]) == data[3] and WeightTiling(**record["weight"]) == weight[2]
    tried = [DataTiling(**t) for t, _ in record["data_ms"]]
    assert tried[:len(data)] == data  # then the 3 fastest (data[3], and of equals the first) with more loads
    batched = [dataclasses.replace(data[i], load_batch=b) for i in (3, 0, 1) for b in LOAD_BATCHES]
    assert data[3].o_step == 64 and not data[3].tensor_cores  # then the fastest with half its weight stages
    assert tried[len(data):] == (batched + [dataclasses.replace(data[3], o_step=32)] + tile_variants(spec, data[3])
                                 + chunk_variants(spec, data[3]))  # then in other tiles, then with wider chunks
    assert [ms for _, ms in record["weight_ms"]][:len(weight)] == [2.0, 2.0, 1.0] + [2.0] * (len(weight) - 3)
    batched = [dataclasses.replace(weight[i], load_batch=b) for i in (2, 0, 1) for b in WEIGHT_LOAD_BATCHES]
    copied = [dataclasses.replace(t, async_copy=True) for t in [weight[2], weight[0], weight[1]] + batched]
    assert all(t.copies_async(spec) for t in copied)  # runs of 4 bytes: 50 x 84 positions
    assert [WeightTiling(**t) for t, _ in record["weight_ms"]][len(weight):] == batched + copied + [
        t for t in step_variants(spec, weight[2]) if t not in weight]  # then the fastest with deeper steps
    assert (record["profile"], record["device"], record["target"]) == ("normal_2px", "a GPU", "sm_90")
    ties = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=lambda *a: ([1.0] * len(data),
                                                                                  [1.0] * len(weight)))
    assert DataTiling(**ties["data"]) == data[0] and WeightTiling(**ties["weight"]) == weight[0]  # the defaults


def test_weight_variants_copy_asynchronously_only_where_the_runs_allow():
    """The weight round of ``refine_load_batch`` adds the asynchronous copies of its variants where
    ``copies_async``: r50 c5's 25 x 42 map in float16 (runs of 2 elements, 4 bytes), not a 25 x 41
    one (runs of one element, 2 bytes)."""
    even = get_workload("r50dcn_c5", "float16").spec
    for spec, copies in ((even, True), (dataclasses.replace(even, width=41), False)):
        weight = weight_space(spec)
        tilings, _, _ = refine_load_batch(spec, "normal_2px", TARGET, weight, [1.0] * len(weight),
                                          lambda spec, profile, target, data, tilings: ([], [1.0] * len(tilings)),
                                          "weight")
        assert any(t.async_copy for t in tilings) == copies
        assert all(t.copies_async(spec) for t in tilings if t.async_copy)


def test_searching_one_kernel_keeps_the_other_kernels_record(tmp_path, capsys):
    """``kernels``: only the named kernel is measured; the other's tiling and times are the kept
    record's (found under the first root that holds one, ``records.fused_backward_record``)."""
    spec = get_workload("r50dcn_c5", "float16").spec
    kept = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(3, 2))
    fast_data, fast_weight = data_space(spec, PROFILE)[1], weight_space(spec)[1]
    measured = []

    def measure(spec, profile, target, data, weight):
        measured.append((len(data), len(weight)))
        return [0.5 if t == fast_data else 1.0 for t in data], [0.5 if t == fast_weight else 1.0 for t in weight]

    weight_only = tune_fused_backward(spec, PROFILE, TARGET, "b GPU", measure, kernels=("weight",), kept=kept)
    assert all(data == 0 for data, _ in measured) and measured[0][1] == len(weight_space(spec))
    assert (weight_only["data"], weight_only["data_ms"]) == (kept["data"], kept["data_ms"])
    assert WeightTiling(**weight_only["weight"]) == fast_weight and weight_only["device"] == "b GPU"
    measured.clear()
    data_only = tune_fused_backward(spec, PROFILE, TARGET, "b GPU", measure, kernels=("data",), kept=weight_only)
    assert all(weight == 0 for _, weight in measured) and DataTiling(**data_only["data"]) == fast_data
    assert (data_only["weight"], data_only["weight_ms"]) == (weight_only["weight"], weight_only["weight_ms"])
    with pytest.raises(ValueError, match="searching only weight keeps the other kernel's tiling from a record of"):
        tune_fused_backward(spec, PROFILE, TARGET, "b GPU", measure, kernels=("weight",))
    other = get_workload("r50dcn_c4", "float16").spec
    with pytest.raises(ValueError, match="from a record of " + other.key()):
        tune_fused_backward(other, "normal_2px", TARGET, "b GPU", measure, kernels=("weight",), kept=kept)
    with pytest.raises(ValueError, match=r"kernels: some of \('data', 'weight'\), got \('grad',\)"):
        tune_fused_backward(spec, PROFILE, TARGET, "b GPU", measure, kernels=("grad",))
    first, second = tmp_path / "first", tmp_path / "second"
    records.write_fused_backward(records.fused_backward_dir(second, spec, TARGET), kept)
    assert records.fused_backward_record(spec, TARGET, [first, second]) == kept
    records.write_fused_backward(records.fused_backward_dir(first, spec, TARGET), data_only)
    assert records.fused_backward_record(spec, TARGET, [first, second]) == data_only
    assert records.fused_backward_record(other, TARGET, [first, second]) is None
    line = error_line(["tune", "--device", "cpu", "--kernels", "weight"], capsys)
    assert "--kernels weight: names the fused backward's kernels; add --fused-backward" in line


def test_the_command_keeps_the_record_under_logs_else_the_committed_one(tmp_path):
    """``deft-tvm tune --fused-backward --kernels weight``: the kept record is the workload's under
    ``--logs``, else the committed one (r50 c5 TF32 has one); a workload with neither is a usage
    error naming it; both kernels keep nothing."""
    from deft_tvm import cli

    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec
    args = argparse.Namespace(kernels=["weight"], logs=str(tmp_path), configuration=False)
    committed = records.fused_backward_record(spec, TARGET, [records.committed_root()])
    assert committed is not None and cli._kept_fused_record(args, TARGET, "r50dcn_c5", spec) == committed
    logged = {**committed, "device": "another GPU"}
    records.write_fused_backward(records.fused_backward_dir(tmp_path, spec, TARGET), logged)
    assert cli._kept_fused_record(args, TARGET, "r50dcn_c5", spec) == logged
    assert cli._kept_fused_record(argparse.Namespace(kernels=["data", "weight"], logs=str(tmp_path)), TARGET,
                                  "r50dcn_c5", spec) is None
    odd = dataclasses.replace(spec, width=41)
    with pytest.raises(cli.UsageError, match="--kernels weight: odd float32 tf32 has no fused-backward record under"):
        cli._kept_fused_record(args, TARGET, "odd", odd)


def test_the_command_reports_the_chosen_halos_coverage_and_writes_the_record(tmp_path, monkeypatch, capsys):
    """``deft-tvm tune --fused-backward``'s line per workload names the chosen data tiling's halo
    and the fraction of the workload profile's samples its patches cover (``stats``), and the
    record lands under ``--logs`` (the search on a stand-in for the GPU)."""
    from deft_tvm import cli

    workload = get_workload("r50dcn_c4", "float16")
    search = fused_backward.tune_fused_backward
    monkeypatch.setattr(fused_backward, "tune_fused_backward",
                        lambda *a, **k: search(*a, **{**k, "measure": _fake_measure(3, 2)}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    args = argparse.Namespace(kernels=["data", "weight"], logs=str(tmp_path), configuration=False)
    cli._tune_fused_backward(args, TARGET, "r50dcn_c4", workload)
    chosen = data_space(workload.spec, PROFILE)[3]
    covered = profile_halo_coverage(workload.spec, PROFILE, (chosen.tile_h, chosen.tile_w))[chosen.halo]
    assert f"halo {chosen.halo} px, its patches cover {covered:.1%} of normal_2px's samples" in capsys.readouterr().out
    written = records.fused_backward_record(workload.spec, TARGET, [tmp_path])
    assert DataTiling(**written["data"]) == chosen


def test_tune_model_resumes_a_fused_search_on_the_same_statistics_and_gpu(tmp_path, monkeypatch):
    from deft_tvm.tuning import fused_rpc, model

    workload = get_workload("r50dcn_c4", "float16")
    search, searched = fused_backward.tune_fused_backward, []
    monkeypatch.setattr(fused_backward, "tune_fused_backward",
                        lambda *a, **k: searched.append(a[1:4]) or search(*a, **{**k, "measure": _fake_measure(3, 2)}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    local = fused_rpc.fused_measure(TARGET)
    first = model._tune_fused(workload, TARGET, tmp_path, False, local)
    assert model._tune_fused(workload, TARGET, tmp_path, False, local) == first and len(searched) == 1  # resumed
    model._tune_fused(dataclasses.replace(workload, profile="normal_8px"), TARGET, tmp_path, False, local)  # statistics
    assert searched[-1] == ("normal_8px", TARGET, "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "another GPU")
    model._tune_fused(dataclasses.replace(workload, profile="normal_8px"), TARGET, tmp_path, False,
                      fused_rpc.fused_measure(TARGET))
    assert searched[-1] == ("normal_8px", TARGET, "another GPU")
    assert records.fused_backward_record(workload.spec, TARGET, [tmp_path])["device"] == "another GPU"


def test_tune_model_with_a_tracker_measures_the_fused_search_there(tmp_path, monkeypatch):
    """With ``rpc``, a layer's fused search measures on the tracker's devices
    (``fused_rpc.measure_candidates_rpc``) and records the remote GPU's name, not this machine's."""
    from deft_tvm.tuning import fused_rpc, model

    workload, rpc, searched = get_workload("r50dcn_c4", "float16"), object(), []
    search = fused_backward.tune_fused_backward
    monkeypatch.setattr(fused_backward, "tune_fused_backward",
                        lambda *a, **k: searched.append((a[3], k["measure"])) or search(
                            *a, **{**k, "measure": _fake_measure(3, 2)}))
    monkeypatch.setattr(fused_rpc, "remote_device_name", lambda config, target: f"GPU of {id(config)}")
    monkeypatch.setattr(torch.cuda, "get_device_name", pytest.fail)
    model._tune_fused(workload, TARGET, tmp_path, False, fused_rpc.fused_measure(TARGET, rpc))
    (device_name, measure), = searched
    assert device_name == f"GPU of {id(rpc)}"
    assert measure.func is fused_rpc.measure_candidates_rpc and measure.keywords["rpc"] is rpc
    assert records.fused_backward_record(workload.spec, TARGET, [tmp_path])["device"] == device_name


def test_tune_model_shows_the_fused_search_on_a_progress_bar(tmp_path, monkeypatch, capsys):
    """The bar of a layer's fused search grows by each round's candidates, counts each measured one
    (``measure_candidates`` with its compiles and GPU times stood in for) and ends on the best and
    default grad_data + grad_weight time; every round's candidates go to the search's one pool of
    compiling processes (``compile_pool``)."""
    from deft_tvm.tuning import fused_rpc, model

    workload = get_workload("r50dcn_c4", "float16")
    rounds, pools = [], set()

    def compiled(spec, target, data, weight, bar, pool):
        rounds.append(len(data) + len(weight))
        pools.add(pool)
        bar.set_postfix_str(f"compiled {len(data) + len(weight)}/{len(data) + len(weight)}")
        return [data] * len(data), [weight] * len(weight)

    monkeypatch.setattr(fused_backward, "compile_candidates", compiled)
    monkeypatch.setattr(fused_backward, "profile_inputs", lambda spec, profile: {})
    for call in ("data_call", "weight_call"):
        monkeypatch.setattr(fused_backward, call, lambda spec, kernel, tiling, inputs: lambda: [torch.ones(2)])
    monkeypatch.setattr(fused_backward, "gpu_ms", lambda call: 0.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")

    assert model._tune_fused(workload, TARGET, tmp_path, True, fused_rpc.fused_measure(TARGET)) == (1.0, 1.0)
    shown = capsys.readouterr().err.split("\r")[-1]
    assert len(rounds) > 1 and f"| {sum(rounds)}/{sum(rounds)} [" in shown, shown
    assert len(pools) == 1 and None not in pools
    assert shown.startswith(f"{workload.name} fused backward: 100%")
    assert "candidate/s, best 1.0000 ms, default 1.0000 ms (grad_data + grad_weight)]" in shown, shown


def test_the_search_never_takes_a_rejected_candidate():
    spec = get_workload("r50dcn_c4", "float16").spec
    data, weight = data_space(spec, PROFILE), weight_space(spec)

    rejected = {data[3], *(dataclasses.replace(data[5], load_batch=b) for b in LOAD_BATCHES)}

    def measure(spec, profile, target, tilings, weight):  # the fastest of each kernel gave other gradients
        return ([None if t in rejected else 0.5 if t.load_batch > 1 else 2.0 - (t == data[5]) * 0.5 for t in tilings],
                [None if i == 1 else 2.0 for i in range(len(weight))])

    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=measure)
    assert DataTiling(**record["data"]) == dataclasses.replace(data[0], load_batch=LOAD_BATCHES[0])
    assert WeightTiling(**record["weight"]) == weight[0]
    assert record["data_ms"][3][1] is None and record["weight_ms"][1][1] is None


def test_more_loads_in_flight_must_beat_their_reference_in_the_same_round():
    spec = get_workload("r50dcn_c5", "float16").spec
    data = data_space(spec, PROFILE)
    batched = dataclasses.replace(data[2], load_batch=8)
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(2, 0, {batched: 0.9}))
    assert DataTiling(**record["data"]) == batched
    slower = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_rounds_of_a_faster_reference(data))
    assert DataTiling(**slower["data"]) == data[0]


def _rounds_of_a_faster_reference(space):
    """Stand-in for ``measure_candidates``: every candidate of ``space`` 1 ms, then in each round of
    refinement the reference 0.8 ms (re-measured) and its variants 0.9 (faster than its first time)."""
    def measure(spec, profile, target, data, weight):
        if data == space:
            return [1.0] * len(data), [1.0] * len(weight)
        times = [0.8] + [0.9] * (len(data or weight) - 1)
        return (times, []) if data else ([], times)

    return measure


def test_other_weight_stages_of_the_fastest_data_tiling_must_beat_it_in_the_same_round():
    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec
    data = data_space(spec, PROFILE)
    group = next(i for i, t in enumerate(data) if t.tensor_cores and t.tap_group > 1 and not t.pipelined)
    batched = dataclasses.replace(data[group], load_batch=LOAD_BATCHES[0])  # the fastest after more loads
    half = dataclasses.replace(batched, o_step=batched.o_step // 2, pipelined=True)
    assert half in stage_variants(spec, batched) and half not in data
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU",
                                 measure=_fake_measure(group, 0, {batched: 0.95, half: 0.9}))
    assert DataTiling(**record["data"]) == half
    slower = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_rounds_of_a_faster_reference(data))
    assert DataTiling(**slower["data"]) == data[0]


def test_step_variants_deepen_tensor_core_steps_into_dynamic_shared_memory():
    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec
    _, committed = records.recorded_fused_tilings(spec, TARGET)  # 256 x 64 channels
    weight = dataclasses.replace(committed, positions=32)  # the space's step for that block: 47 KB
    assert weight.shared_bytes(spec) <= SHARED_BYTES
    variants = step_variants(spec, weight)
    assert [t.positions for t in variants] == [weight.positions * f for f in STEP_FACTORS]
    for tiling in variants:
        assert SHARED_BYTES < tiling.shared_bytes(spec) <= DYNAMIC_SHARED_BYTES
        assert tiling.splits == tiling.fewest_waves(spec)
        assert dataclasses.replace(tiling, positions=weight.positions, splits=weight.splits) == weight
    simt = WeightTiling.for_spec(get_workload("r50dcn_c5", "float32").spec, tensor_cores=False)
    assert not simt.tensor_cores and step_variants(spec, simt) == []
    huge = dataclasses.replace(weight, positions=512)  # 1024 and 2048 positions pass 227 KB
    assert step_variants(spec, huge) == []


def test_the_step_variants_of_the_records_build():
    """TVM's barrier planner takes the deeper steps of every committed record's weight tiling (the
    sampling-point tables static, the operands dynamic): all compile to CUDA source."""
    jobs = []
    for name, workload in WORKLOADS.items():
        for dtype, tf32 in (("float16", False), ("bfloat16", False), ("float32", True)):
            spec = dataclasses.replace(workload.spec, dtype=dtype, tf32=tf32)
            tilings = records.recorded_fused_tilings(spec, TARGET)
            jobs += [(spec, t) for t in step_variants(spec, tilings[1])] if tilings else []
    assert len(jobs) > 40 and any(t.table_bytes(spec) + t.operand_bytes(spec) > SHARED_BYTES > t.operand_bytes(spec)
                                  for spec, t in jobs)

    def build(job):
        spec, tiling = job
        module, _, _ = fused_backward_module(spec, weight=tiling)
        compile_kernel(tvm.IRModule({"grad_weight": module["grad_weight"]}), TARGET)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(build, jobs))


def test_deeper_weight_steps_must_beat_their_reference_in_the_same_round():
    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec
    weight = weight_space(spec)
    deeper = step_variants(spec, weight[0])[0]

    def measure(spec, profile, target, data, tilings):
        return [1.0] * len(data), [0.9 if t == deeper else 1.0 if t == weight[0] else 2.0 for t in tilings]

    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=measure)
    assert WeightTiling(**record["weight"]) == deeper
    slower = tune_fused_backward(spec, PROFILE, TARGET, "a GPU",
                                 measure=_rounds_of_a_faster_reference(data_space(spec, PROFILE)))
    assert WeightTiling(**slower["weight"]) == weight[0]


def test_chunk_variants_widen_the_chunks_into_dynamic_shared_memory():
    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec  # 512 channels in 64 splits of one 8-channel chunk
    data = DataTiling(8, 16, halo=3, chunk=8, o_step=32, channel_splits=64, tensor_cores=True, fixed_point=True,
                      tap_group=3, interior_path=True, load_batch=8, pipelined=True)  # the TF32 record at caf2061
    variants = chunk_variants(spec, data)  # 64 splits divide no 32 chunks of 16: only half as many
    assert [(t.chunk, t.channel_splits, t.halo) for t in variants] == [(16, 32, 3), (16, 32, 2), (16, 32, 1)]
    for tiling in variants:
        assert SHARED_BYTES < tiling.shared_bytes(spec) <= DYNAMIC_SHARED_BYTES
        assert dataclasses.replace(tiling, chunk=8, channel_splits=64, halo=3) == data
    small = get_workload("paper_64c_64x64_n8", "float16").spec  # 64 channels: 4 chunks of 16, in 8 or 4 splits
    base = dataclasses.replace(DataTiling.for_spec(small), chunk=4, channel_splits=8, halo=4)
    assert [(t.chunk, t.channel_splits, t.halo) for t in chunk_variants(small, base)] == [
        (4 * CHUNK_FACTOR, s, h) for s in (8, 4) for h in (4, 3, 2)]
    stem = get_workload("train_stem_1to64_64x64_n32", "float16").spec  # one input channel
    assert chunk_variants(stem, DataTiling.for_spec(stem)) == []
    huge = dataclasses.replace(data, halo=16)  # 16-channel patches of 43 x 51 px: past 227 KB, as at 15 and 14 px
    assert chunk_variants(spec, huge) == [] and chunk_variants(spec, dataclasses.replace(huge, halo=12))


def test_wider_chunks_must_beat_their_reference_in_the_same_round():
    spec = get_workload("r50dcn_c5", "float32", tf32=True).spec
    data = data_space(spec, PROFILE)
    wider = chunk_variants(spec, data[0])[-1]
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(0, 0, {wider: 0.9}))
    assert DataTiling(**record["data"]) == wider
    slower = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_rounds_of_a_faster_reference(data))
    assert DataTiling(**slower["data"]) == data[0]


@needs_nvcc
def test_the_chunk_variants_of_the_records_build():
    """The schedule takes 16-channel chunks in dynamic shared memory: the widest chunk variant of
    every committed record's data tiling (SIMT and tensor-core tap groups) compiles for sm_90."""
    jobs = []
    for name, workload in WORKLOADS.items():
        for dtype, tf32 in (("float16", False), ("bfloat16", False), ("float32", True)):
            spec = dataclasses.replace(workload.spec, dtype=dtype, tf32=tf32)
            tilings = records.recorded_fused_tilings(spec, TARGET)
            jobs += [(spec, t, tilings[1]) for t in chunk_variants(spec, tilings[0])[:1]] if tilings else []
    assert len(jobs) > 25 and {t.tensor_cores for _, t, _ in jobs} == {False, True}
    assert any(t.shared_bytes(spec) > SHARED_BYTES for spec, t, _ in jobs)

    def build(job):
        return bytes(_compile(_source(*job))[:4])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert set(pool.map(build, jobs)) == {b"\x7fELF"}


def test_tile_variants_pad_the_output_less_in_whole_warps():
    spec = get_workload("r50dcn_c5", "float16").spec  # 25 x 42 positions: 8 x 16 tiles cover 32 x 48
    default = DataTiling.for_spec(spec)
    assert (default.tile_h, default.tile_w) == (8, 16)
    variants = tile_variants(spec, default)
    assert [(t.tile_h, t.tile_w) for t in variants] == [(2, 48), (4, 24), (16, 6)]  # 26 x 48, 28 x 48, 32 x 42
    for tiling in variants:
        assert tiling.tile_h * tiling.tile_w in TILE_POSITIONS and tiling.shared_bytes(spec) <= SHARED_BYTES
        assert dataclasses.replace(tiling, tile_h=8, tile_w=16) == default
    assert tile_variants(get_workload("paper_64c_64x64_n32", "float16").spec, default) == []  # 8 x 16 tiles fit


def test_other_tile_shapes_of_the_fastest_data_tiling_must_beat_it_in_the_same_round():
    spec = get_workload("r50dcn_c5", "float16").spec
    data = data_space(spec, PROFILE)
    wide = tile_variants(spec, data[0])[0]
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(0, 0, {wide: 0.9}))
    assert DataTiling(**record["data"]) == wide
    slower = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_rounds_of_a_faster_reference(data))
    assert DataTiling(**slower["data"]) == data[0]


@needs_nvcc
def test_the_tile_variants_of_a_records_tilings_build():
    """The schedule takes blocks of 64 and 96 positions: r50 c5's tensor-core tap groups in the tile
    variants of its committed records (float16 and TF32) compile for sm_90."""
    for dtype, tf32 in (("float16", False), ("float32", True)):
        spec = get_workload("r50dcn_c5", dtype, tf32=tf32).spec
        data, weight = records.recorded_fused_tilings(spec, TARGET)
        variants = tile_variants(spec, data)
        assert {t.tile_h * t.tile_w for t in variants} & {64, 96} and all(t.tensor_cores for t in variants)
        for variant in variants:
            assert _compile(_source(spec, variant, weight))[:4] == b"\x7fELF", variant


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key())
def test_stage_variants_halve_within_the_mma_depth_and_pipeline_only_tensor_core_tap_groups(spec):
    mma, _ = backward_mma(spec)
    for tiling in data_space(spec):
        for variant in stage_variants(spec, tiling):
            assert fits(spec, variant) and variant != tiling
            assert variant.o_step in (tiling.o_step, tiling.o_step // 2)
            if variant.tensor_cores:
                assert variant.o_step % mma.k == 0
            if (variant.pipelined, variant.prefetch) != (tiling.pipelined, tiling.prefetch):
                assert variant.tensor_cores and variant.tap_group > 1
            assert variant.pipelined or not variant.prefetch


def test_the_stage_variants_of_a_records_tilings_build():
    """The schedule accepts the stage variants of r50 c5's tensor-core tap groups (half stages,
    double-buffered) in TF32 and float16."""
    for dtype, tf32 in (("float32", True), ("float16", False)):
        spec = get_workload("r50dcn_c5", dtype, tf32=tf32).spec
        group = next(t for t in data_space(spec) if t.tensor_cores and t.tap_group > 1 and not t.pipelined)
        variants = stage_variants(spec, dataclasses.replace(group, load_batch=4))
        assert any(t.pipelined and t.o_step < group.o_step for t in variants)
        for variant in variants:
            fused_backward_module(spec, variant)


def test_candidates_are_timed_only_where_their_gradients_are_the_defaults(monkeypatch):
    spec = get_workload("test_paper_small", "float16").spec
    monkeypatch.setattr(fused_backward, "gpu_ms", lambda call: 1.0)
    default = torch.tensor([1.0, -2.0, math.nan, 40.0])
    outputs = [default, default * (1 + 1e-3), default + torch.tensor([0.0, 0.0, 0.0, 0.2])]  # 0.2 > 40 x 2e-3

    def make(spec, values):
        return lambda: [values.clone()]

    assert time_checked(spec, [(make, (values,)) for values in outputs]) == [1.0, 1.0, None]


def test_agreement_is_relative_to_the_largest_gradient_and_nan_exact():
    expected = [torch.tensor([100.0, 0.0, math.nan])]
    assert agree([torch.tensor([100.1, 0.05, math.nan])], expected, "float16")  # within 1e-3 x 100 + 2e-3 x |x|
    assert not agree([torch.tensor([100.0, 0.5, math.nan])], expected, "float16")
    assert not agree([torch.tensor([100.0, 0.0, 0.0])], expected, "float16")
    assert agree([torch.tensor([100.0, 0.05, math.nan])], expected, "tf32")


def test_the_op_takes_a_committed_record_over_the_defaults(tmp_path, monkeypatch):
    spec = get_workload("r50dcn_c4", "float16").spec
    monkeypatch.setattr(records, "committed_root", lambda: tmp_path)
    assert records.recorded_fused_tilings(spec, TARGET) is None
    record = tune_fused_backward(spec, PROFILE, TARGET, "a GPU", measure=_fake_measure(4, 1))
    records.write_fused_backward(records.fused_backward_dir(tmp_path, spec, TARGET), record)
    data, weight = records.recorded_fused_tilings(spec, TARGET)
    assert (data, weight) == (data_space(spec, PROFILE)[4], weight_space(spec)[1]) != (DataTiling.for_spec(spec),
                                                                             WeightTiling.for_spec(spec))
    built = {}

    def fake_library(name, fingerprint, target, build_library, functions):
        built.update(name=name)
        return [None] * len(functions)

    monkeypatch.setattr(kernel_cache, "load_or_build_library", fake_library)
    kernels = backward._build(spec, TARGET, "fused")
    assert (kernels.data_tiling, kernels.weight_tiling) == (data, weight)
    assert built["name"] == f"{spec.key()}-fused_backward"
    other = dataclasses.replace(spec, batch=3)  # a record of another layer in this layer's folder
    records.write_fused_backward(records.fused_backward_dir(tmp_path, spec, TARGET),
                                 {**record, "spec": other.to_dict()})
    with pytest.raises(ValueError, match=rf"records {other.key()}, not {spec.key()}"):
        records.recorded_fused_tilings(spec, TARGET)


def test_tuning_the_fused_backward_needs_cuda(capsys):
    line = error_line(["tune", "--device", "cpu", "--fused-backward"], capsys)
    assert "--fused-backward: the fused backward is a CUDA kernel; tune it with --device cuda on a GPU" in line


@needs_nvcc
def test_every_candidate_of_a_wide_layer_compiles_for_sm_90():
    """The search never hands the GPU a tiling that does not build: r50 c4's data and weight
    candidates (paired, one module each) compile with nvcc within the shared memory they claim."""
    spec = get_workload("r50dcn_c4", "float16").spec
    data, weight = data_space(spec), weight_space(spec)
    for i in range(max(len(data), len(weight))):
        source = _source(spec, data[i % len(data)], weight[i % len(weight)])
        assert _compile(source)[:4] == b"\x7fELF", (data[i % len(data)], weight[i % len(weight)])
