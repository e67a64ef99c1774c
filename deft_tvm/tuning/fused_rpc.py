"""The fused backward's tiling search measured on the devices of a TVM RPC tracker.

``measure_candidates_rpc`` is ``fused_backward.measure_candidates`` for the GPUs registered with
a tracker under a key (``search.rpc_config``; one ``python -m tvm.exec.rpc_server --tracker
HOST:PORT --key KEY`` per GPU, on this host or others): the candidates are compiled here into the
kernel disk cache (``compile_candidate_libraries``: nvcc and a process pool on this machine,
which needs no GPU), the inputs drawn here from the offset profile (``profile_inputs``), and each
candidate runs in an RPC session of its own, as MetaSchedule's RPC runner runs its candidates
(so the tracker's session timeout bounds one candidate, not a round): its library uploaded and
loaded, the inputs copied to the server's device, one call as the op makes it (``data_arguments``,
``weight_arguments``) whose gradients are fetched and checked against the round's first
candidate's (the reference, ``agree``; a candidate that differs is rejected: None), then its
kernels timed by TVM's ``time_evaluator``. The reference runs first; the rest are spread over as
many sessions at once as the key has servers (``search.rpc_devices``).

The times are the kernels' alone (``prepare`` + ``grad_data``, ``grad_weight``): the servers run
TVM only, so the sums of the channel splits' partial outputs that ``measure_candidates`` adds on
the local GPU (torch) are not in them. A round's candidates are compared across the servers, so
the key's GPUs are taken to be alike (as MetaSchedule's RPC runner takes them).
"""

from __future__ import annotations

import concurrent.futures
import functools
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tvm

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import tolerance_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling
from deft_tvm.tuning.fused_backward import (
    agree,
    compile_candidate_libraries,
    data_arguments,
    measure_candidates,
    profile_inputs,
    weight_arguments,
)
from deft_tvm.tuning.search import rpc_devices

TIMED_CALLS = 20  # back-to-back calls per repeat of time_evaluator, as timing.gpu_ms times a local candidate
REPEATS = 3  # repeats of TIMED_CALLS; a candidate's time is their median


def remote_device_name(rpc, target: tvm.target.Target) -> str:
    """The name of the device (e.g. "NVIDIA H200") of a server of ``rpc``'s key, for a record.

    Raises:
        RuntimeError: the server has no device of ``target``'s kind.
    """
    session = rpc.connect_server()
    device = session.device(target.get_target_device_type(), 0)
    if not device.exist:  # also initialises the server's CUDA driver, which the name's query does not
        raise RuntimeError(f"RPC tracker {rpc.tracker_host}:{rpc.tracker_port}: the server of key "
                           f"{rpc.tracker_key!r} has no {target.kind.name} device")
    return device.device_name


def fused_measure(target: tvm.target.Target, rpc=None) -> tuple[str, Callable]:
    """``(device name, measure)`` of a fused backward search (``tune_fused_backward``'s arguments):
    this machine's GPU and ``measure_candidates``, or with ``rpc`` a server's GPU
    (``remote_device_name``) and ``measure_candidates_rpc`` on the tracker's."""
    if rpc is None:
        return torch.cuda.get_device_name(), measure_candidates
    return remote_device_name(rpc, target), functools.partial(measure_candidates_rpc, rpc=rpc)


def _host_arrays(inputs: dict) -> dict[str, tuple[np.ndarray, str]]:
    """``(array, TVM dtype)`` of each tensor of ``inputs`` (bfloat16 as its bits: numpy has none)."""
    arrays = {}
    for name, tensor in inputs.items():
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.contiguous()
            bits = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            arrays[name] = (bits.numpy(), str(tensor.dtype).removeprefix("torch."))
    return arrays


def _run(rpc, target: tvm.target.Target, spec: DeformConvSpec, kind: str, tiling, path: Path,
         arrays: dict) -> tuple[list[torch.Tensor], float]:
    """``(gradients, ms)`` of one candidate (library ``path``) in a session of its own: the
    gradients of one call (the splits' partial sums added up) and the median time of its kernels."""
    session = rpc.connect_server()
    device = session.device(target.get_target_device_type(), 0)
    session.upload(str(path), path.name)
    module = session.load_module(path.name)
    inputs = {name: tvm.runtime.empty(array.shape, dtype, device).copyfrom(array)
              for name, (array, dtype) in arrays.items()}

    def empty(shape):
        return tvm.runtime.empty(shape, "float32", device)

    def view(tensor, shape):
        return tensor._create_view(shape)

    if kind == "grad_data":
        prepare, grad_data, (grad_input, *partials) = data_arguments(spec, tiling, inputs, empty, view)
        calls, whole = [("prepare", prepare), ("grad_data", grad_data)], [grad_input]
    else:
        arguments, partials = weight_arguments(spec, tiling, inputs, empty, view)
        calls, whole = [("grad_weight", arguments)], []
    for name, arguments in calls:
        module[name](*arguments)
    gradients = [torch.from_numpy(t.numpy()) for t in whole]
    gradients += [torch.from_numpy(p.numpy()).sum(0) for p in partials]
    ms = sum(statistics.median(module.time_evaluator(name, device, number=TIMED_CALLS, repeat=REPEATS)(
        *arguments).results) for name, arguments in calls) * 1e3
    return gradients, ms


def _measure(rpc, target: tvm.target.Target, spec: DeformConvSpec, kind: str, tilings: list, paths: list[Path],
             arrays: dict, bar) -> list[float | None]:
    """The time (ms) of each candidate of one kernel, None where its gradients are not the first's."""
    if not tilings:
        return []
    key = tolerance_key(spec.dtype, spec.tf32)
    reference, first_ms = _run(rpc, target, spec, kind, tilings[0], paths[0], arrays)
    if bar is not None:
        bar.update(1)

    def checked(tiling, path):
        gradients, ms = _run(rpc, target, spec, kind, tiling, path, arrays)
        if bar is not None:
            bar.update(1)
        return ms if agree(gradients, reference, key) else None

    with concurrent.futures.ThreadPoolExecutor(rpc_devices(rpc)) as pool:
        return [first_ms, *pool.map(checked, tilings[1:], paths[1:])]


def measure_candidates_rpc(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                           weight: list[WeightTiling], bar=None, *, rpc) -> tuple[list[float | None],
                                                                                   list[float | None]]:
    """Time (ms) of each data and weight candidate on the devices of ``rpc`` (``search.rpc_config``)
    under the key, as the module docstring says; None for a candidate whose gradients differ from
    the round's first's. ``bar`` (tqdm-like): as ``measure_candidates``' (its total grows by the
    round's candidates, "compiled k/n", one step per candidate measured). For
    ``tune_fused_backward``'s ``measure``: ``functools.partial(measure_candidates_rpc, rpc=rpc)``.

    Raises:
        RuntimeError: the tracker has no server under the key (``search.rpc_devices``).
    """
    rpc_devices(rpc)  # no server under the key: say so before compiling anything
    if bar is not None:
        bar.total += len(data) + len(weight)
        bar.refresh()
    libraries = compile_candidate_libraries(spec, target, data, weight, bar)
    paths = [kernel_cache.library_path(*library, target) for library in libraries]
    arrays = _host_arrays(profile_inputs(spec, profile, device="cpu"))
    return (_measure(rpc, target, spec, "grad_data", data, paths[:len(data)], arrays, bar),
            _measure(rpc, target, spec, "grad_weight", weight, paths[len(data):], arrays, bar))
