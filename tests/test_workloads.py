"""The workload registry and the main job's command."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm import cli
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.tuning.workloads import (
    BENCHMARK_WORKLOADS,
    DEFAULT_WORKLOAD,
    PROFILES,
    TEST_WORKLOADS,
    WORKLOADS,
    get_workload,
)


def test_registry_lists():
    assert set(BENCHMARK_WORKLOADS).isdisjoint(TEST_WORKLOADS)
    assert set(BENCHMARK_WORKLOADS) | set(TEST_WORKLOADS) == set(WORKLOADS)
    assert DEFAULT_WORKLOAD in BENCHMARK_WORKLOADS
    for name in ("paper_64c_64x64_n1", "paper_64c_64x64_n8", "paper_64c_64x64_n32", "r50dcn_c3", "r50dcn_c4",
                 "r50dcn_c5", "video_64c_180x320_og8"):
        assert name in BENCHMARK_WORKLOADS
    assert get_workload("video_64c_180x320_og8").spec.offset_groups == 8
    assert get_workload("r50dcn_c4").spec.input_shape == (2, 256, 50, 84)
    for workload in WORKLOADS.values():
        assert workload.profile in PROFILES


def test_tf32_workloads_are_float32_with_tf32():
    spec = get_workload("paper_64c_64x64_n32", tf32=True).spec
    assert spec.dtype == "float32" and spec.tf32 and spec.key().endswith("_float32_tf32")
    assert not get_workload("paper_64c_64x64_n32", "float32").spec.tf32
    with pytest.raises(ValueError, match="tf32 applies to float32 only, got dtype 'float16'"):
        get_workload("paper_64c_64x64_n32", "float16", tf32=True)


def test_unknown_workload_names_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown workload 'nope'; registered: paper_64c_64x64_n1"):
        get_workload("nope")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles_have_the_stated_scale_and_are_seeded(profile):
    p = PROFILES[profile]
    draw = p.sample_offsets((200_000,), torch.Generator().manual_seed(1))
    again = p.sample_offsets((200_000,), torch.Generator().manual_seed(1))
    assert torch.equal(draw, again)
    median_abs = draw.abs().median().item()
    # The median of |t(dof)| and |N(0, 1)| is 0.6745 for the normal, 0.765 for t(3).
    expected = p.sigma * (0.6745 if p.dof is None else 0.765)
    assert median_abs == pytest.approx(expected, rel=0.03)
    mask = p.sample_mask((1000,), torch.Generator().manual_seed(1))
    assert mask.min() > 0 and mask.max() < 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TEST_WORKLOADS)
def test_test_workloads_match_reference(name, dtype):
    workload = get_workload(name, dtype)
    inputs = workload.make_inputs(seed=2)
    assert inputs["offset"].shape == workload.spec.offset_shape
    out = deft_tvm.deform_conv2d(**inputs)
    assert_close(out, deft_tvm.deform_conv2d_reference(**inputs), dtype)


def test_main_job_command_builds_and_checks(capsys):
    assert cli.main(["build", "--workload", "test_asymmetric", "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert "matches the float64 reference" in printed and '"kind":"llvm"' in printed


def test_list_command(capsys):
    assert cli.main(["list"]) == 0
    assert "r50dcn_c5" in capsys.readouterr().out
