"""The tensor-core forward's channels-last copies (``schedules.cuda_layout``: shared-memory tiles
of a batched transpose) on a real GPU (``pytest -m gpu``): exactly torch's permuted copies for the
layers of the benchmark registry and a layer of partial tiles, in float16, bfloat16 and float32;
skipped where there is no GPU."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import pytest
import torch

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

DEVICE = torch.device("cuda")
# 70 channels (a full tile of 64 and 6), 99 positions (three tiles of 32 and 3), 70 x 3 x 3 weights.
TILED = DeformConvSpec(2, 70, 9, 11, 5, 3, 3, padding=(1, 1), layout="NHWC")
CASES = {f"tiled_{dtype}": dataclasses.replace(TILED, dtype=dtype) for dtype in ("float16", "bfloat16", "float32")}
CASES.update({name: dataclasses.replace(get_workload(name, "float16").spec, layout="NHWC")
              for name in BENCHMARK_WORKLOADS})


@pytest.fixture(scope="module")
def copies() -> dict:
    """Case -> its compiled copies, built in parallel (nvcc runs outside the GIL)."""
    target = target_for_device(DEVICE)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(kernel_cache.channels_last_kernel, spec, target) for name, spec in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_copies_are_torchs_permuted_copies(copies, name):
    spec = CASES[name]
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    input = torch.randn(spec.input_shape, generator=gen, device=DEVICE).to(dtype)
    weight = torch.randn(spec.weight_shape, generator=gen, device=DEVICE).to(dtype)
    input_nhwc = torch.full(spec.kernel_input_shape, float("nan"), dtype=dtype, device=DEVICE)
    weight_ohwi = torch.full(spec.kernel_weight_shape, float("nan"), dtype=dtype, device=DEVICE)
    copies[name](input, weight, input_nhwc, weight_ohwi)
    torch.cuda.synchronize()
    assert torch.equal(input_nhwc, input.permute(0, 2, 3, 1))
    assert torch.equal(weight_ohwi, weight.permute(0, 2, 3, 1))
