"""Pure TE compute of deformable convolution (torchvision semantics), with named stages.

Stages (names are the block names schedules refer to):
  ``sampled`` - the bilinearly interpolated, mask-modulated input ("sampled columns"),
                shape ``[batch, in_channels, kernel_h, kernel_w, out_h, out_w]``
  ``weight_acc`` - the weights in the accumulate dtype (a cast; identity for float32/float64),
                shape ``[out_channels, in_channels // groups, kernel_h, kernel_w]``
  ``conv``    - the reduction over ``(in_channels // groups, kernel_h, kernel_w)``,
                shape ``[batch, out_channels, out_h, out_w]`` in the accumulate dtype
  ``output``  - bias added and cast to the tensor dtype, shape ``[batch, out_channels, out_h, out_w]``

Nothing here decides fusion, tiling or binding: those are schedule decisions (``schedules/``).
"""

from __future__ import annotations

from tvm import te, tirx

from .spec import DeformConvSpec, accumulate_dtype

STAGE_SAMPLED = "sampled"
STAGE_WEIGHT = "weight_acc"
STAGE_CONV = "conv"
STAGE_OUTPUT = "output"


def _bilinear(data, n, c, y, x, height: int, width: int, acc: str):
    """torchvision's ``bilinear_interpolate`` for one (batch, channel) plane.

    A sample contributes nothing when ``y <= -1 or y >= height or x <= -1 or x >= width``; NaN
    coordinates are not caught by that test, so, as in torchvision, they give NaN. Each of the four
    corners is read only when inside the image, and the index used for every load is clamped, so
    no coordinate (huge, infinite or NaN) can produce an out-of-range read.
    """
    outside = tirx.any(y <= -1, y >= height, x <= -1, x >= width)
    # floor() is taken of a value known to lie in (-1, size); NaN and out-of-range values map to 0
    # there, and the weights below are computed from the raw coordinate, so NaN propagates.
    y_low = tirx.floor(tirx.if_then_else(tirx.all(y > -1, y < height), y, tirx.const(0, acc))).astype("int32")
    x_low = tirx.floor(tirx.if_then_else(tirx.all(x > -1, x < width), x, tirx.const(0, acc))).astype("int32")
    ly = y - y_low.astype(acc)
    lx = x - x_low.astype(acc)
    hy = tirx.const(1, acc) - ly
    hx = tirx.const(1, acc) - lx

    def corner(yi, xi):
        inside = tirx.all(yi >= 0, yi <= height - 1, xi >= 0, xi <= width - 1)
        yc = tirx.max(tirx.min(yi, height - 1), 0)
        xc = tirx.max(tirx.min(xi, width - 1), 0)
        return tirx.if_then_else(inside, data[n, c, yc, xc].astype(acc), tirx.const(0, acc))

    value = (
        hy * hx * corner(y_low, x_low)
        + hy * lx * corner(y_low, x_low + 1)
        + ly * hx * corner(y_low + 1, x_low)
        + ly * lx * corner(y_low + 1, x_low + 1)
    )
    return tirx.if_then_else(outside, tirx.const(0, acc), value)


def deform_conv2d_te(spec: DeformConvSpec) -> tuple[list[te.Tensor], te.Tensor]:
    """Build the TE graph; returns ``(inputs, output)``.

    ``inputs`` is ``[input, offset, mask?, weight, bias?]`` (mask/bias only when the spec has
    them), which together with ``output`` is the argument order of every compiled kernel.
    """
    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    kh, kw = spec.kernel_h, spec.kernel_w
    taps = kh * kw
    channels_per_offset_group = spec.in_channels // spec.offset_groups
    in_per_group = spec.in_channels // spec.groups
    out_per_group = spec.out_channels // spec.groups
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = spec.stride, spec.padding, spec.dilation

    data = te.placeholder(spec.input_shape, dtype, name="input")
    offset = te.placeholder(spec.offset_shape, dtype, name="offset")
    mask = te.placeholder(spec.mask_shape, dtype, name="mask") if spec.has_mask else None
    weight = te.placeholder(spec.weight_shape, dtype, name="weight")
    bias = te.placeholder((spec.out_channels,), dtype, name="bias") if spec.has_bias else None

    def sample(n, c, ky, kx, oy, ox):
        group = c // channels_per_offset_group
        tap = ky * kw + kx
        dy = offset[n, group * 2 * taps + 2 * tap, oy, ox].astype(acc)
        dx = offset[n, group * 2 * taps + 2 * tap + 1, oy, ox].astype(acc)
        y = (oy * stride_h - pad_h + ky * dil_h).astype(acc) + dy
        x = (ox * stride_w - pad_w + kx * dil_w).astype(acc) + dx
        value = _bilinear(data, n, c, y, x, spec.height, spec.width, acc)
        if mask is not None:
            value = value * mask[n, group * taps + tap, oy, ox].astype(acc)
        return value

    sampled = te.compute(
        (spec.batch, spec.in_channels, kh, kw, spec.out_h, spec.out_w), sample, name=STAGE_SAMPLED
    )

    weight_acc = te.compute(spec.weight_shape, lambda *i: weight(*i).astype(acc), name=STAGE_WEIGHT)

    rc = te.reduce_axis((0, in_per_group), name="rc")
    rky = te.reduce_axis((0, kh), name="rky")
    rkx = te.reduce_axis((0, kw), name="rkx")
    conv = te.compute(
        spec.output_shape,
        lambda n, co, oy, ox: te.sum(
            sampled[n, co // out_per_group * in_per_group + rc, rky, rkx, oy, ox]
            * weight_acc[co, rc, rky, rkx],
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


def deform_conv2d_primfunc(spec: DeformConvSpec):
    """The compute as an unscheduled TIR PrimFunc in an IRModule (function name ``main``)."""
    import tvm

    inputs, output = deform_conv2d_te(spec)
    func = te.create_prim_func(inputs + [output]).with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func})
