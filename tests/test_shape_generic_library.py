"""An exported CPU library holds the configuration kernels of its untuned workloads (issue 16):
loaded, it serves every batch and image size of them with no compile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import deft_tvm
from deft_tvm import cli
from deft_tvm.compute.spec import generic_spec
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import backward, kernel_cache, library
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.workloads import get_workload

from helpers import make_case


@pytest.fixture
def loaded(tmp_path, isolated_cache, monkeypatch):
    """``deft-tvm export --device cpu --backward`` of test_paper_small (no tuning records), loaded;
    the backward's kernels forgotten, every library unloaded afterwards."""
    monkeypatch.setattr(backward, "_kernels", {})
    out = tmp_path / "lib"
    assert cli.main(["export", "--device", "cpu", "--logs", str(tmp_path / "no_logs"), "--out", str(out),
                     "--workloads", "test_paper_small", "--backward"]) == 0
    yield library.load_library(out / "deft_kernels.json")
    library.unload_all()


def test_the_library_serves_every_size_of_its_configurations(loaded, monkeypatch):
    spec = get_workload("test_paper_small").spec
    key = generic_spec(spec).key()
    manifest = json.loads(loaded.manifest_path.read_text())
    assert {k["workload"] for k in manifest["kernels"]} == {key, f"{key}_backward", f"{key}_scatter"}
    assert {(k["spec"]["batch"], k["spec"]["height"], k["spec"]["width"]) for k in manifest["kernels"]} == {
        ("N", "H", "W")}
    compiled = []
    monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *args: compiled.append(args))
    target = target_for_device("cpu")
    for size in ((1, 12, 12), (3, 29, 17), (2, 40, 55)):
        sized = dataclasses.replace(spec, **dict(zip(("batch", "height", "width"), size)))
        assert kernel_cache.get_kernel(sized, torch.device("cpu")) is loaded.kernels[key]
        assert backward._kernel(sized, target, "gradients") is loaded.kernels[f"{key}_backward"]
        assert backward._kernel(sized, target, "scatter") is loaded.kernels[f"{key}_scatter"]
        args = make_case(sized)
        with torch.no_grad():
            assert_close(deft_tvm.deform_conv2d(**args), deft_tvm.deform_conv2d_reference(**args), sized.dtype)
    assert compiled == []
