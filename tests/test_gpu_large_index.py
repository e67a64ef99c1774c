"""64-bit indexing on a GPU (``pytest -m gpu``): issue 12's two shapes past 2**31 index elements
run and give the last batch item exactly as that item computed alone (32-bit indices)."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest

from test_large_index import HUGE_BACKWARD, HUGE_FORWARD

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


def _arguments(spec, requires_grad: bool = False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = getattr(torch, spec.dtype)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) * scale).requires_grad_(requires_grad)

    return {"input": randn(spec.input_shape), "offset": randn(spec.offset_shape, 2.0),
            "weight": randn(spec.weight_shape, (spec.weight_shape[1] * 9) ** -0.5), "bias": randn(spec.out_channels),
            "mask": torch.rand(spec.mask_shape, generator=gen, device="cuda", dtype=dtype).requires_grad_(requires_grad)}


def _last_item(args: dict) -> dict:
    return {k: v if k in ("weight", "bias") else v[-1:] for k, v in args.items()}


def test_forward_past_int32_gives_the_last_item_as_computed_alone():
    assert HUGE_FORWARD.index_dtype == "int64"
    args = _arguments(HUGE_FORWARD)
    with torch.no_grad():
        last = deft_tvm.deform_conv2d(**args, padding=1)[-1:]
        alone = deft_tvm.deform_conv2d(**_last_item(args), padding=1)
    assert_close(last, alone.double(), HUGE_FORWARD.dtype)


def test_backward_past_int32_gives_the_last_items_gradients_as_computed_alone():
    assert HUGE_BACKWARD.index_dtype == "int64"
    args = _arguments(HUGE_BACKWARD, requires_grad=True)
    per_item = ("input", "offset", "mask")
    grad_output = torch.randn(HUGE_BACKWARD.output_shape, device="cuda", dtype=torch.float16)
    grads = torch.autograd.grad(deft_tvm.deform_conv2d(**args, padding=1), [args[k] for k in per_item], grad_output)
    alone_args = _last_item({k: v.detach().requires_grad_() for k, v in args.items()})
    alone = torch.autograd.grad(deft_tvm.deform_conv2d(**alone_args, padding=1), [alone_args[k] for k in per_item],
                                grad_output[-1:])
    for name, grad, expected in zip(per_item, grads, alone):
        assert_close_to_largest(grad[-1:], expected, HUGE_BACKWARD.dtype)  # atomic sums
