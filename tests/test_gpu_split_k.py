"""Split-K tensor-core forward (``TensorCoreTiling.k_splits``) against torchvision on a real GPU
(``pytest -m gpu``), in float16, bfloat16 and TF32: every split of a small layer, extreme offsets
among them, and the default tiling of r50 c5 (split 4 ways), also under CUDA graph capture; skipped
where there is no GPU."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math

import pytest
import torch

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import assert_close, tolerance_key
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import kernel_spec
from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling, schedule_cuda_tensorcore, split_k_candidates
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case, replayed_in_cuda_graph

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
torchvision_ops = pytest.importorskip("torchvision.ops", reason="torchvision is needed to compare against")

PRECISIONS = ("float16", "bfloat16", "tf32")
# 64 channels into 48, positions padded to whole fragments (2 x 9 x 6 = 108), stride and padding
# asymmetric: four channel fragments of 16 (eight of 8 in TF32), split 1, 2 and 4 ways.
LAYER = DeformConvSpec(2, 64, 9, 11, 48, 3, 3, stride=(1, 2), padding=(1, 1), offset_groups=2)


def _tilings(spec: DeformConvSpec) -> list[TensorCoreTiling]:
    """``LAYER``'s tilings under test: every split, with and without the sampling points staged."""
    base = TensorCoreTiling.for_spec(spec)
    return [dataclasses.replace(base, k_splits=splits, k_frags=1, tap_points=tap_points)
            for splits in split_k_candidates(spec) for tap_points in (False, True)]


def _c5(precision: str):
    return get_workload("r50dcn_c5", "float32" if precision == "tf32" else precision, tf32=precision == "tf32")


@pytest.fixture(scope="module", autouse=True)
def _prebuild_kernels():
    """Compile the module's kernels in parallel up front (nvcc runs outside the GIL; the schedules
    are built here, one at a time)."""
    target = target_for_device(torch.device("cuda"))
    jobs = [(_kernel_spec(LAYER, p), t) for p in PRECISIONS for t in _tilings(_kernel_spec(LAYER, p))]
    jobs += [(s, TensorCoreTiling.for_spec(s)) for s in (_kernel_spec(_c5(p).spec, p) for p in PRECISIONS)]
    scheduled = [(spec, schedule_cuda_tensorcore(deform_conv2d_primfunc(spec), spec, tiling)) for spec, tiling in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda job: kernel_cache.load_or_build(job[0], target, job[1]), scheduled))


def _kernel_spec(spec: DeformConvSpec, precision: str) -> DeformConvSpec:
    tf32 = precision == "tf32"
    spec = dataclasses.replace(spec, dtype="float32" if tf32 else precision, tf32=tf32)
    return kernel_spec(spec, target_for_device(torch.device("cuda")))


def _run(spec: DeformConvSpec, tiling: TensorCoreTiling, args: dict) -> torch.Tensor:
    """``spec``'s kernel (channels last) scheduled with ``tiling`` on the NCHW ``args``."""
    target = target_for_device(torch.device("cuda"))
    kernel = kernel_cache.load_or_build(spec, target, schedule_cuda_tensorcore(deform_conv2d_primfunc(spec), spec,
                                                                               tiling))
    call = kernel_cache.ForwardCall(spec, kernel, None)
    return call.call(args["input"], args["offset"], args["mask"], args["weight"], args["bias"])


def _check(spec: DeformConvSpec, tiling: TensorCoreTiling, args: dict) -> None:
    out = _run(spec, tiling, args)
    reference = torchvision_ops.deform_conv2d(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                                 for k, v in args.items()})
    assert_close(out, reference, tolerance_key(spec.dtype, spec.tf32))


def _cuda(case: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


@pytest.mark.parametrize("extreme", [False, True], ids=["normal_offsets", "extreme_offsets"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_split_matches_torchvision(precision, extreme):
    spec = _kernel_spec(LAYER, precision)
    assert split_k_candidates(spec) == (1, 2, 4)
    case = make_case(spec, seed=11)
    if extreme:  # far outside and infinite offsets: torchvision's result, no out-of-bounds read
        gen = torch.Generator().manual_seed(12)
        values = torch.tensor([1e4, -1e4, math.inf, -math.inf, 20.0, -1.0, 0.5]).to(case["offset"].dtype)
        pick = values[torch.randint(0, len(values), case["offset"].shape, generator=gen)]
        case["offset"] = torch.where(torch.rand(case["offset"].shape, generator=gen) < 0.4, pick, case["offset"])
    args = _cuda(case)
    for tiling in _tilings(spec):
        _check(spec, tiling, args)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_r50_c5_default_tiling_splits_and_matches_torchvision(precision):
    workload = _c5(precision)
    spec = _kernel_spec(workload.spec, precision)
    tiling = TensorCoreTiling.for_spec(spec)
    assert tiling.k_splits == 4
    _check(spec, tiling, _cuda(workload.make_inputs(seed=3)))


def test_r50_c5_bfloat16_split_kernel_under_cuda_graph_capture_and_replay():
    # c5 bfloat16's default tiling (split 4 ways) keeps its partial sums in TVM's device workspace;
    # captured after a warm-up, the graph replays it. (The op itself takes the unfused forward on
    # c5: tests/test_gpu_unfused_forward.py captures that one.)
    spec = _kernel_spec(_c5("bfloat16").spec, "bfloat16")
    tiling = TensorCoreTiling.for_spec(spec)
    assert tiling.k_splits == 4
    static, fresh = _cuda(_c5("bfloat16").make_inputs(seed=4)), _cuda(_c5("bfloat16").make_inputs(seed=5))
    out = replayed_in_cuda_graph(lambda args: _run(spec, tiling, args), static, fresh)
    assert torch.equal(out, _run(spec, tiling, fresh))
