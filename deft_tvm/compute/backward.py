"""Pure TE compute of the deformable-convolution backward (torchvision's gradient semantics, see
``deft_tvm.reference.backward``), with named stages.

Stages:
  ``grad_columns`` - weight^T @ grad_output per group, ``[batch, in_channels, kh, kw, out_h, out_w]``
  ``coord_index`` / ``coord_share`` - per sampling point the four corners' flat indices (-1 outside
                     the image, no test of the point itself) and mask * bilinear shares
  ``coord_fraction`` - per sampling point its fractional position (ly, lx) in its pixel
  ``coord_corner`` - the corner values per channel (zero outside)
  ``sampled_columns`` - the forward's interpolated samples times the mask (what grad_weight reduces)
  ``grad_offset``, ``grad_mask``, ``grad_weight``, ``grad_bias`` - the reductions
grad_input is a scatter of ``grad_columns * coord_share`` to the corners (TIR: TE has no scatter):
``scatter_primfunc`` over (batch, channel) planes on the CPU, or ``sorted_gather_primfunc`` per
pixel over the samples sorted by pixel (deterministic on CUDA); CUDA's atomic scatter is in
``schedules/cuda_backward.py``.
"""

from __future__ import annotations

from tvm import te, tirx

from deft_tvm.compute.sampling import CORNERS, bilinear_share, index_extents, sampling_coordinates
from deft_tvm.compute.spec import DeformConvSpec, accumulate_dtype


def deform_conv2d_backward_te(spec: DeformConvSpec):
    """Build the TE graph; returns ``(inputs, outputs)``: inputs ``[input, offset, mask?, weight,
    grad_output]`` (NCHW), outputs the stages ``grad_columns``, ``coord_index``, ``coord_share``
    (for the scatter), ``grad_offset``, ``grad_mask`` (with a mask), ``grad_weight`` (in the
    tensor dtype) and ``grad_bias_acc`` (accumulate dtype)."""
    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    taps = kh * kw
    cpg = spec.in_channels // og
    ipg, opg = spec.in_channels // g, spec.out_channels // g
    h, w = spec.height, spec.width
    point_shape = (spec.batch, og, kh, kw, spec.out_h, spec.out_w)

    data = te.placeholder(spec.input_shape, dtype, name="input")
    offset = te.placeholder(spec.offset_shape, dtype, name="offset")
    mask = te.placeholder(spec.mask_shape, dtype, name="mask") if spec.has_mask else None
    weight = te.placeholder(spec.weight_shape, dtype, name="weight")
    grad_out = te.placeholder(spec.output_shape, dtype, name="grad_output")

    coords = sampling_coordinates(spec, offset, acc)

    def low(v, size):
        """floor of v clamped to (-2, size + 1) (else -2): no conversion overflows; NaN -> -2."""
        safe = tirx.Select(tirx.all(v > -2, v < size + 1), v, tirx.const(-2, acc))
        return safe, tirx.floor(safe).astype("int32")

    def mask_at(n, gi, ky, kx, oy, ox):
        return mask[n, gi * taps + ky * kw + kx, oy, ox].astype(acc) if mask is not None else tirx.const(1, acc)

    def index(n, gi, ky, kx, oy, ox, k):
        y, x = coords(n, gi, ky, kx, oy, ox)
        _, yl = low(y, h)
        _, xl = low(x, w)
        yi, xi = yl + k // 2, xl + k % 2
        inside = tirx.all(yi >= 0, yi < h, xi >= 0, xi < w)
        return tirx.Select(inside, yi * w + xi, tirx.const(-1, "int32"))

    def fractions(n, gi, ky, kx, oy, ox):
        y, x = coords(n, gi, ky, kx, oy, ox)
        ys, yl = low(y, h)
        xs, xl = low(x, w)
        return ys - yl.astype(acc), xs - xl.astype(acc)

    coord_index = te.compute((*point_shape, CORNERS), index, name="coord_index")
    coord_fraction = te.compute(
        (*point_shape, 2), lambda n, gi, ky, kx, oy, ox, a: tirx.Select(a == 0, *fractions(n, gi, ky, kx, oy, ox)),
        name="coord_fraction")

    def fraction_at(n, gi, ky, kx, oy, ox):
        return coord_fraction[n, gi, ky, kx, oy, ox, 0], coord_fraction[n, gi, ky, kx, oy, ox, 1]

    def share(n, gi, ky, kx, oy, ox, k):
        ly, lx = fractions(n, gi, ky, kx, oy, ox)
        return bilinear_share(ly, lx, k, acc) * mask_at(n, gi, ky, kx, oy, ox)

    coord_share = te.compute((*point_shape, CORNERS), share, name="coord_share")

    def corner(n, c, ky, kx, oy, ox, k):
        flat = coord_index[n, c // cpg, ky, kx, oy, ox, k]
        safe = tirx.max(flat, 0)
        return tirx.Select(flat >= 0, data[n, c, safe // w, safe % w].astype(acc), tirx.const(0, acc))

    coord_corner = te.compute(
        (spec.batch, spec.in_channels, kh, kw, spec.out_h, spec.out_w, CORNERS), corner, name="coord_corner")

    ro = te.reduce_axis((0, opg), name="ro")
    grad_columns = te.compute(
        (spec.batch, spec.in_channels, kh, kw, spec.out_h, spec.out_w),
        lambda n, c, ky, kx, oy, ox: te.sum(
            weight[c // ipg * opg + ro, c % ipg, ky, kx].astype(acc) * grad_out[n, c // ipg * opg + ro, oy, ox].astype(acc),
            axis=ro),
        name="grad_columns")

    def outside(n, gi, ky, kx, oy, ox):
        y, x = coords(n, gi, ky, kx, oy, ox)
        return tirx.any(y <= -1, y >= h, x <= -1, x >= w)

    def nan_point(n, gi, ky, kx, oy, ox):
        y, x = coords(n, gi, ky, kx, oy, ox)
        return tirx.any(tirx.isnan(y), tirx.isnan(x))

    rj = te.reduce_axis((0, cpg), name="rj")

    def d_offset(n, ch, oy, ox):
        gi, rest = ch // (2 * taps), ch % (2 * taps)
        tap, d = rest // 2, rest % 2
        ky, kx = tap // kw, tap % kw
        c = gi * cpg + rj
        ly, lx = fraction_at(n, gi, ky, kx, oy, ox)
        v = [coord_corner[n, c, ky, kx, oy, ox, k] for k in range(CORNERS)]
        along_y = lx * (v[3] - v[1]) + (1 - lx) * (v[2] - v[0])
        along_x = ly * (v[3] - v[2]) + (1 - ly) * (v[1] - v[0])
        term = grad_columns[n, c, ky, kx, oy, ox] * mask_at(n, gi, ky, kx, oy, ox) * tirx.Select(d == 0, along_y, along_x)
        return te.sum(tirx.Select(nan_point(n, gi, ky, kx, oy, ox), tirx.const(float("nan"), acc), term), axis=rj)

    grad_offset_acc = te.compute(spec.offset_shape, d_offset, name="grad_offset_acc")
    grad_offset = te.compute(spec.offset_shape, lambda *i: grad_offset_acc(*i).astype(dtype), name="grad_offset")

    def interpolated(n, c, ky, kx, oy, ox):
        gi = c // cpg
        ly, lx = fraction_at(n, gi, ky, kx, oy, ox)
        terms = [coord_corner[n, c, ky, kx, oy, ox, k] * bilinear_share(ly, lx, k, acc) for k in range(CORNERS)]
        value = terms[0] + terms[1] + terms[2] + terms[3]
        value = tirx.Select(nan_point(n, gi, ky, kx, oy, ox), tirx.const(float("nan"), acc), value)
        return tirx.Select(outside(n, gi, ky, kx, oy, ox), tirx.const(0, acc), value)

    outputs = []
    if mask is not None:
        rm = te.reduce_axis((0, cpg), name="rm")

        def d_mask(n, ch, oy, ox):
            gi, tap = ch // taps, ch % taps
            ky, kx = tap // kw, tap % kw
            c = gi * cpg + rm
            return te.sum(grad_columns[n, c, ky, kx, oy, ox] * interpolated(n, c, ky, kx, oy, ox), axis=rm)

        grad_mask_acc = te.compute(spec.mask_shape, d_mask, name="grad_mask_acc")
        outputs.append(te.compute(spec.mask_shape, lambda *i: grad_mask_acc(*i).astype(dtype), name="grad_mask"))

    rn = te.reduce_axis((0, spec.batch), name="rn")
    ry = te.reduce_axis((0, spec.out_h), name="ry")
    rx = te.reduce_axis((0, spec.out_w), name="rx")

    sampled_columns = te.compute(
        grad_columns.shape,
        lambda n, c, ky, kx, oy, ox: interpolated(n, c, ky, kx, oy, ox) * mask_at(n, c // cpg, ky, kx, oy, ox),
        name="sampled_columns")

    def d_weight(o, i, ky, kx):
        c = o // opg * ipg + i
        return te.sum(grad_out[rn, o, ry, rx].astype(acc) * sampled_columns[rn, c, ky, kx, ry, rx], axis=[rn, ry, rx])

    grad_weight_acc = te.compute(spec.weight_shape, d_weight, name="grad_weight_acc")
    grad_weight = te.compute(spec.weight_shape, lambda *i: grad_weight_acc(*i).astype(dtype), name="grad_weight")
    bn = te.reduce_axis((0, spec.batch), name="bn")
    by = te.reduce_axis((0, spec.out_h), name="by")
    bx = te.reduce_axis((0, spec.out_w), name="bx")
    grad_bias = te.compute((spec.out_channels,), lambda o: te.sum(grad_out[bn, o, by, bx].astype(acc), axis=[bn, by, bx]),
                           name="grad_bias_acc")
    inputs = [t for t in (data, offset, mask, weight, grad_out) if t is not None]
    return inputs, [grad_columns, coord_index, coord_share, grad_offset, *outputs, grad_weight, grad_bias]


def deform_conv2d_backward_primfunc(spec: DeformConvSpec):
    """Every stage of ``deform_conv2d_backward_te`` as one unscheduled TIR PrimFunc in an IRModule
    (function name ``main``; parameters: its inputs, then its outputs)."""
    import tvm

    inputs, outputs = deform_conv2d_backward_te(spec)
    func = te.create_prim_func(inputs + outputs, index_dtype_override=spec.index_dtype)
    func = func.with_attr("global_symbol", "main")
    return tvm.IRModule({"main": func})


def scatter_primfunc(spec: DeformConvSpec):
    """grad_input (``[batch, in_channels, height, width]`` in the accumulate dtype) as the scatter
    of ``grad_columns * coord_share`` to the corners in ``coord_index``; each (batch, channel)
    plane is written by its own samples only, so its loop can run in parallel without atomics and
    the sums are deterministic. For a ``generic_spec`` the sizes are its variables, bound by
    grad_input's shape."""
    from tvm.script import tirx as T

    acc = accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    kh, kw, og, oh, ow = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.out_h, spec.out_w
    cpg = c // og
    n, c, h, w, pixels, planes = index_extents(spec, n, c, h, w, h * w, n * c)

    @T.prim_func
    def scatter(
        grad_columns: T.Buffer((n, c, kh, kw, oh, ow), acc),
        coord_index: T.Buffer((n, og, kh, kw, oh, ow, 4), "int32"),
        coord_share: T.Buffer((n, og, kh, kw, oh, ow, 4), acc),
        grad_input_planes: T.Buffer((n, c, h, w), acc),
    ):
        T.func_attr({"global_symbol": "scatter", "tirx.noalias": True})
        grad_input = T.decl_buffer((n, c, pixels), acc, data=grad_input_planes.data)  # the planes flat
        for plane in T.parallel(planes):
            for i in range(pixels):
                grad_input[plane // c, plane % c, i] = T.cast(0, acc)
            for ky, kx, oy, ox, k in T.grid(kh, kw, oh, ow, 4):
                index = coord_index[plane // c, plane % c // cpg, ky, kx, oy, ox, k]
                if index >= 0:
                    grad_input[plane // c, plane % c, index] = grad_input[plane // c, plane % c, index] + (
                        grad_columns[plane // c, plane % c, ky, kx, oy, ox]
                        * coord_share[plane // c, plane % c // cpg, ky, kx, oy, ox, k])

    return scatter


def sorted_gather_primfunc(spec: DeformConvSpec, threads: int | None = None):
    """grad_input (in the accumulate dtype) without atomics and deterministic on any device: every
    input pixel sums, in a fixed order, the shares of the samples that touch it.

    ``gather(grad_columns [batch, in_channels, kh, kw, out_h, out_w], coord_share [batch,
    offset_groups, kh, kw, out_h, out_w, 4], order, grad_input [batch, in_channels, height, width],
    starts)``: for each (batch, offset group) the corner entries ``e = ((ky * kw + kx) * out_h *
    out_w + oy * out_w + ox) * 4 + corner`` are stably sorted by the pixel they touch (``order
    [batch, offset_groups, kh * kw * out_h * out_w * 4]``, int32; entries outside the image sort
    last), and ``starts[n, g, p]`` (``[batch, offset_groups, height * width + 1]``, int32) is the
    first sorted entry of pixel ``p``. One thread per (batch, channel, pixel): ``threads`` per CUDA
    block, or a parallel CPU loop when ``None``. For a ``generic_spec`` the sizes are its
    variables, bound by grad_columns' and grad_input's shapes (so grad_input comes before
    starts)."""
    from tvm.script import tirx as T

    acc = accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    kh, kw, og, oh, ow = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.out_h, spec.out_w
    cpg = c // og
    cpu = threads is None  # a Python constant: TVMScript keeps only the branch it selects
    threads = threads or 1
    samples = kh * kw * oh * ow
    n, c, h, w, oh, ow, pixels, samples, entries, total = index_extents(
        spec, n, c, h, w, oh, ow, h * w, samples, samples * CORNERS, n * c * h * w)
    blocks = (total + threads - 1) // threads

    @T.macro
    def pixel_sum(i, grad_columns, coord_share, order, starts, grad_input):
        b = i // (c * pixels)
        ch = i // pixels % c
        p = i % pixels
        g = ch // cpg
        value = T.cast(0, acc)
        for s in range(starts[b, g, p], starts[b, g, p + 1]):
            value = value + grad_columns[b, ch, order[b, g, s] // CORNERS] * coord_share[b, g, order[b, g, s]]
        grad_input[b, ch, p] = value

    @T.prim_func
    def gather(
        grad_columns_taps: T.Buffer((n, c, kh, kw, oh, ow), acc),
        coord_share_taps: T.Buffer((n, og, kh, kw, oh, ow, CORNERS), acc),
        order: T.Buffer((n, og, entries), "int32"),
        grad_input_planes: T.Buffer((n, c, h, w), acc),
        starts: T.Buffer((n, og, pixels + 1), "int32"),
    ):
        T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
        grad_columns = T.decl_buffer((n, c, samples), acc, data=grad_columns_taps.data)  # flat views
        coord_share = T.decl_buffer((n, og, entries), acc, data=coord_share_taps.data)
        grad_input = T.decl_buffer((n, c, pixels), acc, data=grad_input_planes.data)
        if cpu:
            for i in T.parallel(total):
                pixel_sum(i, grad_columns, coord_share, order, starts, grad_input)
        else:
            for block in T.thread_binding(blocks, thread="blockIdx.x"):
                for thread in T.thread_binding(threads, thread="threadIdx.x"):
                    if block * threads + thread < total:
                        pixel_sum(block * threads + thread, grad_columns, coord_share, order, starts, grad_input)

    return gather
