"""Fused-backward records of a layer configuration (``tune_fused_backward(configuration=True)``):
the search starts at the configuration's default tilings and records the configuration, measured
at one size; the op, the library and ``tune_model`` take its tilings for every other size of it
(GPU times stood in for: ``measure_configuration`` times whole entries on a GPU)."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses

import pytest
import torch

from deft_tvm.compute.spec import DeformConvSpec, generic_spec, kernel_key
from deft_tvm.runtime import backward, records
from deft_tvm.runtime.targets import cuda_target
from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling, default_tilings
from deft_tvm.tuning import fused_backward
from deft_tvm.tuning.export import fused_entries
from deft_tvm.tuning.fused_backward import data_space, record_times, tune_fused_backward, weight_space
from deft_tvm.tuning.workloads import get_workload

from test_cli_errors import error_line

TARGET = cuda_target("sm_90")
PROFILE = "normal_2px"
SPEC = get_workload("r50dcn_c4", "float16").spec


def _other_size(spec: DeformConvSpec, batch: int, height: int, width: int) -> DeformConvSpec:
    return dataclasses.replace(spec, batch=batch, height=height, width=width)


def _fake_measure(fastest_data: DataTiling, fastest_weight: WeightTiling, calls: list):
    """Stand-in for ``measure_configuration``: ``fastest_data`` and ``fastest_weight`` 1 ms, the
    others 2; each call's (data, weight) candidates kept in ``calls``."""
    def measure(spec, profile, target, data, weight):
        calls.append((spec, list(data), list(weight)))
        return [1.0 if t == fastest_data else 2.0 for t in data], [1.0 if t == fastest_weight else 2.0 for t in weight]

    return measure


def test_a_configurations_dict_gives_its_generic_spec():
    asymmetric = DeformConvSpec(2, 8, 12, 14, 6, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                offset_groups=2, dtype="bfloat16")
    for spec in (SPEC, asymmetric):
        generic = generic_spec(spec)
        assert DeformConvSpec.from_dict(generic.to_dict()) is generic
        assert DeformConvSpec.from_dict(spec.to_dict()) == spec


def test_the_search_starts_at_the_configurations_defaults_and_records_the_configuration():
    generic = generic_spec(SPEC)
    defaults = default_tilings(generic)
    fastest = data_space(SPEC, PROFILE)[3], weight_space(SPEC)[2]
    assert fastest[0] not in defaults and fastest[1] not in defaults
    calls = []
    record = tune_fused_backward(SPEC, PROFILE, TARGET, "a GPU", measure=_fake_measure(*fastest, calls),
                                 configuration=True)
    (measured_at, data, weight), *refinements = calls
    assert measured_at is SPEC and refinements and all(call[0] is SPEC for call in refinements)
    assert data[0] == defaults[0] and data[1:] == [t for t in data_space(SPEC, PROFILE) if t != defaults[0]]
    assert weight[0] == defaults[1] and set(weight) == {defaults[1], *weight_space(SPEC)}
    assert DeformConvSpec.from_dict(record["spec"]) is generic and record["measured_at"] == SPEC.to_dict()
    assert (DataTiling(**record["data"]), WeightTiling(**record["weight"])) == fastest
    assert record["times"] == "entry" and record_times(record) == (1.0, 2.0)


def test_record_times_of_a_sizes_record_add_its_kernels():
    record = {"data_ms": [[{}, 3.0], [{}, None], [{}, 2.0]], "weight_ms": [[{}, 1.0], [{}, 0.5]]}
    assert record_times(record) == (2.5, 4.0)
    assert record_times({**record, "times": "entry"}) == (0.5, 3.0)


def test_every_size_without_its_own_record_takes_the_configurations_record(tmp_path):
    generic = generic_spec(SPEC)
    record = tune_fused_backward(SPEC, PROFILE, TARGET, "a GPU", configuration=True,
                                 measure=_fake_measure(data_space(SPEC, PROFILE)[3], weight_space(SPEC)[2], []))
    records.write_fused_backward(records.fused_backward_dir(tmp_path, generic, TARGET), record)
    chosen = DataTiling(**record["data"]), WeightTiling(**record["weight"])
    for size in ((1, 17, 300), (3, 64, 64), (2, 50, 84)):
        assert backward.fused_choice(_other_size(SPEC, *size), TARGET, "fused", [tmp_path]) == (generic, *chosen)
    deterministic = dataclasses.replace(chosen[0], fixed_point=True, deterministic=True)
    assert backward.fused_choice(SPEC, TARGET, "fused_deterministic", [tmp_path]) == (generic, deterministic,
                                                                                       chosen[1])
    own = default_tilings(SPEC)  # a record of a size's own wins for that size
    records.write_fused_backward(records.fused_backward_dir(tmp_path, SPEC, TARGET), {
        "spec": SPEC.to_dict(), "data": dataclasses.asdict(own[0]), "weight": dataclasses.asdict(own[1])})
    assert backward.fused_choice(SPEC, TARGET, "fused", [tmp_path]) == (SPEC, *own)
    atomic, fixed_point = fused_entries([generic], TARGET, [], [tmp_path])  # the library's entries
    assert (atomic.spec, atomic.part, fixed_point.part) == (generic, "fused_backward", "fused_backward_deterministic")
    assert atomic.tilings == {"data": record["data"], "weight": record["weight"]}
    assert fixed_point.tilings == {"data": dataclasses.asdict(deterministic), "weight": record["weight"]}
    assert atomic.origin == str(records.fused_backward_dir(tmp_path, generic, TARGET))


class _InProcessPool:
    """Stand-in for TVM's ``PopenPoolExecutor``: keeps the jobs, runs none (no nvcc here); a job's
    result is its arguments after (spec, target), its failure a ValueError."""

    jobs: list = []
    failing: tuple = ()  # the jobs' arguments after (spec, target) whose compile fails: (data, weight), or (tiling,)
    opened: list = []  # the pools made, each with its "shut" flag

    def __init__(self, workers):
        self.shut = False
        _InProcessPool.opened.append(self)

    def submit(self, function, *args):
        _InProcessPool.jobs.append(args)
        future = concurrent.futures.Future()
        if args[2:] in _InProcessPool.failing:
            future.set_exception(ValueError("cannot be copied asynchronously"))
        else:
            future.set_result(args[2:])
        return future

    def shutdown(self):
        self.shut = True


def test_measure_configuration_times_whole_entries_beside_the_other_kernels_default(monkeypatch):
    """A data tiling is measured in an entry with the configuration's default weight tiling and a
    weight tiling with its default data tiling, each entry once, those that would not serve the
    size or do not compile not at all (None), all of the configuration."""
    from deft_tvm.tuning.workloads import Workload

    generic = generic_spec(SPEC)
    data_default, weight_default = default_tilings(generic)
    data = [data_default, *data_space(SPEC, PROFILE)[1:4]]
    weight = [weight_default, *weight_space(SPEC)[1:3]]
    not_serving = data[2]
    _InProcessPool.jobs, _InProcessPool.failing = [], ((data_default, weight[2]),)
    monkeypatch.setattr(fused_backward, "PopenPoolExecutor", _InProcessPool)
    monkeypatch.setattr(backward, "serves", lambda spec, configuration, d, w: d != not_serving)
    monkeypatch.setattr(backward, "fused_kernels", lambda spec, target, d, w: (spec, d, w))
    make_inputs = Workload.make_inputs
    monkeypatch.setattr(Workload, "make_inputs", lambda self, seed=0, device="cpu": make_inputs(self, seed))
    timed = []

    def time_checked(spec, calls, bar=None):
        timed.extend(args[0] for _, args in calls)
        return [float(len(timed) - len(calls) + k) for k in range(len(calls))]

    monkeypatch.setattr(fused_backward, "time_checked", time_checked)
    data_ms, weight_ms = fused_backward.measure_configuration(SPEC, PROFILE, TARGET, data, weight)
    pairs = [(data_default, weight_default), (data[1], weight_default), (data[3], weight_default),
             (data_default, weight[1]), (data_default, weight[2])]
    assert [args[1:] for args in _InProcessPool.jobs] == [(TARGET, *pair) for pair in pairs]
    assert all(args[0] is SPEC for args in _InProcessPool.jobs)  # the worker makes the configuration
    assert timed == [(generic, *pair) for pair in pairs[:-1]]  # the last one failed to compile
    assert data_ms == [0.0, 1.0, None, 2.0] and weight_ms == [0.0, 3.0, None]


def test_tune_model_searches_a_configuration_and_resumes_it(tmp_path, monkeypatch):
    from deft_tvm.tuning import model

    workload, searched = get_workload("r50dcn_c4", "float16"), []
    fastest = data_space(SPEC, PROFILE)[3], weight_space(SPEC)[2]
    monkeypatch.setattr(fused_backward, "measure_configuration",
                        lambda *a, bar=None, pool=None: searched.append(a[0]) or _fake_measure(*fastest, [])(*a))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    measured_on = ("a GPU", pytest.fail)  # the layer's own measure is not the configuration's
    first = model._tune_fused(workload, TARGET, tmp_path, False, measured_on, configuration=True)
    assert first == (1.0, 2.0) and searched and all(s == workload.spec for s in searched)
    count = len(searched)
    assert model._tune_fused(workload, TARGET, tmp_path, False, measured_on, configuration=True) == first
    assert len(searched) == count  # resumed: same statistics, same GPU
    written = records.fused_backward_record(generic_spec(SPEC), TARGET, [tmp_path])
    assert written["device"] == "a GPU"
    assert (DataTiling(**written["data"]), WeightTiling(**written["weight"])) == fastest
    assert records.fused_backward_record(SPEC, TARGET, [tmp_path]) is None


def test_configurations_are_searched_on_this_gpu_not_through_a_tracker(capsys):
    from deft_tvm.tuning.model import tune_model

    with pytest.raises(ValueError, match="configurations are searched on this machine's GPU"):
        tune_model(torch.nn.Identity(), torch.zeros(1), rpc=object(), configurations=True)
    line = error_line(["tune", "--configuration", "--device", "cpu"], capsys)
    assert ("--configuration: searches the tilings of a layer configuration's CUDA kernels; tune it with "
            "--device cuda on a GPU") in line
    line = error_line(["tune", "--model", "test_cli_errors:tiny_model", "--input-shape", "1", "2", "8", "8",
                       "--device", "cpu", "--backward", "--configuration"], capsys)
    assert "--configuration with --model: searches each layer configuration's CUDA kernels on this" in line


def test_the_command_writes_the_configurations_record(tmp_path, monkeypatch, capsys):
    from deft_tvm import cli

    fastest = data_space(SPEC, PROFILE)[3], weight_space(SPEC)[2]
    monkeypatch.setattr(fused_backward, "measure_configuration",
                        lambda *a, bar=None, pool=None: _fake_measure(*fastest, [])(*a))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    args = argparse.Namespace(kernels=["data", "weight"], logs=str(tmp_path), configuration=True)
    cli._tune_fused_backward(args, TARGET, "r50dcn_c4", get_workload("r50dcn_c4", "float16"))
    path = records.fused_backward_dir(tmp_path, generic_spec(SPEC), TARGET)
    assert (f"r50dcn_c4 float16 configuration at {SPEC.key()}: entry 1.000 ms fastest measured (default tilings "
            f"2.000;") in capsys.readouterr().out
    assert DataTiling(**records.fused_backward_record(generic_spec(SPEC), TARGET, [tmp_path])["data"]) == fastest[0]
    assert path.exists() and kernel_key(generic_spec(SPEC), "fused_backward").startswith("nN_")
