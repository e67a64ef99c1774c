"""The staged CUDA backward of a layer configuration (issue 16; deterministic float32 and float64
calls): ``schedules/cuda_backward.py``'s ``apply_backward_cuda_generic`` on the gradient kernels of
a ``generic_spec`` and the sorted gather of the same configuration. Built for the CPU (the same
loops and buffers, no thread bound), one build serves several batch and image sizes and matches
the float64 reference backward; built for CUDA it compiles with nvcc for sm_90, every stage a
kernel of the size variables with no buffer sized by them."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import tvm
from tvm import s_tir

from deft_tvm.compute.backward import sorted_gather_primfunc
from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close_to_largest
from deft_tvm.runtime import backward
from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation
from deft_tvm.schedules import default_schedule
from deft_tvm.schedules import cuda_backward
from deft_tvm.schedules.cuda_backward import THREADS, apply_backward_cuda_generic, generic_splits

from helpers import make_case
from test_fused_backward_codegen import needs_nvcc

CONFIGURATIONS = {  # torchvision-style asymmetric hyper-parameters, grouped; DCNv2 with bias
    "asymmetric_float64": DeformConvSpec(1, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                         groups=2, offset_groups=3, has_mask=False, dtype="float64"),
    "v2_float32": DeformConvSpec(1, 16, 8, 8, 24, 3, 3, padding=(1, 1), offset_groups=2, dtype="float32"),
}
SIZES = ((1, 9, 13), (3, 17, 10), (2, 23, 31))


def _gradients(kernel, gather, spec: DeformConvSpec, seed: int) -> tuple[dict, dict]:
    """The gradients of one call of ``spec`` through the CPU-built configuration kernels, and the
    float64 reference's."""
    args = make_case(spec, seed=seed)
    grad_output = torch.randn(spec.output_shape, generator=torch.Generator().manual_seed(seed),
                              dtype=torch.float64).to(args["input"].dtype)
    results = {name: torch.empty(shape, dtype=getattr(torch, dtype))
               for name, shape, dtype in backward._output_layout(spec)}
    given = [args[k] for k in ("input", "offset", "mask", "weight") if args[k] is not None]
    kernel(*given, grad_output, *results.values())
    order, starts = backward.sort_by_pixel(results["coord_index"], spec.height * spec.width)
    grad_input = torch.full(spec.input_shape, float("nan"), dtype=results["grad_columns"].dtype)
    gather(results["grad_columns"], results["coord_share"], order, grad_input, starts)
    got = {"input": grad_input, "offset": results["grad_offset"], "weight": results["grad_weight"],
           "bias": results["grad_bias_acc"], "mask": results.get("grad_mask")}
    reference = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return got, deform_conv2d_reference_backward(grad_output.double(), **reference)._asdict()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_one_cpu_build_of_the_configuration_serves_every_size(name):
    configuration = CONFIGURATIONS[name]
    generic = generic_spec(configuration)
    sch = s_tir.Schedule(kernel_primfunc(generic, "backward"))
    apply_backward_cuda_generic(sch, generic, bind_threads=False)
    kernel = tvm.compile(sch.mod, target="llvm")["main"]
    gather = tvm.compile(tvm.IRModule({"gather": sorted_gather_primfunc(generic)}), target="llvm")["gather"]
    for seed, size in enumerate(SIZES):
        spec = dataclasses.replace(configuration, **dict(zip(("batch", "height", "width"), size)))
        got, expected = _gradients(kernel, gather, spec, seed)
        for gradient, value in got.items():
            if value is not None and expected[gradient] is not None:
                assert_close_to_largest(value, expected[gradient], configuration.dtype)


@pytest.mark.parametrize("channels, splits", [(64, 64), (128, 64), (256, 64), (512, 16), (2048, 1)])
def test_grad_weights_splits_follow_the_weights_size(channels, splits):
    """The paper's and ResNet-50's c3, c4 and c5 layer configurations, and one whose weight alone
    gives grad_weight enough threads: 64 splits of c5's weight were 604 MB of partial sums in
    float32, 16 are 151 MB (and were faster on an H100)."""
    spec = generic_spec(DeformConvSpec(1, channels, 8, 8, channels, 3, 3, padding=(1, 1)))
    assert generic_splits(spec) == splits
    assert splits * spec.out_channels * channels * 9 <= max(cuda_backward.GENERIC_PARTIALS, channels * channels * 9)


def test_a_grad_weight_of_one_split_sums_every_position(monkeypatch):
    configuration = CONFIGURATIONS["v2_float32"]
    monkeypatch.setattr(cuda_backward, "GENERIC_THREADS", 1)  # the weight's threads are enough: one split
    generic = generic_spec(configuration)
    assert generic_splits(generic) == 1
    sch = s_tir.Schedule(kernel_primfunc(generic, "backward"))
    apply_backward_cuda_generic(sch, generic, bind_threads=False)
    kernel = tvm.compile(sch.mod, target="llvm")["main"]
    gather = tvm.compile(tvm.IRModule({"gather": sorted_gather_primfunc(generic)}), target="llvm")["gather"]
    spec = dataclasses.replace(configuration, batch=2, height=23, width=31)
    got, expected = _gradients(kernel, gather, spec, seed=5)
    assert_close_to_largest(got["weight"], expected["weight"], configuration.dtype)


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_the_configurations_kernels_compile_for_sm90(dtype):
    generic = generic_spec(dataclasses.replace(CONFIGURATIONS["v2_float32"], dtype=dtype))
    target = cuda_target("sm_90")
    with exact_cuda_compilation():
        sources = {name: compile_kernel(mod, target).mod.imports[0].inspect_source() for name, mod in (
            ("gradients", default_schedule(kernel_primfunc(generic, "backward"), generic, target, "backward").mod),
            ("gather", tvm.IRModule({"gather": sorted_gather_primfunc(generic, THREADS)})))}
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) \w+\(([^)]*)\)\s*\{", sources["gradients"])
    # corner indices, shares, grad_columns, grad_offset, grad_mask, grad_weight's partials and their sum, grad_bias
    assert len(kernels) == 8
    sizes = {a.strip() for k in kernels for a in k.split(",")}
    assert {"int N", "int H", "int W", "int OH", "int OW"} <= sizes
    for source in sources.values():  # shared memory only of constant size (the cross-thread sums'), no atomics
        assert all(size.isdigit() for size in re.findall(r"__shared__[^;\[]*\[([^\]]*)\]", source))
        assert "atomicAdd" not in source
