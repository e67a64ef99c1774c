"""deft_tvm: deformable convolution (DCNv1/DCNv2) compiled by Apache TVM, called from PyTorch."""

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.frontend import onnx_export  # registers the ONNX export of deft_tvm::deform_conv2d
from deft_tvm.frontend.convert import convert_model
from deft_tvm.frontend.functional import deform_conv2d
from deft_tvm.frontend.model import build_model, layer_specs
from deft_tvm.frontend.modules import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.runtime.library import export_library, load_library
from deft_tvm.tuning.model import tune_model

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "DeformConvSpec",
    "ModulatedDeformConv2dPack",
    "build_model",
    "convert_model",
    "deform_conv2d",
    "deform_conv2d_reference",
    "export_library",
    "layer_specs",
    "load_library",
    "tune_model",
]
