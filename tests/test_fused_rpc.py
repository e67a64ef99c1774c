"""The fused backward's tiling search measured through TVM's RPC tracker
(``tuning.fused_rpc.measure_candidates_rpc``): a tracker and two CPU servers on loopback (the
``tracker`` fixture), and CPU stand-ins of the candidates' kernels with their exact arguments
(this CPU has no GPU to run the CUDA ones): each candidate is uploaded to a server, its inputs
(bfloat16 ones too) arrive, its gradients come back and are checked against the round's first,
and the candidates are spread over both servers."""

from __future__ import annotations

import re

import pytest
import torch
import tvm
from tvm import te, tirx

from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import compile_kernel
from deft_tvm.tuning import fused_backward, fused_rpc
from deft_tvm.tuning.fused_backward import data_arguments, data_space, profile_inputs, weight_arguments, weight_space
from deft_tvm.tuning.fused_rpc import _host_arrays, _Session, measure_candidates_rpc, remote_device_name
from deft_tvm.tuning.search import rpc_config
from deft_tvm.tuning.workloads import get_workload

TARGET = tvm.target.Target("llvm")
PROFILE = get_workload("test_paper_small").profile
WRONG = 3.0  # grad_input = WRONG * input: a candidate whose gradients are not the reference's


def _placeholder(tensor, name):
    return te.placeholder(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), name)


def _split(shape, source, splits):
    """A partial-sum output of ``splits`` parts that add up to ``source`` (float32)."""
    return te.compute(shape, lambda s, *i: source(*i).astype("float32") / splits)


def _stand_in(spec, kind, tiling, scale=2.0) -> tvm.IRModule:
    """CPU functions with a candidate's names and arguments (``data_arguments``,
    ``weight_arguments``): prepare zeroes grad_input and the bound tables; grad_data writes
    grad_input = ``scale`` * input and partial sums of the offset (and mask) as grad_offset (and
    grad_mask); grad_weight writes partial sums of each weight's flat index (and of each output
    channel's) as grad_weight (and grad_bias)."""
    inputs = profile_inputs(spec, PROFILE, device="cpu")
    if kind == "grad_data":
        prepare_args, data_args, _ = data_arguments(spec, tiling, inputs, torch.empty, lambda t, s: t.view(s))
        zeros = [te.compute(tuple(t.shape), lambda *i: tirx.const(0.0, "float32"))
                 for t in (prepare_args[0], *prepare_args[3:])]  # grad_input, the bound tables (if any)
        operands = [_placeholder(t, f"operand{k}") for k, t in enumerate(prepare_args[1:3])]
        prepare = te.create_prim_func([zeros[0], *operands, *zeros[1:]])
        read = [_placeholder(t, f"in{k}") for k, t in enumerate(data_args[:4 + spec.has_mask])]
        image, offset, mask = read[0], read[1], read[2] if spec.has_mask else None
        grad_input = te.compute(tuple(data_args[4 + spec.has_mask].shape),
                                lambda *i: image(*i).astype("float32") * scale)
        splits = tiling.channel_splits
        partials = [_split((splits, *spec.offset_shape), offset, splits)]
        partials += [_split((splits, *spec.mask_shape), mask, splits)] * spec.has_mask
        bounds = [_placeholder(t, f"bounds{k}") for k, t in enumerate(data_args[5 + spec.has_mask + len(partials):])]
        grad_data = te.create_prim_func([*read, grad_input, *partials, *bounds])
        return tvm.IRModule({"prepare": prepare.with_attr("global_symbol", "prepare"),
                             "grad_data": grad_data.with_attr("global_symbol", "grad_data")})
    arguments, partial_outputs = weight_arguments(spec, tiling, inputs, torch.empty, lambda t, s: t.view(s))
    read = [_placeholder(t, f"in{k}") for k, t in enumerate(arguments[:len(arguments) - len(partial_outputs)])]
    splits, (_, o, ipg, taps) = tiling.splits, partial_outputs[0].shape
    outputs = [te.compute(tuple(partial_outputs[0].shape),
                          lambda s, a, b, c: ((a * ipg + b) * taps + c).astype("float32") / splits)]
    outputs += [te.compute((splits, o), lambda s, a: a.astype("float32") / splits)] * spec.has_bias
    grad_weight = te.create_prim_func([*read, *outputs])
    return tvm.IRModule({"grad_weight": grad_weight.with_attr("global_symbol", "grad_weight")})


@pytest.fixture
def stand_ins(isolated_cache, monkeypatch):
    """``(spec, data tilings, weight tilings)``: two of each, the second data tiling's stand-in
    wrong; their CPU libraries in the kernel disk cache where the search finds its candidates'."""
    spec = get_workload("test_paper_small", "bfloat16").spec
    data, weight = data_space(spec)[:3], weight_space(spec)[:2]
    names = {}

    def library(spec_, target, kind, tiling):
        return names.setdefault((kind, tiling), (f"{spec_.key()}-candidate-{kind}", f"standin{len(names)}"))

    monkeypatch.setattr(fused_backward, "_candidate_library", library)
    for kind, tilings in (("grad_data", data), ("grad_weight", weight)):
        for k, tiling in enumerate(tilings):
            scale = WRONG if (kind, k) == ("grad_data", 1) else 2.0
            kernel_cache.build_into_cache(*library(spec, TARGET, kind, tiling), TARGET,
                                          lambda: compile_kernel(_stand_in(spec, kind, tiling, scale), TARGET))
    return spec, data, weight


class _Bar:
    total, n = 0, 0

    def refresh(self):
        pass

    def set_postfix_str(self, text):
        self.postfix = text

    def update(self, n):
        self.n += n


def test_candidates_gradients_come_back_from_a_session_on_the_server(tracker, stand_ins):
    config, _ = tracker
    spec, data, weight = stand_ins
    inputs = profile_inputs(spec, PROFILE, device="cpu")
    arrays = _host_arrays(inputs)
    path = kernel_cache.library_path(*fused_backward._candidate_library(spec, TARGET, "grad_data", data[0]), TARGET)
    session = _Session(config, TARGET, arrays, 60)
    (grad_input, grad_offset, grad_mask), ms = session.run(spec, "grad_data", data[0], path)
    torch.testing.assert_close(grad_input, inputs["input"].float() * 2, rtol=0, atol=0)
    torch.testing.assert_close(grad_offset, inputs["offset"].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_mask, inputs["mask"].float(), rtol=1e-6, atol=1e-6)
    assert ms > 0
    path = kernel_cache.library_path(*fused_backward._candidate_library(spec, TARGET, "grad_weight", weight[1]),
                                     TARGET)
    (grad_weight, grad_bias), _ = session.run(spec, "grad_weight", weight[1], path)  # a second candidate
    assert grad_weight.shape == (spec.out_channels, spec.in_channels, 9)
    torch.testing.assert_close(grad_weight.flatten(), torch.arange(grad_weight.numel(), dtype=torch.float32))
    torch.testing.assert_close(grad_bias, torch.arange(spec.out_channels, dtype=torch.float32))


def test_a_round_is_checked_against_its_first_candidate_and_spread_over_the_servers(tracker, stand_ins):
    config, server_logs = tracker
    spec, data, weight = stand_ins
    bar = _Bar()
    data_ms, weight_ms = measure_candidates_rpc(spec, PROFILE, TARGET, data, weight, bar, rpc=config)
    assert data_ms[0] > 0 and data_ms[1] is None and data_ms[2] > 0, data_ms
    assert all(ms > 0 for ms in weight_ms), weight_ms
    assert bar.total == bar.n == 5 and bar.postfix == "compiled 5/5"
    loads = [len(re.findall(r"load_module", log.read_text())) for log in server_logs]
    assert sum(loads) == 5 and min(loads) >= 1, loads


def test_a_key_without_servers_fails_before_compiling(tracker, stand_ins, monkeypatch):
    config, _ = tracker
    spec, data, weight = stand_ins
    monkeypatch.setattr(fused_rpc, "compile_candidate_libraries", pytest.fail)
    with pytest.raises(RuntimeError, match=r"has no server under key 'other'"):
        measure_candidates_rpc(spec, PROFILE, TARGET, data, weight,
                               rpc=rpc_config(f"{config.tracker_host}:{config.tracker_port}", "other"))


def test_the_remote_device_is_named_or_its_absence_said(tracker):
    config, _ = tracker
    remote_device_name(config, TARGET)  # the servers' CPU exists (its name is None: TVM names GPUs only)
    with pytest.raises(RuntimeError, match=r"the server of key 'deft-test' has no cuda device"):
        remote_device_name(config, tvm.target.Target("cuda"))
