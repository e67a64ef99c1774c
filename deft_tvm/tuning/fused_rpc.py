"""The fused backward's tiling search measured on the devices of a TVM RPC tracker.

``measure_candidates_rpc`` is ``fused_backward.measure_candidates`` for the GPUs registered with
a tracker under a key (``search.rpc_config``; one ``python -m tvm.exec.rpc_server --tracker
HOST:PORT --key KEY`` per GPU, on this host or others): the candidates are compiled here into the
kernel disk cache (``compile_candidate_libraries``: nvcc and a process pool on this machine,
which needs no GPU), the inputs drawn here from the offset profile (``profile_inputs``), and each
server of the key runs a share of a round's candidates in one RPC session (``_Session``: the inputs
copied to its device once; a session per candidate, as MetaSchedule's RPC runner has, costs a
server started with ``--no-fork`` an interpreter and a CUDA context each, ~6 s on an H100): each
candidate's library uploaded and loaded, one call as the op makes it (``data_arguments``,
``weight_arguments``) whose gradients are fetched and checked against the round's first
candidate's (the reference, ``agree``; a candidate that differs is rejected: None), then its
kernels timed by TVM's ``time_evaluator``. The reference runs first; the rest go to whichever
session is free (``search.rpc_devices`` sessions at once).

The times are the kernels' alone (``prepare`` + ``grad_data``, ``grad_weight``): the servers run
TVM only, so the sums of the channel splits' partial outputs that ``measure_candidates`` adds on
the local GPU (torch) are not in them. A round's candidates are compared across the servers, so
the key's GPUs are taken to be alike (as MetaSchedule's RPC runner takes them).
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
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
FORK_ADVICE = ("a server runs each session in a process forked from its own, and importing tvm (tvm_ffi) calls "
               "torch.cuda.is_available(), which initialises CUDA there, so a forked session cannot; start each "
               "server with TVM_FFI_DISABLE_TORCH_C_DLPACK=1 PYTORCH_NVML_BASED_CUDA_CHECK=1 (or --no-fork, which "
               "starts an interpreter per session)")


def _server_error(rpc, what: str) -> str:
    return f"RPC tracker {rpc.tracker_host}:{rpc.tracker_port}: the server of key {rpc.tracker_key!r} {what}"


def remote_device_name(rpc, target: tvm.target.Target) -> str:
    """The name of the device (e.g. "NVIDIA H200") of a server of ``rpc``'s key, for a record.

    Raises:
        RuntimeError: the server has no device of ``target``'s kind, or its session cannot
            initialise CUDA (a server forked from a process that had: see ``FORK_ADVICE``).
    """
    session = rpc.connect_server()
    device = session.device(target.get_target_device_type(), 0)
    if not device.exist:
        raise RuntimeError(_server_error(rpc, f"has no {target.kind.name} device"))
    try:
        tvm.runtime.empty((1,), "float32", device)  # the first use of the device in the session
    except tvm.error.RPCError as err:
        if "initialization error" not in str(err):
            raise
        raise RuntimeError(_server_error(rpc, f"cannot initialise CUDA in its session: {FORK_ADVICE}")) from None
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


class _Session:
    """An RPC session on a server of the key (``session_timeout`` s at most), the round's inputs
    (``arrays``, ``_host_arrays``) copied to its device once for the candidates it runs."""

    def __init__(self, rpc, target: tvm.target.Target, arrays: dict, session_timeout: int):
        tracker = rpc.connect_tracker()
        self.session = tracker.request(rpc.tracker_key, priority=rpc.session_priority,
                                       session_timeout=session_timeout)
        self.device = self.session.device(target.get_target_device_type(), 0)
        self.inputs = {name: tvm.runtime.empty(array.shape, dtype, self.device).copyfrom(array)
                       for name, (array, dtype) in arrays.items()}

    def close(self) -> None:
        """Drop this side's references to the session, so that it ends and the server is free for
        the tracker's next request (a frame of ``agree``'s caught assertion can outlive the round and
        hold on to a ``_Session``)."""
        self.inputs.clear()
        del self.device, self.session

    def _empty(self, shape):
        return tvm.runtime.empty(shape, "float32", self.device)

    @staticmethod
    def _view(tensor, shape):
        return tensor._create_view(shape)

    def run(self, spec: DeformConvSpec, kind: str, tiling, path: Path) -> tuple[list[torch.Tensor], float]:
        """``(gradients, ms)`` of one candidate (library ``path``, uploaded and loaded): the
        gradients of one call (the splits' partial sums added up) and the median time of its
        kernels."""
        self.session.upload(str(path), path.name)
        module = self.session.load_module(path.name)
        if kind == "grad_data":
            prepare, grad_data, (grad_input, *partials) = data_arguments(spec, tiling, self.inputs, self._empty,
                                                                         self._view)
            calls, whole = [("prepare", prepare), ("grad_data", grad_data)], [grad_input]
        else:
            arguments, partials = weight_arguments(spec, tiling, self.inputs, self._empty, self._view)
            calls, whole = [("grad_weight", arguments)], []
        for name, arguments in calls:
            module[name](*arguments)
        gradients = [torch.from_numpy(t.numpy()) for t in whole]
        gradients += [torch.from_numpy(p.numpy()).sum(0) for p in partials]
        ms = sum(statistics.median(module.time_evaluator(name, self.device, number=TIMED_CALLS, repeat=REPEATS)(
            *arguments).results) for name, arguments in calls) * 1e3
        return gradients, ms


def _measure(rpc, servers: int, target: tvm.target.Target, spec: DeformConvSpec, kind: str, tilings: list,
             paths: list[Path], arrays: dict, bar) -> list[float | None]:
    """The time (ms) of each candidate of one kernel, None where its gradients are not the first's:
    the first on one session, then the rest spread over one session per server of the key (``servers``
    of them)."""
    if not tilings:
        return []
    key = tolerance_key(spec.dtype, spec.tf32)
    workers = min(servers, len(tilings))
    timeout = rpc.session_timeout_sec * len(tilings)  # the tracker's session timeout, per candidate a session runs
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        sessions = list(pool.map(lambda _: _Session(rpc, target, arrays, timeout), range(workers)))
        try:
            reference, first_ms = sessions[0].run(spec, kind, tilings[0], paths[0])
            if bar is not None:
                bar.update(1)
            free = queue.SimpleQueue()
            for session in sessions:
                free.put(session)

            def checked(tiling, path):
                session = free.get()
                try:
                    gradients, ms = session.run(spec, kind, tiling, path)
                finally:
                    free.put(session)
                if bar is not None:
                    bar.update(1)
                return ms if agree(gradients, reference, key) else None

            return [first_ms, *pool.map(checked, tilings[1:], paths[1:])]
        finally:
            for session in sessions:
                session.close()


def measure_candidates_rpc(spec: DeformConvSpec, profile: str, target: tvm.target.Target, data: list[DataTiling],
                           weight: list[WeightTiling], bar=None, pool=None, *, rpc) -> tuple[list[float | None],
                                                                                              list[float | None]]:
    """Time (ms) of each data and weight candidate on the devices of ``rpc`` (``search.rpc_config``)
    under the key, as the module docstring says; None for a candidate whose gradients differ from
    the round's first's. ``bar`` (tqdm-like): as ``measure_candidates``' (its total grows by the
    round's candidates, "compiled k/n", one step per candidate measured); ``pool``: the search's
    compiling processes (``fused_backward.compile_pool``; a new one where not given). For
    ``tune_fused_backward``'s ``measure``: ``functools.partial(measure_candidates_rpc, rpc=rpc)``.

    Raises:
        RuntimeError: the tracker has no server under the key (``search.rpc_devices``).
    """
    servers = rpc_devices(rpc)  # no server under the key: say so before compiling anything
    if bar is not None:
        bar.total += len(data) + len(weight)
        bar.refresh()
    libraries = compile_candidate_libraries(spec, target, data, weight, bar, pool)
    paths = [kernel_cache.library_path(*library, target) for library in libraries]
    arrays = _host_arrays(profile_inputs(spec, profile, device="cpu"))
    return (_measure(rpc, servers, target, spec, "grad_data", data, paths[:len(data)], arrays, bar),
            _measure(rpc, servers, target, spec, "grad_weight", weight, paths[len(data):], arrays, bar))
