"""Measurement inputs on a GPU (``pytest -m gpu``): a workload measured on a model's recorded
statistics (an empirical profile, as ``tune_model`` makes) draws on the CPU generator and gives the
GPU the CPU's draws, as the synthetic profiles do (it failed with a CPU generator on CUDA weights
before); skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.tuning import stats
from deft_tvm.tuning.workloads import Workload

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


class Explicit(torch.nn.Module):
    """A DCN layer called with given offsets (and mask): ``forward(x, offset, mask=None)``."""

    def __init__(self):
        super().__init__()
        self.dcn = deft_tvm.DeformConv2d(4, 6, 3, padding=1)

    def forward(self, x, offset, mask=None):
        return self.dcn(x, offset, mask)


@pytest.mark.parametrize("masked", [True, False])
def test_empirical_profile_inputs_on_the_gpu_are_the_cpu_s(tmp_path, masked):
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 4, 9, 7, generator=generator), torch.randn(2, 18, 9, 7, generator=generator) * 2,
             torch.rand(2, 9, 9, 7, generator=generator) if masked else None)
    path = stats.collect(Explicit(), [batch]).save(tmp_path / "profile.json")
    spec = DeformConvSpec(2, 4, 9, 7, 6, 3, 3, padding=(1, 1), has_mask=masked)
    workload = Workload("test", spec, f"{path}#dcn")
    on_cpu, on_gpu = workload.make_inputs(seed=3), workload.make_inputs(seed=3, device="cuda")
    for name, value in on_cpu.items():
        if isinstance(value, torch.Tensor):
            assert on_gpu[name].device.type == "cuda" and torch.equal(on_gpu[name].cpu(), value), name
