"""CPU (``llvm``) schedule of the backward compute (``deft_tvm.compute.backward``).

* ``coord_corner`` is inlined: corner values are read where they are used;
* ``coord_index`` / ``coord_fraction`` / ``coord_share``: parallel over (batch, offset group, tap),
  each sampling point's fractions computed once for all the channels that use them;
* ``grad_columns``: parallel over (batch, channel), the reduction over the group's output channels
  outside a tile of output columns (``WIDTH_TILE``: a contiguous inner loop for LLVM to vectorise);
* ``grad_offset`` / ``grad_mask``: parallel over (batch, channel of the gradient), the reduction
  over the offset group's channels in a register;
* ``grad_weight``: parallel over (output-channel tile, input channel), the reduction over (batch,
  rows, columns) into local accumulators of a tile of ``OUT_CHANNEL_TILE`` output channels times
  ``LANES`` columns (``rfactor``: each lane sums every ``LANES``-th column, so the innermost loop
  has independent accumulators to vectorise; the lanes are added up afterwards); each row of
  ``sampled_columns`` is interpolated once per tile (once per input channel, tap and row when the
  tile is all of a group's output channels) and reused by the tile's channels;
* ``grad_bias``: parallel over output channels.

For a generic spec (``compute.spec.generic_spec``) no loop over a row is split: grad_columns sums
each whole row over the output channels (the row innermost), grad_weight's partial sums are one
per column of the row (``rfactor`` of the columns' loop).

``schedule_backward_cpu`` uses the default tiles (the largest divisors up to the constants);
``backward_cpu_space`` samples all three (``sample_perfect_tile``), ``seed_backward_cpu_schedule`` is the
default as a point of that space.
"""

from __future__ import annotations

from tvm import s_tir

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cpu import fixed_tiles, sampled_tiles

OUT_CHANNEL_TILE = 64
LANES = 16
WIDTH_TILE = 16
MAX_TILE = 64


def schedule_backward_cpu(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``deft_tvm.compute.backward.deform_conv2d_backward_primfunc(spec)``."""
    sch = s_tir.Schedule(mod)
    apply_backward_cpu(sch, spec.has_mask, fixed_tiles(sch), spec.shape_generic)
    return sch


def backward_cpu_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the CPU backward schedule with sampled tiles."""

    def space(sch: s_tir.Schedule) -> None:
        apply_backward_cpu(sch, spec.has_mask, sampled_tiles(sch, False, MAX_TILE))

    return space


def seed_backward_cpu_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default backward schedule as a point of ``backward_cpu_space``."""
    sch = s_tir.Schedule(mod)
    apply_backward_cpu(sch, spec.has_mask, sampled_tiles(sch, True, MAX_TILE))
    return sch


def _parallel(sch: s_tir.Schedule, block, count: int):
    """Fuse the ``count`` outermost loops of ``block`` into one parallel loop; returns it."""
    fused = sch.fuse(*sch.get_loops(block)[:count])
    sch.parallel(fused)
    return fused


def _reduce_in_register(sch: s_tir.Schedule, acc_name: str, cast_name: str) -> None:
    """The cast stage parallel over its two outermost loops, its reduction ``acc_name`` computed
    per element into a local accumulator."""
    cast = sch.get_sblock(cast_name)
    _parallel(sch, cast, 2)
    acc = sch.get_sblock(acc_name)
    sch.compute_at(acc, sch.get_loops(cast)[-1], preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")


def apply_backward_cpu(sch: s_tir.Schedule, has_mask: bool, tile_factors, generic: bool = False) -> None:
    """Apply the CPU backward schedule in place; ``tile_factors(loop, default_tile)`` gives a loop's
    split. ``generic``: the PrimFunc of a generic spec (batch, height and width variables), whose
    rows are not split (see the module's docstring)."""
    sch.compute_inline(sch.get_sblock("coord_corner"))
    for name in ("coord_index", "coord_fraction", "coord_share"):
        _parallel(sch, sch.get_sblock(name), 4)

    columns = sch.get_sblock("grad_columns")
    n, c, ky, kx, oy, ox, ro = sch.get_loops(columns)
    if generic:  # the reduction outside the whole row, a loop of unknown extent for LLVM to vectorise
        sch.reorder(ro, ox)
    else:
        ox_outer, ox_inner = sch.split(ox, tile_factors(ox, WIDTH_TILE))
        sch.reorder(ox_outer, ro, ox_inner)
    sch.parallel(sch.fuse(n, c))
    init = sch.decompose_reduction(columns, ro)
    if not generic:
        sch.vectorize(sch.get_loops(init)[-1])

    _reduce_in_register(sch, "grad_offset_acc", "grad_offset")
    if has_mask:
        _reduce_in_register(sch, "grad_mask_acc", "grad_mask")

    weight = sch.get_sblock("grad_weight_acc")
    rx = sch.get_loops(weight)[-1]
    if generic:  # a partial sum per column of the row; grad_weight_acc adds them up
        lanes = sch.rfactor(rx, factor_axis=4)
        o, i, ky, kx, rn, ry, rx = sch.get_loops(lanes)
        o_outer, o_inner = sch.split(o, tile_factors(o, OUT_CHANNEL_TILE))
        sch.reorder(o_outer, i, ky, kx, rn, ry, o_inner, rx)
    else:
        _, lane = sch.split(rx, tile_factors(rx, LANES))
        lanes = sch.rfactor(lane, factor_axis=0)  # a partial sum per lane; grad_weight_acc adds them up
        o, i, ky, kx, rn, ry, rx, lane = sch.get_loops(lanes)
        o_outer, o_inner = sch.split(o, tile_factors(o, OUT_CHANNEL_TILE))
        sch.reorder(o_outer, i, ky, kx, rn, ry, o_inner, rx, lane)
    sch.parallel(sch.fuse(o_outer, i))
    sch.compute_at(sch.get_sblock("sampled_columns"), ry, preserve_unit_loops=True)
    accumulators = sch.cache_write(lanes, 0, "local")
    sch.reverse_compute_at(accumulators, kx)
    sch.decompose_reduction(lanes, rn)
    _parallel(sch, weight, 2)
    _parallel(sch, sch.get_sblock("grad_weight"), 2)

    _parallel(sch, sch.get_sblock("grad_bias_acc"), 1)
