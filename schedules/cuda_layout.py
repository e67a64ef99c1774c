"""The channels-last copies the tensor-core forward gathers from, made by one host function.

The tensor-core schedule (``cuda_tensorcore.py``) reads input ``[N, H, W, C]`` and weight ``[O,
kh, kw, C / groups]`` (``kernel_spec``'s ``layout="NHWC"``). From torch's NCHW tensors that is two
permuted copies per call: in torch, each a view, an allocation and a copy kernel, about 60 us of
host time on the H200's host for a layer whose kernel takes 20 us. ``channels_last_primfunc``
makes both copies in one call, into buffers the caller allocates: two kernels, each a batched
transpose ``[B, R, S] -> [B, S, R]`` (input: ``B = N``, ``R = C``, ``S = H x W``; weight: ``B =
O``, ``R = C / groups``, ``S = kh x kw``) through a shared-memory tile of ``R_TILE`` x ``S_TILE``
elements, read along ``S`` and written along ``R``, so that both the reads and the writes are
coalesced (a thread per element written, as before, read NCHW input at a stride of H x W elements).
"""

from __future__ import annotations

import math

from tvm import tirx

from deft_tvm.compute.spec import INT32_MAX, DeformConvSpec
from deft_tvm.schedules.cuda import thread_loops

THREADS = 256
R_TILE = 64  # channels per tile: 128 bytes of a 16-bit row written at once
S_TILE = 32  # positions (or taps) per tile, fewer where a row has fewer


def transpose_tile(r_extent, s_extent) -> tuple[int, int]:
    """``(r_tile, s_tile)`` of the batched transpose of ``[B, r_extent, s_extent]``: at most
    ``R_TILE`` x ``S_TILE``, no larger than the extents (a weight's 3 x 3 taps: one 9-tap tile, read
    as one contiguous run); the full tile along an extent that is a TIR expression (a
    ``generic_spec``'s)."""
    return tuple(min(tile, e) if isinstance(e, int) else tile for tile, e in ((R_TILE, r_extent), (S_TILE, s_extent)))


def _ceil_div(extent, tile: int):
    return -(-extent // tile) if isinstance(extent, int) else (extent + tile - 1) // tile


def batched_transpose(r_extent, s_extent, batch, s_inner, dtype: str, idx: str, bind_threads: bool = True):
    """One batched transpose ``[B, R, S] -> [B, S, R]`` of ``dtype`` as TVMScript macros:
    ``(blocks, copy_block)``, where ``copy_block(src, dst, block)`` moves block ``block``'s tile
    from ``src`` (indexed ``[b, r, s // s_inner, s % s_inner]``) through the tile buffer into
    ``dst`` (indexed ``[b, s // s_inner, s % s_inner, r]``); ``blocks`` is the number of blocks,
    of ``idx``, the index dtype. The extents are ints, or int32 TIR expressions of a
    ``generic_spec``'s size variables. ``bind_threads=False``: serial loops, the tile in global
    memory."""
    from tvm.script import tirx as T

    _, threads_loop = thread_loops(bind_threads)
    scope = "shared" if bind_threads else "global"
    r_tile, s_tile = transpose_tile(r_extent, s_extent)
    r_tiles, s_tiles = _ceil_div(r_extent, r_tile), _ceil_div(s_extent, s_tile)
    imm = lambda v: tirx.IntImm(idx, v) if isinstance(v, int) else v  # noqa: E731
    tile_elements = r_tile * s_tile
    steps = -(-tile_elements // THREADS)
    blocks = imm(batch * r_tiles * s_tiles)
    pitch = s_tile + 1  # a padded tile row: the store's column reads fall in different banks
    threads = imm(THREADS)

    @T.macro
    def load(src, tile, block, thread, i):
        e = T.meta_var(i * THREADS + thread)
        b = T.meta_var(block // (r_tiles * s_tiles))
        r = T.meta_var(block // s_tiles % r_tiles * r_tile + e // s_tile)
        s = T.meta_var(block % s_tiles * s_tile + e % s_tile)
        if e < tile_elements and r < imm(r_extent) and s < imm(s_extent):
            tile[e // s_tile * pitch + e % s_tile] = src[b, r, s // s_inner, s % s_inner]

    @T.macro
    def store(tile, dst, block, thread, i):
        e = T.meta_var(i * THREADS + thread)
        b = T.meta_var(block // (r_tiles * s_tiles))
        r = T.meta_var(block // s_tiles % r_tiles * r_tile + e % r_tile)
        s = T.meta_var(block % s_tiles * s_tile + e // r_tile)
        if e < tile_elements and r < imm(r_extent) and s < imm(s_extent):
            dst[b, s // s_inner, s % s_inner, r] = tile[e % r_tile * pitch + e // r_tile]

    @T.macro
    def copy_block(src, dst, block):
        tile = T.alloc_buffer((r_tile * pitch,), dtype, scope=scope)
        for thread in threads_loop(threads):
            for i in T.unroll(steps):
                load(src, tile, block, thread, i)
        if bind_threads:
            T.tvm_storage_sync("shared")
        for thread in threads_loop(threads):
            for i in T.unroll(steps):
                store(tile, dst, block, thread, i)

    return blocks, copy_block


def _index_dtype(spec: DeformConvSpec, shape) -> str:
    """The index dtype of a copy of a tensor of ``shape``: int64 beyond int32's range; a
    ``generic_spec``'s is int32 (calls beyond it keep per-size kernels)."""
    if spec.shape_generic:
        return "int32"
    return "int64" if math.prod(shape) > INT32_MAX else "int32"


def output_positions(spec: DeformConvSpec):
    """Positions of an output plane: ``out_h * out_w``, a ``generic_spec``'s the variable ``P``."""
    return tirx.Var("P", "int32") if spec.shape_generic else spec.out_h * spec.out_w


def channels_last_primfunc(spec: DeformConvSpec, bind_threads: bool = True):
    """``channels_last(input [N, C, H, W], weight [O, C / groups, kh, kw], input_nhwc [N, H, W, C],
    weight_ohwi [O, kh, kw, C / groups])`` (the spec's dtype, all contiguous): the last two are the
    first two with the channels last; for a ``generic_spec``, of every batch and image size (its
    variables bound by the tensors' shapes). ``bind_threads=False``: the same loops, serial, the
    tile in global memory (buildable for a CPU, where tests check the copies)."""
    from tvm.script import tirx as T

    n, c, h, w = spec.input_shape
    o, ipg, kh, kw = spec.weight_shape
    dtype = spec.dtype
    index = _index_dtype(spec, spec.input_shape)
    blocks_loop, _ = thread_loops(bind_threads)
    input_blocks, copy_input = batched_transpose(c, h * w, n, w, dtype, index, bind_threads)
    weight_blocks, copy_weight = batched_transpose(ipg, kh * kw, o, kw, dtype, "int32", bind_threads)

    @T.prim_func
    def channels_last(
        input: T.Buffer((n, c, h, w), dtype),
        weight: T.Buffer((o, ipg, kh, kw), dtype),
        input_nhwc: T.Buffer((n, h, w, c), dtype),
        weight_ohwi: T.Buffer((o, kh, kw, ipg), dtype),
    ):
        T.func_attr({"global_symbol": "channels_last", "tirx.noalias": True})
        for block in blocks_loop(input_blocks):
            copy_input(input, input_nhwc, block)
        for block in blocks_loop(weight_blocks):
            copy_weight(weight, weight_ohwi, block)

    return channels_last


def channels_first_output_primfunc(spec: DeformConvSpec, bind_threads: bool = True):
    """``channels_first_output(rows [N, out_h * out_w, O, 1], output [N, O, 1, out_h * out_w])``
    (the spec's dtype, contiguous): the unfused forward's GEMM result, one row of output channels
    per position, written as the NCHW output (``[N, O, out_h, out_w]`` viewed with one unit axis):
    the batched transpose ``[N, positions, O] -> [N, O, positions]``, read along the channels and
    written along the positions. For a ``generic_spec``, of every batch and number of positions
    (TIR variables ``N`` and ``P``, bound by the tensors' shapes)."""
    from tvm.script import tirx as T

    n, o, oh, ow = spec.output_shape
    positions, dtype = output_positions(spec), spec.dtype
    index = _index_dtype(spec, spec.output_shape)
    blocks_loop, _ = thread_loops(bind_threads)
    blocks, copy_block = batched_transpose(positions, o, n, 1, dtype, index, bind_threads)

    @T.prim_func
    def channels_first_output(
        rows: T.Buffer((n, positions, o, 1), dtype),
        output: T.Buffer((n, o, 1, positions), dtype),
    ):
        T.func_attr({"global_symbol": "channels_first_output", "tirx.noalias": True})
        for block in blocks_loop(blocks):
            copy_block(rows, output, block)

    return channels_first_output
