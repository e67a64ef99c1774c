"""Default schedule for CPU targets (``llvm``).

One parallel task per (batch, output row):
  1. interpolate that row's sampled columns ``[in_channels, kernel_h, kernel_w, out_w]`` once,
     with the channels of an offset group innermost: the sampling point (corner indices and
     weights) is computed once per (offset group, tap, position) and reused for the channels;
  2. reduce the columns against the weights into register tiles of accumulators (a local cache
     of the ``conv`` stage), by default the largest divisors of the output channels and width
     up to ``OUT_CHANNEL_TILE x WIDTH_TILE``;
  3. add the bias and cast while writing the row of every output channel.
For a generic spec (``compute.spec.generic_spec``: batch, height and width TIR variables, one
kernel for every size) the rows are not split: step 2 sums a tile of output channels over the
whole row in memory, an inner loop of unknown extent that LLVM vectorises with a remainder (a
split with a predicated tail leaves TVM 0.27's region analysis with negative buffer sizes).

``schedule_cpu`` uses fixed register tiles; ``deft_cpu_space`` is the MetaSchedule design space in
which both tile sizes are ``sample_perfect_tile`` instructions; ``seed_cpu_schedule`` is the default
as a point of that space (the search's start).
"""

from __future__ import annotations

from tvm import s_tir

from deft_tvm.compute.forward import (
    STAGE_CONV,
    STAGE_CORNER,
    STAGE_INDEX,
    STAGE_OUTPUT,
    STAGE_POINT_WEIGHT,
    STAGE_SAMPLED,
    STAGE_WEIGHT,
)
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda import inline_positions, largest_divisor

OUT_CHANNEL_TILE = 4
WIDTH_TILE = 16


def schedule_cpu(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``deft_tvm.compute.deform_conv2d_primfunc(spec)``."""
    sch = s_tir.Schedule(mod)
    apply_deft_cpu(sch, spec, fixed_tiles(sch))
    return sch


MAX_TILE = 32


def fixed_tiles(sch: s_tir.Schedule):
    """``tile_factors(loop, tile)``: the split of ``loop`` by the largest divisor of its extent up to ``tile``."""
    return lambda loop, tile: [None, largest_divisor(int(sch.get(loop).extent), tile)]


def sampled_tiles(sch: s_tir.Schedule, decided: bool, max_tile: int = MAX_TILE):
    """``tile_factors(loop, tile)`` as ``sample_perfect_tile`` instructions (inner factor at most
    ``max_tile``); ``decided`` fixes them at ``fixed_tiles``' split."""

    def tile_factors(loop, tile):
        extent = int(sch.get(loop).extent)
        inner = largest_divisor(extent, tile)
        decision = [extent // inner, inner] if decided else None
        return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_tile, decision=decision)

    return tile_factors


def deft_cpu_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the CPU schedule with sampled tiles."""

    def space(sch: s_tir.Schedule) -> None:
        apply_deft_cpu(sch, spec, sampled_tiles(sch, decided=False))

    return space


def seed_cpu_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default schedule as a point of ``deft_cpu_space`` (its tiles decided as the default's)
    for the search to start from and mutate."""
    sch = s_tir.Schedule(mod)
    apply_deft_cpu(sch, spec, sampled_tiles(sch, decided=True))
    return sch


def apply_deft_cpu(sch: s_tir.Schedule, spec: DeformConvSpec, tile_factors) -> None:
    """Apply the CPU schedule in place; ``tile_factors(loop, default_tile)`` gives a loop's split."""
    sch.compute_inline(sch.get_sblock(STAGE_WEIGHT))
    inline_positions(sch, spec)
    sampled = sch.get_sblock(STAGE_SAMPLED)
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)

    n, co, oy, ox, rc, ky, kx = sch.get_loops(conv)
    co_outer, co_inner = sch.split(co, tile_factors(co, OUT_CHANNEL_TILE))
    if spec.shape_generic:  # rows of unknown width: the tile's sums over the whole row, in memory
        sch.reorder(n, oy, co_outer, rc, ky, kx, co_inner, ox)
    else:
        ox_outer, ox_inner = sch.split(ox, tile_factors(ox, WIDTH_TILE))
        sch.reorder(n, oy, co_outer, ox_outer, rc, ky, kx, co_inner, ox_inner)
    row = sch.fuse(n, oy)
    sch.parallel(row)

    sch.compute_at(sampled, row, preserve_unit_loops=True)
    _, channel, tap_y, tap_x, _, width = sch.get_loops(sampled)[1:]
    group, channel_in_group = sch.split(channel, [spec.offset_groups, None])
    sch.reorder(group, tap_y, tap_x, width, channel_in_group)
    sch.compute_inline(sch.get_sblock(STAGE_CORNER))
    for stage in (STAGE_INDEX, STAGE_POINT_WEIGHT):
        sch.compute_at(sch.get_sblock(stage), width, preserve_unit_loops=True)

    if not spec.shape_generic:
        accumulators = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(accumulators, ox_outer)
    sch.reverse_compute_at(output, row)
    sch.unroll(co_inner)
    init = sch.decompose_reduction(conv, rc)
    if not spec.shape_generic:
        sch.vectorize(sch.get_loops(init)[-1])
