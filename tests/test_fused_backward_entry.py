"""The fused backward's one host function (``cuda_backward_fused.backward_entry``): built for the CPU
around stand-in data and weight kernels, and called by the runtime's fused path
(``runtime.backward.run_fused_backward``), it zeroes grad_input's sums, places every partial sum (and
the data kernel's bound tables) in its workspace region and finishes every gradient; built for
CUDA it compiles with nvcc for sm_90 into its four kernels, in launch order, each on exactly the
buffers of the kernel it wraps."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import tvm
from tvm import tirx

from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.runtime import backward
from deft_tvm.runtime.targets import compile_kernel
from deft_tvm.schedules.cuda_backward_fused import (
    WORKSPACE_ALIGN,
    backward_entry,
    backward_workspace,
    default_tilings,
    grad_data_primfunc,
    grad_weight_primfunc,
    prepare_primfunc,
    reduce_primfunc,
    reduce_segments,
)

from test_fused_backward_codegen import REGISTRY_SPECS, _compile, cuda_target, needs_nvcc
from test_fused_reduce import CASES, _case, _in_split_order


def _stand_in(func, seed: int):
    """A serial PrimFunc with ``func``'s parameters (a fused kernel's, of a spec or of a layer
    configuration) that writes a known pattern into each output parameter (``_patterns``):
    grad_input's sums are added to (the entry zeroes them first), the others stored."""
    body = []
    for param in func.params:
        if param.name not in OUTPUTS:
            continue
        count = math.prod(param.shape)
        flat = tirx.decl_buffer((count,), param.dtype, f"{param.name}_flat")
        i = tirx.Var("i", "int32")
        value = tirx.Cast(param.dtype, (i * 7 + seed) % 101 - 50)
        if param.name == "grad_input":
            value = tirx.BufferLoad(flat, [i]) + value
        body += [tirx.DeclBuffer(flat, data=param.data),
                 tirx.For(i, 0, count, tirx.ForKind.SERIAL, tirx.BufferStore(flat, value, [i]))]
    return tirx.PrimFunc(func.params, tirx.SeqStmt(body))


OUTPUTS = {"grad_input", "grad_offset", "grad_mask", "weight_part", "bias_part"}


def _patterns(func, seed: int) -> dict:
    """``{gradient: pattern}`` (flat, float64) that ``_stand_in(func, seed)`` writes, ``func`` of a
    spec's sizes."""
    return {param.name.removesuffix("_part").removeprefix("grad_"): (
        (torch.arange(math.prod(int(s) for s in param.shape), dtype=torch.float64) * 7 + seed) % 101 - 50)
        for param in func.params if param.name in OUTPUTS}


def _entry(spec, data, weight):
    """``backward_entry`` of ``spec`` (or its configuration) around the stand-ins, built for the
    CPU."""
    entry = backward_entry(spec, data, weight, bind_threads=False,
                           data_func=_stand_in(grad_data_primfunc(spec, data), 3),
                           weight_func=_stand_in(grad_weight_primfunc(spec, weight), 5))
    return tvm.compile(tvm.IRModule({"backward": entry}), target=tvm.target.Target({"kind": "llvm"}))["backward"]


def _check_entry(spec, data, weight, compiled):
    """``run_fused_backward`` of ``spec`` through ``compiled`` (``_entry``) on buffers it fills with
    garbage first: every gradient is the stand-ins' pattern summed over its splits in order and
    cast."""
    written = {**_patterns(grad_data_primfunc(spec, data), 3), **_patterns(grad_weight_primfunc(spec, weight), 5)}

    def call(*args):  # garbage in the workspace and the outputs: the entry must not read what it did not write
        for tensor in args[-(4 + spec.has_mask + spec.has_bias):]:
            tensor.copy_(torch.full(tensor.shape, 77, dtype=tensor.dtype))
        compiled(*args)

    kernels = backward.FusedKernels(call, data, weight, reduce_segments(spec, data))
    dtype = getattr(torch, spec.dtype)
    tensors = {k: torch.zeros(shape, dtype=dtype) for k, shape in (
        ("grad_output", spec.output_shape), ("input", spec.input_shape), ("offset", spec.offset_shape),
        ("weight", spec.weight_shape))}
    mask = torch.zeros(spec.mask_shape, dtype=dtype) if spec.has_mask else None
    bound = 3.0 if data.deterministic else None
    grads = backward.run_fused_backward(spec, kernels, tensors["grad_output"], tensors["input"], tensors["offset"],
                                        mask, tensors["weight"], bound)

    splits = {"offset": data.channel_splits, "mask": data.channel_splits, "weight": weight.splits,
              "bias": weight.splits}
    parts = {key: value.view(splits.get(key, 1), -1).float() for key, value in written.items()}
    grad_input = parts["input"][0].double() * data.fixed_point_quantum(spec, bound) if bound else parts["input"][0]
    expected = {"input": grad_input.view(spec.input_shape).to(dtype),
                "offset": _in_split_order(parts["offset"], dtype).view(spec.offset_shape),
                "weight": _in_split_order(parts["weight"], dtype).view(spec.weight_shape),
                "bias": _in_split_order(parts["bias"], dtype) if spec.has_bias else None,
                "mask": _in_split_order(parts["mask"], dtype).view(spec.mask_shape) if spec.has_mask else None}
    for key, got in zip(("input", "offset", "weight", "bias", "mask"), grads):
        if expected[key] is None:
            assert got is None, key
        else:
            assert got.dtype == dtype and torch.equal(got, expected[key]), key


@pytest.mark.parametrize("name", list(CASES))
def test_runtime_entry_wires_the_kernels_and_finishes_every_gradient(name):
    spec, data, weight = _case(name)
    _check_entry(spec, data, weight, _entry(spec, data, weight))


@pytest.mark.parametrize("name", ["float16_splits", "float16_deterministic", "tf32_splits_no_mask"])
def test_a_configurations_entry_serves_every_size(name):
    """One entry of the layer configuration (``generic_spec``: workspace regions, reduction segments
    and kernel grids as expressions of the sizes) serves calls of other batch and image sizes."""
    spec, data, weight = _case(name)
    compiled = _entry(generic_spec(spec), data, weight)
    for batch, height, width in ((1, 5, 7), (3, 9, 4)):
        _check_entry(dataclasses.replace(spec, batch=batch, height=height, width=width), data, weight, compiled)


def test_workspace_regions_are_aligned_and_disjoint():
    spec, data, weight = _case("float16_splits")
    workspace = backward_workspace(spec, data, weight)
    starts = dict(workspace.starts)
    assert data.fixed_point and list(starts) == ["weight", "bias", "offset", "mask", "input", "bounds"]
    sizes = {"weight": weight.splits * 8 * 8 * 9, "bias": weight.splits * 8,
             "offset": data.channel_splits * math.prod(spec.offset_shape),
             "mask": data.channel_splits * math.prod(spec.mask_shape), "input": math.prod(spec.input_shape),
             "bounds": spec.batch * spec.out_h * spec.out_w + spec.in_channels * 9}
    ends = [starts[k] + sizes[k] for k in starts]
    assert all(start % WORKSPACE_ALIGN == 0 for start in starts.values())
    assert all(end <= nxt for end, nxt in zip(ends, list(starts.values())[1:])) and ends[-1] <= workspace.elements


def _kernels(source: str) -> list[tuple[str, list[str]]]:
    """(name, sorted buffer parameters) of each kernel of a CUDA source, in order."""
    found = re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([\d, ]+\) )?(\w+)\(([^)]*)\) \{', source)
    return [(m.group(1), sorted(re.findall(r"(\w+)_ptr", m.group(2)))) for m in found]


def _buffers(func) -> list[str]:
    return sorted(p.name for p in func.params)


# Layer configurations (generic_spec: sizes as kernel parameters) in every precision, outputs smaller than the input.
CONFIGURATIONS = [generic_spec(DeformConvSpec(2, 32, 20, 24, 48, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                              offset_groups=2, dtype=dtype, tf32=tf32))
                  for dtype, tf32 in (("float16", False), ("bfloat16", False), ("float32", True), ("float32", False))]


@needs_nvcc
@pytest.mark.parametrize("spec", [s for s in REGISTRY_SPECS if s.dtype == "float16" or s.tf32] + CONFIGURATIONS,
                         ids=lambda s: s.key())
def test_entry_compiles_into_the_four_kernels_in_launch_order(spec):
    data, weight = default_tilings(spec)
    entry = backward_entry(spec, data, weight)
    source = compile_kernel(tvm.IRModule({"backward": entry}), cuda_target("sm_90")).mod.imports[0].inspect_source()
    assert sorted(_kernels(source)) == [  # numbered in launch order
        ("backward_kernel", _buffers(prepare_primfunc(spec, data))),
        ("backward_kernel_1", _buffers(grad_weight_primfunc(spec, weight))),
        ("backward_kernel_2", _buffers(grad_data_primfunc(spec, data))),
        ("backward_kernel_3", _buffers(reduce_primfunc(spec, data, weight))),
    ]
    segments = reduce_segments(spec, data)
    names = [p.name for p in entry.params]
    assert names == ["input", "offset", *["mask"] * spec.has_mask, "weight", "grad_output", "workspace", "grad_input",
                     "grad_offset", *["grad_mask"] * spec.has_mask, "grad_weight", *["grad_bias"] * spec.has_bias]
    gradient_dtypes = {p.name: p.dtype for p in entry.params}
    assert gradient_dtypes["grad_input"] == (spec.dtype if segments.input else "float32")
    assert _compile(source)[:4] == b"\x7fELF"
