"""The static description of one deformable-convolution call (a "workload")."""

from __future__ import annotations

import dataclasses
import functools

SUPPORTED_DTYPES = ("float32", "float64", "float16", "bfloat16")
LAYOUTS = ("NCHW", "NHWC")
INT32_MAX = 2**31 - 1


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch's output size of a convolution."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def accumulate_dtype(dtype: str) -> str:
    """The dtype sums and interpolation are computed in: float32 for the half types."""
    return "float64" if dtype == "float64" else "float32"


@dataclasses.dataclass(frozen=True)
class DeformConvSpec:
    """Shapes, hyper-parameters and dtype of one ``deform_conv2d`` call.

    Tensor shapes it describes (NCHW, torchvision's layout):
      input  ``[batch, in_channels, height, width]``
      offset ``[batch, 2 * offset_groups * kernel_h * kernel_w, out_h, out_w]``, (dy, dx) pairs
      mask   ``[batch, offset_groups * kernel_h * kernel_w, out_h, out_w]`` when ``has_mask``
      weight ``[out_channels, in_channels // groups, kernel_h, kernel_w]``
      bias   ``[out_channels]`` when ``has_bias``
      output ``[batch, out_channels, out_h, out_w]``

    ``layout`` is the layout a compiled kernel takes input and weight in: ``"NCHW"`` (as above),
    or ``"NHWC"`` (channels last: input ``[batch, height, width, in_channels]``, weight
    ``[out_channels, kernel_h, kernel_w, in_channels // groups]``, see ``kernel_input_shape`` and
    ``kernel_weight_shape``; torch's channels_last tensors permuted, no copy), which lets a GPU
    kernel read the channels of a sampling point or a weight row contiguously. The torch-facing
    shapes above do not depend on it.

    ``tf32`` (float32 only) lets a kernel multiply on TF32 tensor cores (operands with 10 mantissa
    bits, sums in float32), as torch's matmuls do when ``torch.backends.cuda.matmul.allow_tf32``.
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    has_mask: bool = True
    has_bias: bool = True
    dtype: str = "float32"
    layout: str = "NCHW"
    tf32: bool = False

    def __post_init__(self):
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype {self.dtype!r} is not supported; expected one of {SUPPORTED_DTYPES}")
        if self.tf32 and self.dtype != "float32":
            raise ValueError(f"tf32 applies to float32 only, got dtype {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not supported; expected one of {LAYOUTS}")
        non_negative = {"batch": self.batch, "padding": min(self.padding)}
        positive = {
            "in_channels": self.in_channels,
            "height": self.height,
            "width": self.width,
            "out_channels": self.out_channels,
            "kernel_h": self.kernel_h,
            "kernel_w": self.kernel_w,
            "stride": min(self.stride),
            "dilation": min(self.dilation),
            "groups": self.groups,
            "offset_groups": self.offset_groups,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must both be divisible by groups ({self.groups})"
            )
        if self.in_channels % self.offset_groups:
            raise ValueError(
                f"in_channels ({self.in_channels}) must be divisible by offset_groups ({self.offset_groups})"
            )
        if self.out_h <= 0 or self.out_w <= 0:
            raise ValueError(
                f"kernel {self.kernel_h}x{self.kernel_w} with dilation {self.dilation} does not fit the padded "
                f"input {self.height + 2 * self.padding[0]}x{self.width + 2 * self.padding[1]} "
                f"(input {self.height}x{self.width}, padding {self.padding}): output would be "
                f"{self.out_h}x{self.out_w}"
            )

    @property
    def out_h(self) -> int:
        if self.shape_generic:
            return self._out_sizes[0]
        return _out_size(self.height, self.kernel_h, self.stride[0], self.padding[0], self.dilation[0])

    @property
    def out_w(self) -> int:
        if self.shape_generic:
            return self._out_sizes[1]
        return _out_size(self.width, self.kernel_w, self.stride[1], self.padding[1], self.dilation[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def kernel_input_shape(self) -> tuple[int, ...]:
        """The input's shape as a compiled kernel takes it (``input_shape`` in ``layout``)."""
        if self.layout == "NHWC":
            return (self.batch, self.height, self.width, self.in_channels)
        return self.input_shape

    @property
    def kernel_weight_shape(self) -> tuple[int, ...]:
        """The weight's shape as a compiled kernel takes it (``weight_shape`` in ``layout``)."""
        if self.layout == "NHWC":
            return (self.out_channels, self.kernel_h, self.kernel_w, self.in_channels // self.groups)
        return self.weight_shape

    @property
    def offset_shape(self) -> tuple[int, ...]:
        return (self.batch, 2 * self.offset_groups * self.kernel_h * self.kernel_w, self.out_h, self.out_w)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return (self.batch, self.offset_groups * self.kernel_h * self.kernel_w, self.out_h, self.out_w)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_h, self.kernel_w)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def index_dtype(self) -> str:
        """``"int64"`` when an index space of the forward or backward kernels can pass 2**31 - 1,
        else ``"int32"`` (faster address arithmetic). The largest is the sampled corners' or the
        scatter's ``(batch, in_channels, kernel_h, kernel_w, out_h, out_w, 4)``; the tensors
        themselves are checked too, as a 1x1 kernel's corners can be fewer than the input's
        elements."""
        if self.shape_generic:  # calls whose sizes need int64 keep kernels of their own (schedules.shape_generic)
            return "int32"
        taps = self.kernel_h * self.kernel_w
        spaces = (
            self.batch * self.in_channels * taps * self.out_h * self.out_w * 4,
            self.batch * self.in_channels * self.height * self.width,
            self.batch * self.out_channels * self.out_h * self.out_w,
        )
        return "int64" if max(spaces) > INT32_MAX else "int32"

    _generic = False  # not a field: set on the specs generic_spec makes

    @property
    def shape_generic(self) -> bool:
        """Whether batch, height and width are TIR variables (``generic_spec``)."""
        return self._generic

    @property
    def flops(self) -> int:
        """Multiply-adds of the convolution part counted as 2 FLOPs each."""
        reduction = self.in_channels // self.groups * self.kernel_h * self.kernel_w
        return 2 * self.batch * self.out_channels * self.out_h * self.out_w * reduction

    def __hash__(self) -> int:  # the fields' hash, as dataclass's own, computed once: specs key the op's caches
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, field.name) for field in dataclasses.fields(self)))

    def __getstate__(self) -> dict:
        """The fields (and the cached key) without the cached hash: a string's hash differs between
        processes."""
        return {name: value for name, value in vars(self).items() if name != "_hash"}

    @functools.cached_property
    def _key(self) -> str:
        return (
            f"n{self.batch}_c{self.in_channels}_h{self.height}_w{self.width}_o{self.out_channels}"
            f"_k{self.kernel_h}x{self.kernel_w}_s{self.stride[0]}x{self.stride[1]}"
            f"_p{self.padding[0]}x{self.padding[1]}_d{self.dilation[0]}x{self.dilation[1]}"
            f"_g{self.groups}_og{self.offset_groups}_{'m' if self.has_mask else 'nm'}"
            f"{'b' if self.has_bias else 'nb'}_{self.dtype}"
            f"{'_nhwc' if self.layout == 'NHWC' else ''}{'_tf32' if self.tf32 else ''}"
        )

    def kernel_arguments(self, input, offset, mask, weight, bias) -> list:
        """The torch tensors of a call in a compiled kernel's parameter order (``input, offset,
        mask?, weight, bias?``, as ``compute.forward.deform_conv2d_te`` declares them; the output
        follows), contiguous, input and weight in ``layout`` (for ``"NHWC"`` channels last: no copy
        for torch channels_last tensors)."""
        if self.layout == "NHWC":
            input, weight = input.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
        return [t.contiguous() for t in (input, offset, mask, weight, bias) if t is not None]

    def key(self) -> str:
        """A short, stable, file-name-safe identifier of the workload."""
        return self._key

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (pairs as lists; a generic spec's size variables as
        their names)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.shape_generic:
            fields.update(GENERIC_DIMENSIONS)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    @classmethod
    def from_dict(cls, fields: dict) -> "DeformConvSpec":
        """Inverse of ``to_dict``: a layer configuration's dict (its sizes named ``N``, ``H``, ``W``)
        gives its ``generic_spec``."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        if any(values.get(name) == variable for name, variable in GENERIC_DIMENSIONS.items()):
            # any size that fits the kernel validates the configuration's other fields
            extent = [(values[f"kernel_{axis}"] - 1) * values.get("dilation", (1, 1))[i] + 1
                      for i, axis in enumerate("hw")]
            return generic_spec(cls(**{**values, "batch": 1, "height": extent[0], "width": extent[1]}))
        return cls(**values)


PARTS = ("forward", "backward", "columns", "fused_backward", "fused_backward_deterministic", "gather", "scatter",
         "channels_last", "channels_first_output")


def kernel_key(spec: DeformConvSpec, part: str = "forward") -> str:
    """The identifier of ``spec``'s ``part`` kernel (one of ``PARTS``): the spec's key for the
    forward, with ``_backward`` appended for the backward's gradient kernels, ``_columns`` for the
    unfused forward's columns kernel, ``_fused_backward`` (``_fused_backward_deterministic``) for
    the fused CUDA backward's host entry (its deterministic variant), ``_gather`` for the staged
    CUDA backward's grad_input (the sorted gather of deterministic calls), ``_scatter`` for the
    CPU backward's (the plane scatter), ``_channels_last`` for
    the channels-last copies of a channels-last forward's input and weight and
    ``_channels_first_output`` for an unfused forward's output transpose."""
    if part not in PARTS:
        raise ValueError(f"unknown kernel part {part!r}; expected one of {', '.join(PARTS)}")
    return spec.key() if part == "forward" else f"{spec.key()}_{part}"


GENERIC_DIMENSIONS = {"batch": "N", "height": "H", "width": "W"}  # field -> its variable's name (and in the key)
GENERIC_OUT_SIZES = ("OH", "OW")  # the output sizes' variables
GENERIC_SIZE_NAMES = (*GENERIC_DIMENSIONS.values(), *GENERIC_OUT_SIZES)


def generic_spec(spec: DeformConvSpec) -> DeformConvSpec:
    """The layer configuration of ``spec`` (channels, kernel, stride, padding, dilation, groups,
    offset groups, mask, bias, dtype, layout, TF32) with ``batch``, ``height`` and ``width`` as
    int32 TIR variables ``N``, ``H`` and ``W``: the compute builders take it to make one PrimFunc
    for every size, whose key (``nN_c.._hH_wW_..``) names the configuration. ``out_h`` and
    ``out_w`` are variables of their own, ``OH`` and ``OW`` (bound from the offset's or output's
    shape, which the front end checks against torch's output size): as expressions of ``H`` and
    ``W`` (``H - 2``) they fail TVM 0.27's iteration-map analysis of fused and split loops. Its
    shape properties are TIR expressions, its ``index_dtype`` int32: a call of ``spec``'s sizes
    may run on it only where ``spec.index_dtype`` is int32 too. Built from a validated spec, so not
    validated again (``__post_init__`` compares sizes). One object per configuration, so that it
    keys caches as a spec does (TIR variables compare and hash by identity)."""
    from tvm import tirx

    if spec.shape_generic:
        return spec
    configuration = tuple((f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)
                          if f.name not in GENERIC_DIMENSIONS)
    generic = _generic_specs.get(configuration)
    if generic is None:
        generic = object.__new__(DeformConvSpec)
        for name, value in configuration:
            object.__setattr__(generic, name, value)
        for name, variable in GENERIC_DIMENSIONS.items():
            object.__setattr__(generic, name, tirx.Var(variable, "int32"))
        object.__setattr__(generic, "_out_sizes", tuple(tirx.Var(name, "int32") for name in GENERIC_OUT_SIZES))
        object.__setattr__(generic, "_generic", True)
        generic = _generic_specs.setdefault(configuration, generic)
    return generic


_generic_specs: dict[tuple, DeformConvSpec] = {}
