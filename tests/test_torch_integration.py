"""The custom op under torch's tooling: opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deft_tvm.ops import deform_conv2d_op
from deft_tvm.spec import DeformConvSpec

from helpers import make_case, small_dcn_model

SPEC = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2, offset_groups=3)


def _op_args(spec: DeformConvSpec):
    a = make_case(spec)
    return (a["input"], a["offset"], a["weight"], a["bias"], a["mask"], *spec.stride, *spec.padding, *spec.dilation)


@pytest.mark.parametrize("has_mask, has_bias", [(True, True), (False, False)])
def test_opcheck(has_mask, has_bias):
    spec = dataclasses.replace(SPEC, has_mask=has_mask, has_bias=has_bias)
    torch.library.opcheck(
        deform_conv2d_op, _op_args(spec),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"),
    )


def test_fake_tensor_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = _op_args(SPEC)
        assert deform_conv2d_op(*args).shape == SPEC.output_shape
        bad = (args[0], args[1][:, :-1], *args[2:])
        with pytest.raises(ValueError, match=r"offset.shape\[1\] \(35\)"):
            deform_conv2d_op(*bad)


def test_torch_compile_fullgraph_of_a_dcn_model():
    model = small_dcn_model()
    x = torch.randn(2, 3, 10, 12)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)
