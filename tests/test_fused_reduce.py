"""The fused backward's reduce kernel (``cuda_backward_fused.reduce_primfunc``), built serially for
the CPU: its sums are the splits added in split order and cast, bit for bit, for every segment
``reduce_segments`` gives it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import tvm

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda_backward_fused import (
    DataTiling,
    ReduceSegments,
    WeightTiling,
    reduce_primfunc,
    reduce_segments,
)

from test_large_index import HUGE_BACKWARD

SPEC = DeformConvSpec(2, 8, 12, 12, 8, 3, 3, padding=(1, 1), offset_groups=2)
CASES = {  # (dtype, tf32, has_bias, has_mask, channel splits, deterministic)
    "float16_splits": ("float16", False, True, True, 4, False),
    "bfloat16_one_split_no_bias": ("bfloat16", False, False, True, 1, False),
    "float16_deterministic": ("float16", False, True, True, 2, True),
    "tf32_splits_no_mask": ("float32", True, True, False, 2, False),
    "float32_one_split": ("float32", False, False, False, 1, False),
}


def _case(name):
    dtype, tf32, has_bias, has_mask, splits, deterministic = CASES[name]
    spec = dataclasses.replace(SPEC, dtype=dtype, tf32=tf32, has_bias=has_bias, has_mask=has_mask)
    data = dataclasses.replace(DataTiling.for_spec(spec), channel_splits=splits, chunk=1, deterministic=deterministic,
                               fixed_point=deterministic or DataTiling.for_spec(spec).fixed_point)
    return spec, data, WeightTiling.for_spec(spec)


def _serial_reduce(spec, data, weight):
    func = reduce_primfunc(spec, data, weight, bind_threads=False)
    return tvm.compile(tvm.IRModule({"reduce": func}), target=tvm.target.Target({"kind": "llvm"}))["reduce"]


def _in_split_order(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    total = torch.zeros(parts.shape[1:], dtype=torch.float32)
    for part in parts:
        total = total + part
    return total.to(dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_segments_and_sums_bit_for_bit(name):
    spec, data, weight = _case(name)
    segments = reduce_segments(spec, data)
    cast = spec.dtype != "float32"
    many = data.channel_splits > 1
    assert segments == ReduceSegments(cast or many, (cast or many) and spec.has_mask,
                                      cast and not data.deterministic)
    kernel = _serial_reduce(spec, data, weight)

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, spec.dtype)
    weights = spec.out_channels * spec.in_channels // spec.groups * spec.kernel_h * spec.kernel_w
    inputs = {"weight": torch.randn(weight.splits, weights, generator=gen),
              "bias": torch.randn(weight.splits, spec.out_channels, generator=gen) if spec.has_bias else None}
    sizes = {"offset": spec.offset_shape, "mask": spec.mask_shape, "input": spec.input_shape}
    for segment, shape in sizes.items():
        if getattr(segments, segment):
            splits = 1 if segment == "input" else data.channel_splits
            inputs[segment] = torch.randn(splits, *shape, generator=gen).flatten(1)
    outputs = {k: torch.empty(v.shape[1:], dtype=dtype) for k, v in inputs.items() if v is not None}
    parts = [v if k != "input" else v[0] for k, v in inputs.items() if v is not None]
    kernel(*parts, *outputs.values())
    params = reduce_primfunc(spec, data, weight, bind_threads=False).params
    assert [p.name for p in params] == [f"{k}_part" for k in outputs] + [f"grad_{k}" for k in outputs]
    for key, out in outputs.items():
        assert torch.equal(out, _in_split_order(inputs[key], dtype)), key


def test_no_segments_past_int32_indexing():
    assert reduce_segments(HUGE_BACKWARD, DataTiling.for_spec(HUGE_BACKWARD)) == ReduceSegments(True, True, True)
    past = dataclasses.replace(HUGE_BACKWARD, batch=64, in_channels=256, out_channels=256)  # 4.3e9 input elements
    assert reduce_segments(past, DataTiling.for_spec(past)) == ReduceSegments(False, False, False)
