"""``runtime.backward.prebuild``: the backward kernels the op takes on a device, loaded or compiled in
parallel ahead of the first backward call (as ``deft-tvm bench`` does before a forward+backward run)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from deft_tvm.compute.spec import generic_spec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close_to_largest
from deft_tvm.runtime import backward, kernel_cache
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.workloads import get_workload

HALF = get_workload("test_paper_small", "float16").spec
TF32 = get_workload("test_paper_small", "float32", tf32=True).spec
FLOAT32 = get_workload("test_paper_small", "float32").spec


@pytest.mark.parametrize(("spec", "device_type", "deterministic", "parts"), [
    (HALF, "cuda", False, ("fused",)),
    (FLOAT32, "cuda", False, ("fused",)),
    (HALF, "cuda", True, ("fused_deterministic",)),
    (TF32, "cuda", True, ("fused_deterministic",)),
    (FLOAT32, "cuda", True, ("gradients", "gather")),  # below the fixed-point quantum's tolerance
    (FLOAT32, "cpu", False, ("gradients", "scatter")),
    (FLOAT32, "cpu", True, ("gradients", "scatter")),
])
def test_the_parts_are_those_the_ops_backward_takes(spec, device_type, deterministic, parts):
    assert backward.backward_parts(spec, device_type, deterministic) == parts


def test_prebuild_builds_each_missing_kernel_once_in_parallel_and_the_op_then_reuses_them(monkeypatch):
    monkeypatch.setattr(backward, "_kernels", {})
    running, most, calls, lock = [0], [0], [], threading.Lock()

    def build(spec, target, part):
        with lock:
            calls.append((spec.key(), part))
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return f"{spec.key()}:{part}"

    monkeypatch.setattr(backward, "_build", build)
    # A repeat, and on the CPU another size of the same layer (its configuration's kernels), are built once.
    specs = [FLOAT32, dataclasses.replace(FLOAT32, dtype="float64"), FLOAT32, dataclasses.replace(FLOAT32, batch=3)]
    cpu = torch.device("cpu")
    assert backward.prebuild(specs, cpu) == 4
    assert sorted(calls) == sorted((generic_spec(s).key(), p) for s in specs[:2] for p in ("gradients", "scatter"))
    assert most[0] > 1  # threads overlapped the builds
    assert backward.prebuild(specs, cpu) == 0 and len(calls) == 4
    target = target_for_device(cpu)
    assert backward._kernel(FLOAT32, target, "scatter") == f"{generic_spec(FLOAT32).key()}:scatter"
    assert len(calls) == 4


def test_prebuilt_cpu_kernels_give_the_reference_gradients(monkeypatch):
    monkeypatch.setattr(backward, "_kernels", {})
    assert backward.prebuild([FLOAT32], torch.device("cpu")) == 2
    monkeypatch.setattr(backward, "_build", lambda *args: pytest.fail("built again on the backward call"))
    inputs = get_workload("test_paper_small", "float32").make_inputs()
    grad_output = torch.randn(FLOAT32.output_shape, generator=torch.Generator().manual_seed(3))
    grads = backward.deform_conv2d_backward(FLOAT32, grad_output, inputs["input"], inputs["offset"],
                                            inputs["mask"], inputs["weight"])
    reference = deform_conv2d_reference_backward(grad_output, **inputs)
    for got, expected in zip(grads, (reference.input, reference.offset, reference.weight, reference.bias,
                                     reference.mask)):
        assert_close_to_largest(got, expected, "float32")


@pytest.mark.parametrize("part", ["gather", "scatter"])
def test_grad_inputs_kernels_are_kept_on_disk(part, isolated_cache, monkeypatch):
    """The sorted gather (deterministic CUDA calls of float32, float64) and the scatter (the CPU's)
    are compiled into the disk cache once; a new process loads them."""
    target = target_for_device(torch.device("cpu"))
    backward._build(FLOAT32, target, part)
    files = sorted(p.name for p in isolated_cache.rglob("*.so"))
    assert len(files) == 1 and f"_{part}-" in files[0]
    monkeypatch.setattr(kernel_cache, "compile_kernel", lambda *args: pytest.fail("compiled again"))
    backward._build(FLOAT32, target, part)
    assert sorted(p.name for p in isolated_cache.rglob("*.so")) == files
