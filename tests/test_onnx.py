"""ONNX export (deft_tvm.onnx_export): both exporters write a standard DeformConv node that
onnxruntime runs to deft_tvm's own float32 output."""

import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import deft_tvm  # noqa: E402
from deft_tvm.reference.tolerances import assert_close  # noqa: E402

# Extra torch.onnx.export arguments per exporter; the torch.export-based one is torch's default.
EXPORTERS = {"dynamo": {}, "torchscript": {"dynamo": False}}

# Asymmetric everything: a 3x2 kernel, stride (2, 1), padding (1, 0), dilation (2, 1).
ASYMMETRIC = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1))


class FunctionalDeformConv(torch.nn.Module):
    """``deft_tvm.deform_conv2d`` with the weight and mask as graph inputs and no bias."""

    def forward(self, input, offset, weight, mask):
        return deft_tvm.deform_conv2d(input, offset, weight, mask=mask, **ASYMMETRIC)


def _functional_case():
    """groups 2, offset_groups 2, mask, no bias, asymmetric: input [1, 4, 7, 6] -> [1, 6, 3, 5]."""
    kh, kw, offset_groups = 3, 2, 2
    args = (
        torch.randn(1, 4, 7, 6),
        2 * torch.randn(1, 2 * offset_groups * kh * kw, 3, 5),
        torch.randn(6, 2, kh, kw),
        torch.rand(1, offset_groups * kh * kw, 3, 5),
    )
    return FunctionalDeformConv(), args


def _deform_conv2d_case():
    """``DeformConv2d``: groups 2, offset_groups 1, no mask, bias, asymmetric."""
    model = deft_tvm.DeformConv2d(4, 6, (3, 2), groups=2, bias=True, **ASYMMETRIC)
    return model, (torch.randn(1, 4, 7, 6), 2 * torch.randn(1, 2 * 3 * 2, 3, 5))


def _pack_case():
    """``ModulatedDeformConv2dPack``: offset_groups 2, predicted mask, no bias; ``conv_offset``
    randomised so that the offsets are not all zero."""
    model = deft_tvm.ModulatedDeformConv2dPack(4, 4, 3, padding=1, offset_groups=2, bias=False)
    torch.nn.init.normal_(model.conv_offset.weight, std=0.3)
    return model, (torch.randn(1, 4, 5, 5),)


CASES = {"functional": _functional_case, "DeformConv2d": _deform_conv2d_case, "ModulatedDeformConv2dPack": _pack_case}


def _export(model, args, exporter, path, opset_version):
    torch.onnx.export(model.eval(), args, path, opset_version=opset_version, **EXPORTERS[exporter])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_runs_in_onnxruntime(case, exporter, tmp_path):
    torch.manual_seed(0)
    model, args = CASES[case]()
    path = tmp_path / "model.onnx"
    _export(model, args, exporter, path, opset_version=19)

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    deform_convs = [node for node in proto.graph.node if node.op_type == "DeformConv"]
    assert len(deform_convs) == 1 and deform_convs[0].domain in ("", "ai.onnx")

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {graph_input.name: arg.numpy() for graph_input, arg in zip(session.get_inputs(), args)}
    (actual,) = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*args)
    assert_close(torch.from_numpy(actual), expected.double(), "float32")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_opset_below_19_raises(exporter, tmp_path):
    model, args = _deform_conv2d_case()
    with pytest.raises(
        torch.onnx.OnnxExporterError,
        match=r"'deft_tvm::deform_conv2d' to ONNX opset version 18 is not supported\. "
        r"Support for this operator was added in version 19",
    ):
        _export(model, args, exporter, tmp_path / "model.onnx", opset_version=18)
