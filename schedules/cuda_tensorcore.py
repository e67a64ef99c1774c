"""The DefT CUDA schedule on tensor cores (float16, bfloat16, TF32 or 3xTF32 float32 operands, float32
accumulation).

The convolution as a GEMM of ``[out_channels] x [positions]`` (batch, rows and columns flattened)
reduced over ``(kernel_h, kernel_w, in_channels)``, kernel taps outermost; the interpolated tile of
one tap and channel chunk is computed straight into shared memory, never a global columns buffer:

* a thread block owns ``warps_co * frags_co * 16`` output channels and ``warps_p * frags_p * 16``
  flat positions (which may span rows and images); each warp accumulates ``frags_co x frags_p``
  16x16 fragments in registers (``wmma.accumulator``);
* input and weight are channels last (``layout="NHWC"``): per (tap, chunk of ``k_frags``
  reduction fragments of 16 (float16, bfloat16) or 8 (TF32) channels) each thread takes a (position, 16
  bytes of channels) pair, computes the sampling point's corner indices and weights, reads each
  corner's channels in one 16-byte load, interpolates in float32 and stores the values to the
  shared tile ``[position][channel]`` in one 16-byte store; the chunk's weights are copied to a
  shared ``[out_channel][channel]`` tile 16 bytes at a time; with ``tap_points`` the sampling
  points (corner indices, weights times the mask) of the block's positions are computed once per
  tap into shared memory and read from there by every chunk, instead of per chunk from the offsets;
* each warp loads its operand fragments from those tiles (the sampled one column-major) and
  issues ``mma_sync``;
* the accumulators go through shared memory (``store_matrix_sync``) to the bias + cast epilogue;
* with ``k_splits`` > 1 (split-K, for layers of few blocks: wide channels on small maps) the
  channel reduction is split over that many blocks (``rfactor``): each writes its partial sums
  through shared memory to a float32 buffer ``[split][out_channel][position]`` in global memory
  (TVM's device workspace), and a second kernel adds them in a fixed order with the bias (no
  atomics: deterministic).

Applies to one-group layers with in and out channels in multiples of 16 (``supports_tensor_cores``)
in float16 (WMMA), bfloat16 (PTX mma m16n8k16) or float32: on TF32 where it is allowed
(``spec.tf32``: PTX mma m16n8k8), else as 3xTF32 (each operand split into a TF32 part and the TF32
part of the rest, three m16n8k8 products: about float32's accuracy, NVIDIA's scheme for float32
GEMMs on tensor cores); all three on warp fragments (``cuda_warp_mma``). Positions are padded to
whole fragments (``pad_einsum``). Other layers (float64, groups, channels not in multiples of 16)
use the SIMT schedule.

The default schedule also takes a layer configuration (``compute.spec.generic_spec``: batch,
height and width as TIR variables): one kernel for every size. Its flat positions are padded to
whole blocks, so that every split of them divides (TVM 0.27 sizes a buffer placed under a
predicated tail from the tail's region: no constant for a variable extent, see ``cpu.py``). A
position's (image, row, column) is divided out of its flat index by the output plane's run-time
size once per block (the compute's ``sample_position``, staged in shared memory before the taps),
and the sampling of every tap and chunk indexes through that table. Its tiling is that of a map of
many blocks (``TensorCoreTiling.for_spec``).
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from deft_tvm.compute.forward import (STAGE_CONV, STAGE_CORNER, STAGE_INDEX, STAGE_OUTPUT, STAGE_POINT_WEIGHT,
                                      STAGE_POSITION, STAGE_SAMPLED, STAGE_WEIGHT)
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.schedules.cuda import largest_divisor, place_sampling_point_in_registers
from deft_tvm.schedules.cuda_mma import MMA_SHAPES
from deft_tvm.schedules.cuda_occupancy import with_min_blocks

FRAGMENT = 16
WARP = 32
# Largest factors the tuning space samples: fragments per warp along co and positions, warps along
# each, fragments of channels per reduction chunk.
MAX_FRAGS = 4
MAX_WARPS_CO = 4
MAX_WARPS_P = 8
MAX_K_FRAGS = 4
# Channels a thread reads or writes at once: 16 bytes of float16 (4 float32).
VECTOR = 8
# Operand tile rows in shared memory are ROW_PAD bytes past a multiple of ROW_ALIGN bytes.
ROW_ALIGN = 64
ROW_PAD = 16
# Input channels of a reduction chunk in the default tiling, fewer where the block's weight tile
# would exceed DEFAULT_WEIGHT_TILE_BYTES (split-K's 256 output channels in TF32: the operand tiles
# would take all of the 48 KB of static shared memory).
DEFAULT_CHUNK = 32
DEFAULT_WEIGHT_TILE_BYTES = 16384
# A layer configuration's kernel asks for CONFIGURATION_MIN_BLOCKS resident blocks an SM where its
# blocks have CONFIGURATION_MIN_BLOCKS_THREADS threads or fewer (``cuda_occupancy``): its run-time
# sizes and staged positions take more registers than the per-size kernel of the same tiling (80
# against 64 a thread for the paper float16 record's 256 threads, so 3 blocks an SM instead of 4).
# Measured on an H100 (tools/results/configuration_forward_min_blocks_h100_fca2166.txt): the paper
# float16 record 0.080 -> 0.067 ms, the others (TF32 record, bfloat16, video og8, r50 c3 defaults;
# blocks of 64 to 256 threads) 0-3 % faster. Not asked of larger blocks (4 of 512 threads would
# leave 32 registers a thread), nor measured there.
CONFIGURATION_MIN_BLOCKS = 4
CONFIGURATION_MIN_BLOCKS_THREADS = 256
# The default tiling stages the sampling points per tap where each offset group has at least this
# many channels (every staged point then serves that many gathered channels). H200, 22c9880, a
# record's tiling without / with them: one offset group of 64-512 channels won wherever the staged
# kernel launched (paper N=1 float16 0.033 / 0.021 ms, r50 c4 0.177 / 0.151, c5 TF32 0.493 / 0.311),
# 8 groups of 8 channels (video) lost (0.117 / 0.442).
TAP_POINTS_MIN_GROUP_CHANNELS = 16
# ... and where a tap has at least this many channel chunks: the staged points then serve several
# chunks. With one chunk per tap they save no loads, and they die before the chunk's float16 tile
# is written, whose memory TVM's StorageRewrite can then take from theirs (a float32 buffer): the
# default tiling of 16 channels into 64 on a 10 x 13 map failed to lower ("tvm_access_ptr element
# type must match the source buffer"). Every registry layer has two chunks per tap or more.
TAP_POINTS_MIN_CHUNKS = 2
# Split-K: the splits of the channel reduction the space samples (those dividing the layer's
# channel fragments). The default tiling splits 4 ways, with 256 output channels per block, the
# layers whose blocks would not fill SPLIT_K_BLOCKS (two per SM of an H100/H200) and which have
# SPLIT_K_MIN_CHANNELS input channels or more (each split then reduces 64 or more). H200, r50 c5
# (512 channels, 25 x 42, batch 2), the kernel alone (tools/results/forward_split_k_refine_h200.txt):
# float16 0.227 ms unsplit (its tuned record then), 0.107 that record split 4 ways, 0.099 this
# default; TF32 0.258 unsplit, 0.154 this default.
SPLIT_K_CANDIDATES = (1, 2, 4)
SPLIT_K_DEFAULT = 4
SPLIT_K_BLOCKS = 264
SPLIT_K_MIN_CHANNELS = 256
# Threads per block of split-K's second kernel (the sum of the partial sums).
SPLIT_K_SUM_THREADS = 256


@dataclasses.dataclass(frozen=True)
class Operands:
    """How a tensor-core layer's operands reach the tensor cores: float16 through WMMA 16x16x16
    fragments, bfloat16 and float32 (TF32) through PTX mma m16n8k16 / m16n8k8 on warp-scope
    fragments (``cuda_warp_mma``)."""

    k: int  # channels per reduction fragment
    vector: int  # channels per 16-byte read
    scope_a: str
    scope_b: str
    scope_c: str
    load_a: str
    load_b: str
    sync: str
    fill: str
    store: str

    @property
    def warp_fragments(self) -> bool:
        return self.scope_c == "warp"


def precision(spec: DeformConvSpec) -> str:
    """How the layer multiplies on tensor cores: "float16", "bfloat16", "tf32" (float32 where
    ``spec.tf32`` allows TF32) or "float32" (3xTF32: each operand split into two TF32 parts, three
    TF32 products, about float32's accuracy)."""
    return "tf32" if spec.tf32 else spec.dtype


def fragment_shape(spec: DeformConvSpec):
    """The ``cuda_mma.MmaShape`` the layer's fragments take (float32 and TF32: m16n8k8 TF32), or
    None (float64)."""
    return MMA_SHAPES.get("tf32" if spec.dtype == "float32" else spec.dtype)


def operands(precision: str) -> Operands:
    """The ``Operands`` of a layer multiplying in ``precision`` (see ``precision``; registers the
    intrinsics: slow the first time)."""
    from tvm.s_tir.tensor_intrin import cuda as intrinsics

    from deft_tvm.schedules.cuda_warp_mma import SHAPE_KEYS, register_warp_mma_intrinsics

    if precision == "float16":
        return Operands(
            16, 8, "wmma.matrix_a", "wmma.matrix_b", "wmma.accumulator",
            intrinsics.WMMA_LOAD_16x16x16_F16_A_INTRIN, intrinsics.WMMA_LOAD_16x16x16_F16_B_TRANS_INTRIN,
            intrinsics.WMMA_SYNC_16x16x16_f16f16f32_TRANS_INTRIN, intrinsics.WMMA_FILL_16x16x16_F32_INTRIN,
            intrinsics.WMMA_STORE_16x16x16_F32_SHARED_DYN_INTRIN,
        )
    load_a, load_b, sync = register_warp_mma_intrinsics(precision)
    k = MMA_SHAPES[SHAPE_KEYS[precision]].k
    vector = 8 if precision == "bfloat16" else 4  # channels in 16 bytes
    return Operands(k, vector, "warp", "warp", "warp", load_a, load_b, sync,
                    intrinsics.MMA_fill_16x16_f32_INTRIN, intrinsics.MMA_store_16x16_f32_shared_dyn_INTRIN)


@dataclasses.dataclass(frozen=True)
class TensorCoreTiling:
    """Warps of the block and 16x16 fragments per warp along output channels and flat positions,
    16-channel fragments per reduction chunk, and the channels a thread gathers per corner read
    (no defaults: ``for_spec`` picks them for a layer)."""

    warps_co: int
    frags_co: int
    warps_p: int
    frags_p: int
    k_frags: int
    vector: int
    tap_points: bool = False  # the sampling points staged per tap in shared memory (_stage_sampling_points_per_tap)
    k_splits: int = 1  # blocks the channel reduction is split over (split-K; one of split_k_candidates)

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "TensorCoreTiling":
        """Small blocks, many per SM (measured on an H100 over the registry's layers,
        ``tools/sweep_cuda_tiling.py``): up to 128 output channels (each block interpolates its
        positions once for all of its channels) on 2 warps (4 above 64 channels), one warp along
        positions with 2 fragments of them (4 above 64 channels), 32-channel reduction chunks (fewer
        where the weight tile would exceed ``DEFAULT_WEIGHT_TILE_BYTES``);
        sampling points staged per tap where offset groups have ``TAP_POINTS_MIN_GROUP_CHANNELS``
        channels or more (measured on the H200, ``tools/results/forward_tap_points_refine_h200.txt``)
        and a tap has ``TAP_POINTS_MIN_CHUNKS`` chunks or more. Layers of few blocks (see
        ``SPLIT_K_BLOCKS``) split the channel reduction ``SPLIT_K_DEFAULT`` ways with 256 output
        channels per block (4 warps of 4 fragments).

        A layer configuration (``spec.shape_generic``) takes the tiling of a map of many blocks (the
        most position fragments per warp, no split-K) and no staged sampling points (staged per
        tap, their buffer would be sized by the block's positions clipped at the map's variable end)."""
        k = fragment_shape(spec).k
        co_frags = spec.out_channels // spec.groups // FRAGMENT
        k_frags = channel_fragments(spec)
        block_co = largest_divisor(co_frags, 8)
        wide = block_co > 4
        if spec.shape_generic:
            p_frags = frags_p = 4 if wide else 2
        else:
            p_frags = -(-spec.batch * spec.out_h * spec.out_w // FRAGMENT)
            frags_p = largest_divisor(p_frags, 4 if wide else 2)
        splits = 1
        if (not spec.shape_generic and spec.in_channels // spec.groups >= SPLIT_K_MIN_CHANNELS
                and SPLIT_K_DEFAULT in split_k_candidates(spec)
                and (co_frags // block_co) * (p_frags // frags_p) < SPLIT_K_BLOCKS):
            splits, block_co = SPLIT_K_DEFAULT, largest_divisor(co_frags, 16)
        itemsize = 2 if k == 16 else 4
        chunk = min(DEFAULT_CHUNK, DEFAULT_WEIGHT_TILE_BYTES // (block_co * FRAGMENT * itemsize))
        chunk_frags = largest_divisor(k_frags // splits, max(1, chunk // k))
        warps_co = largest_divisor(block_co, 4 if wide else 2)
        return cls(
            warps_co=warps_co,
            frags_co=block_co // warps_co,
            warps_p=1,
            frags_p=frags_p,
            k_frags=chunk_frags,
            vector=_vector(spec),
            tap_points=(not spec.shape_generic
                        and spec.in_channels // spec.offset_groups >= TAP_POINTS_MIN_GROUP_CHANNELS
                        and k_frags // splits >= TAP_POINTS_MIN_CHUNKS * chunk_frags),
            k_splits=splits,
        )

    @classmethod
    def of_trace(cls, trace, spec: DeformConvSpec) -> "TensorCoreTiling | None":
        """The tiling a trace of ``deft_cuda_tensorcore_space`` (a tuning record) decided, or None
        for a trace of another space. Traces from before ``tap_points`` (``k_splits``) was a decision
        had it off (1)."""
        decisions = {"SamplePerfectTile": [], "SampleCategorical": []}
        for inst in trace.insts:
            if inst.kind.name in decisions:
                decisions[inst.kind.name].append(trace.decisions[inst])
        tiles, categorical = decisions["SamplePerfectTile"], [int(d) for d in decisions["SampleCategorical"]]
        if len(tiles) != 5 or len(categorical) > 2:
            return None
        (_, frags_co), (_, frags_p), (_, warps_co), (_, warps_p), (_, k_frags) = (map(int, t) for t in tiles)
        tap_points, split = (categorical + [0, 0])[:2]
        return cls(warps_co=warps_co, frags_co=frags_co, warps_p=warps_p, frags_p=frags_p, k_frags=k_frags,
                   vector=_vector(spec), tap_points=bool(tap_points), k_splits=split_k_candidates(spec)[split])


def channel_fragments(spec: DeformConvSpec) -> int:
    """Fragments of ``fragment_shape(spec).k`` channels in a group's input channels (the reduction)."""
    return spec.in_channels // spec.groups // fragment_shape(spec).k


def split_k_candidates(spec: DeformConvSpec) -> tuple[int, ...]:
    """The ``k_splits`` of a layer: ``SPLIT_K_CANDIDATES`` that divide its channel fragments."""
    return tuple(s for s in SPLIT_K_CANDIDATES if channel_fragments(spec) % s == 0)


def _vector(spec: DeformConvSpec) -> int:
    """Channels per corner read: up to 16 bytes of consecutive channels of one offset group."""
    per_read = VECTOR if spec.dtype in ("float16", "bfloat16") else VECTOR // 2
    return largest_divisor(spec.in_channels // spec.offset_groups, per_read)


class FixedTensorCoreTiles:
    """Split factors from a ``TensorCoreTiling``."""

    def __init__(self, tiling: TensorCoreTiling):
        self.t = tiling

    def co(self, sch, fragments):
        return [None, self.t.frags_co]

    def co_warps(self, sch, blocks_by_warps):
        return [None, self.t.warps_co]

    def p(self, sch, fragments):
        return [None, self.t.frags_p]

    def p_warps(self, sch, blocks_by_warps):
        return [None, self.t.warps_p]

    def block_positions(self, sch):
        return self.t.warps_p * self.t.frags_p * FRAGMENT

    def rc(self, sch, fragments):
        return [None, self.t.k_frags]

    def vector(self, sch):
        return self.t.vector

    def tap_points(self, sch):
        return self.t.tap_points

    def k_splits(self, sch):
        return self.t.k_splits


class SampledTensorCoreTiles:
    """Split factors sampled by MetaSchedule (divisors of the extents in fragments); with
    ``start``, the samples are decided as that tiling (a point of the space the search can mutate)."""

    def __init__(self, spec: DeformConvSpec, start: TensorCoreTiling | None = None):
        self.vector_width = _vector(spec)
        self.splits = split_k_candidates(spec)
        self.start = start

    def _sample(self, sch, loop, max_innermost: int, field: str):
        decision = None
        if self.start is not None:
            inner = getattr(self.start, field)
            decision = [int(sch.get(loop).extent) // inner, inner]
        return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_innermost, decision=decision)

    def co(self, sch, fragments):
        return self._sample(sch, fragments, MAX_FRAGS, "frags_co")

    def co_warps(self, sch, blocks_by_warps):
        return self._sample(sch, blocks_by_warps, MAX_WARPS_CO, "warps_co")

    def p(self, sch, fragments):
        return self._sample(sch, fragments, MAX_FRAGS, "frags_p")

    def p_warps(self, sch, blocks_by_warps):
        return self._sample(sch, blocks_by_warps, MAX_WARPS_P, "warps_p")

    def rc(self, sch, fragments):
        return self._sample(sch, fragments, MAX_K_FRAGS, "k_frags")

    def vector(self, sch):
        return self.vector_width

    def tap_points(self, sch):
        decision = None if self.start is None else int(self.start.tap_points)
        return bool(int(sch.get(sch.sample_categorical([0, 1], [0.5, 0.5], decision=decision))))

    def k_splits(self, sch):
        # Sampled when the space is generated, never mutated (the search mutates tile sizes):
        # the schedule's instructions depend on it, as on tap_points.
        decision = None if self.start is None else self.splits.index(self.start.k_splits)
        return int(sch.get(sch.sample_categorical(list(self.splits), [1 / len(self.splits)] * len(self.splits),
                                                  decision=decision)))


def supports_tensor_cores(spec: DeformConvSpec) -> bool:
    """Whether the layer runs on tensor cores: float16, bfloat16 or float32 (on TF32 where
    ``spec.tf32`` allows it, else 3xTF32), one group, in and out channels in multiples of 16
    (positions are padded to whole fragments)."""
    return (
        spec.dtype in ("float16", "bfloat16", "float32")
        and spec.groups == 1
        and (spec.in_channels // spec.groups) % FRAGMENT == 0
        and (spec.out_channels // spec.groups) % FRAGMENT == 0
    )


def _cooperative(sch, loops, warps_co, warps_p):
    """Spread ``loops`` (fused) over the block's threads (warps on threadIdx.y, lanes on
    threadIdx.x); returns the lane loop."""
    fused = sch.fuse(*loops)
    _, warp_co, warp_p, lane = sch.split(fused, [None, warps_co, warps_p, WARP])
    sch.bind(sch.fuse(warp_co, warp_p), "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    return lane


def _flat_position(sch):
    """Index map of a ``(batch, out_h, out_w)`` position to its flat index in the output plane."""
    _, _, out_h, out_w = (sch.get(loop).extent for loop in sch.get_loops(sch.get_sblock(STAGE_OUTPUT)))
    return lambda n, oy, ox: n * (out_h * out_w) + oy * out_w + ox


def _points_by_flat_position(sch, block, flat) -> None:
    """A sampling-point stage's block and buffer ``[offset group][ky][kx][flat position][corner]``."""
    sch.transform_layout(block, ("write", 0), lambda n, g, ky, kx, oy, ox, k: (g, ky, kx, flat(n, oy, ox), k))
    sch.transform_block_layout(block, lambda n, g, ky, kx, oy, ox, k: (g, ky, kx, flat(n, oy, ox), k))


def _corner_by_flat_position(flat):
    """Index map of the corner-read stage ``(batch, channel, ky, kx, out_h, out_w, corner)`` to
    ``(ky, kx, flat position, corner, channel)``."""
    return lambda n, c, ky, kx, oy, ox, k: (ky, kx, flat(n, oy, ox), k, c)


def _sampling_by_flat_position(sch, flat) -> None:
    """A layer configuration's sampling stages (points and corner reads), blocks and buffers, by
    flat position: their bindings then divide no flat position by the run-time sizes, and their
    reads of the staged positions (``_stage_positions``) index it as it is."""
    for stage in (STAGE_INDEX, STAGE_POINT_WEIGHT):
        _points_by_flat_position(sch, sch.get_sblock(stage), flat)
    corner = sch.get_sblock(STAGE_CORNER)
    sch.transform_layout(corner, ("write", 0), _corner_by_flat_position(flat))
    sch.transform_block_layout(corner, _corner_by_flat_position(flat))


def _stage_sampling_points_per_tap(sch, tap, flat, warps_co: int, warps_p: int) -> None:
    """The sampling points (corner indices, weights times the mask) of the block's positions for
    one tap, computed under ``tap`` into shared memory ``[position][corner]`` by the whole block,
    once for all of the tap's channel chunks (which then read them from there instead of loading
    the offsets and mask again per chunk)."""
    for stage in (STAGE_INDEX, STAGE_POINT_WEIGHT):
        block = sch.get_sblock(stage)
        _points_by_flat_position(sch, block, flat)
        sch.compute_at(block, tap, preserve_unit_loops=True)
        sch.set_scope(block, 0, "shared")
        _cooperative(sch, sch.get_loops(block)[-2:], warps_co, warps_p)


def _stage_positions(sch, block_loop, flat, block_positions: int, warps_co: int, warps_p: int) -> None:
    """A layer configuration's output positions of the block (image, row and column of each of its
    ``block_positions`` flat positions; zeros past the last), computed into shared memory
    ``[block][position][3]`` by the whole block once, before its taps: the sampling points of
    every tap and chunk index offsets, mask and input through them instead of dividing the flat
    position by the run-time sizes again (stage ``sample_position`` of the compute)."""
    block = sch.get_sblock(STAGE_POSITION)
    sch.transform_layout(block, ("write", 0), lambda n, oy, ox, k: (flat(n, oy, ox), k))
    sch.transform_block_layout(block, lambda n, oy, ox, k: (flat(n, oy, ox), k))
    # Whole blocks (the padding's zeros written too), so the shared tile has a constant size.
    sch.transform_layout(block, ("write", 0), lambda p, k: (p // block_positions, p % block_positions, k),
                         pad_value=0)
    sch.compute_at(block, block_loop, preserve_unit_loops=True)
    sch.set_scope(block, 0, "shared")
    _cooperative(sch, sch.get_loops(block)[-2:], warps_co, warps_p)


def _gather_channels_vectorised(sch, fill, vector: int, warps_co: int, warps_p: int, points_staged: bool,
                                corner_flat: bool):
    """Fill ``fill`` (the interpolated tile ``[position][channel]`` of one tap and channel chunk)
    with one thread per (position, ``vector`` consecutive channels): the sampling point's corner
    indices and weights into registers, each corner's ``vector`` channels in one contiguous read
    of the channels-last input, the interpolation unrolled over them into registers, then one
    contiguous store of the ``vector`` values to shared memory (the block returned)."""
    store = sch.cache_write(fill, 0, "local")
    position, channel = sch.get_loops(store)[-2:]
    channel_vec, channel = sch.split(channel, [None, vector])
    lane = _cooperative(sch, [position, channel_vec], warps_co, warps_p)
    sch.vectorize(channel)
    if points_staged:  # a thread's gathers of the chunk all in flight at once
        sch.unroll(sch.get_loops(store)[-4])
    sch.compute_at(fill, lane, preserve_unit_loops=True)
    sch.unroll(sch.get_loops(fill)[-1])
    corner = sch.get_sblock(STAGE_CORNER)
    sch.compute_at(corner, lane, preserve_unit_loops=True)
    sch.set_scope(corner, 0, "local")
    if not corner_flat:
        sch.transform_layout(corner, ("write", 0), lambda n, c, ky, kx, oy, ox, k: (n, ky, kx, oy, ox, k, c))
    if points_staged or corner_flat:  # the corner block iterates over (tap, flat position, corner, channel)
        corner_k, corner_c = sch.get_loops(corner)[-2:]
    else:
        corner_c, corner_k = sch.get_loops(corner)[-6], sch.get_loops(corner)[-1]
        sch.reorder(corner_k, corner_c)
    sch.unroll(corner_k)
    sch.vectorize(corner_c)
    if not points_staged:
        place_sampling_point_in_registers(sch, lane)
    return store


def _sum_splits(sch, total, output) -> None:
    """Split-K's second kernel: one thread per (output channel, position) adds the splits' partial
    sums in order (in registers), then the bias, and writes the output."""
    channel, position, _ = sch.get_loops(total)
    block, thread = sch.split(sch.fuse(channel, position), [None, SPLIT_K_SUM_THREADS])
    sch.bind(block, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")
    sch.set_scope(total, 0, "local")
    sch.reverse_compute_at(output, thread, preserve_unit_loops=True)


def apply_deft_cuda_tensorcore(sch: s_tir.Schedule, tiles, spec: DeformConvSpec) -> None:
    """Apply the tensor-core DefT schedule to ``sch`` (of ``deform_conv2d_primfunc(spec)``, a spec
    with ``layout="NHWC"``) in place, with split factors from ``tiles`` (``FixedTensorCoreTiles`` or
    ``SampledTensorCoreTiles``), multiplying in ``precision(spec)``."""
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)
    sampled = sch.get_sblock(STAGE_SAMPLED)
    # Importing TVM's tensor intrinsics registers all of them (about a minute on a slow CPU): only
    # schedules that use them pay for it.
    ops = operands(precision(spec))
    flat = _flat_position(sch)
    sch.compute_inline(sch.get_sblock(STAGE_WEIGHT))
    tap_points = tiles.tap_points(sch)

    # A GEMM over flat positions (batch, rows and columns fused): [out_channel] x [position]
    # reduced over (tap, channel): the sampled tile is [tap][position][channel] (position-major,
    # i.e. column-major B), the weight [out_channel][tap][channel] (channels last).
    sch.transform_layout(sampled, ("write", 0), lambda n, c, ky, kx, oy, ox: (ky, kx, flat(n, oy, ox), c))
    sch.transform_block_layout(sampled, lambda n, c, ky, kx, oy, ox: (ky, kx, flat(n, oy, ox), c))
    sch.transform_layout(conv, ("write", 0), lambda n, co, oy, ox: (co, flat(n, oy, ox)))
    sch.transform_block_layout(conv, lambda n, co, oy, ox, rc, ky, kx: (co, flat(n, oy, ox), ky, kx, rc))
    sch.transform_block_layout(output, lambda n, co, oy, ox: (co, flat(n, oy, ox)))
    if tap_points:  # corner reads then index the staged points by flat position, a tight region
        sch.transform_block_layout(sch.get_sblock(STAGE_CORNER), _corner_by_flat_position(flat))
    if spec.shape_generic:  # every sampling stage by flat position, which indexes the staged positions
        _sampling_by_flat_position(sch, flat)
    # Positions padded to whole fragments (a layer configuration's to whole blocks, see the module's
    # docstring): the padding samples zeros (its sampling points are never computed) and its
    # results are never written out.
    pad = FRAGMENT
    if spec.shape_generic:
        if tap_points:
            raise ValueError("a layer configuration's kernel (generic_spec) stages no sampling points per tap")
        pad = tiles.block_positions(sch)
    if spec.shape_generic or int(sch.get(sch.get_loops(conv)[1]).extent) % pad:
        sch.pad_einsum(conv, [1, pad, 1, 1, 1])
        sch.compute_inline(sampled)
        sampled = sch.get_sblock(f"{STAGE_SAMPLED}_pad")
        sch.compute_inline(sch.get_sblock(f"{STAGE_CONV}_pad"))
    # Split-K: the GEMM block (rfactor) reduces one split of the channels into partial sums
    # [split][out_channel][position]; ``total`` (the conv block now) adds the splits.
    total, splits = None, tiles.k_splits(sch)
    if splits > 1:
        split, _ = sch.split(sch.get_loops(conv)[-1], [splits, None])
        total, conv = conv, sch.rfactor(split, 0)
        sch.reorder(sch.get_loops(conv)[-2], *sch.get_loops(conv)[:-2])

    # Operand tiles in shared memory, the accumulators staged for the epilogue in dynamic shared
    # memory (one dtype per scope: TVM's StorageRewrite cannot merge float16 and float32 buffers).
    sampled_shared = sch.cache_read(conv, 1, "shared")
    weight_shared = sch.cache_read(conv, 0, "shared")
    sampled_frag = sch.cache_read(conv, 1, ops.scope_b)
    weight_frag = sch.cache_read(conv, 0, ops.scope_a)
    if total is None:  # the epilogue: output (bias, cast) from the staged accumulators
        epilogue = output
    else:  # the epilogue: the staged accumulators to the partial sums in global memory
        epilogue = sch.cache_write(conv, 0, "shared.dyn")
    conv_shared = sch.cache_write(conv, 0, ops.scope_c)
    if total is None:
        sch.set_scope(conv_shared, 0, "shared.dyn")
    for block in (weight_shared, weight_frag):  # the weight is [co][ky][kx][rc]
        sch.transform_layout(block, ("write", 0), lambda co, ky, kx, rc: (ky, kx, co, rc))
    if ops.warp_fragments:  # [tile][tile][lane][register] as the mma instructions hold them
        from deft_tvm.schedules.cuda_warp_mma import a_map, b_map, c_map

        k = ops.k
        sch.transform_layout(weight_frag, ("write", 0),
                             lambda ky, kx, co, rc: (ky, kx, co // 16, rc // k, *a_map(co % 16, rc % k, k)))
        if total is not None:
            sch.transform_layout(conv, ("write", 0),
                                 lambda s, co, p: (s, co // 16, p // 16, *c_map(co % 16, p % 16)))

    split = sch.get_loops(conv)[0] if total is not None else None
    co, p, ky, kx, rc = sch.get_loops(conv)[-5:]
    co, co_i = sch.split(co, [None, FRAGMENT])
    p, p_i = sch.split(p, [None, FRAGMENT])
    rc, rc_i = sch.split(rc, [None, ops.k])
    co_frag_factors, p_frag_factors = tiles.co(sch, co), tiles.p(sch, p)
    co, co_f = sch.split(co, co_frag_factors)
    p, p_f = sch.split(p, p_frag_factors)
    co_factors, p_factors = tiles.co_warps(sch, co), tiles.p_warps(sch, p)
    co_b, co_w = sch.split(co, co_factors)
    p_b, p_w = sch.split(p, p_factors)
    warps_co, warps_p = co_factors[1], p_factors[1]
    rc_o, rc_f = sch.split(rc, tiles.rc(sch, rc))
    sch.reorder(co_b, p_b, co_w, p_w, ky, kx, rc_o, rc_f, co_f, p_f, co_i, p_i, rc_i)
    block_loop = sch.fuse(co_b, p_b) if split is None else sch.fuse(split, co_b, p_b)
    sch.bind(block_loop, "blockIdx.x")
    warp = sch.fuse(co_w, p_w)
    sch.bind(warp, "threadIdx.y")

    # Epilogue, one accumulator fragment at a time: the warp stores it to shared memory, then its
    # lanes add the bias, cast and write it out (split-K: write it to the partial sums).
    sch.reverse_compute_at(conv_shared, warp, preserve_unit_loops=True)
    if ops.warp_fragments and total is None:  # after the epilogue's placement: see the sampled fragments'
        sch.transform_layout(conv, ("write", 0), lambda co, p: (co // 16, p // 16, *c_map(co % 16, p % 16)))
    store_co, store_p = sch.get_loops(conv_shared)[-2:]
    store_co_f, store_co_i = sch.split(store_co, [None, FRAGMENT])
    store_p_f, store_p_i = sch.split(store_p, [None, FRAGMENT])
    sch.reorder(store_co_f, store_p_f, store_co_i, store_p_i)
    sch.reverse_compute_at(epilogue, store_p_f, preserve_unit_loops=True)
    out_lane = sch.fuse(*sch.get_loops(epilogue)[-2:])
    _, lane = sch.split(out_lane, [None, WARP])
    sch.bind(lane, "threadIdx.x")
    if total is not None:
        _sum_splits(sch, total, output)

    # Operand fragments are loaded per 16-channel step (placed before their producers are).
    sch.compute_at(sampled_frag, rc_f, preserve_unit_loops=True)
    if ops.warp_fragments:  # laid out once placed: before, over a layer configuration's variable number of
        # positions, the fragment load's bindings could not be blockized for tensorize (same code per size)
        sch.transform_layout(sampled_frag, ("write", 0),
                             lambda ky, kx, p, c: (ky, kx, p // 16, c // k, *b_map(p % 16, c % k, k)))
    sch.compute_at(weight_frag, rc_f, preserve_unit_loops=True)

    def stage_weights():  # the chunk's weights of the tap, into shared memory
        sch.compute_at(weight_shared, rc_o, preserve_unit_loops=True)
        w_co, w_ky, w_kx, w_rc = sch.get_loops(weight_shared)[-4:]
        w_rc, w_vec = sch.split(w_rc, [None, ops.vector])
        _cooperative(sch, [w_co, w_ky, w_kx, w_rc], warps_co, warps_p)
        sch.vectorize(w_vec)

    # With staged sampling points the weights come first: the points then stay live while every
    # float16 tile of the chunk is, so TVM's StorageRewrite, which reuses the memory of a dead
    # "shared" buffer for one of another dtype, never hands the int32 points' memory to a tile that
    # the tensor cores load (a one-chunk tap would otherwise end their use before the weights' copy).
    if tap_points:
        stage_weights()
    # The interpolated float16 tile of one tap and channel chunk, into shared memory.
    sch.compute_at(sampled_shared, rc_o, preserve_unit_loops=True)
    sch.compute_inline(sampled)
    sampled_store = _gather_channels_vectorised(sch, sampled_shared, tiles.vector(sch), warps_co, warps_p,
                                                tap_points, spec.shape_generic)
    if tap_points:
        _stage_sampling_points_per_tap(sch, kx, flat, warps_co, warps_p)
    else:
        stage_weights()
    if spec.shape_generic:
        _stage_positions(sch, block_loop, flat, pad, warps_co, warps_p)

    # Operand tile rows padded (ROW_ALIGN, ROW_PAD): the rows a fragment load reads at once start
    # in different shared-memory banks (unpadded rows of 64 or 128 bytes share them).
    itemsize = 2 if ops.k == 16 else 4
    for block in (sampled_store, weight_shared):
        sch.storage_align(block, 0, axis=2, factor=ROW_ALIGN // itemsize, offset=ROW_PAD // itemsize)

    # Per-warp operand fragments of one 16-channel step, then mma_sync.
    b_p, b_c = sch.get_loops(sampled_frag)[-2:]
    b_p_f, b_p_i = sch.split(b_p, [None, FRAGMENT])
    sch.reorder(b_p_f, b_p_i, b_c)
    sch.tensorize(b_p_i, ops.load_b)
    a_co, a_ky, a_kx, a_rc = sch.get_loops(weight_frag)[-4:]
    a_co_f, a_co_i = sch.split(a_co, [None, FRAGMENT])
    sch.reorder(a_ky, a_kx, a_co_f, a_co_i, a_rc)
    sch.tensorize(a_co_i, ops.load_a)

    sch.tensorize(store_co_i, ops.store)
    init = sch.decompose_reduction(conv, ky)
    init_co_i = sch.get_loops(init)[-2]
    sch.tensorize(init_co_i, ops.fill)
    sch.tensorize(co_i, ops.sync)


def schedule_cuda_tensorcore(mod, spec: DeformConvSpec, tiling: TensorCoreTiling | None = None) -> s_tir.Schedule:
    """The tensor-core schedule of the ``main`` PrimFunc of ``deform_conv2d_primfunc(spec)``; a
    layer configuration's (``spec.shape_generic``) asks for ``CONFIGURATION_MIN_BLOCKS`` resident
    blocks an SM where its blocks are small enough."""
    tiling = tiling or TensorCoreTiling.for_spec(spec)
    if spec.shape_generic and WARP * tiling.warps_co * tiling.warps_p <= CONFIGURATION_MIN_BLOCKS_THREADS:
        mod = with_min_blocks(mod, CONFIGURATION_MIN_BLOCKS)
    sch = s_tir.Schedule(mod)
    apply_deft_cuda_tensorcore(sch, FixedTensorCoreTiles(tiling), spec)
    return sch


def seed_tensorcore_schedule(mod, spec: DeformConvSpec) -> s_tir.Schedule:
    """The default tiling as a point of ``deft_cuda_tensorcore_space`` (sampling instructions
    decided as ``TensorCoreTiling.for_spec``), for the search to start from."""
    return tensorcore_schedule_at(mod, spec, TensorCoreTiling.for_spec(spec))


def tensorcore_refinements(mod, spec: DeformConvSpec, trace) -> dict:
    """Points of ``deft_cuda_tensorcore_space`` near a tuning record (``trace``) that its search,
    whose mutators change tile sizes only, does not reach from it: the record's tiling with the
    sampling points staged per tap, that with twice the channel chunk (where the space has it),
    the record's tiling split (split-K) the other ways its chunk allows, and the default tiling as
    ``TensorCoreTiling.for_spec`` gives it and with its tap points flipped; ``{label: schedule}``
    (empty for a trace of another space)."""
    tiling = TensorCoreTiling.of_trace(trace, spec)
    if tiling is None:
        return {}
    staged = dataclasses.replace(tiling, tap_points=True)
    candidates = {"tap points": staged}
    k_frags = channel_fragments(spec)
    chunk = 2 * tiling.k_frags
    if chunk <= MAX_K_FRAGS and (k_frags // tiling.k_splits) % chunk == 0:
        candidates["tap points, 2x chunk"] = dataclasses.replace(staged, k_frags=chunk)
    for splits in split_k_candidates(spec):
        if (k_frags // splits) % tiling.k_frags == 0:
            candidates[f"split-K {splits}"] = dataclasses.replace(tiling, k_splits=splits)
    default = TensorCoreTiling.for_spec(spec)
    flipped = dataclasses.replace(default, tap_points=not default.tap_points)
    candidates.update({"default": default, f"default, tap points {'on' if flipped.tap_points else 'off'}": flipped})
    chosen = {}
    for label, candidate in candidates.items():
        if candidate != tiling and candidate not in chosen.values():
            chosen[label] = candidate
    return {label: tensorcore_schedule_at(mod, spec, t) for label, t in chosen.items()}


def tensorcore_transfer(mod, spec: DeformConvSpec, source: DeformConvSpec, trace) -> s_tir.Schedule | None:
    """The tiling a record of the same layer in another dtype (``trace``, of
    ``deft_cuda_tensorcore_space`` on ``source``) decided, as a point of ``spec``'s space: a
    schedule of ``mod``, or None where ``source`` is another layer or multiplies another fragment
    shape (float16 and bfloat16 share m16n8k16, TF32 and 3xTF32 float32 m16n8k8: the fragment
    counts differ between the two pairs), or the trace is of another space."""
    same_layer = dataclasses.replace(source, dtype=spec.dtype, tf32=spec.tf32) == spec
    shapes = fragment_shape(source), fragment_shape(spec)
    if not same_layer or None in shapes or shapes[0].shape != shapes[1].shape:
        return None
    tiling = TensorCoreTiling.of_trace(trace, spec)
    return None if tiling is None else tensorcore_schedule_at(mod, spec, tiling)


def tensorcore_schedule_at(mod, spec: DeformConvSpec, tiling: TensorCoreTiling) -> s_tir.Schedule:
    """``tiling`` as a point of ``deft_cuda_tensorcore_space`` (its sampling instructions decided
    so), a schedule of ``mod`` (``deform_conv2d_primfunc(spec)``) whose trace a record can hold."""
    sch = s_tir.Schedule(mod)
    apply_deft_cuda_tensorcore(sch, SampledTensorCoreTiles(spec, start=tiling), spec)
    return sch


class ConfigurationTilings:
    """The tilings a layer configuration's kernel (``spec.shape_generic``) can take, the design
    space of its search (``deft_tvm.tuning.forward_configuration``): ``TensorCoreTiling``s without
    staged sampling points or split-K (see ``TensorCoreTiling.for_spec``), whose output-channel
    block divides the layer's fragments and whose per-warp fragments, warps and channel chunk stay
    within the per-size space's bounds (``MAX_FRAGS``, ``MAX_WARPS_CO``, ``MAX_WARPS_P``,
    ``MAX_K_FRAGS``); the positions of a block need not divide anything (they are padded to whole
    blocks). Raises ValueError for a spec of one size."""

    def __init__(self, spec: DeformConvSpec):
        if not spec.shape_generic:
            raise ValueError(f"{spec.key()} is of one size; a configuration's tilings are of its generic_spec")
        self.spec = spec

    def default(self) -> TensorCoreTiling:
        return TensorCoreTiling.for_spec(self.spec)

    def admits(self, tiling: TensorCoreTiling) -> bool:
        co_frags = self.spec.out_channels // self.spec.groups // FRAGMENT
        return (not tiling.tap_points and tiling.k_splits == 1 and tiling.vector == _vector(self.spec)
                and 1 <= tiling.frags_co <= MAX_FRAGS and 1 <= tiling.warps_co <= MAX_WARPS_CO
                and co_frags % (tiling.frags_co * tiling.warps_co) == 0
                and 1 <= tiling.frags_p <= MAX_FRAGS and 1 <= tiling.warps_p <= MAX_WARPS_P
                and 1 <= tiling.k_frags <= MAX_K_FRAGS and channel_fragments(self.spec) % tiling.k_frags == 0)

    def of_size(self, tiling: TensorCoreTiling) -> TensorCoreTiling | None:
        """A per-size record's tiling (e.g. ``TensorCoreTiling.of_trace``) as a configuration's:
        without staged sampling points and split-K; None where that is not in the space."""
        tiling = dataclasses.replace(tiling, tap_points=False, k_splits=1)
        return tiling if self.admits(tiling) else None

    def neighbours(self, tiling: TensorCoreTiling) -> list[TensorCoreTiling]:
        """The tilings one step from ``tiling``, those in the space: one of its fragment, warp or
        chunk counts doubled or halved, or a block's channels (positions) kept with twice the
        warps of half the fragments, or the reverse."""
        def halved(value: int) -> int:
            return value // 2 if value % 2 == 0 else 0  # 0: no tiling

        steps = []
        for field in ("frags_co", "warps_co", "frags_p", "warps_p", "k_frags"):
            value = getattr(tiling, field)
            steps += [dataclasses.replace(tiling, **{field: value * 2}),
                      dataclasses.replace(tiling, **{field: halved(value)})]
        for frags, warps in (("frags_co", "warps_co"), ("frags_p", "warps_p")):
            f, w = getattr(tiling, frags), getattr(tiling, warps)
            steps += [dataclasses.replace(tiling, **{frags: halved(f), warps: w * 2}),
                      dataclasses.replace(tiling, **{frags: f * 2, warps: halved(w)})]
        return list(dict.fromkeys(t for t in steps if self.admits(t)))

    def schedule(self, mod, tiling: TensorCoreTiling) -> s_tir.Schedule:
        """``tiling`` applied to ``mod`` (``kernel_primfunc(spec)``). ValueError outside the space."""
        if not self.admits(tiling):
            raise ValueError(f"{tiling} is not a tiling of {self.spec.key()}'s configuration")
        return schedule_cuda_tensorcore(mod, self.spec, tiling)

    @staticmethod
    def to_dict(tiling: TensorCoreTiling) -> dict:
        return dataclasses.asdict(tiling)

    @staticmethod
    def from_dict(fields: dict) -> TensorCoreTiling:
        return TensorCoreTiling(**fields)


def deft_cuda_tensorcore_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the tensor-core schedule with sampled tiles."""

    def space(sch: s_tir.Schedule) -> None:
        apply_deft_cuda_tensorcore(sch, SampledTensorCoreTiles(spec), spec)

    return space
