"""The custom ops under torch's tooling on a GPU (``pytest -m gpu``): opcheck of both ops, a
compiled training step, autocast with a GradScaler; skipped where there is no GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deft_tvm
from deft_tvm.frontend.ops import deform_conv2d_backward_op, deform_conv2d_op
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest

from helpers import small_dcn_model
from test_autocast import check_pack_layer_under_autocast
from test_forward import SHAPES
from test_torch_integration import OPCHECK_UTILS, _hyper, _op_args, _training_step

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


def _cuda(args):
    return tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_opcheck_both_ops_on_gpu(dtype):
    spec = dataclasses.replace(SHAPES["asymmetric"], dtype=dtype)
    torch.library.opcheck(deform_conv2d_op, _cuda(_op_args(spec, requires_grad=True)), test_utils=OPCHECK_UTILS)
    input, offset, weight, bias, mask, *_ = _cuda(_op_args(spec))
    grad_output = torch.randn(spec.output_shape, device="cuda", dtype=input.dtype)
    torch.library.opcheck(deform_conv2d_backward_op,
                          (grad_output, input, offset, weight, mask, bias is not None, *_hyper(spec)),
                          test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_training_step_matches_eager_on_gpu(dynamic):
    model = small_dcn_model().cuda().train()
    x, target = torch.randn(2, 3, 10, 12, device="cuda"), torch.randn(2, 8, 10, 12, device="cuda")
    # Full-precision convolutions: inductor may pick another algorithm for the plain convs than eager.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager_loss, eager_grads = _training_step(model, x, target)
        torch._dynamo.reset()
        loss, grads = _training_step(torch.compile(model, fullgraph=True, dynamic=dynamic), x, target)
    assert_close(loss, eager_loss.double(), "float32")
    for grad, eager in zip(grads, eager_grads):  # grad_input sums by atomics: compare relative to the largest
        assert_close_to_largest(grad, eager, "float32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_layer_under_cuda_autocast_matches_the_reference(dtype):
    torch.manual_seed(0)
    layer = deft_tvm.ModulatedDeformConv2dPack(16, 32, 3, padding=1, offset_groups=2).cuda()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    check_pack_layer_under_autocast(layer, torch.randn(2, 16, 12, 10, device="cuda"), dtype)


def test_gradscaler_training_with_autocast_lowers_the_loss():
    model = small_dcn_model().cuda().train()
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    x, target = torch.randn(4, 3, 16, 16, device="cuda"), torch.randn(4, 8, 16, 16, device="cuda")
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert set(seen) == {torch.float16}
    assert scaler.get_scale() == 65536.0  # no step skipped for inf/NaN gradients
    assert losses[-1] < losses[0]
