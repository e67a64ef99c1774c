"""Pure TE compute of deformable convolution (torchvision semantics), with named stages.

Stages (names are the block names schedules refer to):
  ``sample_position`` - a layer configuration's only (``spec.shape_generic``): the image, row and
                      column of every output position, int32 ``[batch, out_h, out_w, 3]``, which
                      the sampling stages index offsets, mask and input through
  ``sample_index``  - per sampling point, the flat in-plane index (``y * width + x``) of each of
                      the four bilinear corners, or -1 where the corner contributes nothing,
                      int32 of shape ``[batch, offset_groups, kernel_h, kernel_w, out_h, out_w, 4]``
  ``sample_weight`` - per sampling point, the four bilinear weights times the mask (0 when the
                      point is outside the image), same shape, in the accumulate dtype
  ``sample_corner`` - the four corner values of every (channel, sampling point), read at the
                      clamped index (every read is in range, whatever the offsets),
                      shape ``[batch, in_channels, kernel_h, kernel_w, out_h, out_w, 4]``
  ``sampled``       - the bilinearly interpolated, mask-modulated input ("sampled columns"),
                      interpolated in the accumulate dtype and rounded to the tensor dtype (as
                      torchvision's columns buffer is; tensor cores take half-type operands),
                      shape ``[batch, in_channels, kernel_h, kernel_w, out_h, out_w]``
  ``weight_acc``    - the weights in the accumulate dtype (a cast; identity for float32/float64),
                      shape ``[out_channels, in_channels // groups, kernel_h, kernel_w]``
  ``conv``          - the reduction over ``(in_channels // groups, kernel_h, kernel_w)``,
                      shape ``[batch, out_channels, out_h, out_w]`` in the accumulate dtype
  ``output``        - bias added and cast to the tensor dtype, shape ``[batch, out_channels, out_h, out_w]``

The columns kernel (``deform_columns_te``, the unfused forward's first half) shares the sampling
stages and ends in ``columns``, ``sampled`` transposed to ``[batch, out_h, out_w, kernel_h,
kernel_w, in_channels]``.

The sampling point is its own pair of stages because it depends on (offset group, tap, position)
but not on the channel: a schedule can compute it once and reuse it for every channel of the group.
The corner reads are their own stage so that a schedule can issue them unconditionally (the choice
between a corner's value and zero then selects between registers instead of guarding the load).

Nothing here decides fusion, tiling or binding: those are schedule decisions (``schedules/``).
"""

from __future__ import annotations

from tvm import te, tirx

from deft_tvm.compute.sampling import CORNERS, bilinear_share, sampling_coordinates
from deft_tvm.compute.spec import DeformConvSpec, accumulate_dtype

STAGE_POSITION = "sample_position"
STAGE_INDEX = "sample_index"
STAGE_POINT_WEIGHT = "sample_weight"
STAGE_CORNER = "sample_corner"
STAGE_SAMPLED = "sampled"
STAGE_WEIGHT = "weight_acc"
STAGE_CONV = "conv"
STAGE_OUTPUT = "output"
STAGE_COLUMNS = "columns"

def _bilinear_point(y, x, corner, height: int, width: int, acc: str, index: bool):
    """torchvision's ``bilinear_interpolate`` split per corner: the flat index of ``corner``
    (0: low y low x, 1: low y high x, 2: high y low x, 3: high y high x; -1 when the corner does
    not contribute) if ``index``, else its weight.

    A point contributes nothing when ``y <= -1 or y >= height or x <= -1 or x >= width`` (all its
    indices are -1 and weights 0); NaN coordinates are not caught by that test, so, as in
    torchvision, their weights and the result are NaN. ``floor`` is taken of a value known to lie
    in (-1, size): NaN and out-of-range coordinates map to 0 there, so no conversion overflows.
    """
    outside = tirx.any(y <= -1, y >= height, x <= -1, x >= width)
    y_low = tirx.floor(tirx.Select(tirx.all(y > -1, y < height), y, tirx.const(0, acc))).astype("int32")
    x_low = tirx.floor(tirx.Select(tirx.all(x > -1, x < width), x, tirx.const(0, acc))).astype("int32")
    if index:
        yi, xi = y_low + corner // 2, x_low + corner % 2
        inside = tirx.all(tirx.Not(outside), yi >= 0, yi <= height - 1, xi >= 0, xi <= width - 1)
        return tirx.Select(inside, yi * width + xi, tirx.const(-1, "int32"))
    share = bilinear_share(y - y_low.astype(acc), x - x_low.astype(acc), corner, acc)
    return tirx.Select(outside, tirx.const(0, acc), share)


def _positions(spec: DeformConvSpec):
    """``(n, oy, ox) -> (image, row, column)``: the output position whose offsets, mask and input
    the sampling stages of ``(n, oy, ox)`` read. A layer configuration's (``spec.shape_generic``)
    come from stage ``sample_position`` (each output position's image, row and column, int32
    ``[batch, out_h, out_w, 3]``), which a schedule that tiles flat positions can compute once per
    block instead of dividing each flat position by the run-time sizes again at every tap; a kernel
    of one size indexes by ``(n, oy, ox)`` itself."""
    if not spec.shape_generic:
        return lambda n, oy, ox: (n, oy, ox)
    position = te.compute(
        (spec.batch, spec.out_h, spec.out_w, 3),
        lambda n, oy, ox, k: tirx.Select(k == 0, n, tirx.Select(k == 1, oy, ox)), name=STAGE_POSITION)
    return lambda n, oy, ox: (position[n, oy, ox, 0], position[n, oy, ox, 1], position[n, oy, ox, 2])


def sampled_te(spec: DeformConvSpec, data: te.Tensor, offset: te.Tensor, mask: te.Tensor | None) -> te.Tensor:
    """The stages ``sample_index`` .. ``sampled`` over ``data`` (``spec.kernel_input_shape``, in
    ``spec.layout``), ``offset`` and ``mask`` (None without one): the ``sampled`` tensor,
    ``[batch, in_channels, kernel_h, kernel_w, out_h, out_w]`` of ``spec.dtype``."""
    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    kh, kw = spec.kernel_h, spec.kernel_w
    taps = kh * kw
    channels_per_offset_group = spec.in_channels // spec.offset_groups
    point_shape = (spec.batch, spec.offset_groups, kh, kw, spec.out_h, spec.out_w, CORNERS)
    coordinates = sampling_coordinates(spec, offset, acc)
    at = _positions(spec)

    def point(n, g, ky, kx, oy, ox, corner, index):
        image, row, column = at(n, oy, ox)
        y, x = coordinates(image, g, ky, kx, row, column)
        return _bilinear_point(y, x, corner, spec.height, spec.width, acc, index)

    def point_weight(n, g, ky, kx, oy, ox, corner):
        value = point(n, g, ky, kx, oy, ox, corner, index=False)
        if mask is not None:
            image, row, column = at(n, oy, ox)
            value = value * mask[image, g * taps + ky * kw + kx, row, column].astype(acc)
        return value

    sample_index = te.compute(
        point_shape, lambda *i: point(*i, index=True), name=STAGE_INDEX
    )
    sample_weight = te.compute(point_shape, point_weight, name=STAGE_POINT_WEIGHT)

    def corner_value(n, c, ky, kx, oy, ox, corner):
        flat = tirx.max(sample_index[n, c // channels_per_offset_group, ky, kx, oy, ox, corner], 0)
        image = at(n, oy, ox)[0]
        if spec.layout == "NHWC":
            return data[image, flat // spec.width, flat % spec.width, c]
        return data[image, c, flat // spec.width, flat % spec.width]

    sample_corner = te.compute(
        (spec.batch, spec.in_channels, kh, kw, spec.out_h, spec.out_w, CORNERS), corner_value,
        name=STAGE_CORNER,
    )

    def sample(n, c, ky, kx, oy, ox):
        g = c // channels_per_offset_group
        terms = [
            tirx.Select(
                sample_index[n, g, ky, kx, oy, ox, k] >= 0,
                sample_corner[n, c, ky, kx, oy, ox, k].astype(acc),
                tirx.const(0, acc),
            )
            * sample_weight[n, g, ky, kx, oy, ox, k]
            for k in range(CORNERS)
        ]
        return (terms[0] + terms[1] + terms[2] + terms[3]).astype(dtype)

    return te.compute(
        (spec.batch, spec.in_channels, kh, kw, spec.out_h, spec.out_w), sample, name=STAGE_SAMPLED
    )


def _placeholders(spec: DeformConvSpec):
    """The kernel's input placeholders ``input, offset, mask?, weight, bias?`` (None if absent)."""
    dtype = spec.dtype
    data = te.placeholder(spec.kernel_input_shape, dtype, name="input")
    offset = te.placeholder(spec.offset_shape, dtype, name="offset")
    mask = te.placeholder(spec.mask_shape, dtype, name="mask") if spec.has_mask else None
    weight = te.placeholder(spec.kernel_weight_shape, dtype, name="weight")
    bias = te.placeholder((spec.out_channels,), dtype, name="bias") if spec.has_bias else None
    return data, offset, mask, weight, bias


def deform_conv2d_te(spec: DeformConvSpec) -> tuple[list[te.Tensor], te.Tensor]:
    """Build the TE graph; returns ``(inputs, output)``.

    ``inputs`` is ``[input, offset, mask?, weight, bias?]`` (mask/bias only when the spec has
    them; input and weight in ``spec.layout``), which together with ``output`` is the argument
    order of every compiled kernel.
    """
    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    kh, kw = spec.kernel_h, spec.kernel_w
    in_per_group = spec.in_channels // spec.groups
    out_per_group = spec.out_channels // spec.groups
    data, offset, mask, weight, bias = _placeholders(spec)
    sampled = sampled_te(spec, data, offset, mask)

    def weight_value(co, rc, ky, kx):
        if spec.layout == "NHWC":
            return weight[co, ky, kx, rc].astype(acc)
        return weight[co, rc, ky, kx].astype(acc)

    weight_acc = te.compute(spec.weight_shape, weight_value, name=STAGE_WEIGHT)

    rc = te.reduce_axis((0, in_per_group), name="rc")
    rky = te.reduce_axis((0, kh), name="rky")
    rkx = te.reduce_axis((0, kw), name="rkx")

    def channel(co):
        """The input channel of reduction index rc for output channel co (its group's). A layer
        configuration of one group indexes it as rc, an einsum (``pad_einsum`` needs one); per-size
        kernels keep the expression their tuning records were taken on (records match by hash)."""
        if spec.groups == 1 and spec.shape_generic:
            return rc
        return co // out_per_group * in_per_group + rc

    conv = te.compute(
        spec.output_shape,
        lambda n, co, oy, ox: te.sum(
            weight_acc[co, rc, rky, rkx] * sampled[n, channel(co), rky, rkx, oy, ox].astype(acc),
            axis=[rc, rky, rkx],
        ),
        name=STAGE_CONV,
    )

    def finish(n, co, oy, ox):
        value = conv[n, co, oy, ox]
        if bias is not None:
            value = value + bias[co].astype(acc)
        return value.astype(dtype)

    output = te.compute(spec.output_shape, finish, name=STAGE_OUTPUT)
    inputs = [t for t in (data, offset, mask, weight, bias) if t is not None]
    return inputs, output


def _main_module(spec: DeformConvSpec, inputs: list[te.Tensor], output: te.Tensor):
    """``inputs`` and ``output`` as an unscheduled TIR PrimFunc ``main`` in an IRModule, indexed in
    ``spec.index_dtype``."""
    import tvm

    func = te.create_prim_func(inputs + [output], index_dtype_override=spec.index_dtype)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def deform_conv2d_primfunc(spec: DeformConvSpec):
    """The compute as an unscheduled TIR PrimFunc in an IRModule (function name ``main``), indexed
    in ``spec.index_dtype``."""
    return _main_module(spec, *deform_conv2d_te(spec))


def deform_columns_te(spec: DeformConvSpec) -> tuple[list[te.Tensor], te.Tensor]:
    """The sampled columns as a GEMM operand; returns ``(inputs, columns)``.

    ``inputs`` is ``[input, offset, mask?]`` (input in ``spec.layout``); ``columns`` (stage
    ``columns``) is ``sampled`` transposed to ``[batch, out_h, out_w, kernel_h, kernel_w,
    in_channels]`` of ``spec.dtype``: row ``(n, oy, ox)`` of the ``[batch * out_h * out_w,
    kernel_h * kernel_w * in_channels]`` matrix whose product with the channels-last weight
    ``[out_channels, kernel_h * kernel_w * in_channels]`` transposed is the convolution
    (torchvision's columns buffer, ``deformable_im2col``, transposed; groups == 1).
    """
    data, offset, mask, _, _ = _placeholders(spec)
    sampled = sampled_te(spec, data, offset, mask)
    columns = te.compute(
        (spec.batch, spec.out_h, spec.out_w, spec.kernel_h, spec.kernel_w, spec.in_channels),
        lambda n, oy, ox, ky, kx, c: sampled[n, c, ky, kx, oy, ox],
        name=STAGE_COLUMNS,
    )
    return [t for t in (data, offset, mask) if t is not None], columns


def deform_columns_primfunc(spec: DeformConvSpec):
    """``deform_columns_te`` as an unscheduled TIR PrimFunc in an IRModule (``main``)."""
    return _main_module(spec, *deform_columns_te(spec))
