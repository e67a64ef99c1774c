"""The fused CUDA backward (atomic mode): no global columns buffer, no per-sample tables.

Two hand-scheduled TIR kernels (TVMScript) and a small reduction replace the staged backward of
``cuda_backward.py`` when atomics are allowed; the math is ``deft_tvm.compute.backward``'s
(torchvision's gradients), the fusion, staging and tiling are decided here:

* ``grad_data_primfunc`` - grad_input, grad_offset and grad_mask. A thread block owns one output
  tile (``tile_h x tile_w`` positions, one thread each) of one (image, offset group) and a range
  of the group's channels (``channel_splits`` blocks share a group's channels). Per chunk of
  ``chunk`` channels it stages the input patch the tile samples (the tile's receptive field plus
  ``halo`` px on each side) in shared memory and zeroes a grad_input patch of the same size; then
  per kernel tap each thread computes its position's grad_columns for the chunk (weight^T .
  grad_output over the group's output channels, weights staged in shared memory ``o_step``
  output channels at a time, sums in registers), its sampling point once, and per channel the
  four corners (from the patch; a corner outside it reads global memory): the bilinear
  derivatives times the column go to grad_offset, the interpolated value times the column to
  grad_mask (both summed over channels in registers), the column times the mask and bilinear
  share to the grad_input patch (shared-memory atomics; outside it, global atomics). The patch is
  added to grad_input once per chunk with global atomics. grad_offset and grad_mask are written
  per channel split (``[channel_splits, ...]``, float sums) and added up by the caller.
* ``grad_weight_primfunc`` - grad_weight (and grad_bias, folded in) as partial sums per split of
  the (batch x positions) reduction: a block owns ``o_threads * o_regs`` output channels x
  ``c_threads * c_regs`` input channels of one tap; per step of ``positions`` flat positions it
  computes their sampling points once into shared memory, interpolates its channels' samples
  (times the mask) into shared memory, stages grad_output's step, and each thread accumulates an
  ``o_regs x c_regs`` outer product in registers. grad_bias is the row sums of the staged
  grad_output, taken by the blocks of tap 0 and the first channel tile.
* ``weight_reduce_primfunc`` - adds the splits in a fixed order (deterministic) and casts.

grad_input's order of additions varies between runs (atomics); the deterministic mode keeps the
staged backward with the sorted gather. Corners that are outside the image are skipped; NaN
sampling points give torchvision's NaN gradients; every read is in bounds whatever the offsets.
"""

from __future__ import annotations

import dataclasses
import math

from tvm import tirx

from deft_tvm.compute.sampling import index_extents
from deft_tvm.compute.spec import DeformConvSpec, accumulate_dtype
from deft_tvm.schedules.cuda import largest_divisor

SHARED_BYTES = 48 * 1024  # static shared memory per block every sm_70+ GPU allows
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Tile shapes (rows, columns) of 128 positions, in order of preference.
TILE_SHAPES = ((8, 16), (4, 32), (16, 8), (2, 64))
# Blocks a grid should have to fill an H200 (132 SMs) a few times over.
TARGET_BLOCKS = 4 * 132


@dataclasses.dataclass(frozen=True)
class DataTiling:
    """Tiles of ``grad_data_primfunc``: output positions per block (rows x columns, one thread
    each), halo around the receptive field in px, channels per chunk, output channels per weight
    stage, blocks sharing an offset group's channels, and whether the input and grad_input patches
    are staged in shared memory (else every corner goes through global memory)."""

    tile_h: int
    tile_w: int
    halo: int
    chunk: int
    o_step: int
    channel_splits: int
    staged: bool = True

    def patch(self, spec: DeformConvSpec) -> tuple[int, int]:
        """Rows and columns of the staged input patch: the tile's receptive field plus the halo
        on each side, and one more row / column for the bilinear high corner."""
        rows = (self.tile_h - 1) * spec.stride[0] + (spec.kernel_h - 1) * spec.dilation[0] + 2 * self.halo + 2
        cols = (self.tile_w - 1) * spec.stride[1] + (spec.kernel_w - 1) * spec.dilation[1] + 2 * self.halo + 2
        return rows, cols

    def shared_bytes(self, spec: DeformConvSpec) -> int:
        rows, cols = self.patch(spec)
        acc = DTYPE_BYTES[accumulate_dtype(spec.dtype)]
        patches = self.chunk * rows * cols * (DTYPE_BYTES[spec.dtype] + acc) if self.staged else 0
        return patches + self.o_step * self.chunk * acc

    @classmethod
    def for_spec(cls, spec: DeformConvSpec, halo: int = 4) -> "DataTiling":
        """128 positions per block in the tile shape that pads the output least (of equals, the
        first of ``TILE_SHAPES``), a ``halo`` px halo, 8-channel chunks, 64 output channels per
        weight stage (fewer channels, then a smaller halo, where shared memory would pass 48 KB),
        and channel splits until the grid has about ``TARGET_BLOCKS`` blocks. Measured on an H200
        (fp16 data kernel of paper N=32, ms): 8 x 16 tiles 1.51 (1.57 with 32-channel weight
        stages), 16 x 16 1.53, 8 x 32 with 32-channel stages 1.56; staging grad_output in shared memory once per chunk
        instead of reading it per tap cost up to 1.5x (2.29 ms; r50 c3 1.41 vs 1.45, video 0.83
        vs 0.70 ms), as it leaves room for fewer channels per chunk and fewer blocks per SM."""
        def padded(shape):
            th, tw = shape
            return -(-spec.out_h // th) * th * -(-spec.out_w // tw) * tw

        tile_h, tile_w = min(TILE_SHAPES, key=padded)  # the first of equals
        per_group = math.gcd(spec.in_channels // spec.groups, spec.in_channels // spec.offset_groups)
        o_step = largest_divisor(spec.out_channels // spec.groups, 64)
        fitting = (cls(tile_h, tile_w, h, chunk, o_step, 1) for h in range(halo, -1, -1)
                   for chunk in range(8, 0, -1) if per_group % chunk == 0)
        tiling = next(t for t in fitting if t.shared_bytes(spec) <= SHARED_BYTES)
        chunks = spec.in_channels // spec.offset_groups // tiling.chunk
        tiles = spec.batch * spec.offset_groups * -(-spec.out_h // tile_h) * -(-spec.out_w // tile_w)
        splits = min((d for d in range(1, chunks + 1) if chunks % d == 0 and tiles * d >= TARGET_BLOCKS),
                     default=chunks)
        return dataclasses.replace(tiling, channel_splits=splits)


@dataclasses.dataclass(frozen=True)
class WeightTiling:
    """Tiles of ``grad_weight_primfunc``: threads and registers per output and input channel,
    flat positions per step, and splits of the (batch x positions) reduction."""

    o_threads: int
    o_regs: int
    c_threads: int
    c_regs: int
    positions: int
    splits: int

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "WeightTiling":
        """Up to 64 x 64 channels per block, on 16 x 16 threads with 4 x 4 registers and splits
        until the grid has about ``TARGET_BLOCKS`` blocks for groups of up to 64 output channels,
        on 8 x 16 threads with 8 x 4 registers and about twice the blocks for wider ones; 64
        positions per step. Measured on an H200 (fp16, ms): 0.76 / 0.41 on paper N=32 / video
        (0.94 / 0.86 on r50 c3 / c5) against 1.04 / 0.48 (1.28 / 0.95) the other way round."""
        opg, ipg = spec.out_channels // spec.groups, spec.in_channels // spec.groups
        wide = opg > 64
        o_regs, c_regs = largest_divisor(opg, 8 if wide else 4), largest_divisor(ipg, 4)
        o_threads = largest_divisor(opg // o_regs, 8 if wide else 16)
        c_threads = largest_divisor(ipg // c_regs, 16)
        tiles = spec.kernel_h * spec.kernel_w * (spec.out_channels // (o_threads * o_regs)) * (
            ipg // (c_threads * c_regs))
        steps = -(-spec.batch * spec.out_h * spec.out_w // 64)
        splits = max(1, min(steps, -(-(2 if wide else 1) * TARGET_BLOCKS // tiles)))
        per_split = -(-steps // splits)
        return cls(o_threads, o_regs, c_threads, c_regs, 64, -(-steps // per_split))  # no empty split

    def steps(self, spec: DeformConvSpec) -> int:
        """Steps of ``positions`` each split takes."""
        return -(-spec.batch * spec.out_h * spec.out_w // (self.positions * self.splits))


def grad_data_primfunc(spec: DeformConvSpec, tiling: DataTiling):
    """grad_input (accumulate dtype, NCHW with the plane flattened, zeroed by the caller; added to
    with atomics), grad_offset and grad_mask per channel split (accumulate dtype, ``[channel_splits,
    *offset_shape]`` and ``[channel_splits, *mask_shape]``), see the module docstring. Parameters:
    ``input [N, C, H * W], offset, mask?, weight, grad_output`` (NCHW, the spec's dtype), then the
    three outputs."""
    from tvm.script import tirx as T

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    o_ch, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    taps = kh * kw
    cpg, ipg, opg = c // og, c // g, o_ch // g
    (sh, sw), (pad_h, pad_w), (dh, dw) = spec.stride, spec.padding, spec.dilation
    th, tw, halo, chunk, o_step, splits = (tiling.tile_h, tiling.tile_w, tiling.halo, tiling.chunk, tiling.o_step,
                                           tiling.channel_splits)
    if cpg % (chunk * splits) or ipg % chunk or opg % o_step:
        raise ValueError(f"{tiling} does not divide the layer's channels (per offset group {cpg}, "
                         f"per group {ipg} in / {opg} out)")
    staged = tiling.staged
    rows, cols = tiling.patch(spec)
    patch = rows * cols if staged else 1
    threads = th * tw
    tiles_y, tiles_x = -(-oh // th), -(-ow // tw)
    chunks_per_split = cpg // chunk // splits
    has_mask = spec.has_mask
    blocks = n * og * tiles_y * tiles_x * splits
    n, c, pixels, blocks = index_extents(spec, n, c, h * w, blocks)
    nan, zero, one, below = (tirx.const(v, acc) for v in (float("nan"), 0, 1, -2))

    @T.macro
    def body(block, thread, input, offset, mask, weight, grad_output, grad_input, grad_offset, grad_mask):
        split = block % splits
        tile_x = block // splits % tiles_x
        tile_y = block // (splits * tiles_x) % tiles_y
        gi = block // (splits * tiles_x * tiles_y) % og
        b = block // (splits * tiles_x * tiles_y * og)
        oy = tile_y * th + thread // tw
        ox = tile_x * tw + thread % tw
        valid = oy < oh and ox < ow
        patch_y = T.Cast("int32", tile_y * th * sh - pad_h - halo)  # in-plane coordinates: 32 bits
        patch_x = T.Cast("int32", tile_x * tw * sw - pad_w - halo)

        in_patch = T.alloc_buffer((chunk * patch,), dtype, scope="shared")
        grad_patch = T.alloc_buffer((chunk * patch,), acc, scope="shared")
        w_stage = T.alloc_buffer((o_step * chunk,), acc, scope="shared")
        columns = T.alloc_buffer((chunk,), acc, scope="local")
        d = T.alloc_buffer((3,), acc, scope="local")  # this chunk's sums: grad offset y, x, grad mask
        flat = T.alloc_buffer((4,), "int32", scope="local")
        local = T.alloc_buffer((4,), "int32", scope="local")
        share = T.alloc_buffer((4,), acc, scope="local")
        value = T.alloc_buffer((4,), acc, scope="local")
        point = T.alloc_buffer((5,), acc, scope="local")  # ly, lx, mask, outside, nan
        for step in range(chunks_per_split):
            c0 = gi * cpg + (split * chunks_per_split + step) * chunk
            group = c0 // ipg
            if staged:
                T.tvm_storage_sync("shared")
                for i in range((chunk * patch + threads - 1) // threads):
                    e = i * threads + thread
                    if e < chunk * patch:
                        yy = patch_y + e % patch // cols
                        xx = patch_x + e % cols
                        grad_patch[e] = zero
                        in_patch[e] = T.Cast(dtype, 0)
                        if yy >= 0 and yy < h and xx >= 0 and xx < w:
                            in_patch[e] = input[b, c0 + e // patch, yy * w + xx]
            for t in range(taps):
                ky = t // kw
                kx = t % kw
                for j in T.unroll(chunk):
                    columns[j] = zero
                for o_chunk in range(opg // o_step):
                    T.tvm_storage_sync("shared")
                    for i in range((o_step * chunk + threads - 1) // threads):
                        e = i * threads + thread
                        if e < o_step * chunk:
                            w_stage[e] = T.Cast(acc, weight[group * opg + o_chunk * o_step + e // chunk,
                                                            c0 - group * ipg + e % chunk, ky, kx])
                    T.tvm_storage_sync("shared")
                    if valid:
                        for o in T.unroll(o_step):
                            dy = T.Cast(acc, grad_output[b, group * opg + o_chunk * o_step + o, oy, ox])
                            for j in T.unroll(chunk):
                                columns[j] = columns[j] + w_stage[o * chunk + j] * dy
                if valid:
                    y = T.Cast(acc, oy * sh - pad_h + ky * dh) + T.Cast(acc, offset[b, (gi * taps + t) * 2, oy, ox])
                    x = T.Cast(acc, ox * sw - pad_w + kx * dw) + T.Cast(acc, offset[b, (gi * taps + t) * 2 + 1, oy, ox])
                    ys = T.Select(y > -2 and y < h + 1, y, below)
                    xs = T.Select(x > -2 and x < w + 1, x, below)
                    y_low = T.Cast("int32", T.floor(ys))
                    x_low = T.Cast("int32", T.floor(xs))
                    point[0] = ys - T.Cast(acc, y_low)
                    point[1] = xs - T.Cast(acc, x_low)
                    point[2] = one
                    if has_mask:
                        point[2] = T.Cast(acc, mask[b, gi * taps + t, oy, ox])
                    point[3] = T.Select(y <= -1 or y >= h or x <= -1 or x >= w, one, zero)
                    point[4] = T.Select(T.isnan(y) or T.isnan(x), one, zero)
                    for k in T.unroll(4):
                        yi = y_low + k // 2
                        xi = x_low + k % 2
                        flat[k] = T.Select(yi >= 0 and yi < h and xi >= 0 and xi < w, yi * w + xi, -1)
                        if staged:
                            local[k] = T.Select(
                                flat[k] >= 0 and yi >= patch_y and yi < patch_y + rows and xi >= patch_x
                                and xi < patch_x + cols, (yi - patch_y) * cols + xi - patch_x, -1)
                        share[k] = (T.Select(k // 2 == 1, point[0], one - point[0])
                                    * T.Select(k % 2 == 1, point[1], one - point[1]))
                    for i in T.unroll(3):
                        d[i] = zero
                    for j in range(chunk):
                        for k in T.unroll(4):
                            value[k] = zero
                            if staged:
                                if local[k] >= 0:
                                    value[k] = T.Cast(acc, in_patch[j * patch + local[k]])
                                elif flat[k] >= 0:
                                    value[k] = T.Cast(acc, input[b, c0 + j, flat[k]])
                            elif flat[k] >= 0:
                                value[k] = T.Cast(acc, input[b, c0 + j, flat[k]])
                        col = columns[j]
                        d[0] = d[0] + col * point[2] * (
                            point[1] * (value[3] - value[1]) + (one - point[1]) * (value[2] - value[0]))
                        d[1] = d[1] + col * point[2] * (
                            point[0] * (value[3] - value[2]) + (one - point[0]) * (value[1] - value[0]))
                        if has_mask:
                            d[2] = d[2] + col * T.Select(
                                point[3] > zero, zero,
                                value[0] * share[0] + value[1] * share[1] + value[2] * share[2]
                                + value[3] * share[3])
                        for k in T.unroll(4):
                            if staged:
                                if local[k] >= 0:
                                    T.evaluate(T.cuda.atomic_add(T.address_of(grad_patch[j * patch + local[k]]),
                                                                 col * point[2] * share[k]))
                                elif flat[k] >= 0:
                                    T.evaluate(T.cuda.atomic_add(T.address_of(grad_input[b, c0 + j, flat[k]]),
                                                                 col * point[2] * share[k]))
                            elif flat[k] >= 0:
                                T.evaluate(T.cuda.atomic_add(T.address_of(grad_input[b, c0 + j, flat[k]]),
                                                             col * point[2] * share[k]))
                    if step > 0:  # add the earlier chunks' sums
                        d[0] = d[0] + grad_offset[split, b, (gi * taps + t) * 2, oy, ox]
                        d[1] = d[1] + grad_offset[split, b, (gi * taps + t) * 2 + 1, oy, ox]
                        if has_mask:
                            d[2] = d[2] + grad_mask[split, b, gi * taps + t, oy, ox]
                    if step == chunks_per_split - 1 and point[4] > zero:  # a NaN sampling point: NaN
                        d[0] = nan  # offset gradients; NaN mask gradient unless the other
                        d[1] = nan  # coordinate puts the point outside (interpolation 0 there)
                        if point[3] == zero:
                            d[2] = nan
                    grad_offset[split, b, (gi * taps + t) * 2, oy, ox] = d[0]
                    grad_offset[split, b, (gi * taps + t) * 2 + 1, oy, ox] = d[1]
                    if has_mask:
                        grad_mask[split, b, gi * taps + t, oy, ox] = d[2]
            if staged:
                T.tvm_storage_sync("shared")
                for i in range((chunk * patch + threads - 1) // threads):
                    e = i * threads + thread
                    if e < chunk * patch:
                        yy = patch_y + e % patch // cols
                        xx = patch_x + e % cols
                        total = grad_patch[e]
                        if total != zero and yy >= 0 and yy < h and xx >= 0 and xx < w:
                            T.evaluate(T.cuda.atomic_add(
                                T.address_of(grad_input[b, c0 + e // patch, yy * w + xx]), total))

    offset_shape = (splits, n, *spec.offset_shape[1:])
    mask_shape = (splits, n, *spec.mask_shape[1:])

    @T.prim_func
    def grad_data(
        input: T.Buffer((n, c, pixels), dtype),
        offset: T.Buffer(spec.offset_shape, dtype),
        mask: T.Buffer(spec.mask_shape, dtype),
        weight: T.Buffer(spec.weight_shape, dtype),
        grad_output: T.Buffer(spec.output_shape, dtype),
        grad_input: T.Buffer((n, c, pixels), acc),
        grad_offset: T.Buffer(offset_shape, acc),
        grad_mask: T.Buffer(mask_shape, acc),
    ):
        T.func_attr({"global_symbol": "grad_data", "tirx.noalias": True})
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                body(block, thread, input, offset, mask, weight, grad_output, grad_input, grad_offset, grad_mask)

    return _without(grad_data, () if has_mask else ("mask", "grad_mask"))


def _point_table_groups(spec: DeformConvSpec, tiling: WeightTiling) -> int:
    """Offset groups one channel tile of ``grad_weight_primfunc`` can span (at most)."""
    cpg = spec.in_channels // spec.offset_groups
    return min(spec.offset_groups, -(-tiling.c_threads * tiling.c_regs // cpg) + 1)


def grad_weight_primfunc(spec: DeformConvSpec, tiling: WeightTiling):
    """Partial sums of grad_weight (``[splits, out_channels, in_channels // groups, kernel_h *
    kernel_w]``, accumulate dtype) and, with a bias, of grad_bias (``[splits, out_channels]``),
    see the module docstring. Parameters: ``input [N, C, H * W], offset, mask?, grad_output [N,
    O, out_h * out_w]`` (the spec's dtype), then the outputs."""
    from tvm.script import tirx as T

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    o_ch, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    taps = kh * kw
    cpg, ipg, opg = c // og, c // g, o_ch // g
    (sh, sw), (pad_h, pad_w), (dh, dw) = spec.stride, spec.padding, spec.dilation
    o_threads, o_regs, c_threads, c_regs = tiling.o_threads, tiling.o_regs, tiling.c_threads, tiling.c_regs
    o_tile, c_tile, p, splits = o_threads * o_regs, c_threads * c_regs, tiling.positions, tiling.splits
    if opg % o_tile or ipg % c_tile:
        raise ValueError(f"{tiling} does not divide the layer's channels per group ({opg} out, {ipg} in)")
    o_tiles, c_tiles = o_ch // o_tile, ipg // c_tile
    threads = o_threads * c_threads
    groups_in_tile = _point_table_groups(spec, tiling)
    steps = tiling.steps(spec)
    positions = oh * ow
    has_mask, has_bias = spec.has_mask, spec.has_bias
    blocks = taps * o_tiles * c_tiles * splits
    total = n * positions  # flat positions: 32-bit (the tensors' extents may need 64)
    n, c, pixels = index_extents(spec, n, c, h * w)
    nan, zero, one, below = (tirx.const(v, acc) for v in (float("nan"), 0, 1, -2))
    s_row, d_row = c_tile + 4, o_tile + 4  # shared rows padded by 16 bytes

    @T.macro
    def body(block, thread, input, offset, mask, grad_output, weight_part, bias_part):
        split = block % splits
        ct = block // splits % c_tiles
        ot = block // (splits * c_tiles) % o_tiles
        t = block // (splits * c_tiles * o_tiles)
        ky = t // kw
        kx = t % kw
        ty = thread // c_threads
        tx = thread % c_threads
        o0 = ot * o_tile
        c0 = o0 // opg * ipg + ct * c_tile
        first_group = c0 // cpg

        point_index = T.alloc_buffer((groups_in_tile * p * 4,), "int32", scope="shared")
        point_weight = T.alloc_buffer((groups_in_tile * p * 4,), acc, scope="shared")
        point_batch = T.alloc_buffer((p,), "int32", scope="shared")
        samples = T.alloc_buffer((p * s_row,), acc, scope="shared")
        grads = T.alloc_buffer((p * d_row,), acc, scope="shared")
        sums = T.alloc_buffer((o_regs * c_regs,), acc, scope="local")
        bias_sums = T.alloc_buffer((o_regs,), acc, scope="local")
        a = T.alloc_buffer((o_regs,), acc, scope="local")
        b_ = T.alloc_buffer((c_regs,), acc, scope="local")
        for i in T.unroll(o_regs * c_regs):
            sums[i] = zero
        for i in T.unroll(o_regs):
            bias_sums[i] = zero
        for step in range(steps):
            q0 = (split * steps + step) * p
            T.tvm_storage_sync("shared")
            for i in range((groups_in_tile * p + threads - 1) // threads):
                e = i * threads + thread
                if e < groups_in_tile * p:
                    q = q0 + e % p
                    gi = first_group + e // p
                    for k in T.unroll(4):
                        point_index[e * 4 + k] = -1
                        point_weight[e * 4 + k] = zero
                    if e < p:
                        point_batch[e] = 0
                    if q < total and gi < og:
                        b = q // positions
                        oy = q % positions // ow
                        ox = q % ow
                        if e < p:
                            point_batch[e] = b
                        y = T.Cast(acc, oy * sh - pad_h + ky * dh) + T.Cast(acc, offset[b, (gi * taps + t) * 2, oy, ox])
                        x = T.Cast(acc, ox * sw - pad_w + kx * dw) + T.Cast(
                            acc, offset[b, (gi * taps + t) * 2 + 1, oy, ox])
                        m = one
                        if has_mask:
                            m = T.Cast(acc, mask[b, gi * taps + t, oy, ox])
                        if y <= -1 or y >= h or x <= -1 or x >= w:  # outside: no sample (even if NaN)
                            point_weight[e * 4] = zero
                        elif T.isnan(y) or T.isnan(x):
                            point_weight[e * 4] = nan
                        else:
                            y_low = T.Cast("int32", T.floor(y))
                            x_low = T.Cast("int32", T.floor(x))
                            ly = y - T.Cast(acc, y_low)
                            lx = x - T.Cast(acc, x_low)
                            for k in T.unroll(4):
                                yi = y_low + k // 2
                                xi = x_low + k % 2
                                if yi >= 0 and yi < h and xi >= 0 and xi < w:
                                    point_index[e * 4 + k] = yi * w + xi
                                point_weight[e * 4 + k] = m * T.Select(k // 2 == 1, ly, one - ly) * T.Select(
                                    k % 2 == 1, lx, one - lx)
            for i in range((o_tile * p + threads - 1) // threads):
                e = i * threads + thread
                if e < o_tile * p:
                    q = q0 + e % p
                    grads[e % p * d_row + e // p] = zero
                    if q < total:
                        grads[e % p * d_row + e // p] = T.Cast(acc, grad_output[q // positions, o0 + e // p,
                                                                                q % positions])
            T.tvm_storage_sync("shared")
            for i in range((c_tile * p + threads - 1) // threads):
                e = i * threads + thread
                if e < c_tile * p:
                    pl = e % p
                    base = ((c0 + e // p) // cpg - first_group) * p * 4 + pl * 4
                    interpolated = zero
                    for k in T.unroll(4):
                        index = point_index[base + k]
                        corner = zero
                        if index >= 0:
                            corner = T.Cast(acc, input[point_batch[pl], c0 + e // p, index])
                        interpolated = interpolated + corner * point_weight[base + k]
                    samples[pl * s_row + e // p] = interpolated
            T.tvm_storage_sync("shared")
            for pl in range(p):
                for i in T.unroll(o_regs):
                    a[i] = grads[pl * d_row + ty * o_regs + i]
                for j in T.unroll(c_regs):
                    b_[j] = samples[pl * s_row + tx * c_regs + j]
                for i in T.unroll(o_regs):
                    for j in T.unroll(c_regs):
                        sums[i * c_regs + j] = sums[i * c_regs + j] + a[i] * b_[j]
                if has_bias:
                    for i in T.unroll(o_regs):
                        bias_sums[i] = bias_sums[i] + a[i]
        for i in T.unroll(o_regs):
            for j in T.unroll(c_regs):
                weight_part[split, o0 + ty * o_regs + i, ct * c_tile + tx * c_regs + j, t] = sums[i * c_regs + j]
        if has_bias:
            if t == 0 and ct == 0 and tx == 0:
                for i in T.unroll(o_regs):
                    bias_part[split, o0 + ty * o_regs + i] = bias_sums[i]

    @T.prim_func
    def grad_weight(
        input: T.Buffer((n, c, pixels), dtype),
        offset: T.Buffer(spec.offset_shape, dtype),
        mask: T.Buffer(spec.mask_shape, dtype),
        grad_output: T.Buffer((n, o_ch, positions), dtype),
        weight_part: T.Buffer((splits, o_ch, ipg, taps), acc),
        bias_part: T.Buffer((splits, o_ch), acc),
    ):
        T.func_attr({"global_symbol": "grad_weight", "tirx.noalias": True})
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                body(block, thread, input, offset, mask, grad_output, weight_part, bias_part)

    return _without(grad_weight, ("mask",) * (not has_mask) + ("bias_part",) * (not has_bias))


def weight_reduce_primfunc(spec: DeformConvSpec, splits: int):
    """grad_weight (``weight_shape``) and, with a bias, grad_bias (``[out_channels]``) in the
    spec's dtype: the partial sums of ``grad_weight_primfunc`` added in split order, one thread per
    element. Parameters: ``weight_part, bias_part?, grad_weight, grad_bias?``."""
    from tvm.script import tirx as T

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    o_ch, ipg, taps = spec.out_channels, spec.in_channels // spec.groups, spec.kernel_h * spec.kernel_w
    weights = o_ch * ipg * taps
    total = weights + o_ch * spec.has_bias
    threads = 256
    blocks = -(-total // threads)
    zero = tirx.const(0, acc)
    has_bias = spec.has_bias

    @T.prim_func
    def weight_reduce(
        weight_part: T.Buffer((splits, weights), acc),
        bias_part: T.Buffer((splits, o_ch), acc),
        grad_weight: T.Buffer((weights,), dtype),
        grad_bias: T.Buffer((o_ch,), dtype),
    ):
        T.func_attr({"global_symbol": "weight_reduce", "tirx.noalias": True})
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                e = block * threads + thread
                sum_ = zero
                if e < weights:
                    for s in range(splits):
                        sum_ = sum_ + weight_part[s, e]
                    grad_weight[e] = T.Cast(dtype, sum_)
                if has_bias:
                    if e >= weights and e < total:
                        for s in range(splits):
                            sum_ = sum_ + bias_part[s, e - weights]
                        grad_bias[e - weights] = T.Cast(dtype, sum_)

    return _without(weight_reduce, () if has_bias else ("bias_part", "grad_bias"))


def _without(func, names):
    """``func`` without the parameters ``names`` (buffers its body does not use)."""
    if not names:
        return func
    return tirx.PrimFunc([v for v in func.params if v.name not in names], func.body, func.ret_type, func.attrs)


def fused_backward_module(spec: DeformConvSpec, data: DataTiling | None = None, weight: WeightTiling | None = None):
    """``(module, data, weight)``: the IRModule of the three kernels (``grad_data``,
    ``grad_weight``, ``weight_reduce``) with the given tilings (default ``for_spec``), and those
    tilings (the caller sizes the partial-sum buffers by them)."""
    import tvm

    data = data or DataTiling.for_spec(spec)
    weight = weight or WeightTiling.for_spec(spec)
    module = tvm.IRModule({
        "grad_data": grad_data_primfunc(spec, data),
        "grad_weight": grad_weight_primfunc(spec, weight),
        "weight_reduce": weight_reduce_primfunc(spec, weight.splits),
    })
    return module, data, weight
