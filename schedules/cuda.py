"""The DefT CUDA schedule: one schedule structure, with fixed tiles (the default) or with tiles
sampled by MetaSchedule (the tuning design space, ``deft_cuda_space``).

The convolution is tiled like a GEMM of ``[out_channels] x [positions]`` reduced over
``(kernel_h, kernel_w, in_channels / groups)``, kernel taps outermost:

* a thread block owns ``co_threads * co_regs`` output channels and a spatial tile of
  ``oy_threads * oy_regs`` rows by ``ox_threads * ox_regs`` columns of one image;
* for each kernel tap and chunk of ``k_chunk`` input channels it computes the bilinear
  interpolation of the chunk for the whole spatial tile into shared memory, one thread per
  position looping over the chunk's channels: the sampling point (four corner indices, and
  weights times the mask) is computed once per (tap, position) into registers and reused for
  every channel, whose four corners are read unconditionally at clamped indices into registers;
  every output channel of the block reuses the tile (no global "columns" buffer exists);
* the tap's weights of the chunk, cast to the accumulate dtype, are staged in shared memory;
* each thread copies its ``co_regs`` weights and ``oy_regs x ox_regs`` samples of one reduction
  step into registers and accumulates the ``co_regs x oy_regs x ox_regs`` outer product there;
  bias, cast and store run from those registers (a warp writes whole rows).

Which tiles are fast depends on the layer and on the offsets (the sampled tile's corners are
gathered through L1/L2): ``deft_cuda_space`` exposes every tile size to MetaSchedule as a
``sample_perfect_tile`` instruction, so the cost model and the evolutionary search tune them, on
inputs drawn from the workload's offset profile (``deft_tvm.tuning.search``).

The default schedule also takes a layer configuration of one group (``compute.spec.generic_spec``:
sizes as TIR variables; one kernel for every size): its output rows and columns are padded to whole
tiles (``pad_einsum``; the samples outside the output are zeros, the stores outside skipped), so
that no split has a predicated tail, under which TVM 0.27 would size the shared tile by the tail's
clipped region (no constant). Grouped layers' convolution is no einsum (the input channel depends
on the output channel's group): they keep kernels per size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from tvm import s_tir

from deft_tvm.compute.forward import (
    STAGE_CONV,
    STAGE_CORNER,
    STAGE_INDEX,
    STAGE_OUTPUT,
    STAGE_POINT_WEIGHT,
    STAGE_POSITION,
    STAGE_SAMPLED,
    STAGE_WEIGHT,
)
from deft_tvm.compute.spec import DeformConvSpec

# Largest per-thread register tile along each axis, and largest channel chunk, the space samples.
MAX_CO_REGS = 8
MAX_SPATIAL_REGS = 4
MAX_K_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class CudaTiling:
    """Tile sizes of the schedule (threads and per-thread registers along each axis)."""

    co_threads: int = 8
    co_regs: int = 8
    oy_threads: int = 1
    oy_regs: int = 4
    ox_threads: int = 32
    ox_regs: int = 2
    k_chunk: int = 16

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "CudaTiling":
        """The default tile, shrunk where the layer is smaller than it (a layer configuration's,
        ``generic_spec``: that of a map of at least 64 columns and 4 rows)."""
        out_per_group = spec.out_channels // spec.groups
        co_regs = largest_divisor(out_per_group, cls.co_regs)
        out_h, out_w = (cls.oy_regs, 64) if spec.shape_generic else (spec.out_h, spec.out_w)
        ox_threads = 32 if out_w >= 48 else 16 if out_w >= 16 else 8
        return cls(
            co_threads=max(1, min(cls.co_threads, out_per_group // co_regs)),
            co_regs=co_regs,
            oy_threads=1,
            oy_regs=min(cls.oy_regs, out_h),
            ox_threads=ox_threads,
            ox_regs=2 if out_w >= 2 * ox_threads else 1,
            k_chunk=min(cls.k_chunk, spec.in_channels // spec.groups),
        )

    @property
    def rows(self) -> int:
        """Output rows of a block's tile."""
        return self.oy_threads * self.oy_regs

    @property
    def columns(self) -> int:
        """Output columns of a block's tile."""
        return self.ox_threads * self.ox_regs


def compute_capability(arch: str) -> int:
    """The compute capability of a CUDA arch name as one number: ``"sm_90a"`` -> 90, ``"sm_80"`` -> 80.
    Raises ValueError for a name that is not ``sm_`` followed by digits (and an optional ``a``)."""
    digits = arch.removeprefix("sm_").removesuffix("a")
    if not arch.startswith("sm_") or not digits.isdigit():
        raise ValueError(f"not a CUDA arch name: {arch!r}, expected sm_<digits> such as 'sm_90'")
    return int(digits)


def thread_loops(bind_threads: bool = True):
    """``(blocks_loop, threads_loop)`` for a hand-written TVMScript kernel: loops bound to
    ``blockIdx.x`` and ``threadIdx.x``, or with ``bind_threads=False`` serial ones (the same loops,
    buildable for a CPU, where tests check them)."""
    from tvm.script import tirx as T

    if not bind_threads:
        return T.serial, T.serial
    return (functools.partial(T.thread_binding, thread="blockIdx.x"),
            functools.partial(T.thread_binding, thread="threadIdx.x"))


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most``."""
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def inline_positions(sch: s_tir.Schedule, spec: DeformConvSpec) -> None:
    """A layer configuration's stage ``sample_position`` inlined (its sampling stages then index
    offsets, mask and input by ``(n, oy, ox)`` as a kernel of one size does), for the schedules
    that do not stage positions; a spec of one size has no such stage."""
    if spec.shape_generic:
        sch.compute_inline(sch.get_sblock(STAGE_POSITION))


def place_sampling_point_in_registers(sch: s_tir.Schedule, position) -> None:
    """The sampling point (four corner indices, four weights times the mask) computed into
    registers under ``position``, once for all the channels a thread interpolates there."""
    for stage in (STAGE_INDEX, STAGE_POINT_WEIGHT):
        block = sch.get_sblock(stage)
        sch.compute_at(block, position, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")
        sch.unroll(sch.get_loops(block)[-1])


def place_sampling_in_registers(sch: s_tir.Schedule, channel, position) -> None:
    """Under the interpolated tile's fill (one thread per position, ``channel`` its innermost
    channel loop, unrolled here): the four corners of a channel are read into registers
    unconditionally (clamped indices), and the sampling point (indices and weights) is computed
    into registers once per ``position`` for all its channels."""
    corner = sch.get_sblock(STAGE_CORNER)
    sch.compute_at(corner, channel, preserve_unit_loops=True)
    sch.set_scope(corner, 0, "local")
    sch.unroll(sch.get_loops(corner)[-1])
    place_sampling_point_in_registers(sch, position)
    sch.unroll(channel)


class FixedTiles:
    """Split factors from a ``CudaTiling`` (outermost factor inferred; non-divisible sizes are
    predicated)."""

    def __init__(self, tiling: CudaTiling):
        self.t = tiling

    def co(self, sch, loop):
        return [None, self.t.co_threads, self.t.co_regs]

    def oy(self, sch, loop):
        return [None, self.t.oy_threads, self.t.oy_regs]

    def ox(self, sch, loop):
        return [None, self.t.ox_threads, self.t.ox_regs]

    def rc(self, sch, loop):
        return [None, self.t.k_chunk]


def sample_tile(sch: s_tir.Schedule, loop, n: int, max_innermost: int, inner: tuple[int, ...] | None):
    """``loop`` split into ``n`` factors by ``sample_perfect_tile``; with ``inner`` (the ``n - 1``
    inner factors, which must divide the extent) the decision is fixed at that split."""
    decision = None if inner is None else [int(sch.get(loop).extent) // math.prod(inner), *inner]
    return sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_innermost, decision=decision)


class SampledTiles:
    """Split factors sampled by MetaSchedule (``sample_perfect_tile``: divisors of the extent);
    with ``start``, the samples are decided as that tiling (which must divide the extents)."""

    def __init__(self, start: CudaTiling | None = None):
        self.start = start

    def co(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_CO_REGS, t and (t.co_threads, t.co_regs))

    def oy(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_SPATIAL_REGS, t and (t.oy_threads, t.oy_regs))

    def ox(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_SPATIAL_REGS, t and (t.ox_threads, t.ox_regs))

    def rc(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 2, MAX_K_CHUNK, t and (t.k_chunk,))


def _spread_over_threads(sch, loops, co_t, oy_t, ox_t):
    """Fuse ``loops`` and spread them over the block's (threadIdx.y, threadIdx.x) layout; returns
    the threadIdx.x loop."""
    fused = sch.fuse(*loops)
    _, ty, ty_x, tx = sch.split(fused, [None, co_t, oy_t, ox_t])
    sch.bind(ty, "threadIdx.y")
    thread_x = sch.fuse(ty_x, tx)
    sch.bind(thread_x, "threadIdx.x")
    return thread_x


def apply_deft_cuda(sch: s_tir.Schedule, tiles, padded_tile: tuple[int, int] | None = None) -> None:
    """Apply the DefT schedule to ``sch`` (a schedule of ``deform_conv2d_primfunc``) in place.
    ``padded_tile`` (rows, columns): the output rows and columns are first padded to whole tiles of
    that shape (``pad_einsum``; a ``generic_spec``'s, whose sizes are variables: TVM 0.27 would size
    the shared tile of a predicated tail by its clipped region, no constant)."""
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)
    weight = sch.get_sblock(STAGE_WEIGHT)
    sampled = STAGE_SAMPLED
    if padded_tile:
        sch.pad_einsum(conv, [1, 1, *padded_tile, 1, 1, 1])
        sch.compute_inline(sch.get_sblock(STAGE_SAMPLED))  # into the padded tile's producer (zero outside)
        sch.compute_inline(sch.get_sblock(f"{STAGE_CONV}_pad"))  # the output reads the padded sums
        sampled = f"{STAGE_SAMPLED}_pad"

    n, co, oy, ox, rc, ky, kx = sch.get_loops(conv)
    co_f, oy_f, ox_f, rc_f = tiles.co(sch, co), tiles.oy(sch, oy), tiles.ox(sch, ox), tiles.rc(sch, rc)
    co_b, co_t, co_r = sch.split(co, co_f)
    oy_b, oy_t, oy_r = sch.split(oy, oy_f)
    ox_b, ox_t, ox_r = sch.split(ox, ox_f)
    rc_o, rc_i = sch.split(rc, rc_f)
    sch.reorder(n, co_b, oy_b, ox_b, co_t, oy_t, ox_t, ky, kx, rc_o, rc_i, co_r, oy_r, ox_r)
    sch.bind(sch.fuse(n, co_b, oy_b, ox_b), "blockIdx.x")
    sch.bind(co_t, "threadIdx.y")
    thread_x = sch.fuse(oy_t, ox_t)
    sch.bind(thread_x, "threadIdx.x")
    co_threads, oy_threads, ox_threads = co_f[1], oy_f[1], ox_f[1]

    # Accumulate in registers; bias, cast and the coalesced store run from them.
    sch.set_scope(conv, 0, "local")
    sch.reverse_compute_at(output, thread_x, preserve_unit_loops=True)

    # The interpolated tile of one tap and channel chunk, computed straight into shared memory:
    # one thread per position, the chunk's channels innermost (sampling point computed once).
    sampled_shared = sch.cache_read(conv, 1, "shared")
    sch.compute_at(sampled_shared, rc_o, preserve_unit_loops=True)
    sch.compute_inline(sch.get_sblock(sampled))
    _, s_c, s_ky, s_kx, s_y, s_x = sch.get_loops(sampled_shared)[-6:]
    sch.reorder(s_y, s_x, s_c, s_ky, s_kx)
    position = _spread_over_threads(sch, [s_y, s_x], co_threads, oy_threads, ox_threads)
    place_sampling_in_registers(sch, s_c, position)

    # The tap's weights of the chunk, already in the accumulate dtype, in shared memory.
    sch.set_scope(weight, 0, "shared")
    # Stored tap-major, output channel innermost: a thread's co_regs weights are contiguous.
    sch.transform_layout(weight, ("write", 0), lambda co, rc, ky, kx: (ky, kx, rc, co))
    sch.compute_at(weight, rc_o, preserve_unit_loops=True)
    _spread_over_threads(sch, sch.get_loops(weight)[-4:], co_threads, oy_threads, ox_threads)

    # Per-thread register fragments of one reduction step, then the outer product.
    for index in (0, 1):
        fragment = sch.cache_read(conv, index, "local")
        sch.compute_at(fragment, rc_i, preserve_unit_loops=True)

    sch.decompose_reduction(conv, ky)
    for loop in (co_r, oy_r, ox_r):
        sch.unroll(loop)


def schedule_cuda(mod, spec: DeformConvSpec, tiling: CudaTiling | None = None) -> s_tir.Schedule:
    """The default schedule of the ``main`` PrimFunc of ``deform_conv2d_primfunc(spec)``; of a
    layer configuration's (``generic_spec``, one group: the padded tile needs the convolution as
    an einsum), its output padded to whole tiles."""
    tiling = tiling or CudaTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    inline_positions(sch, spec)
    apply_deft_cuda(sch, FixedTiles(tiling), (tiling.rows, tiling.columns) if spec.shape_generic else None)
    return sch


def seed_cuda_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default tiling as a point of ``deft_cuda_space`` (sampling instructions decided as
    ``CudaTiling.for_spec``) for the search to start from; the default schedule itself where its
    tiles do not divide the layer (the space holds perfect tilings only)."""
    t = CudaTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    divides = (
        spec.out_channels % (t.co_threads * t.co_regs) == 0
        and spec.out_h % (t.oy_threads * t.oy_regs) == 0
        and spec.out_w % (t.ox_threads * t.ox_regs) == 0
        and spec.in_channels // spec.groups % t.k_chunk == 0
    )
    apply_deft_cuda(sch, SampledTiles(start=t) if divides else FixedTiles(t))
    return sch


def deft_cuda_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the DefT schedule with sampled tiles."""

    def space(sch: s_tir.Schedule) -> None:
        apply_deft_cuda(sch, SampledTiles())

    return space
