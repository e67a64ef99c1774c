"""The backward TE compute and the grad_input scatter, unscheduled on the CPU, stage by stage against
the float64 reference backward."""

from __future__ import annotations

import pytest
import torch
import tvm
from tvm import te

from deft_tvm.compute.backward import deform_conv2d_backward_te, scatter_primfunc, sorted_gather_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.runtime.backward import sort_by_pixel

from helpers import make_case

SPECS = {
    "asymmetric": DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                 offset_groups=3, dtype="float64"),
    "no_mask_no_bias": DeformConvSpec(1, 4, 6, 7, 6, 3, 3, padding=(1, 1), offset_groups=2, has_mask=False,
                                      has_bias=False, dtype="float64"),
}


@pytest.mark.parametrize("shape", list(SPECS))
def test_backward_compute_matches_the_reference(shape):
    spec = SPECS[shape]
    inputs, outputs = deform_conv2d_backward_te(spec)
    kernel = tvm.compile(tvm.IRModule({"main": te.create_prim_func(inputs + outputs)}), target="llvm")["main"]
    args = make_case(spec, seed=3)
    grad_output = torch.randn(spec.output_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    given = [args["input"], args["offset"]] + ([args["mask"]] if spec.has_mask else []) + [args["weight"], grad_output]
    results = {o.op.name: torch.zeros([int(s) for s in o.shape], dtype=getattr(torch, str(o.dtype))) for o in outputs}
    kernel(*[tvm.runtime.from_dlpack(t.contiguous()) for t in given + list(results.values())])
    expected = deform_conv2d_reference_backward(grad_output, **args)

    scatter = tvm.compile(tvm.IRModule({"scatter": scatter_primfunc(spec)}), target="llvm")["scatter"]
    grad_input = torch.full(spec.input_shape, float("nan"), dtype=torch.float64)  # every element is written
    scatter(*[tvm.runtime.from_dlpack(results[name]) for name in ("grad_columns", "coord_index", "coord_share")],
            tvm.runtime.from_dlpack(grad_input))
    torch.testing.assert_close(grad_input, expected.input, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_offset"], expected.offset, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_weight"], expected.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_bias_acc"], torch.einsum("nopq->o", grad_output), rtol=1e-12, atol=1e-12)
    if spec.has_mask:
        torch.testing.assert_close(results["grad_mask"], expected.mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", list(SPECS))
def test_sorted_gather_equals_the_plane_scatter_bit_for_bit(shape):
    # The deterministic CUDA grad_input, run here as a CPU loop: each pixel sums its samples in
    # the order the plane scatter adds them, so even the rounding is the same.
    spec = SPECS[shape]
    n, c, h, w = spec.input_shape
    point_shape = (n, spec.offset_groups, spec.kernel_h, spec.kernel_w, spec.out_h, spec.out_w, 4)
    gen = torch.Generator().manual_seed(5)
    columns = torch.randn((n, c, *point_shape[2:6]), generator=gen, dtype=torch.float64)
    index = torch.randint(-1, h * w, point_shape, generator=gen, dtype=torch.int32)  # -1: outside
    share = torch.rand(point_shape, generator=gen, dtype=torch.float64)
    scattered = torch.empty(spec.input_shape, dtype=torch.float64)
    scatter = tvm.compile(tvm.IRModule({"scatter": scatter_primfunc(spec)}), target="llvm")["scatter"]
    scatter(columns, index, share, scattered)
    scattered = scattered.flatten(2)

    order, starts = sort_by_pixel(index, h * w)
    assert starts[..., -1].eq((index >= 0).flatten(2).sum(-1)).all()  # entries outside sort last
    for gather_spec in (spec, generic_spec(spec)):  # the call's sizes, its layer configuration's (any size)
        gathered = torch.full(spec.input_shape, float("nan"), dtype=torch.float64)  # every pixel is written
        gather = tvm.compile(tvm.IRModule({"gather": sorted_gather_primfunc(gather_spec)}), target="llvm")["gather"]
        gather(columns, share, order, gathered, starts)
        assert torch.equal(gathered.flatten(2), scattered)


def test_sort_by_pixel_keeps_equal_pixels_in_entry_order():
    index = torch.tensor([3, -1, 0, 3, 0, 2, 3, -1], dtype=torch.int32).reshape(1, 1, 1, 1, 1, 2, 4)
    order, starts = sort_by_pixel(index, pixels=4)
    assert order.flatten().tolist() == [2, 4, 5, 0, 3, 6, 1, 7]
    assert starts.flatten().tolist() == [0, 2, 2, 3, 6]
