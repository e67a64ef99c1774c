"""deft_tvm: deformable convolution (DCNv1/DCNv2) compiled by Apache TVM, called from PyTorch."""

from . import onnx_export  # registers the ONNX export of deft_tvm::deform_conv2d
from .functional import deform_conv2d
from .library import export_library, load_library
from .modules import DeformConv2d, ModulatedDeformConv2dPack
from .reference import deform_conv2d_reference
from .spec import DeformConvSpec

__all__ = [
    "DeformConv2d",
    "DeformConvSpec",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "deform_conv2d_reference",
    "export_library",
    "load_library",
]
