"""The backward TE compute and the grad_input scatter, unscheduled on the CPU, stage by stage against
the float64 reference backward."""

from __future__ import annotations

import pytest
import torch
import tvm
from tvm import te

from deft_tvm.compute_backward import deform_conv2d_backward_te, scatter_primfunc
from deft_tvm.reference_backward import deform_conv2d_reference_backward
from deft_tvm.spec import DeformConvSpec

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
    n, c, h, w = spec.input_shape
    grad_input = torch.full((n, c, h * w), float("nan"), dtype=torch.float64)  # every element is written
    scatter(*[tvm.runtime.from_dlpack(results[name]) for name in ("grad_columns", "coord_index", "coord_share")],
            tvm.runtime.from_dlpack(grad_input))
    torch.testing.assert_close(grad_input.reshape(spec.input_shape), expected.input, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_offset"], expected.offset, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_weight"], expected.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["grad_bias_acc"], torch.einsum("nopq->o", grad_output), rtol=1e-12, atol=1e-12)
    if spec.has_mask:
        torch.testing.assert_close(results["grad_mask"], expected.mask, rtol=1e-12, atol=1e-12)
