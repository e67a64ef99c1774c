"""CUDA schedule of the backward compute (``deft_tvm.compute.backward``): one kernel per stage.

* ``coord_index`` / ``coord_share``: one thread per element;
* ``grad_columns``: weight^T . grad_output as a register-tiled GEMM per (batch, tap, row): a block
  owns ``c_threads * c_regs`` input channels x ``p_threads * p_regs`` columns, stages ``k_step``
  output channels of both operands in shared memory per step, and each thread accumulates a
  ``c_regs x p_regs`` tile in registers;
* ``grad_offset`` / ``grad_mask``: one thread per element, the reduction over the offset group's
  channels in registers, the corner values read where they are used (``coord_corner`` inlined);
* ``grad_weight``: a GEMM of ``[out_channels] x [in_channels / groups]`` per kernel tap, reduced
  over (batch, rows, columns) and split over thread blocks along that reduction (``rfactor``:
  ``splits`` partial sums, added by a second small kernel). A block owns ``o_threads * o_regs``
  output channels and ``i_threads * i_regs`` input channels of one tap and one split; for each
  step of ``rows`` output rows it interpolates the samples of its input channels (times the mask)
  straight into shared memory, once for all its output channels (no global columns buffer),
  stages grad_output's rows in shared memory, and each thread accumulates an ``o_regs x i_regs``
  outer product in registers;
* ``grad_bias``: one thread block per output channel, its threads splitting the reduction over
  (batch, rows, columns) in a cross-thread reduction.

This is the staged backward of the deterministic mode (grad_input then comes from the sorted gather
over ``grad_columns``); with atomics, ``cuda_backward_fused.py`` runs instead.

A layer configuration (``generic_spec``: batch and image sizes are variables) takes
``apply_backward_cuda_generic``: no tile of a row or of output positions, so that no shared or
local buffer is sized by a tail of unknown extent; grad_columns a thread per ``GENERIC_C_REGS``
input channels of one (batch, tap, position), their reductions over the output channels in
registers, each grad_output value read once for them all; grad_weight's (batch x positions) reduction
split over ``generic_splits`` partial sums (split s sums positions s, s + splits, ...), each thread one
partial of ``GENERIC_O_REGS`` output channels of one (input channel, tap), each sample interpolated
once per step into a register for them all, a warp's threads consecutive splits (positions).
``backward_cuda_space`` samples the grad_weight and grad_columns tiles (``sample_perfect_tile``)
and every other kernel's threads per block (``sample_categorical`` over ``THREAD_CHOICES``); the
default is ``BackwardTiling.for_spec`` and ``THREADS`` / ``REDUCTION_THREADS``.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda import largest_divisor, sample_tile

THREADS = 256
REDUCTION_THREADS = 256
THREAD_CHOICES = (64, 128, 256, 512)
# Largest per-thread register tile along each grad_weight axis, and most rows per step, sampled.
MAX_WEIGHT_REGS = 8
MAX_ROWS = 8
MAX_K_STEP = 32  # output channels per shared-memory step of grad_columns
MAX_SPLITS = 64  # bounds grad_weight's partial sums: splits x the weight's size in the accumulate dtype
GENERIC_THREADS = 1 << 21  # grad_weight threads a layer configuration's splits aim at (~8 waves of an H100's)
GENERIC_PARTIALS = 1 << 26  # most grad_weight partial sums of a layer configuration (splits x weight elements)
GENERIC_O_REGS = 16  # most output channels of a layer configuration's grad_weight partial per thread
# Most input channels of a layer configuration's grad_columns per thread: on an H100 (float32, its kernel;
# tools/results/staged_generic_c_regs_h100_ff305ac.txt) 8 -> 16 -> 32 took paper N=8 1.07 -> 0.62 -> 0.49 ms and
# r50 c5 4.36 -> 2.50 -> 1.82 ms (4: 8.18).
GENERIC_C_REGS = 32


@dataclasses.dataclass(frozen=True)
class BackwardTiling:
    """The backward's GEMM tiles. grad_weight: threads and registers per output / input channel,
    output rows per reduction step, and the number of blocks the reduction is split over.
    grad_columns: threads and registers per input channel (``c_*``) and per output column
    (``p_*``) of a block's (channels x columns of one row) tile, and output channels per
    shared-memory step (``k_step``)."""

    o_threads: int = 8
    o_regs: int = 4
    i_threads: int = 16
    i_regs: int = 4
    rows: int = 1
    splits: int = 64
    c_threads: int = 16
    c_regs: int = 4
    p_threads: int = 16
    p_regs: int = 4
    k_step: int = 16

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "BackwardTiling":
        """The default tiles, shrunk where the layer is smaller; a grad_weight step covers about 64
        positions."""
        opg, ipg = spec.out_channels // spec.groups, spec.in_channels // spec.groups
        o_regs, i_regs = largest_divisor(opg, cls.o_regs), largest_divisor(ipg, cls.i_regs)
        rows = largest_divisor(spec.out_h, max(1, 64 // spec.out_w))
        c_regs, p_regs = largest_divisor(spec.in_channels, cls.c_regs), largest_divisor(spec.out_w, cls.p_regs)
        return cls(
            o_threads=max(1, min(cls.o_threads, opg // o_regs)),
            o_regs=o_regs,
            i_threads=max(1, min(cls.i_threads, ipg // i_regs)),
            i_regs=i_regs,
            rows=rows,
            splits=largest_divisor(spec.batch * spec.out_h // rows, cls.splits),
            c_threads=largest_divisor(spec.in_channels // c_regs, cls.c_threads),
            c_regs=c_regs,
            p_threads=largest_divisor(spec.out_w // p_regs, cls.p_threads),
            p_regs=p_regs,
            k_step=largest_divisor(opg, cls.k_step),
        )

    def divides(self, spec: DeformConvSpec) -> bool:
        """Whether every tile divides its extent (the design space holds such tilings only)."""
        return (spec.out_channels % (self.o_threads * self.o_regs) == 0
                and spec.in_channels // spec.groups % (self.i_threads * self.i_regs) == 0)


class FixedTiles:
    """The schedule's knobs as constants (a ``BackwardTiling`` and the thread counts); splits that
    do not divide are predicated."""

    def __init__(self, tiling: BackwardTiling):
        self.t = tiling

    def threads(self, sch):
        return THREADS

    def reduction_threads(self, sch):
        return REDUCTION_THREADS

    def o(self, sch, loop):
        return [None, self.t.o_threads, self.t.o_regs]

    def i(self, sch, loop):
        return [None, self.t.i_threads, self.t.i_regs]

    def rows(self, sch, loop):
        return [None, self.t.rows]

    def splits(self, sch, loop):
        return [None, self.t.splits]

    def columns_c(self, sch, loop):
        return [None, self.t.c_threads, self.t.c_regs]

    def columns_p(self, sch, loop):
        return [None, self.t.p_threads, self.t.p_regs]

    def columns_k(self, sch, loop):
        return [None, self.t.k_step]


class SampledTiles:
    """The knobs as MetaSchedule sampling instructions; with ``start``, decided as that tiling and
    the default thread counts (which must divide the extents)."""

    def __init__(self, start: BackwardTiling | None = None):
        self.start = start

    def _categorical(self, sch, default: int):
        decision = THREAD_CHOICES.index(default) if self.start is not None else None
        probs = [1.0 / len(THREAD_CHOICES)] * len(THREAD_CHOICES)
        return sch.sample_categorical(list(THREAD_CHOICES), probs, decision=decision)

    def threads(self, sch):
        return self._categorical(sch, THREADS)

    def reduction_threads(self, sch):
        return self._categorical(sch, REDUCTION_THREADS)

    def o(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_WEIGHT_REGS, t and (t.o_threads, t.o_regs))

    def i(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_WEIGHT_REGS, t and (t.i_threads, t.i_regs))

    def rows(self, sch, loop):
        return sample_tile(sch, loop, 2, MAX_ROWS, self.start and (self.start.rows,))

    def splits(self, sch, loop):
        return sample_tile(sch, loop, 2, MAX_SPLITS, self.start and (self.start.splits,))

    def columns_c(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_WEIGHT_REGS, t and (t.c_threads, t.c_regs))

    def columns_p(self, sch, loop):
        t = self.start
        return sample_tile(sch, loop, 3, MAX_WEIGHT_REGS, t and (t.p_threads, t.p_regs))

    def columns_k(self, sch, loop):
        return sample_tile(sch, loop, 2, MAX_K_STEP, self.start and (self.start.k_step,))


def _iter_kinds(sch: s_tir.Schedule, block) -> list[int]:
    """The kind of each loop of ``block`` (0 spatial, 2 reduction), from its block iterators."""
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _bind_elementwise(sch: s_tir.Schedule, block, threads, bind_threads: bool = True):
    """One thread per element of ``block``'s spatial loops (its reduction loops stay inside),
    ``threads`` per thread block (a split bound to threadIdx.x: the pattern MetaSchedule's
    ``MutateThreadBinding`` mutates where ``threads`` is sampled). Returns the thread's loop.
    ``bind_threads=False``: the same loops, unbound (buildable for a CPU)."""
    spatial = [loop for loop, kind in zip(sch.get_loops(block), _iter_kinds(sch, block)) if kind == 0]
    fused = sch.fuse(*spatial)
    blocks, inner = sch.split(fused, [None, threads])
    if bind_threads:
        sch.bind(blocks, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    return inner


def _accumulate_in_registers(sch: s_tir.Schedule, acc_name: str, cast_name: str, threads,
                             bind_threads: bool = True) -> None:
    """The cast stage ``cast_name`` one thread per element, its reduction ``acc_name`` in registers."""
    cast = sch.get_sblock(cast_name)
    _bind_elementwise(sch, cast, threads, bind_threads)
    acc = sch.get_sblock(acc_name)
    sch.compute_at(acc, sch.get_loops(cast)[-1], preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")


def _reduce_across_threads(sch: s_tir.Schedule, acc_name: str, threads, bind_threads: bool = True) -> None:
    """One thread block per element of ``acc_name``: its reduction loops fused and split over the
    block's ``threads`` threads (a cross-thread reduction)."""
    acc = sch.get_sblock(acc_name)
    loops, kinds = sch.get_loops(acc), _iter_kinds(sch, acc)
    reduction = sch.fuse(*[loop for loop, kind in zip(loops, kinds) if kind == 2])
    _, inner = sch.split(reduction, [None, threads])
    if bind_threads:
        sch.bind(inner, "threadIdx.x")
        sch.bind(sch.fuse(*[loop for loop, kind in zip(loops, kinds) if kind == 0]), "blockIdx.x")


def _spread_over_threads(sch: s_tir.Schedule, loops, o_threads, i_threads) -> None:
    """Fuse ``loops`` and spread them over the block's (threadIdx.y, threadIdx.x) layout."""
    _, ty, tx = sch.split(sch.fuse(*loops), [None, o_threads, i_threads])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _read_index(sch: s_tir.Schedule, block, buffer: str) -> int:
    """The index of ``block``'s read of ``buffer`` (for ``cache_read``)."""
    return [r.source.name for r in sch.get(block).reads].index(buffer)


def _tile_grad_columns(sch: s_tir.Schedule, tiles) -> None:
    """grad_columns = weight^T . grad_output (per group) as a register-tiled GEMM: a block owns a
    (channels x columns) tile of one output row of one (batch, tap), each thread a ``c_regs x
    p_regs`` tile in registers, and every ``k_step`` output channels both operands' chunks are
    staged in shared memory by all the block's threads. (Tiles stay inside a row: a tile of
    flattened positions would cross rows, and the write-back of its bounding box would overwrite
    other threads' results.)"""
    block = sch.get_sblock("grad_columns")
    n, c, ky, kx, oy, ox, ro = sch.get_loops(block)
    c_f, x_f = tiles.columns_c(sch, c), tiles.columns_p(sch, ox)
    c_b, c_t, c_r = sch.split(c, c_f)
    x_b, x_t, x_r = sch.split(ox, x_f)
    k_o, k_i = sch.split(ro, tiles.columns_k(sch, ro))
    sch.reorder(n, ky, kx, oy, c_b, x_b, c_t, x_t, k_o, k_i, c_r, x_r)
    sch.bind(sch.fuse(n, ky, kx, oy, c_b, x_b), "blockIdx.x")
    sch.bind(c_t, "threadIdx.y")
    sch.bind(x_t, "threadIdx.x")
    registers = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(registers, x_t, preserve_unit_loops=True)
    for buffer in ("weight", "grad_output"):
        shared = sch.cache_read(block, _read_index(sch, block, buffer), "shared", consumer_blocks=[block])
        sch.compute_at(shared, k_o, preserve_unit_loops=True)
        _spread_over_threads(sch, sch.get_loops(shared)[-4:], c_f[1], x_f[1])
    sch.decompose_reduction(block, k_o)
    sch.unroll(c_r)
    sch.unroll(x_r)


def _tile_grad_weight(sch: s_tir.Schedule, tiles, threads) -> None:
    """grad_weight as a split-reduction GEMM with the samples interpolated into shared memory."""
    acc = sch.get_sblock("grad_weight_acc")
    o, i, ky, kx, rn, ry, rx = sch.get_loops(acc)
    ry_steps, ry_rows = sch.split(ry, tiles.rows(sch, ry))
    steps = sch.fuse(rn, ry_steps)
    step, split = sch.split(steps, tiles.splits(sch, steps))  # split s takes steps s, s + splits, ...
    partial = sch.rfactor(split, factor_axis=0)  # partial sums per split; acc now adds them up
    _accumulate_in_registers(sch, "grad_weight_acc", "grad_weight", threads)

    o, i, ky, kx, step, split, ry_rows, rx = sch.get_loops(partial)
    o_f, i_f = tiles.o(sch, o), tiles.i(sch, i)
    o_b, o_t, o_r = sch.split(o, o_f)
    i_b, i_t, i_r = sch.split(i, i_f)
    sch.reorder(split, ky, kx, o_b, i_b, o_t, i_t, step, ry_rows, rx, o_r, i_r)
    sch.bind(sch.fuse(split, ky, kx, o_b, i_b), "blockIdx.x")
    sch.bind(o_t, "threadIdx.y")
    sch.bind(i_t, "threadIdx.x")
    registers = sch.cache_write(partial, 0, "local")
    sch.reverse_compute_at(registers, i_t, preserve_unit_loops=True)

    # One step's samples (interpolated here, times the mask) and grad_output rows in shared memory.
    for index, name, dims in ((1, "sampled_columns", 6), (0, None, 4)):
        shared = sch.cache_read(partial, index, "shared", consumer_blocks=[partial])
        sch.compute_at(shared, step, preserve_unit_loops=True)
        if name is not None:
            sch.compute_inline(sch.get_sblock(name))
        _spread_over_threads(sch, sch.get_loops(shared)[-dims:], o_f[1], i_f[1])
    for index in (0, 1):
        sch.compute_at(sch.cache_read(partial, index, "local"), rx, preserve_unit_loops=True)
    sch.decompose_reduction(partial, step)
    sch.unroll(o_r)
    sch.unroll(i_r)


def apply_backward_cuda(sch: s_tir.Schedule, has_mask: bool, tiles) -> None:
    """Apply the CUDA backward schedule in place with the knobs of ``tiles`` (``FixedTiles`` or
    ``SampledTiles``)."""
    sch.compute_inline(sch.get_sblock("coord_corner"))
    sch.compute_inline(sch.get_sblock("coord_fraction"))
    for name in ("coord_index", "coord_share"):
        _bind_elementwise(sch, sch.get_sblock(name), tiles.threads(sch))
    _tile_grad_columns(sch, tiles)
    _accumulate_in_registers(sch, "grad_offset_acc", "grad_offset", tiles.threads(sch))
    if has_mask:
        _accumulate_in_registers(sch, "grad_mask_acc", "grad_mask", tiles.threads(sch))
    _tile_grad_weight(sch, tiles, tiles.threads(sch))
    _reduce_across_threads(sch, "grad_bias_acc", tiles.reduction_threads(sch))


def generic_splits(spec: DeformConvSpec) -> int:
    """The partial sums a layer configuration's grad_weight reduction is split into: the fewest powers
    of two up to ``MAX_SPLITS`` that give ``GENERIC_THREADS`` threads (a thread per
    ``GENERIC_O_REGS`` output channels of one input channel and tap, per split), their partial sums
    (splits x the weight's elements, in the accumulate dtype) within ``GENERIC_PARTIALS``. The batch
    and image sizes are unknown when the kernel is built, the weight's size is not. On an H100
    (``tools/results/staged_generic_splits_h100_f55b071.txt``, float32, grad_weight's kernel) r50 c5
    (512 x 512 x 3 x 3) took 5.38 ms at 64 splits (604 MB of partial sums, MAX_SPLITS for every
    configuration until then), 4.20 at 16 (this rule's), 8.01 at 4 and 30.7 at 1; r50 c4 4.01 at 64
    (the rule's), 4.24 at 16; r50 c3 4.41 at 64 (the rule's), 5.65 at 16."""
    weights = spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel_h * spec.kernel_w
    threads = weights // largest_divisor(spec.out_channels // spec.groups, GENERIC_O_REGS)
    splits = 1
    while splits < MAX_SPLITS and splits * threads < GENERIC_THREADS and 2 * splits * weights <= GENERIC_PARTIALS:
        splits *= 2
    return splits


def apply_backward_cuda_generic(sch: s_tir.Schedule, spec: DeformConvSpec, bind_threads: bool = True) -> None:
    """Apply the CUDA backward schedule of a layer configuration (``spec``: a ``generic_spec``; see
    the module's docstring) in place. ``bind_threads=False``: the same loops and buffers, no thread
    bound (buildable for a CPU, where tests check its gradients)."""
    sch.compute_inline(sch.get_sblock("coord_corner"))
    sch.compute_inline(sch.get_sblock("coord_fraction"))
    for name in ("coord_index", "coord_share"):
        _bind_elementwise(sch, sch.get_sblock(name), THREADS, bind_threads)
    # grad_columns: a thread owns GENERIC_C_REGS input channels of one (batch, tap, position), so that each
    # grad_output value it reads serves them all; the weight's are read by a warp's threads at once
    columns = sch.get_sblock("grad_columns")
    n, c, ky, kx, oy, ox, ro = sch.get_loops(columns)
    c_outer, c_regs = sch.split(c, [None, largest_divisor(spec.in_channels, GENERIC_C_REGS)])
    sch.reorder(c_outer, ky, kx, oy, ox, c_regs)
    blocks, thread = sch.split(sch.fuse(n, c_outer, ky, kx, oy, ox), [None, THREADS])
    if bind_threads:
        sch.bind(blocks, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
    sch.reverse_compute_at(sch.cache_write(columns, 0, "local"), thread, preserve_unit_loops=True)
    sch.reorder(ro, c_regs)
    sch.decompose_reduction(columns, ro)
    sch.unroll(c_regs)
    _accumulate_in_registers(sch, "grad_offset_acc", "grad_offset", THREADS, bind_threads)
    if spec.has_mask:
        _accumulate_in_registers(sch, "grad_mask_acc", "grad_mask", THREADS, bind_threads)

    acc = sch.get_sblock("grad_weight_acc")
    _, _, _, _, rn, ry, rx = sch.get_loops(acc)
    step, split = sch.split(sch.fuse(rn, ry, rx), [None, generic_splits(spec)])  # split s: positions s, s + splits, ...
    partial = sch.rfactor(split, factor_axis=0)
    _accumulate_in_registers(sch, "grad_weight_acc", "grad_weight", REDUCTION_THREADS, bind_threads)
    o, i, ky, kx, step, split = sch.get_loops(partial)
    o_outer, o_regs = sch.split(o, [None, largest_divisor(spec.out_channels // spec.groups, GENERIC_O_REGS)])
    # the splits innermost among the threads: a warp's threads sum consecutive positions at each step, so that
    # their grad_output, offset and mask reads coalesce and their samples' corners lie close together
    sch.reorder(i, ky, kx, o_outer, split, step, o_regs)
    blocks, thread = sch.split(sch.fuse(i, ky, kx, o_outer, split), [None, THREADS])
    if bind_threads:
        sch.bind(blocks, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
    sch.reverse_compute_at(sch.cache_write(partial, 0, "local"), thread, preserve_unit_loops=True)
    sampled = sch.get_sblock("sampled_columns")  # one sample per step, for the thread's output channels
    sch.compute_at(sampled, step, preserve_unit_loops=True)
    sch.set_scope(sampled, 0, "local")
    sch.decompose_reduction(partial, step)
    sch.unroll(o_regs)
    _reduce_across_threads(sch, "grad_bias_acc", REDUCTION_THREADS, bind_threads)


def schedule_backward_cuda(mod, spec: DeformConvSpec, tiling: BackwardTiling | None = None) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``deft_tvm.compute.backward.deform_conv2d_backward_primfunc(spec)``
    with the default knobs (or ``tiling`` for grad_weight); a layer configuration's (``generic_spec``)
    with ``apply_backward_cuda_generic``."""
    sch = s_tir.Schedule(mod)
    if spec.shape_generic:
        apply_backward_cuda_generic(sch, spec)
    else:
        apply_backward_cuda(sch, spec.has_mask, FixedTiles(tiling or BackwardTiling.for_spec(spec)))
    return sch


def backward_cuda_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the CUDA backward schedule with sampled knobs."""

    def space(sch: s_tir.Schedule) -> None:
        apply_backward_cuda(sch, spec.has_mask, SampledTiles())

    return space


def seed_backward_cuda_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default backward schedule as a point of ``backward_cuda_space`` (the default schedule
    itself where its grad_weight tiles do not divide the layer)."""
    tiling = BackwardTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    apply_backward_cuda(sch, spec.has_mask, SampledTiles(tiling) if tiling.divides(spec) else FixedTiles(tiling))
    return sch

