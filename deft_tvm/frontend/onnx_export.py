"""ONNX export of ``deft_tvm::deform_conv2d`` as the standard ``DeformConv`` operator (opset 19+).

What is exported: each call of the torch custom op ``deft_tvm::deform_conv2d`` (behind
``deft_tvm.deform_conv2d``, ``deft_tvm.DeformConv2d`` and ``deft_tvm.ModulatedDeformConv2dPack``)
becomes one ``DeformConv`` node of the default ONNX domain with inputs ``X = input
[N, C, H, W]``, ``W = weight [out_channels, C / group, kernel_h, kernel_w]``, ``offset
[N, 2 * offset_group * kernel_h * kernel_w, out_h, out_w]``, ``B = bias [out_channels]`` and
``mask [N, offset_group * kernel_h * kernel_w, out_h, out_w]`` (a None bias or mask is left out)
and attributes ``strides``, ``pads = [pad_h, pad_w, pad_h, pad_w]``, ``dilations``,
``kernel_shape``, ``group = C // weight.shape[1]`` and ``offset_group = offset.shape[1] //
(2 * kernel_h * kernel_w)``. The semantics are those of the ONNX operator spec ``DeformConv``,
opset 19 (https://onnx.ai/onnx/operators/onnx__DeformConv.html), which are torchvision's and
deft_tvm's: (dy, dx) offset pairs per kernel tap, bilinear sampling, zero outside the image, the
mask scaling each sampled value.

Exporters (both registered when ``deft_tvm`` is imported; nothing to pass to ``torch.onnx.export``):
  * ``torch.onnx.export(..., opset_version=19)`` (torch.export-based, torch's default): a
    trace-only onnxscript function registered with onnxscript's torchlib registry
    (``onnxscript.function_libs.torch_lib.registration.torch_op``, the way onnxscript itself exports
    ``torchvision::deform_conv2d``); torch reads that registry at every export
    (``torch/onnx/_internal/exporter/_registration.py``, ``ONNXRegistry.from_torchlib``). The
    registry is read before the model is traced, so registering cannot wait for the export:
    where onnxscript is installed, importing ``deft_tvm`` imports it (about 0.7 s more on a CPU
    host); where it is not, nothing is imported, and this exporter could not run anyway.
  * ``torch.onnx.export(..., dynamo=False, opset_version=19)`` (TorchScript-based): a symbolic
    function registered with ``torch.onnx.register_custom_op_symbolic`` for opset 19 and above.

Opset: 19 or newer. Below 19 both exporters raise ``torch.onnx.errors.UnsupportedOperatorError``
("Exporting the operator 'deft_tvm::deform_conv2d' to ONNX opset version 18 is not supported.
Support for this operator was added in version 19, ..."); the dynamo exporter wraps it in its
``ConversionError`` and, as it builds graphs at opset 18 or above, reports 18 for any lower request.

Dtypes: float16, float32 and float64 (``DeformConv``-19's T; onnxruntime's CPU kernel runs all
three). The tests check float32.

Not supported:
  * channel counts and kernel sizes that are not static (``group``, ``offset_group`` and
    ``kernel_shape`` are attributes): ``ValueError`` (wrapped in ``ConversionError`` by the dynamo
    exporter). Batch, height and width may be dynamic.
  * bfloat16: ``DeformConv`` takes it from opset 22 only, and onnxruntime's CPU kernel lacks it.
"""

import importlib.util
from typing import Optional

import torch
from torch.onnx import symbolic_helper

OP_NAME = "deft_tvm::deform_conv2d"
DEFORM_CONV_OPSET = 19  # the first opset with DeformConv


def _deform_conv_attributes(
    input_shape, weight_shape, offset_shape, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w
) -> dict[str, int | list[int]]:
    """The ``DeformConv`` attributes for one call of the op.

    Args:
        input_shape, weight_shape, offset_shape: the exporter's shapes of ``input``, ``weight`` and
            ``offset`` (indexable, ints for static sizes, or None where unknown); only
            ``in_channels`` (input dim 1), ``in_channels // group`` and the kernel size (weight
            dims 1-3) and the offset channels (offset dim 1) are read.
        stride_h, ..., dilation_w: the op's int arguments.

    Returns:
        ``strides``, ``pads``, ``dilations``, ``kernel_shape``, ``group``, ``offset_group``.

    Raises:
        ValueError: one of the sizes read is not static.
    """

    def static(shape, dim: int, name: str) -> int:
        size = None if shape is None else shape[dim]
        if not isinstance(size, int):
            raise ValueError(
                f"{OP_NAME} exports to ONNX DeformConv only with a static {name} (got {size!r}): "
                "group, offset_group and kernel_shape are attributes"
            )
        return size

    kernel_h = static(weight_shape, 2, "kernel height (weight dim 2)")
    kernel_w = static(weight_shape, 3, "kernel width (weight dim 3)")
    return {
        "strides": [stride_h, stride_w],
        "pads": [pad_h, pad_w, pad_h, pad_w],
        "dilations": [dilation_h, dilation_w],
        "kernel_shape": [kernel_h, kernel_w],
        "group": static(input_shape, 1, "in_channels (input dim 1)")
        // static(weight_shape, 1, "in_channels // groups (weight dim 1)"),
        "offset_group": static(offset_shape, 1, "offset channel count (offset dim 1)") // (2 * kernel_h * kernel_w),
    }


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i")
def _torchscript_symbolic(
    g, input, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w
):
    """TorchScript-exporter symbolic: one ``DeformConv`` node; a None bias or mask arrives as a None
    constant, which the exporter writes as an empty (left out) input."""
    attributes = _deform_conv_attributes(
        symbolic_helper._get_tensor_sizes(input), symbolic_helper._get_tensor_sizes(weight),
        symbolic_helper._get_tensor_sizes(offset), stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    )
    return g.op("DeformConv", input, weight, offset, bias, mask, **{f"{k}_i": v for k, v in attributes.items()})


torch.onnx.register_custom_op_symbolic(OP_NAME, _torchscript_symbolic, DEFORM_CONV_OPSET)

if importlib.util.find_spec("onnxscript") is not None:
    # The dynamo exporter's translation. Module level, not inside a function: onnxscript builds the
    # signature torch dispatches on from the annotations, looked up in the module's globals (hence
    # also no ``from __future__ import annotations`` here).
    from onnxscript import evaluator
    from onnxscript.function_libs.torch_lib.registration import torch_op
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
    from onnxscript.onnx_opset import opset19

    @torch_op(OP_NAME, trace_only=True)
    def deft_tvm_deform_conv2d(
        input: TFloat,
        offset: TFloat,
        weight: TFloat,
        bias: Optional[TFloat],
        mask: Optional[TFloat],
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
    ) -> TFloat:
        """One ``deft_tvm::deform_conv2d`` node (arguments named as in the op's schema) as ``DeformConv``.

        Raises ``torch.onnx.errors.UnsupportedOperatorError`` below opset 19 and ``ValueError``
        for non-static channel counts or kernel sizes.
        """
        # The exporter traces this under its OpRecorder evaluator, whose opset is the one the graph
        # is built at (torch/onnx/_internal/exporter/_core.py, onnxscript.evaluator.default_as).
        opset = evaluator.default().opset.version
        if opset < DEFORM_CONV_OPSET:
            raise torch.onnx.errors.UnsupportedOperatorError(OP_NAME, opset, DEFORM_CONV_OPSET)
        attributes = _deform_conv_attributes(
            input.shape, weight.shape, offset.shape, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w
        )
        return opset19.DeformConv(input, weight, offset, bias, mask, **attributes)
