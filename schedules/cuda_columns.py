"""CUDA schedule of the columns kernel (``deform_columns_te``): the interpolation of the unfused
forward, whose GEMM cuBLAS computes (``deft_tvm.runtime.columns``).

Each row of the columns matrix is one sampling point, ``(n, oy, ox, ky, kx)``, and its
``in_channels`` values. A block owns ``points`` consecutive points, one per ``threadIdx.y``; the
``lanes`` threads of a point (``threadIdx.x``) take ``vector`` consecutive channels each and step
over the row, so a warp reads each bilinear corner of channels-last input as one contiguous run
and writes its row the same way. The point's four corner indices and weights (times the mask)
are computed into registers once per thread for all its channels (every offset group its
channels touch).

``columns_cuda_space`` samples ``points`` (``sample_categorical``); ``vector`` is the widest
corner load (up to 16 bytes) that divides an offset group's channels and ``lanes`` follows
(``in_channels / vector`` threads, at most 32). ``ColumnsTiling.for_spec`` is the default and
the search's start.
"""

from __future__ import annotations

import dataclasses

from tvm import DataType, s_tir

from deft_tvm.compute.forward import STAGE_COLUMNS, STAGE_CORNER, STAGE_SAMPLED
from deft_tvm.compute.spec import DeformConvSpec

from .cuda import inline_positions, place_sampling_point_in_registers

POINT_CHOICES = (1, 2, 4, 8, 16)
VECTOR_BYTES = (4, 8, 16)  # channels per thread and step: a 4-, 8- or 16-byte load per corner
MAX_LANES = 32


@dataclasses.dataclass(frozen=True)
class ColumnsTiling:
    """Points per block and channels per thread and step (``vector``: one load per corner)."""

    points: int = 4
    vector: int = 8

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "ColumnsTiling":
        """16-byte corner loads where the channels divide, 4 points per block."""
        return cls(points=4, vector=vector_choices(spec)[-1])


def columns_bytes(spec: DeformConvSpec) -> int:
    """Bytes of the columns matrix, ``[batch * out_h * out_w, kernel_h * kernel_w * in_channels]``
    of the spec's dtype."""
    values = spec.batch * spec.out_h * spec.out_w * spec.kernel_h * spec.kernel_w * spec.in_channels
    return values * DataType(spec.dtype).bits // 8


def lanes(spec: DeformConvSpec, vector: int) -> int:
    """Threads per point: ``in_channels / vector``, at most ``MAX_LANES``."""
    return min(MAX_LANES, spec.in_channels // vector)


def vector_choices(spec: DeformConvSpec) -> tuple[int, ...]:
    """Channels per corner load that divide ``in_channels`` (and the channels of an offset group),
    from 4 to 16 bytes; ``(1,)`` where none does."""
    per_group = spec.in_channels // spec.offset_groups
    found = tuple(
        v for v in (b // (DataType(spec.dtype).bits // 8) for b in VECTOR_BYTES) if v >= 1 and per_group % v == 0
    )
    return found or (1,)


def apply_columns_cuda(sch: s_tir.Schedule, spec: DeformConvSpec, points, vector: int) -> None:
    """Schedule the columns kernel in place; ``points`` is an int or a sampled variable."""
    sch.compute_inline(sch.get_sblock(STAGE_SAMPLED))
    inline_positions(sch, spec)
    block = sch.get_sblock(STAGE_COLUMNS)
    n, oy, ox, ky, kx, c = sch.get_loops(block)
    point_block, point = sch.split(sch.fuse(n, oy, ox, ky, kx), [None, points])
    step, lane, lane_vector = sch.split(c, [None, lanes(spec, vector), vector])
    sch.reorder(point_block, point, lane, step, lane_vector)
    sch.bind(point_block, "blockIdx.x")
    sch.bind(point, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    # Each corner's vector channels read as one load (clamped index: always in range).
    corner = sch.get_sblock(STAGE_CORNER)
    sch.compute_at(corner, step, preserve_unit_loops=True)
    sch.set_scope(corner, 0, "local")
    corner_loops = sch.get_loops(corner)
    channel_loop, corner_loop = corner_loops[-6], corner_loops[-1]
    sch.reorder(corner_loop, channel_loop)
    sch.unroll(corner_loop)
    sch.vectorize(channel_loop)
    sch.unroll(lane_vector)
    # ... and each thread's vector channels written as one store.
    store = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(store, step, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(store)[-1])
    place_sampling_point_in_registers(sch, lane)


def schedule_columns_cuda(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default columns schedule (``ColumnsTiling.for_spec``)."""
    tiling = ColumnsTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    apply_columns_cuda(sch, spec, tiling.points, tiling.vector)
    return sch


def _sampled_points(sch: s_tir.Schedule, start: int | None):
    probs = [1 / len(POINT_CHOICES)] * len(POINT_CHOICES)
    decision = None if start is None else POINT_CHOICES.index(start)
    return sch.sample_categorical(list(POINT_CHOICES), probs, decision=decision)


def columns_cuda_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): points per block sampled, the default's
    vector width (the widest load that divides the channels)."""
    vector = ColumnsTiling.for_spec(spec).vector

    def space(sch: s_tir.Schedule) -> None:
        apply_columns_cuda(sch, spec, _sampled_points(sch, None), vector)

    return space


def seed_columns_cuda_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default columns schedule as a point of ``columns_cuda_space``."""
    tiling = ColumnsTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    apply_columns_cuda(sch, spec, _sampled_points(sch, tiling.points), tiling.vector)
    return sch
