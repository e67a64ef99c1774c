"""Argument checks that turn torch tensors into a ``DeformConvSpec`` or a clear error.

Works on real and fake (meta) tensors alike: only shapes, dtypes and devices are read.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from deft_tvm.compute.spec import SUPPORTED_DTYPES, DeformConvSpec

IntPair = Union[int, Sequence[int]]


def as_pair(value: IntPair, name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``(2, 1) -> (2, 1)``; anything else is a TypeError/ValueError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


_TENSOR_NAMES = ("input", "offset", "weight", "bias", "mask")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor_types(input, offset, weight, bias=None, mask=None) -> None:
    """Each argument is a torch.Tensor (bias and mask: or None); a TypeError names the first that is not."""
    for name, tensor in zip(_TENSOR_NAMES, (input, offset, weight, bias, mask)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


class _Described(NamedTuple):
    """What validation reads of a tensor."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def _check_rank(name: str, tensor: Optional[_Described], rank: int, layout: str) -> None:
    if tensor is not None and len(tensor.shape) != rank:
        raise ValueError(
            f"{name} must be a {rank}-D tensor {layout}, got {len(tensor.shape)}-D with shape {tensor.shape}"
        )


def spec_from_tensors(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    mask: Optional[torch.Tensor],
) -> DeformConvSpec:
    """Validate the arguments of ``deform_conv2d`` and describe the call.

    The result depends only on shapes, dtypes, devices and hyper-parameters, so it is cached per
    such signature: a repeated call costs building the signature and one dictionary look-up.
    """
    check_tensor_types(input, offset, weight, bias, mask)
    return tensors_spec(input, offset, weight, bias, mask, (*stride, *padding, *dilation))


def tensors_spec(input, offset, weight, bias, mask, hyper: tuple[int, ...]) -> DeformConvSpec:
    """``spec_from_tensors`` for arguments known to be tensors (or None for bias and mask), the
    hyper-parameters as one tuple ``(stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)``:
    the eager call's path, which has checked the types already."""
    signature = (hyper, *[None if t is None else (t.shape, t.dtype, t.device)
                          for t in (input, offset, weight, bias, mask)])
    try:
        spec = _specs.get(signature)
    except TypeError:  # symbolic (traced) sizes are not hashable: validate without the cache
        return _spec_from_signature(signature)
    if spec is None:
        spec = _spec_from_signature(signature)
        if len(_specs) < _MAX_SIGNATURES:
            _specs[signature] = spec
    return spec


def _spec_from_signature(signature) -> DeformConvSpec:
    hyper = signature[0]
    input, offset, weight, bias, mask = (None if d is None else _Described(tuple(d[0]), d[1], d[2])
                                         for d in signature[1:])
    stride, padding, dilation = hyper[0:2], hyper[2:4], hyper[4:6]
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    given = {name: t for name, t in named.items() if t is not None}

    dtypes = {name: t.dtype for name, t in given.items()}
    if len(set(dtypes.values())) != 1:
        found = ", ".join(f"{n}={_dtype_name(d)}" for n, d in dtypes.items())
        raise TypeError(f"all tensors must have the same dtype, got {found}")
    dtype = _dtype_name(input.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; expected one of {', '.join(SUPPORTED_DTYPES)}")
    devices = {name: t.device for name, t in given.items()}
    if len(set(devices.values())) != 1:
        found = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {found}")

    _check_rank("input", input, 4, "[batch, in_channels, height, width]")
    _check_rank("offset", offset, 4, "[batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]")
    _check_rank("weight", weight, 4, "[out_channels, in_channels // groups, kernel_h, kernel_w]")
    _check_rank("mask", mask, 4, "[batch, offset_groups * kernel_h * kernel_w, out_h, out_w]")
    _check_rank("bias", bias, 1, "[out_channels]")

    batch, in_channels, height, width = input.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    if in_per_group == 0 or in_channels % in_per_group:
        raise ValueError(
            f"input channels ({in_channels}) must be a multiple of weight.shape[1] ({in_per_group}), "
            f"the input channels per group"
        )
    groups = in_channels // in_per_group
    if out_channels % groups:
        raise ValueError(
            f"weight.shape[0] (out_channels = {out_channels}) must be divisible by groups ({groups} = "
            f"{in_channels} input channels / weight.shape[1] {in_per_group})"
        )
    taps = kernel_h * kernel_w
    if taps == 0 or offset.shape[1] % (2 * taps) or offset.shape[1] == 0:
        raise ValueError(
            f"offset.shape[1] ({offset.shape[1]}) must be a positive multiple of 2 * kernel_h * kernel_w "
            f"= {2 * taps} (kernel {kernel_h}x{kernel_w})"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if in_channels % offset_groups:
        raise ValueError(
            f"input channels ({in_channels}) must be divisible by offset_groups ({offset_groups} = "
            f"offset.shape[1] {offset.shape[1]} / {2 * taps})"
        )

    spec = DeformConvSpec(
        batch=batch,
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        offset_groups=offset_groups,
        has_mask=mask is not None,
        has_bias=bias is not None,
        dtype=dtype,
    )
    expected = {"offset": spec.offset_shape, "mask": spec.mask_shape, "bias": (out_channels,)}
    for name in ("offset", "mask", "bias"):
        tensor = named[name]
        if tensor is not None and tensor.shape != expected[name]:
            raise ValueError(
                f"{name} has shape {tensor.shape}, expected {expected[name]} for input "
                f"{input.shape}, weight {weight.shape}, stride {stride}, padding {padding}, "
                f"dilation {dilation}, offset_groups {offset_groups}"
            )
    return spec


# Specs of the signatures seen (validated ones only: an error is raised again on every call); up to
# _MAX_SIGNATURES, past which calls validate afresh.
_specs: dict[tuple, DeformConvSpec] = {}
_MAX_SIGNATURES = 4096
