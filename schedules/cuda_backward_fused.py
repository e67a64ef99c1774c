"""The fused CUDA backward: no global columns buffer, no per-sample tables.

Two hand-scheduled TIR kernels (TVMScript) and a small reduction replace the staged backward of
``cuda_backward.py`` (with atomics, and in deterministic mode for float16, bfloat16 and TF32);
the math is ``deft_tvm.compute.backward``'s
(torchvision's gradients), the fusion, staging and tiling are decided here:

* ``grad_data_primfunc`` - grad_input, grad_offset and grad_mask. A thread block owns one output
  tile (``tile_h x tile_w`` positions, one thread each) of one (image, offset group) and a range
  of the group's channels (``channel_splits`` blocks share a group's channels). Per chunk of
  ``chunk`` channels it stages the input patch the tile samples (the tile's receptive field plus
  ``halo`` px on each side) in shared memory and zeroes a grad_input patch of the same size; then
  per kernel tap each thread computes its position's grad_columns for the chunk (weight^T .
  grad_output over the group's output channels, weights staged in shared memory ``o_step``
  output channels at a time, sums in registers; with ``tap_group`` > 1 the sums of that many taps
  in one pass over grad_output, parked in shared memory, on SIMT cores or, with ``tensor_cores``,
  one ``mma.sync`` n8 tile per tap), its sampling point once, and per channel the
  four corners (from the patch; a corner outside it reads global memory): the bilinear
  derivatives times the column go to grad_offset, the interpolated value times the column to
  grad_mask (both summed over channels in registers), the column times the mask and bilinear
  share to the grad_input patch (shared-memory atomics; outside it, global atomics). The patch is
  added to grad_input once per chunk with global atomics, in aligned groups of ``flush_width``
  pixels (float4 atomics on sm_90). With ``fixed_point`` (the default for float16, bfloat16 and
  TF32) the patch holds int32 sums: a block first bounds its contributions (max |grad_output| x
  max |mask| x max over its channels and taps of sum |weight| over output channels, so
  |column x mask x share| <= bound; the first and last from ``prepare_primfunc``'s tables, one
  load per thread) and scales them by the power of 2 that keeps the sums of its
  threads x taps samples per pixel inside int32 (19 bits per contribution for 128 threads and 9
  taps: the bound's 2**-19 is the quantum); integer shared-memory atomics are native, float ones
  compare-and-swap loops. A block whose bound is not finite (NaN or infinite grad_output, mask or
  weights) adds floats instead. grad_offset and grad_mask are written per channel split
  (``[channel_splits, ...]``, float sums) and added up by the caller. With ``tensor_cores`` the
  grad_columns come from ``mma.sync`` instead (each warp's 32 positions x the chunk, passed
  between lanes through shared memory; float32 without TF32 as 3xTF32, as grad_weight below):
  not the default, measured slower (``DataTiling.for_spec``).
* ``grad_weight_primfunc`` - grad_weight (and grad_bias, folded in) as partial sums per split of
  the (batch x positions) reduction: a block owns ``o_tile`` output channels x ``c_tile`` input
  channels of one tap; per step of ``positions`` flat positions it computes their sampling points
  once into shared memory, interpolates its channels' samples (times the mask) into shared
  memory (a thread per position where the block's threads are a multiple of the step's
  positions: its four corners' table entries read once per offset group, not once per channel)
  and stages grad_output's step (on tensor cores in aligned runs of up to 16 bytes that divide
  the positions of an image and of a step; the runtime passes grad_output 16-byte aligned;
  ``async_copy``: by ``cp.async``, issued before the sampling points and waited for after them,
  sm_80 or newer). On tensor cores (float16, bfloat16, TF32; ``cuda_mma``; float32 as 3xTF32,
  ``backward_mma``) both are staged channel-major in the spec's dtype (the samples rounded as
  torchvision's columns are) and each warp multiplies its ``o_regs`` m16 x ``c_regs`` n8 tiles
  with ``mma.sync``, channels padded to whole tiles (float32 without TF32: each operand split
  into its TF32 part and the TF32 rest, three TF32 products per tile, ``cuda_warp_mma.tf32_part``,
  as the forward's float32 tensor-core schedule; an infinite operand gives NaN products there);
  on SIMT cores each thread accumulates an ``o_regs x c_regs`` outer product in registers.
  grad_bias is the row sums of the staged grad_output, taken by the blocks of tap 0 and the
  first channel tile. Steps whose tables and operands pass 48 KB stage the operands in dynamic
  shared memory (``WeightTiling.dynamic``; the tables stay static).
* ``reduce_primfunc`` - adds the splits of grad_weight and grad_bias, and (``reduce_segments``) of
  grad_offset and grad_mask, in a fixed order (deterministic), and casts them and grad_input to the
  spec's dtype: one kernel where torch would take up to five (two sums and three casts).
* ``prepare_primfunc`` - grad_input's sums zeroed and, for fixed-point patches, the bound tables:
  the peak |grad_output| per position and the sum of |weight| over output channels per (channel,
  tap), reduced once per call (each block of the data kernel used to reduce its own: on r50 c5
  with 64 channel splits, every thread 512 output channels and the weights' 512 x 72 sums per
  block, ~128 dependent load rounds before its first mma).
* ``backward_entry`` - the runtime's one call: a host function that launches ``prepare`` and
  the three kernels above (grad_weight, then grad_data, which sm_90 starts beside
  grad_weight's last partial wave, then the reduction) on a scratch buffer the caller allocates once
  (``backward_workspace``), every kernel buffer declared over the entry's parameters. On a
  small layer the host is the bottleneck (one torch allocation costs about as much as a kernel
  launch), so one call and one scratch allocation besides the gradients' instead of three calls,
  a zero fill and a dozen allocations per backward.

Both kernels are launched with ``__launch_bounds__(threads, resident_blocks)``, so that they keep
to 64 registers where shared memory lets 8 blocks of 128 threads share an SM.

grad_input's order of additions varies between runs (float atomics across blocks).
``DataTiling(deterministic=True)`` makes grad_input int64 fixed point at one quantum for every
block (from a bound the caller computes, ``runtime.backward.contribution_bound``), so that its
sums are the same in any order: the runtime's deterministic mode for float16, bfloat16 and TF32.
Corners that are outside the image are skipped; NaN sampling points
give torchvision's NaN gradients; every read is in bounds whatever the offsets.

Every builder also takes a layer configuration (``compute.spec.generic_spec``: batch, height,
width and the output sizes TIR variables): grids, loop extents, buffer shapes and the workspace's
regions become expressions of the sizes, so one entry serves every batch and image size. Its
tilings are the defaults of the configuration at ``CONFIGURATION_SIZES`` (``default_tilings``),
grad_output is staged one element per access (a run of 16 bytes needs the positions of an image
to divide it) and indices are int32 (the runtime keeps per-size kernels for calls that need more).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import struct
import sys
from pathlib import Path

from tvm import tirx
from tvm.script import tirx as T

from deft_tvm.compute.sampling import index_extents
from deft_tvm.compute.spec import GENERIC_DIMENSIONS, INT32_MAX, DeformConvSpec, accumulate_dtype
from deft_tvm.schedules.cuda import compute_capability, largest_divisor, thread_loops
from deft_tvm.schedules.cuda_launch import grid_dependency_wait, launch_dependents
from deft_tvm.schedules.cuda_mma import MMA_SHAPES, c_element, mma_shape
from deft_tvm.schedules.cuda_warp_mma import tf32_part, tf32_rest

SHARED_BYTES = 48 * 1024  # static shared memory per block every sm_70+ GPU allows
DYNAMIC_SHARED_BYTES = 227 * 1024  # dynamic shared memory an sm_90 block may take (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability": 227 KB for compute capability 9.0)
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Tile shapes (rows, columns) of 128 positions, in order of preference.
TILE_SHAPES = ((8, 16), (4, 32), (16, 8), (2, 64))
# Blocks a grid should have to fill an H200 (132 SMs) a few times over.
SMS = 132
TARGET_BLOCKS = 4 * SMS
SIMT_THREADS = 256  # threads of a full SIMT grad_weight block (16 x 16)
SM_SHARED_BYTES = 228 * 1024  # shared memory of an sm_90 SM (H100 / H200); 1 KB of it reserved per block
PARTIAL_FLOATS = 8 << 20  # at most 32 MB of grad_weight partial sums
# Batch, height and width whose default tilings a layer configuration's kernels (generic_spec) take: a detection
# backbone's stage of a multi-scale batch (2 images, ~800 x 1200 px input) has 25 x 38 to 100 x 150 px maps.
CONFIGURATION_SIZES = (2, 64, 64)


def _in_dtype(dtype: str, *sizes):
    """``sizes`` to compare with values of ``dtype``: ints as they are (constants), a
    ``generic_spec``'s size variables cast."""
    return tuple(v if isinstance(v, int) else tirx.Cast(dtype, v) for v in sizes)


def magnitude_bits(value):
    """The bits of ``|value|`` (as float32) as an int32: ordered as the magnitudes, NaN above
    infinity."""
    return tirx.bitwise_and(tirx.reinterpret("int32", tirx.Cast("float32", value)), 0x7FFFFFFF)


def _without_empty_splits(steps: int, splits: int) -> int:
    """The splits that ``steps`` steps in splits of ``ceil(steps / splits)`` fill (none empty)."""
    return -(-steps // -(-steps // splits))


def _waves_x_work(blocks_per_split: int, splits: int, wave: int, work: int) -> int:
    """(Waves of ``wave`` resident blocks that ``blocks_per_split x splits`` blocks take) x (the
    ``work`` units of one split, rounded up): what the splits of both kernels minimise, as a
    partial last wave costs a whole one."""
    return -(-blocks_per_split * splits // wave) * -(-work // splits)


def padded_positions(spec: DeformConvSpec, tile_h: int, tile_w: int) -> int:
    """Output positions of one image that ``tile_h x tile_w`` tiles cover, the map's padding included."""
    return -(-spec.out_h // tile_h) * tile_h * -(-spec.out_w // tile_w) * tile_w


def resident_blocks(shared_bytes: int, threads: int) -> int:
    """Blocks of ``threads`` threads and ``shared_bytes`` of shared memory an sm_90 SM runs at once
    with at most 64 registers per thread: the kernels are launched with that bound
    (``__launch_bounds__(threads, resident_blocks)``, CUDA C++ Programming Guide, "Launch Bounds")."""
    return max(1, min(65536 // (64 * threads), SM_SHARED_BYTES // (shared_bytes + 1024)))


@dataclasses.dataclass(frozen=True)
class DataTiling:
    """Tiles of ``grad_data_primfunc``: output positions per block (rows x columns, one thread
    each), halo around the receptive field in px, channels per chunk, output channels per weight
    stage, blocks sharing an offset group's channels, whether the input and grad_input patches
    are staged in shared memory (else every corner goes through global memory), whether the
    grad_columns come from tensor cores (``mma.sync``; else SIMT sums in registers), the width of
    the grad_input flush's atomics, and whether the grad_input patch holds fixed-point sums
    (int32, native shared-memory atomics; else float32 ones, compare-and-swap loops) and, with
    ``deterministic``, grad_input too (int64, scaled by a bound the caller passes: integer sums
    are the same in any order), and the kernel taps whose SIMT grad_columns one pass over the
    output channels sums (``tap_group``: a dividing number of taps, each grad_output value loaded
    once per group instead of once per tap, one weight stage for the group; the group's sums are
    parked in shared memory for its taps), and whether a sample whose four corners are all in the
    staged patch takes a loop over the chunk's channels without a branch per corner, its mask x
    bilinear weights multiplied once per tap (``interior_path``; the others the general loop),
    and how many of its global loads a thread issues before it stores them to shared memory when it
    stages the input patch and the weights (``load_batch``: 1 stores each load as it arrives, a
    round trip to L2 per element; more overlap that many),
    and whether the tensor-core tap groups double-buffer their weight stages (``pipelined``: each
    stage's weights are loaded into registers while the stage before multiplies, stored to the other
    buffer after it, one barrier per stage instead of two) and, pipelined, their grad_output
    fragments (``prefetch``: the next stage's are loaded into a second register buffer while this
    one multiplies, where each stage waited for its own loads from L2; on r50 c5 that wait and the
    barrier after it took 44 % of the stall samples of the stage loop, which took 58 % of the data
    kernel's; ncu, ``tools/results/ncu_grad_data_c5_h200_834608e.txt``).
    The interior path is searched, not the default: on an H200 (data kernel ms, record's tiling
    without / with it) it gains on float16's SIMT tap groups (paper N=32 1.027 / 1.006, r50 c3
    0.789 / 0.744, c5 0.584 / 0.567) and loses on TF32 (paper 1.058 / 1.109; c3 0.813 / 0.819) and
    on the default tilings (``tools/results/fused_backward_interior_h200_86cb52e.txt``)."""

    tile_h: int
    tile_w: int
    halo: int
    chunk: int
    o_step: int
    channel_splits: int
    staged: bool = True
    tensor_cores: bool = False
    flush_width: int = 4
    fixed_point: bool = False
    deterministic: bool = False
    tap_group: int = 1
    interior_path: bool = False
    load_batch: int = 1
    pipelined: bool = False
    prefetch: bool = False

    def patch(self, spec: DeformConvSpec) -> tuple[int, int]:
        """Rows and columns of the staged input patch: the tile's receptive field plus the halo
        on each side, and one more row / column for the bilinear high corner."""
        rows = (self.tile_h - 1) * spec.stride[0] + (spec.kernel_h - 1) * spec.dilation[0] + 2 * self.halo + 2
        cols = (self.tile_w - 1) * spec.stride[1] + (spec.kernel_w - 1) * spec.dilation[1] + 2 * self.halo + 2
        return rows, cols

    def quantum_bits(self, spec: DeformConvSpec) -> int:
        """Bits a fixed-point contribution keeps below its bound: a patch pixel takes at most one
        contribution per sample of a chunk channel (threads x taps of them), whose int32 sum must
        stay in range (30 - ceil(log2(threads x taps)); 19 for 128 threads and 9 taps)."""
        return 30 - math.ceil(math.log2(self.tile_h * self.tile_w * spec.kernel_h * spec.kernel_w))

    def fixed_point_quantum(self, spec: DeformConvSpec, bound: float) -> float:
        """The value of one unit of the fixed-point sums scaled for ``bound`` (a float32 bound on
        |contribution|, finite), as the kernel computes it: 2**(e - quantum_bits) where ``bound <
        2**e`` by its float32 exponent (2**-127 at most, for a zero or subnormal bound)."""
        exponent = struct.unpack("<I", struct.pack("<f", bound))[0] >> 23 & 0xFF
        return 2.0 ** -min(self.quantum_bits(spec) + 126 - exponent, 127)

    def bound_elements(self, spec: DeformConvSpec) -> int:
        """Elements of the bound tables that ``prepare_primfunc`` writes for the data kernel
        (float32; 0 where it reads none): with fixed-point patches, unless deterministic (whose
        bound the caller passes), the peak |grad_output| over the output channels per (image,
        output position), then the sum of |weight| over its group's output channels per (input
        channel, tap); of a ``generic_spec``, an expression of its sizes."""
        if not self.takes_bounds:
            return 0
        return spec.batch * spec.out_h * spec.out_w + spec.in_channels * spec.kernel_h * spec.kernel_w

    @property
    def takes_bounds(self) -> bool:
        """Whether the data kernel reads ``prepare_primfunc``'s bound tables (``bound_elements``)."""
        return self.staged and self.fixed_point and not self.deterministic

    def stages(self, spec: DeformConvSpec) -> int:
        """Weight stages per tap: the group's output channels over ``o_step`` (tensor cores pad the
        last one with zeros)."""
        return -(-spec.out_channels // spec.groups // self.o_step)

    def shared_bytes(self, spec: DeformConvSpec) -> int:
        rows, cols = self.patch(spec)
        acc, item = DTYPE_BYTES[accumulate_dtype(spec.dtype)], DTYPE_BYTES[spec.dtype]
        patches = self.chunk * rows * cols * (item + acc) + 16 * self.fixed_point if self.staged else 0
        if not self.tensor_cores:
            group_sums = self.tap_group * self.chunk * self.tile_h * self.tile_w * acc if self.tap_group > 1 else 0
            return patches + self.o_step * self.tap_group * self.chunk * acc + group_sums
        n8 = -(-self.chunk // 8) * 8
        if self.tap_group > 1:  # the group's weights (two buffers, pipelined) and its sums parked per thread
            return (patches + (1 + self.pipelined) * self.tap_group * n8 * (self.o_step * item + 16)
                    + self.tap_group * self.chunk * self.tile_h * self.tile_w * acc)
        taps = spec.kernel_h * spec.kernel_w if self.stages(spec) == 1 else 1
        return patches + taps * n8 * (self.o_step * item + 16) + self.tile_h * self.tile_w * (n8 + 4) * 4

    @classmethod
    def for_spec(cls, spec: DeformConvSpec, halo: int = 4, tensor_cores: bool = False,
                 shared_limit: int = SHARED_BYTES, fixed_point: bool | None = None) -> "DataTiling":
        """128 positions per block in the tile shape that pads the output least (of equals, the
        first of ``TILE_SHAPES``), 8-channel chunks, 64 output channels per weight stage (fewer
        channels where shared memory would pass ``shared_limit``), and of the largest halo up to
        ``halo`` px that fits and the two below it, with channel splits, the pair that minimises
        (waves of resident blocks) x (channels per block), the larger halo and more splits of
        equals: a partial last wave costs a whole one, a smaller patch may let more blocks share
        an SM, and of equal costs smaller blocks balance better (the tuned records, fp16 data
        kernel, ms: paper N=32 at 1 / 2 / 4 splits 1.14 / 1.07 / 1.04, N=8 at 4 / 8 0.28 / 0.27,
        r50 c5 at halo 3 and 32 / 64 splits 0.78 / 0.75). Measured on an H200 (ms, data kernel, by
        halo and splits; ``tools/results/fused_backward_patches_h200.txt``): paper N=32 TF32 2.30 at halo 4 (6
        blocks per SM, 1.29 waves), 1.62 at halo 2 (8, 0.97 waves; this rule); r50 c4 fp16 0.95 at
        8 splits (0.79 waves), 0.85 at halo 3 and 32 splits (this rule); c3 fp16 1.45 at 2 splits,
        1.03 at 16 (this rule); video fp16 0.76 / 0.70 / 0.73 at halo 4 / 3 (this rule) / 2.
        ``fixed_point`` (default: float16, bfloat16 and TF32, whose tolerances cover the 2**-19
        quantum) makes the grad_input patch hold int32 sums (module docstring). Measured on an H200
        (fp16 data kernel of paper N=32, ms): 8 x 16 tiles 1.51 (1.57 with 32-channel weight
        stages), 16 x 16 1.53, 8 x 32 with 32-channel stages 1.56; staging grad_output in shared
        memory once per chunk instead of reading it per tap cost up to 1.5x (2.29 ms; r50 c3 1.41
        vs 1.45, video 0.83 vs 0.70 ms), as it leaves room for fewer channels per chunk and fewer
        blocks per SM.

        ``shared_limit`` is the most shared memory per block (bytes; past 48 KB the kernel takes
        dynamic shared memory, sm_70+). Not the default: on an H200 the tilings past 48 KB were
        slower (fewer resident blocks), as were patches of 2 or 4 float32 sums per pixel, a
        sample adding a row's or all four corners with one 64- or 128-bit compare-and-swap loop
        (ms, float patches / 2 / 4 sums, data kernel: paper N=32 fp16 1.53 / 3.58 / 2.81, TF32
        2.31 / 2.54 / 2.66, r50 c4 fp16 0.95 / 1.40 / 1.79). Fixed-point patches, whose int32
        adds are native shared-memory atomics, are faster (fixed / float: paper N=32 fp16 1.15 /
        1.53, TF32 1.21 / 1.64, r50 c3 fp16 0.81 / 1.02, c4 0.74 / 0.85, c5 0.80 / 0.89 (TF32 0.99 /
        0.96), video fp16 0.51 / 0.70; ``tools/results/fused_backward_patches_h200.txt``).

        ``tensor_cores`` (float16, bfloat16, TF32; float32 as 3xTF32, ``backward_mma``) computes the
        grad_columns with ``mma.sync`` instead, on stages of up to 64 output channels padded to the
        mma depth.
        It is not the default: on an H200 (ms, data kernel, SIMT vs tensor cores) paper N=32
        fp16 1.55 vs 2.27, TF32 2.32 vs 2.54, video fp16 0.76 vs 0.99, r50 c3 fp16 1.43 vs 1.61,
        c5 0.85 vs 1.07. The SIMT sums cost 0.38 ms of the 1.55 (a variant without them took
        1.17): the rest is the bilinear part, whose shared-memory float atomics are compare-and-
        swap loops (``ATOMS.CAST.SPIN``), and the tensor-core variant's 94 registers, 41 KB of
        shared memory (weights of every tap, the sums' exchange between lanes) and two block
        barriers per tap cost more than the sums it saves."""
        tile_h, tile_w = min(TILE_SHAPES, key=lambda shape: padded_positions(spec, *shape))  # the first of equals
        per_group = math.gcd(spec.in_channels // spec.groups, spec.in_channels // spec.offset_groups)
        opg = spec.out_channels // spec.groups
        mma, _ = backward_mma(spec) or (None, False)
        if tensor_cores and mma is None:
            raise ValueError(f"{spec.dtype} has no tensor-core mma (float16, bfloat16, TF32, float32 as 3xTF32)")
        chunks = [chunk for chunk in range(8, 0, -1) if per_group % chunk == 0]
        if tensor_cores:  # 1, 2, ... stages of at most 64 output channels, padded to the mma depth
            depths = dict.fromkeys(-(-opg // (stages * mma.k)) * mma.k for stages in range(1, opg + 1))
            choices = [(chunk, depth) for chunk in chunks for depth in depths if depth <= 64]
        else:
            choices = [(chunk, largest_divisor(opg, 64)) for chunk in chunks]
        tiles = spec.batch * spec.offset_groups * -(-spec.out_h // tile_h) * -(-spec.out_w // tile_w)
        cpg = spec.in_channels // spec.offset_groups

        def with_fewest_waves(tiling):
            """(cost, ``tiling`` with the channel splits of least cost)."""
            wave = resident_blocks(tiling.shared_bytes(spec), tile_h * tile_w) * SMS
            chunks = cpg // tiling.chunk

            def cost(splits):
                return _waves_x_work(tiles, splits, wave, cpg)

            splits = min((d for d in range(1, chunks + 1) if chunks % d == 0), key=lambda d: (cost(d), -d))
            return cost(splits), dataclasses.replace(tiling, channel_splits=splits)

        if fixed_point is None:
            fixed_point = spec.dtype in ("float16", "bfloat16") or (spec.dtype == "float32" and spec.tf32)
        fitting = [next((t for t in (cls(tile_h, tile_w, h, chunk, o_step, 1, True, tensor_cores,
                                         fixed_point=fixed_point)
                                     for chunk, o_step in choices) if t.shared_bytes(spec) <= shared_limit), None)
                   for h in range(halo, -1, -1)]
        candidates = [t for t in fitting if t is not None][:3]  # the largest halo that fits and 2 px less
        return min(map(with_fewest_waves, candidates), key=lambda pair: pair[0])[1]  # of equals the larger halo


@dataclasses.dataclass(frozen=True)
class WeightTiling:
    """Tiles of ``grad_weight_primfunc``: threads and registers per output and input channel
    (with tensor cores: warps, and m16 / n8 ``mma`` tiles per warp), flat positions per step,
    splits of the (batch x positions) reduction, and the channels whose four corners a thread of
    the interpolation (one per position) loads before it sums and stores them (``load_batch``: 1
    waits on each channel's corners in turn), and whether grad_output's runs reach shared memory
    by asynchronous copies (``async_copy``: ``cp.async``, every run of a step in flight at once,
    issued before the step's sampling points and waited for after them; else each thread loads a
    run and stores it before the next)."""

    o_threads: int
    o_regs: int
    c_threads: int
    c_regs: int
    positions: int
    splits: int
    tensor_cores: bool = False
    load_batch: int = 1
    async_copy: bool = False

    @property
    def o_tile(self) -> int:
        """Output channels per block."""
        return self.o_threads * self.o_regs * (16 if self.tensor_cores else 1)

    @property
    def c_tile(self) -> int:
        """Input channels per block."""
        return self.c_threads * self.c_regs * (8 if self.tensor_cores else 1)

    @property
    def threads(self) -> int:
        return self.o_threads * self.c_threads * (32 if self.tensor_cores else 1)

    def run_elements(self, spec: DeformConvSpec) -> int:
        """grad_output elements per staged run (one access of up to 16 bytes, tensor cores: runs of
        one output channel that stay in one image and aligned; SIMT and ``generic_spec``: 1)."""
        if not self.tensor_cores or spec.shape_generic:  # a generic_spec's runs: any number of positions
            return 1
        return math.gcd(16 // DTYPE_BYTES[spec.dtype], spec.out_h * spec.out_w, self.positions)

    def copies_async(self, spec: DeformConvSpec) -> bool:
        """Whether grad_output's runs can reach shared memory by ``cp.async`` (``async_copy``): staged
        in the spec's dtype (tensor cores, or SIMT in float32 / float64), runs of 4, 8 or 16 bytes."""
        staged_as_is = self.tensor_cores or accumulate_dtype(spec.dtype) == spec.dtype
        return staged_as_is and self.run_elements(spec) * DTYPE_BYTES[spec.dtype] >= 4

    def point_table_groups(self, spec: DeformConvSpec) -> int:
        """Offset groups one channel tile can span (at most): the sampling-point tables per step."""
        return min(spec.offset_groups, -(-self.c_tile // (spec.in_channels // spec.offset_groups)) + 1)

    def table_bytes(self, spec: DeformConvSpec) -> int:
        """Shared memory of a step's sampling-point tables (corner indices and weights, images)."""
        acc = DTYPE_BYTES[accumulate_dtype(spec.dtype)]
        return self.point_table_groups(spec) * self.positions * 4 * (4 + acc) + self.positions * 4

    def operand_bytes(self, spec: DeformConvSpec) -> int:
        """Shared memory of a step's staged grad_output and samples, before any padding."""
        acc = DTYPE_BYTES[accumulate_dtype(spec.dtype)]
        if self.tensor_cores:  # staged operands, channel-major, rows padded by 16 bytes
            return (self.o_tile + self.c_tile) * (self.positions * DTYPE_BYTES[spec.dtype] + 16)
        return self.positions * (self.o_tile + self.c_tile + 8) * acc  # position-major, rows padded by 4 elements

    def dynamic(self, spec: DeformConvSpec) -> bool:
        """Whether the staged operands take dynamic shared memory: the block's tables and operands pass
        the 48 KB a block may hold statically."""
        return self.table_bytes(spec) + self.operand_bytes(spec) > SHARED_BYTES

    def shared_bytes(self, spec: DeformConvSpec) -> int:
        """Shared memory per block (bytes). Dynamic operands are padded to at least 48 KB: the
        kernel's tables stay static, and TVM 0.27's runtime raises a kernel's dynamic limit only for
        48 KB or more (below it the driver's default, 48 KB less the static tables, fails the launch
        with CUDA_ERROR_INVALID_VALUE, as the video layer's 128-position step did on an H200)."""
        operands = self.operand_bytes(spec)
        if self.dynamic(spec):
            operands = max(operands, SHARED_BYTES)
        return self.table_bytes(spec) + operands

    def fits(self, spec: DeformConvSpec) -> bool:
        """Whether a block's static tables fit 48 KB and its shared memory ``DYNAMIC_SHARED_BYTES``."""
        return self.table_bytes(spec) <= SHARED_BYTES and self.shared_bytes(spec) <= DYNAMIC_SHARED_BYTES

    @classmethod
    def for_spec(cls, spec: DeformConvSpec, o_channels: int = 256,
                 tensor_cores: bool | None = None) -> "WeightTiling":
        """``tensor_cores`` (default: where grad_weight has an mma, ``backward_mma``: float16,
        bfloat16, TF32, and float32 without TF32 as 3xTF32; raises ValueError if True for float64).
        float32's 3xTF32 default: every float32 record's tuning measured it 1.7-4.6x faster than
        the fastest SIMT tiling on an H200 (ms, SIMT / 3xTF32): train_stem 0.575 / 0.124,
        train_down 0.454 / 0.277, r50 c3 1.039 / 0.441, c4 1.012 / 0.368, c5 1.007 / 0.597.
        With tensor cores: up to ``o_channels`` x 64 channels per block, on a warp per 32 output
        channels x 2 warps of 2 x 4 ``mma`` tiles (channels padded to whole tiles):
        each block interpolates its input channels' samples once for all its output channels, so
        wide layers re-interpolate less. Measured on an H200 (ms; blocks of up to 64, 128 and 256
        output channels): r50 c3 fp16 0.83, 0.51 (its 128 channels); c4 fp16 0.80, 0.49, 0.36,
        TF32 0.89, 0.42, 0.43; c5 fp16 0.57, 0.42, 0.38, TF32 0.76, 0.45, 0.42. On SIMT cores: up
        to 64 x 64 channels per block, on 16 x 16 threads with 4 x 4 registers for groups of up to
        64 output channels, on 8 x 16 threads with 8 x 4 registers and about twice the blocks for
        wider ones. 64 positions per step (32 where shared memory would pass 48 KB: the sampling
        points of many offset groups, as in the video layer in float32). Measured on an H200 (SIMT
        fp16, ms): 0.76 / 0.41 on paper N=32 / video (0.94 / 0.86 on r50 c3 / c5) against 1.04 /
        0.48 (1.28 / 0.95) the other way round. Splits until the grid has about ``TARGET_BLOCKS``
        blocks of ``SIMT_THREADS`` threads on SIMT cores (wide layers' blocks of 128 threads: twice the
        blocks; a layer of one input channel per group, as a stem, 16 threads: 16 times), about one
        wave (``fewest_waves``) on tensor cores."""
        opg, ipg = spec.out_channels // spec.groups, spec.in_channels // spec.groups
        has_mma = backward_mma(spec) is not None
        if tensor_cores is None:
            tensor_cores = has_mma
        elif tensor_cores and not has_mma:
            raise ValueError(f"grad_weight has no tensor-core mma for {spec.dtype} (float16, bfloat16, float32)")
        wide = opg > 64 and not tensor_cores
        if tensor_cores:
            o_pad, c_pad = min(-(-opg // 16) * 16, o_channels), min(-(-ipg // 8) * 8, 64)
            o_warps, c_warps = max(1, o_pad // 32), 2 if c_pad == 64 else 1
            tiling = cls(o_warps, o_pad // 16 // o_warps, c_warps, c_pad // 8 // c_warps, 64, 1, True)
        else:
            o_regs, c_regs = largest_divisor(opg, 8 if wide else 4), largest_divisor(ipg, 4)
            tiling = cls(largest_divisor(opg // o_regs, 8 if wide else 16), o_regs,
                         largest_divisor(ipg // c_regs, 16), c_regs, 64, 1)
        if tiling.shared_bytes(spec) > SHARED_BYTES:
            tiling = dataclasses.replace(tiling, positions=32)
        if not tiling.tensor_cores:
            return tiling.with_splits(spec, -(-TARGET_BLOCKS * SIMT_THREADS // (tiling.tiles(spec) * tiling.threads)))
        return dataclasses.replace(tiling, splits=tiling.fewest_waves(spec))

    def fewest_waves(self, spec: DeformConvSpec) -> int:
        """The splits that minimise (waves of resident blocks) x (steps per split), the fewest of
        equals, with at most ``PARTIAL_FLOATS`` partial sums. Measured on an H200 (float16
        tensor-core grad_weight, ms, by the splits' grid in waves): paper N=32 0.85 (1/2 wave),
        0.64 (3/4), 0.56 (1 wave), 0.73 (1.5 waves); r50 c5 0.77 (1 split, 1/2 wave of 33 steps)
        and 0.54 (3 splits, 2 waves of 11). r50 c3 does not follow the model: 0.61 at 3/4 of a wave,
        0.83-0.84 at 28-30 splits (this rule's choice, about one wave)."""
        ipg = spec.in_channels // spec.groups
        tiles = self.tiles(spec)
        steps = self.total_steps(spec)
        wave = resident_blocks(self.shared_bytes(spec), self.threads) * SMS
        most = max(1, min(steps, PARTIAL_FLOATS // (spec.out_channels * ipg * spec.kernel_h * spec.kernel_w)))

        def cost(splits):
            return _waves_x_work(tiles, splits, wave, steps), splits

        return _without_empty_splits(steps, min(range(1, most + 1), key=cost))

    def tiles(self, spec: DeformConvSpec) -> int:
        """Blocks of one split: taps x groups x output- and input-channel tiles per group (tensor
        cores pad the last of each)."""
        opg, ipg = spec.out_channels // spec.groups, spec.in_channels // spec.groups
        return spec.kernel_h * spec.kernel_w * spec.groups * -(-opg // self.o_tile) * -(-ipg // self.c_tile)

    def total_steps(self, spec: DeformConvSpec) -> int:
        """Steps of ``positions`` over the whole (batch x positions) reduction, all splits together."""
        return -(-spec.batch * spec.out_h * spec.out_w // self.positions)

    def steps(self, spec: DeformConvSpec) -> int:
        """Steps of ``positions`` each split takes."""
        return -(-self.total_steps(spec) // self.splits)

    def with_splits(self, spec: DeformConvSpec, splits: int) -> "WeightTiling":
        """This tiling in ``splits`` splits, clamped to 1 ... ``total_steps`` and lowered until no
        split is empty."""
        steps = self.total_steps(spec)
        return dataclasses.replace(self, splits=_without_empty_splits(steps, max(1, min(splits, steps))))


def backward_mma(spec: DeformConvSpec):
    """``(mma, three_tf32)``: the ``mma.sync`` of the fused kernels' tensor-core tilings (grad_data's
    grad_columns, grad_weight), and whether each product takes three of them on the operands' TF32
    parts and rests (float32 without TF32: 3xTF32, about float32's accuracy); None for float64."""
    if spec.dtype == "float32" and not spec.tf32:
        return MMA_SHAPES["tf32"], True
    mma = mma_shape(spec)
    return None if mma is None else (mma, False)


@T.macro
def split_tf32(values, count: int, rests: int):
    """``values[:count]`` rounded to TF32 (``tf32_part``), their TF32 rests into ``values[rests:]``
    (3xTF32's operands: the products rest x part, part x rest, part x part, NVIDIA's scheme)."""
    for e in T.unroll(count):
        values[rests + e] = tf32_rest(values[e], tf32_part(values[e]))
        values[e] = tf32_part(values[e])


def grad_data_primfunc(spec: DeformConvSpec, tiling: DataTiling):
    """grad_input (accumulate dtype, NCHW with the plane flattened, zeroed by the caller; added to
    with atomics), grad_offset and grad_mask per channel split (accumulate dtype, ``[channel_splits,
    *offset_shape]`` and ``[channel_splits, *mask_shape]``), see the module docstring. Parameters:
    ``input [N, C, H * W], offset, mask?, weight, grad_output`` (NCHW, the spec's dtype), then the
    three outputs. With ``tiling.deterministic`` grad_input is int64 (multiples of the quantum
    ``contribution_bound`` sets: the bound's exponent e, ``bound < 2**e``, gives contributions in
    units of ``2**(e - bits)``, ``bits`` = 30 - ceil(log2(threads x taps)); the caller converts) and
    a last parameter ``contribution_bound [1]`` (float32, finite; the caller's) bounds every
    |column x mask|: the same integers whatever the order of the additions."""

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    o_ch, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    taps = kh * kw
    cpg, ipg, opg = c // og, c // g, o_ch // g
    (sh, sw), (pad_h, pad_w), (dh, dw) = spec.stride, spec.padding, spec.dilation
    th, tw, halo, chunk, o_step, splits = (tiling.tile_h, tiling.tile_w, tiling.halo, tiling.chunk, tiling.o_step,
                                           tiling.channel_splits)
    tensor_cores = tiling.tensor_cores
    tap_group = tiling.tap_group
    mma, three_tf32 = backward_mma(spec) or (None, False)
    if taps % tap_group:
        raise ValueError(f"{tiling}: groups of taps divide the kernel's {taps} taps")
    if cpg % (chunk * splits) or ipg % chunk or (opg % o_step and not tensor_cores):
        raise ValueError(f"{tiling} does not divide the layer's channels (per offset group {cpg}, "
                         f"per group {ipg} in / {opg} out)")
    staged = tiling.staged
    interior = tiling.interior_path
    if interior and not staged:
        raise ValueError(f"{tiling}: the interior path reads the staged patches")
    batch = tiling.load_batch
    if batch < 1:
        raise ValueError(f"{tiling}: a thread issues at least one load per batch, got load_batch={batch}")
    pipelined = tiling.pipelined
    if pipelined and not (tiling.tensor_cores and tiling.tap_group > 1):
        raise ValueError(f"{tiling}: only the tensor-core tap groups pipeline their weight stages")
    if tiling.prefetch and not pipelined:
        raise ValueError(f"{tiling}: only pipelined weight stages prefetch grad_output's fragments")
    rows, cols = tiling.patch(spec)
    patch = rows * cols if staged else 1
    threads = th * tw
    if tensor_cores and (mma is None or o_step % mma.k or threads % 32):
        raise ValueError(f"{tiling} cannot take tensor cores for {spec.dtype}{' on TF32' * spec.tf32}: they need "
                         f"float16, bfloat16, TF32 or float32, output channels per stage a multiple of the mma depth "
                         f"({mma.k if mma else '-'}) and tiles of whole warps (32 positions)")
    tiles_y, tiles_x = -(-oh // th), -(-ow // tw)
    chunks_per_split = cpg // chunk // splits
    has_mask = spec.has_mask
    blocks = n * og * tiles_y * tiles_x * splits
    n, c, pixels, blocks = index_extents(spec, n, c, h * w, blocks)
    nan, zero, one, below = (tirx.const(v, acc) for v in (float("nan"), 0, 1, -2))
    h_acc, w_acc = _in_dtype(acc, h, w)  # compared with sampling points
    stages = tiling.stages(spec)
    deterministic = tiling.deterministic
    bound_elements, = index_extents(spec, tiling.bound_elements(spec) if tiling.takes_bounds else 1)
    # float2 / float4 atomics: float32 only; deterministic grad_input takes int64 ones
    width = tiling.flush_width if acc == "float32" and not deterministic else 1
    if width not in (1, 2, 4):
        raise ValueError(f"{tiling} flushes groups of 1, 2 or 4 pixels, got {width}")
    min_blocks = resident_blocks(tiling.shared_bytes(spec), threads)
    scope = "shared.dyn" if tiling.shared_bytes(spec) > SHARED_BYTES else "shared"
    fixed = staged and tiling.fixed_point
    bits = tiling.quantum_bits(spec)
    if fixed and (acc != "float32" or bits < 8):
        raise ValueError(f"{tiling}: fixed-point patches need float32 sums and at most 2**22 samples per block "
                         f"and channel, not {acc} and {threads * taps}")
    if deterministic and not fixed:
        raise ValueError(f"{tiling}: deterministic grad_input needs staged fixed-point patches")
    grad_input_dtype = "int64" if deterministic else acc
    row_groups = cols // width + 2  # groups of ``width`` that cover a patch row at any alignment

    def fixed_add(address, value):
        """Adds the int32 ``value`` to the shared-memory word at ``address`` (a float buffer holding
        fixed-point sums): a native shared-memory atomic, where float adds are compare-and-swap loops."""
        return device_call("deft_shared_add_fixed", "float* address, int value",
                           "atomicAdd(reinterpret_cast<int*>(address), value);", address, value)

    def global_fixed_add(address, value):
        """Adds the int64 ``value`` to the global int64 word at ``address`` (a native reduction)."""
        return device_call("deft_global_add_fixed", "void* address, long long value",
                           "atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>"
                           "(value));", address, value)

    def input_add(grad_input, index, value, scale):
        """Adds the contribution ``value`` to ``grad_input[index]``: a float atomic or, deterministic,
        its fixed-point multiple."""

        if deterministic:
            return global_fixed_add(T.address_of(grad_input[index]), T.Cast("int64", T.round(value * scale[0])))
        return T.cuda.atomic_add(T.address_of(grad_input[index]), value)

    def bits_max(address, value):
        """atomicMax of the int32 ``value`` into the shared-memory word at ``address``."""
        return device_call("deft_shared_max_bits", "int* address, int value", "atomicMax(address, value);",
                           address, value)

    def patch_sum(grad_patch, e, scale):
        """Patch pixel ``e``'s sum as a float (fixed-point sums times ``scale[1]``, where ``scale[2]``)."""
        if not fixed:
            return grad_patch[e]
        return tirx.Select(scale[2] > zero, tirx.Cast(acc, tirx.reinterpret("int32", grad_patch[e])) * scale[1],
                           grad_patch[e])

    def any_nonzero(values):
        return functools.reduce(tirx.Or, [values[k] != zero for k in range(width)])

    def vector_add(address, values):
        """One ``atomicAdd(float{width}*, float{width})`` (sm_90, global memory) for the group."""
        names = [f"v{k}" for k in range(width)]
        parameters = ", ".join(["float* address"] + [f"float {v}" for v in names])
        body = f"atomicAdd(reinterpret_cast<float{width}*>(address), make_float{width}({', '.join(names)}));"
        return device_call(f"deft_atomic_add_float{width}", parameters, body, address,
                           *[values[k] for k in range(width)])

    # grad_output fragments held per group, weights of every tap staged per chunk
    resident = tensor_cores and stages == 1 and tap_group == 1
    # Tensor cores: each warp multiplies its 32 positions (two m16 tiles) of grad_output by the
    # chunk's weights (n8 tiles, channels past the chunk zero) over the stage's output channels
    # (mma-deep steps, channels past the group zero); the sums pass through shared memory
    # (``exchange``) to the thread of each position. Shapes of the unused buffers are 1.
    n8 = -(-chunk // 8) * 8 if tensor_cores else 1
    k_steps = o_step // mma.k if tensor_cores else 1
    a_elements = mma.a_elements if tensor_cores else 1
    w_row = o_step + 16 // DTYPE_BYTES[dtype]  # rows padded by 16 bytes: no bank conflicts
    x_row = n8 + 4
    w_taps = taps if resident else tap_group if tensor_cores else 1
    w_size = w_taps * n8 * w_row  # one weight stage's buffer (tensor cores); pipelined: two
    w_shape, w_dtype = (((1 + pipelined) * w_size,), dtype) if tensor_cores else ((o_step * tap_group * chunk,), acc)
    # load_batch: loads per thread in flight per round of the weight (tensor cores or SIMT) and patch stagings
    w_per_thread = -(-(w_taps * n8 * o_step if tensor_cores else o_step * tap_group * chunk) // threads)
    w_batch = min(batch, w_per_thread)
    w_rounds = -(-w_per_thread // w_batch)
    p_per_thread = -(-chunk * patch // threads)
    p_batch = min(batch, p_per_thread)
    p_rounds = -(-p_per_thread // p_batch)
    group_shape = (tap_group * chunk * threads if tap_group > 1 else 1,)  # [tap in group][channel][thread]
    a_size = 2 * k_steps * a_elements  # one stage's fragments of the warp's two m16 tiles
    a_shape = ((1 + tiling.prefetch) * a_size,)
    b_shape = ((1 + three_tf32) * mma.b_elements if tensor_cores else 1,)  # 3xTF32: the rests after
    n_tiles = tap_group * n8 // 8  # n8 tiles of one multiply: the chunk's channels of each tap of the group
    c_shape = (2 * n_tiles * 4,)
    x_shape = (threads * x_row if tensor_cores and tap_group == 1 else 1,)

    @T.macro
    def multiply(a_frag, a_at, b_frag, c_frag, c_at):
        """``c_frag[c_at:]`` += A (``a_frag[a_at:]``) x B (``b_frag``): one ``mma.sync``; 3xTF32 three,
        on A's TF32 parts and rests split here and B's split by ``load_b``."""
        if three_tf32:
            a_parts = T.alloc_buffer((2 * a_elements,), dtype, scope="local")
            for e in T.unroll(a_elements):
                a_parts[e] = a_frag[a_at + e]
            split_tf32(a_parts, a_elements, a_elements)
            T.evaluate(mma.sync(a_parts, a_elements, b_frag, 0, c_frag, c_at))
            T.evaluate(mma.sync(a_parts, 0, b_frag, mma.b_elements, c_frag, c_at))
            T.evaluate(mma.sync(a_parts, 0, b_frag, 0, c_frag, c_at))
        else:
            T.evaluate(mma.sync(a_frag, a_at, b_frag, 0, c_frag, c_at))

    @T.macro
    def load_b(b_frag, w_stage, base, ks, lane_g, lane_t):
        """B's fragment of an n8 tile, the weights of ``w_stage[base:]`` (rows of 8 channels) at mma
        step ``ks`` (3xTF32: split into TF32 parts and rests)."""
        for i in T.unroll(mma.b_elements):
            k, j = T.meta_var(mma.b_element(i, lane_g, lane_t))
            b_frag[i] = w_stage[base + j * w_row + ks * mma.k + k]
        if three_tf32:
            split_tf32(b_frag, mma.b_elements, mma.b_elements)

    @T.macro
    def load_a(a_frag, a_at, grad_output, b, group, stage, tile_y, tile_x, thread):
        """This warp's grad_output fragments of one stage into ``a_frag[a_at:]`` (positions past the
        output and channels past the group zero)."""
        warp = thread // 32
        lane_g = thread % 32 // 4
        lane_t = thread % 4
        for m in T.unroll(2):
            for ks in T.unroll(k_steps):
                for i in T.unroll(a_elements):
                    row, col = T.meta_var(mma.a_element(i, lane_g, lane_t))
                    pos = warp * 32 + m * 16 + row
                    ay = tile_y * th + pos // tw
                    ax = tile_x * tw + pos % tw
                    o = stage * o_step + ks * mma.k + col
                    a_frag[a_at + (m * k_steps + ks) * a_elements + i] = T.Cast(dtype, 0)
                    if ay < oh and ax < ow and o < opg:
                        a_frag[a_at + (m * k_steps + ks) * a_elements + i] = grad_output[b, group * opg + o, ay, ax]

    @T.macro
    def load_weight_regs(regs, count, first, weight, group, c_in, stage, t, thread):
        """This thread's ``count`` elements of ``stage_weights``' stage from its element ``first`` on
        (element ``i`` at ``i * threads + thread``), every one in flight at once, into ``regs``."""
        for u in T.unroll(count):
            e = (first + u) * threads + thread
            j = e // w_taps % n8
            k = e // (w_taps * n8)
            regs[u] = T.Cast(dtype, 0)
            if e < w_taps * n8 * o_step and j < chunk and stage * o_step + k < opg:
                regs[u] = weight[group * opg + stage * o_step + k, c_in + j, (e % w_taps + t) // kw,
                                 (e % w_taps + t) % kw]

    @T.macro
    def store_weight_regs(regs, count, first, w_stage, base, thread):
        """``load_weight_regs``' elements to their places in ``w_stage[base:]``."""
        for u in T.unroll(count):
            e = (first + u) * threads + thread
            if e < w_taps * n8 * o_step:
                w_stage[base + (e % w_taps * n8 + e // w_taps % n8) * w_row + e // (w_taps * n8)] = regs[u]

    @T.macro
    def stage_weights(w_stage, weight, group, c_in, stage, t, thread):
        """Weights of the chunk's channels (from ``c_in`` in the group) x the stage's output channels,
        of every tap (one weight stage) or of tap ``t``, into ``w_stage [tap][channel][output channel]``
        (with ``load_batch`` > 1, that many loads per thread in flight before their stores)."""
        if batch == 1:
            for i in range((w_taps * n8 * o_step + threads - 1) // threads):
                e = i * threads + thread
                if e < w_taps * n8 * o_step:
                    slot = e % w_taps
                    tap = slot + t
                    j = e // w_taps % n8
                    k = e // (w_taps * n8)
                    w_stage[(slot * n8 + j) * w_row + k] = T.Cast(dtype, 0)
                    if j < chunk and stage * o_step + k < opg:
                        w_stage[(slot * n8 + j) * w_row + k] = weight[group * opg + stage * o_step + k, c_in + j,
                                                                      tap // kw, tap % kw]
        else:
            loaded = T.alloc_buffer((w_batch,), dtype, scope="local")
            for i0 in range(w_rounds):
                load_weight_regs(loaded, w_batch, i0 * w_batch, weight, group, c_in, stage, t, thread)
                store_weight_regs(loaded, w_batch, i0 * w_batch, w_stage, 0, thread)

    @T.macro
    def tap_columns(columns, a_frag, b_frag, c_frag, w_stage, exchange, weight, grad_output, b, group, c_in, tile_y,
                    tile_x, t, thread):
        """``columns[j]`` = grad_columns of this thread's position, tap ``t`` and the chunk's channel
        ``j``: weight^T . grad_output on tensor cores."""
        warp = thread // 32
        lane_g = thread % 32 // 4
        lane_t = thread % 4
        for q in T.unroll(2 * n8 // 8 * 4):
            c_frag[q] = T.float32(0)
        for stage in range(stages):
            if not resident:
                load_a(a_frag, 0, grad_output, b, group, stage, tile_y, tile_x, thread)
                T.tvm_storage_sync("shared")
                stage_weights(w_stage, weight, group, c_in, stage, t, thread)
                T.tvm_storage_sync("shared")
            for ks in T.unroll(k_steps):
                for nt in T.unroll(n8 // 8):
                    load_b(b_frag, w_stage, (t * int(resident) * n8 + nt * 8) * w_row, ks, lane_g, lane_t)
                    for m in T.unroll(2):
                        multiply(a_frag, (m * k_steps + ks) * a_elements, b_frag, c_frag, (m * n8 // 8 + nt) * 4)
        T.evaluate(T.cuda.warp_sync())
        for m in T.unroll(2):
            for nt in T.unroll(n8 // 8):
                for i in T.unroll(4):
                    row, col = T.meta_var(c_element(i, lane_g, lane_t))
                    exchange[(warp * 32 + m * 16 + row) * x_row + nt * 8 + col] = c_frag[(m * n8 // 8 + nt) * 4 + i]
        T.evaluate(T.cuda.warp_sync())
        for j in T.unroll(chunk):
            columns[j] = exchange[thread * x_row + j]

    @T.macro
    def stage_simt_weights(w_stage, weight, group, c_in, o_chunk, t0, thread):
        """The SIMT sums' weight stage, between barriers: ``w_stage[(o * tap_group + slot) * chunk + j]``
        = the weight of the stage's output channel ``o``, tap ``t0 + slot`` and the chunk's channel
        ``j`` (from ``c_in`` in the group), in the accumulate dtype."""
        T.tvm_storage_sync("shared")
        if batch == 1:
            for i in range((o_step * tap_group * chunk + threads - 1) // threads):
                e = i * threads + thread
                if e < o_step * tap_group * chunk:
                    tap = t0 + e % (tap_group * chunk) // chunk
                    w_stage[e] = T.Cast(acc, weight[group * opg + o_chunk * o_step + e // (tap_group * chunk),
                                                    c_in + e % chunk, tap // kw, tap % kw])
        else:
            loaded = T.alloc_buffer((w_batch,), dtype, scope="local")
            for i0 in range(w_rounds):
                for u in T.unroll(w_batch):
                    e = (i0 * w_batch + u) * threads + thread
                    loaded[u] = T.Cast(dtype, 0)
                    if e < o_step * tap_group * chunk:
                        loaded[u] = weight[group * opg + o_chunk * o_step + e // (tap_group * chunk), c_in + e % chunk,
                                           (t0 + e % (tap_group * chunk) // chunk) // kw,
                                           (t0 + e % (tap_group * chunk) // chunk) % kw]
                for u in T.unroll(w_batch):
                    e = (i0 * w_batch + u) * threads + thread
                    if e < o_step * tap_group * chunk:
                        w_stage[e] = T.Cast(acc, loaded[u])
        T.tvm_storage_sync("shared")

    @T.macro
    def group_mma(a_frag, a_at, b_frag, c_frag, w_stage, base, lane_g, lane_t):
        """One weight stage of the tensor-core tap groups: the warp's grad_output fragments from
        ``a_frag[a_at:]`` times the stage's weights from ``w_stage[base:]`` (one n8 tile per tap and 8
        channels), into ``c_frag``."""
        for ks in T.unroll(k_steps):
            for nt in T.unroll(n_tiles):
                load_b(b_frag, w_stage, base + nt * 8 * w_row, ks, lane_g, lane_t)
                for m in T.unroll(2):
                    multiply(a_frag, a_at + (m * k_steps + ks) * a_elements, b_frag, c_frag, (m * n_tiles + nt) * 4)

    @T.macro
    def group_sums_mma(group_columns, a_frag, b_frag, c_frag, w_stage, weight, grad_output, b, group, c_in, tile_y,
                       tile_x, t0, thread):
        """``group_columns[(slot * chunk + j) * threads + p]`` = grad_columns of the tile's position
        ``p``, tap ``t0 + slot`` and the chunk's channel ``j``, on tensor cores: per weight stage each
        warp multiplies its 32 positions of grad_output by the group's taps x chunk channels of
        weights (one n8 tile per tap), and the sums go from the C fragments to their slots."""
        warp = thread // 32
        lane_g = thread % 32 // 4
        lane_t = thread % 4
        for q in T.unroll(2 * n_tiles * 4):
            c_frag[q] = T.float32(0)
        if pipelined:  # stage 0's weights in buffer 0; then per stage: the next one's loads in flight
            stage_weights(w_stage, weight, group, c_in, 0, t0, thread)  # while this one multiplies
            T.tvm_storage_sync("shared")
            next_weights = T.alloc_buffer((w_per_thread,), dtype, scope="local")
            if tiling.prefetch:
                # and the next stage's fragments too: stages in pairs, so that each register buffer has a
                # constant place (``half``)
                load_a(a_frag, 0, grad_output, b, group, 0, tile_y, tile_x, thread)
                for pair in range(stages // 2):
                    for half in T.unroll(2):
                        if pair * 2 + half + 1 < stages:
                            load_a(a_frag, (1 - half) * a_size, grad_output, b, group, pair * 2 + half + 1, tile_y,
                                   tile_x, thread)
                            load_weight_regs(next_weights, w_per_thread, 0, weight, group, c_in,
                                             pair * 2 + half + 1, t0, thread)
                        group_mma(a_frag, half * a_size, b_frag, c_frag, w_stage, half * w_size, lane_g, lane_t)
                        if pair * 2 + half + 1 < stages:
                            store_weight_regs(next_weights, w_per_thread, 0, w_stage, (1 - half) * w_size, thread)
                        T.tvm_storage_sync("shared")
                if stages % 2 == 1:  # the last stage, prefetched into the first buffers
                    group_mma(a_frag, 0, b_frag, c_frag, w_stage, 0, lane_g, lane_t)
                    T.tvm_storage_sync("shared")
            else:
                for stage in range(stages):
                    load_a(a_frag, 0, grad_output, b, group, stage, tile_y, tile_x, thread)
                    if stage + 1 < stages:
                        load_weight_regs(next_weights, w_per_thread, 0, weight, group, c_in, stage + 1, t0, thread)
                    group_mma(a_frag, 0, b_frag, c_frag, w_stage, stage % 2 * w_size, lane_g, lane_t)
                    if stage + 1 < stages:
                        store_weight_regs(next_weights, w_per_thread, 0, w_stage, (stage + 1) % 2 * w_size, thread)
                    T.tvm_storage_sync("shared")
        else:
            for stage in range(stages):
                load_a(a_frag, 0, grad_output, b, group, stage, tile_y, tile_x, thread)
                T.tvm_storage_sync("shared")
                stage_weights(w_stage, weight, group, c_in, stage, t0, thread)
                T.tvm_storage_sync("shared")
                group_mma(a_frag, 0, b_frag, c_frag, w_stage, 0, lane_g, lane_t)
        for m in T.unroll(2):
            for nt in T.unroll(n_tiles):
                for i in T.unroll(4):
                    row, col = T.meta_var(c_element(i, lane_g, lane_t))
                    j = nt % (n8 // 8) * 8 + col
                    if j < chunk:
                        group_columns[(nt // (n8 // 8) * chunk + j) * threads + warp * 32 + m * 16 + row] = \
                            c_frag[(m * n_tiles + nt) * 4 + i]
        T.tvm_storage_sync("shared")

    def in_patch_only(local, scale):
        """Whether a sample takes ``interior_channel_sums``: its four corners in the patch and, fixed
        point, a finite block bound (else the patch holds float sums)."""
        inside = functools.reduce(tirx.And, [local[k] >= 0 for k in range(4)])
        return tirx.And(inside, scale[2] > zero) if fixed else inside

    def bilinear_terms(value, point, share):
        """A sample's derivatives along y and x and its interpolated value, from its four corners'
        ``value``s, its point (``ly, lx`` in ``point[0:2]``) and the corners' bilinear ``share``s:
        times column x mask, what it adds to grad_offset (y, x) and (times column) to grad_mask."""
        return (point[1] * (value[3] - value[1]) + (one - point[1]) * (value[2] - value[0]),
                point[0] * (value[3] - value[2]) + (one - point[0]) * (value[1] - value[0]),
                value[0] * share[0] + value[1] * share[1] + value[2] * share[2] + value[3] * share[3])

    def patch_scale(scale):
        """What a contribution to the patch is multiplied by: the fixed-point scale, or 1."""
        return scale[0] if fixed else one

    @T.macro
    def channel_sums(d, value, columns, point, share, flat, local, in_patch, grad_patch, input, grad_input, b, c0,
                     scale):
        """This thread's sample of one tap over the chunk's channels: grad offset / mask sums into ``d``,
        the contributions to the grad_input patch (or to grad_input, for corners outside it)."""
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
            along_y, along_x, sample = T.meta_var(bilinear_terms(value, point, share))
            d[0] = d[0] + col * point[2] * along_y
            d[1] = d[1] + col * point[2] * along_x
            if has_mask:
                d[2] = d[2] + col * T.Select(point[3] > zero, zero, sample)
            for k in T.unroll(4):
                if staged:
                    if local[k] >= 0:
                        if fixed and scale[2] > zero:
                            T.evaluate(fixed_add(T.address_of(grad_patch[j * patch + local[k]]),
                                                 T.Cast("int32", T.round(col * point[2] * share[k]
                                                                         * scale[0]))))
                        else:
                            T.evaluate(T.cuda.atomic_add(T.address_of(grad_patch[j * patch + local[k]]),
                                                         col * point[2] * share[k]))
                    elif flat[k] >= 0:
                        T.evaluate(input_add(grad_input, (b, c0 + j, flat[k]),
                                             col * point[2] * share[k], scale))
                elif flat[k] >= 0:
                    T.evaluate(T.cuda.atomic_add(T.address_of(grad_input[b, c0 + j, flat[k]]),
                                                 col * point[2] * share[k]))

    @T.macro
    def interior_channel_sums(d, value, columns, point, share, local, in_patch, grad_patch, weighted):
        """``channel_sums`` for a sample whose four corners are in the patch (so in the image: not
        outside, every corner read and added in shared memory) and, fixed point, a finite block
        bound: no branch per corner, and each corner's mask x bilinear weight (x the fixed-point
        scale: a power of 2) multiplied once per tap (``weighted``), the order torchvision's
        col2im takes (mask x weight, then x column)."""
        for j in range(chunk):
            for k in T.unroll(4):
                value[k] = T.Cast(acc, in_patch[j * patch + local[k]])
            col = columns[j]
            along_y, along_x, sample = T.meta_var(bilinear_terms(value, point, share))
            d[0] = d[0] + col * point[2] * along_y
            d[1] = d[1] + col * point[2] * along_x
            if has_mask:
                d[2] = d[2] + col * sample
            for k in T.unroll(4):
                if fixed:
                    T.evaluate(fixed_add(T.address_of(grad_patch[j * patch + local[k]]),
                                         T.Cast("int32", T.round(col * weighted[k]))))
                else:
                    T.evaluate(T.cuda.atomic_add(T.address_of(grad_patch[j * patch + local[k]]), col * weighted[k]))

    @T.macro
    def body(block, thread, input, offset, mask, weight, grad_output, grad_input, grad_offset, grad_mask,
             contribution_bound, bounds):
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

        in_patch = T.alloc_buffer((chunk * patch,), dtype, scope=scope)
        grad_patch = T.alloc_buffer((chunk * patch,), acc, scope=scope)
        w_stage = T.alloc_buffer(w_shape, w_dtype, scope=scope)
        exchange = T.alloc_buffer(x_shape, "float32", scope=scope)
        group_columns = T.alloc_buffer(group_shape, acc, scope=scope)
        sums = T.alloc_buffer((tap_group * chunk,), acc, scope="local")
        a_frag = T.alloc_buffer(a_shape, dtype, scope="local")
        b_frag = T.alloc_buffer(b_shape, dtype, scope="local")
        c_frag = T.alloc_buffer(c_shape, "float32", scope="local")
        columns = T.alloc_buffer((chunk,), acc, scope="local")
        d = T.alloc_buffer((3,), acc, scope="local")  # this chunk's sums: grad offset y, x, grad mask
        flat = T.alloc_buffer((4,), "int32", scope="local")
        local = T.alloc_buffer((4,), "int32", scope="local")
        share = T.alloc_buffer((4,), acc, scope="local")
        value = T.alloc_buffer((4,), acc, scope="local")
        point = T.alloc_buffer((5,), acc, scope="local")  # ly, lx, mask, outside, nan
        weighted = T.alloc_buffer((4,), acc, scope="local")  # interior samples: mask x corner weight x scale
        patch_loads = T.alloc_buffer((p_batch,), dtype, scope="local")  # load_batch > 1: the patch's loads in flight
        flush = T.alloc_buffer((width,), acc, scope="local")
        bound = T.alloc_buffer((3,), "int32", scope=scope)  # bits of max |grad_output|, |mask|, sum |weight|
        peak = T.alloc_buffer((2,), "int32", scope="local")
        weights = T.alloc_buffer((1,), acc, scope="local")
        scale = T.alloc_buffer((3,), acc, scope="local")  # fixed point: to, from, and whether used (1)
        if deterministic:  # the caller's bound on |contribution| (finite), the same for every block
            weights[0] = contribution_bound[0]
        elif fixed:  # the block's bound on |contribution| (column x mask x share)
            if thread < 3:
                bound[thread] = 0
            T.tvm_storage_sync("shared")
            peak[0] = 0
            peak[1] = 0
            if valid:  # the prepare kernel's peak |grad_output| at the position
                peak[0] = magnitude_bits(bounds[(b * oh + oy) * ow + ox])
                peak[1] = 0x3F800000  # the bits of 1.0
                if has_mask:
                    peak[1] = 0
                    for t in range(taps):
                        peak[1] = T.max(peak[1], magnitude_bits(mask[b, gi * taps + t, oy, ox]))
            T.evaluate(bits_max(T.address_of(bound[0]), peak[0]))
            T.evaluate(bits_max(T.address_of(bound[1]), peak[1]))
            for i in range((cpg // splits * taps + threads - 1) // threads):  # its sums of |weight| per
                pair = i * threads + thread  # (channel, tap) of the block's channels
                if pair < cpg // splits * taps:
                    ch = gi * cpg + split * (cpg // splits) + pair // taps
                    T.evaluate(bits_max(T.address_of(bound[2]),
                                        magnitude_bits(bounds[n * oh * ow + ch * taps + pair % taps])))
            T.tvm_storage_sync("shared")
            weights[0] = T.reinterpret(acc, bound[0]) * T.reinterpret(acc, bound[1]) * T.reinterpret(acc, bound[2])
        if fixed:  # its power-of-2 scale:
            # |contribution| <= weights[0] < 2**(exponent - 126): scaled by 2**(bits + 126 - exponent) it is
            # below 2**bits (the exponent clamped where the bound is 0 or tiny: then so is every sum).
            scale[0] = T.reinterpret(acc, T.shift_left(
                T.min(bits + 253 - T.shift_right(T.reinterpret("int32", weights[0]), 23), 254), 23))
            scale[1] = one / scale[0]
            scale[2] = T.Select(T.isfinite(weights[0]), one, zero)
        for step in range(chunks_per_split):
            c0 = gi * cpg + (split * chunks_per_split + step) * chunk
            group = c0 // ipg
            if staged or resident:
                T.tvm_storage_sync("shared")
            if staged and batch == 1:
                for i in range((chunk * patch + threads - 1) // threads):
                    e = i * threads + thread
                    if e < chunk * patch:
                        yy = patch_y + e % patch // cols
                        xx = patch_x + e % cols
                        grad_patch[e] = zero
                        in_patch[e] = T.Cast(dtype, 0)
                        if yy >= 0 and yy < h and xx >= 0 and xx < w:
                            in_patch[e] = input[b, c0 + e // patch, yy * w + xx]
            elif staged:  # ``load_batch`` loads per thread in flight, then their stores
                for i0 in range(p_rounds):
                    for u in T.unroll(p_batch):
                        e = (i0 * p_batch + u) * threads + thread
                        yy = patch_y + e % patch // cols
                        xx = patch_x + e % cols
                        patch_loads[u] = T.Cast(dtype, 0)
                        if e < chunk * patch and yy >= 0 and yy < h and xx >= 0 and xx < w:
                            patch_loads[u] = input[b, c0 + e // patch, yy * w + xx]
                    for u in T.unroll(p_batch):
                        e = (i0 * p_batch + u) * threads + thread
                        if e < chunk * patch:
                            grad_patch[e] = zero
                            in_patch[e] = patch_loads[u]
            if resident:  # one weight stage: this chunk's weights of every tap, and the tile's
                stage_weights(w_stage, weight, group, c0 - group * ipg, 0, 0, thread)  # grad_output
                if step == 0 or c0 % ipg == 0:  # fragments at each group's first chunk
                    load_a(a_frag, 0, grad_output, b, group, 0, tile_y, tile_x, thread)
                T.tvm_storage_sync("shared")
            for tg in range(taps // tap_group):
                if tap_group > 1 and tensor_cores:  # the sums of taps tg * tap_group ..., parked per position
                    group_sums_mma(group_columns, a_frag, b_frag, c_frag, w_stage, weight, grad_output, b, group,
                                   c0 - group * ipg, tile_y, tile_x, tg * tap_group, thread)
                elif tap_group > 1:  # the SIMT sums of taps tg * tap_group ..., parked per thread
                    for q in T.unroll(tap_group * chunk):
                        sums[q] = zero
                    for o_chunk in range(stages):
                        stage_simt_weights(w_stage, weight, group, c0 - group * ipg, o_chunk, tg * tap_group, thread)
                        if valid:
                            for o in range(o_step):
                                dy = T.Cast(acc, grad_output[b, group * opg + o_chunk * o_step + o, oy, ox])
                                for q in T.unroll(tap_group * chunk):
                                    sums[q] = sums[q] + w_stage[o * tap_group * chunk + q] * dy
                    for q in T.unroll(tap_group * chunk):
                        group_columns[q * threads + thread] = sums[q]
                for tt in range(tap_group):
                    t = tg * tap_group + tt
                    ky = t // kw
                    kx = t % kw
                    if tensor_cores and tap_group == 1:
                        tap_columns(columns, a_frag, b_frag, c_frag, w_stage, exchange, weight, grad_output, b, group,
                                    c0 - group * ipg, tile_y, tile_x, t, thread)
                    elif tap_group > 1:
                        for j in T.unroll(chunk):
                            columns[j] = group_columns[(tt * chunk + j) * threads + thread]
                    else:
                        for j in T.unroll(chunk):
                            columns[j] = zero
                        for o_chunk in range(stages):
                            stage_simt_weights(w_stage, weight, group, c0 - group * ipg, o_chunk, t, thread)
                            if valid:
                                for o in T.unroll(o_step):
                                    dy = T.Cast(acc, grad_output[b, group * opg + o_chunk * o_step + o, oy, ox])
                                    for j in T.unroll(chunk):
                                        columns[j] = columns[j] + w_stage[o * chunk + j] * dy
                    if valid:
                        y = (T.Cast(acc, oy * sh - pad_h + ky * dh)
                             + T.Cast(acc, offset[b, (gi * taps + t) * 2, oy, ox]))
                        x = (T.Cast(acc, ox * sw - pad_w + kx * dw)
                             + T.Cast(acc, offset[b, (gi * taps + t) * 2 + 1, oy, ox]))
                        ys = T.Select(y > -2 and y < h_acc + 1, y, below)
                        xs = T.Select(x > -2 and x < w_acc + 1, x, below)
                        y_low = T.Cast("int32", T.floor(ys))
                        x_low = T.Cast("int32", T.floor(xs))
                        point[0] = ys - T.Cast(acc, y_low)
                        point[1] = xs - T.Cast(acc, x_low)
                        point[2] = one
                        if has_mask:
                            point[2] = T.Cast(acc, mask[b, gi * taps + t, oy, ox])
                        point[3] = T.Select(y <= -1 or y >= h_acc or x <= -1 or x >= w_acc, one, zero)
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
                        if interior:  # the branch-free loop where it applies
                            if in_patch_only(local, scale):
                                for k in T.unroll(4):
                                    weighted[k] = point[2] * share[k] * patch_scale(scale)
                                interior_channel_sums(d, value, columns, point, share, local, in_patch, grad_patch,
                                                      weighted)
                            else:
                                channel_sums(d, value, columns, point, share, flat, local, in_patch, grad_patch,
                                             input, grad_input, b, c0, scale)
                        else:
                            channel_sums(d, value, columns, point, share, flat, local, in_patch, grad_patch, input,
                                         grad_input, b, c0, scale)
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
            if staged and width == 1:
                T.tvm_storage_sync("shared")
                for i in range((chunk * patch + threads - 1) // threads):
                    e = i * threads + thread
                    if e < chunk * patch:
                        yy = patch_y + e % patch // cols
                        xx = patch_x + e % cols
                        if deterministic:  # the fixed-point sum as it is
                            total_fixed = T.Cast("int64", T.reinterpret("int32", grad_patch[e]))
                            if total_fixed != T.int64(0) and yy >= 0 and yy < h and xx >= 0 and xx < w:
                                T.evaluate(global_fixed_add(
                                    T.address_of(grad_input[b, c0 + e // patch, yy * w + xx]), total_fixed))
                        else:
                            total = patch_sum(grad_patch, e, scale)
                            if total != zero and yy >= 0 and yy < h and xx >= 0 and xx < w:
                                T.evaluate(T.cuda.atomic_add(
                                    T.address_of(grad_input[b, c0 + e // patch, yy * w + xx]), total))
            elif staged:  # flushed in aligned groups of ``width`` pixels of grad_input's flat layout
                T.tvm_storage_sync("shared")
                for i in range((chunk * rows * row_groups + threads - 1) // threads):
                    e = i * threads + thread
                    if e < chunk * rows * row_groups:
                        j = e // (rows * row_groups)
                        r = e // row_groups % rows
                        yy = patch_y + r
                        x_lo = T.max(patch_x, 0)
                        x_hi = T.min(patch_x + cols, w)
                        if yy >= 0 and yy < h and x_lo < x_hi:
                            row0 = yy * w  # the row's first pixel in the plane
                            skew = T.Cast("int32", ((b * c + c0 + j) * pixels + row0 + x_lo) % width)
                            start = x_lo - skew + e % row_groups * width  # the group's first x (may be < 0)
                            if start < x_hi:
                                for k in T.unroll(width):
                                    flush[k] = zero
                                    if start + k >= x_lo and start + k < x_hi:
                                        flush[k] = patch_sum(grad_patch, j * patch + r * cols + start + k - patch_x,
                                                             scale)
                                if start >= 0 and start + width <= w:  # the whole group in the row
                                    if any_nonzero(flush):
                                        T.evaluate(vector_add(T.address_of(grad_input[b, c0 + j, row0 + start]), flush))
                                else:
                                    for k in T.unroll(width):
                                        if start + k >= x_lo and start + k < x_hi and flush[k] != zero:
                                            T.evaluate(T.cuda.atomic_add(
                                                T.address_of(grad_input[b, c0 + j, row0 + start + k]), flush[k]))

    offset_shape = (splits, n, *spec.offset_shape[1:])
    mask_shape = (splits, n, *spec.mask_shape[1:])

    @T.prim_func
    def grad_data(
        input: T.Buffer((n, c, pixels), dtype),
        offset: T.Buffer(spec.offset_shape, dtype),
        mask: T.Buffer(spec.mask_shape, dtype),
        weight: T.Buffer(spec.weight_shape, dtype),
        grad_output: T.Buffer(spec.output_shape, dtype),
        grad_input: T.Buffer((n, c, pixels), grad_input_dtype),
        grad_offset: T.Buffer(offset_shape, acc),
        grad_mask: T.Buffer(mask_shape, acc),
        contribution_bound: T.Buffer((1,), "float32"),
        bounds: T.Buffer((bound_elements,), "float32"),
    ):
        T.func_attr({"global_symbol": "grad_data", "tirx.noalias": True})
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(threads, thread="threadIdx.x"):
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks):
                    body(block, thread, input, offset, mask, weight, grad_output, grad_input, grad_offset, grad_mask,
                         contribution_bound, bounds)
                    T.evaluate(grid_dependency_wait())  # the entry's grad_weight done before this kernel is

    return without_parameters(grad_data, ("mask", "grad_mask") * (not has_mask)
                              + ("contribution_bound",) * (not deterministic)
                              + ("bounds",) * (not tiling.takes_bounds))


def grad_weight_primfunc(spec: DeformConvSpec, tiling: WeightTiling):
    """Partial sums of grad_weight (``[splits, out_channels, in_channels // groups, kernel_h *
    kernel_w]``, accumulate dtype) and, with a bias, of grad_bias (``[splits, out_channels]``),
    see the module docstring. Parameters: ``input [N, C, H * W], offset, mask?, grad_output [N,
    O, out_h * out_w]`` (the spec's dtype), then the outputs."""

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    o_ch, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    kh, kw, og, g = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.groups
    taps = kh * kw
    cpg, ipg, opg = c // og, c // g, o_ch // g
    (sh, sw), (pad_h, pad_w), (dh, dw) = spec.stride, spec.padding, spec.dilation
    o_regs, c_threads, c_regs = tiling.o_regs, tiling.c_threads, tiling.c_regs
    o_tile, c_tile, p, splits = tiling.o_tile, tiling.c_tile, tiling.positions, tiling.splits
    tensor_cores = tiling.tensor_cores
    mma, three_tf32 = backward_mma(spec) or (None, False)
    if not tensor_cores and (opg % o_tile or ipg % c_tile):
        raise ValueError(f"{tiling} does not divide the layer's channels per group ({opg} out, {ipg} in)")
    if tensor_cores and (mma is None or p % mma.k):
        raise ValueError(f"{tiling} cannot take tensor cores for {spec.dtype}{' on TF32' * spec.tf32}: they need "
                         f"float16, bfloat16 or float32 and positions per step a multiple of the mma depth "
                         f"({mma.k if mma else '-'})")
    o_tiles, c_tiles = -(-opg // o_tile), -(-ipg // c_tile)  # per group (tensor cores pad the last)
    threads = tiling.threads
    groups_in_tile = tiling.point_table_groups(spec)
    steps = tiling.steps(spec)
    positions = oh * ow
    has_mask, has_bias = spec.has_mask, spec.has_bias
    blocks = tiling.tiles(spec) * splits
    total = n * positions  # flat positions: 32-bit (the tensors' extents may need 64)
    n, c, pixels = index_extents(spec, n, c, h * w)
    nan, zero, one, below = (tirx.const(v, acc) for v in (float("nan"), 0, 1, -2))
    h_acc, w_acc = _in_dtype(acc, h, w)  # compared with sampling points
    if tensor_cores:
        # Operands staged channel-major in the spec's dtype (rows padded by 16 bytes); each warp
        # owns o_regs m16 x c_regs n8 tiles of the block's o_tile x c_tile.
        row = p + 16 // DTYPE_BYTES[dtype]
        stage_dtype = dtype
        k_steps, a_elements, b_elements = p // mma.k, mma.a_elements, mma.b_elements

        def grads_at(q, o):
            return o * row + q

        def samples_at(q, ch):
            return ch * row + q

        grads_size, samples_size = o_tile * row, c_tile * row
    else:  # position-major in the accumulate dtype (rows padded by 4 elements)
        stage_dtype = acc
        k_steps, a_elements, b_elements = 1, 1, 1

        def grads_at(q, o):
            return q * (o_tile + 4) + o

        def samples_at(q, ch):
            return q * (c_tile + 4) + ch

        grads_size, samples_size = p * (o_tile + 4), p * (c_tile + 4)
    sums_count = o_regs * c_regs * (4 if tensor_cores else 1)
    # grad_bias sums per thread: SIMT, its o_regs output channels; tensor cores, channels thread, thread + threads, ...
    bias_rounds = -(-o_tile // threads) if tensor_cores else o_regs
    # grad_output staged in runs of up to 16 bytes where they stay in one image and aligned (tensor
    # cores: channel-major, rows of 16-byte multiples); samples by a thread per position where the
    # block's threads are a multiple of the step's positions
    vector = tiling.run_elements(spec)
    lanes = threads // p if threads % p == 0 else 0
    if tiling.load_batch < 1:
        raise ValueError(f"{tiling}: a thread loads at least one channel's corners per batch, got "
                         f"load_batch={tiling.load_batch}")
    lane_rounds = -(-c_tile // lanes) if lanes else 1  # channels per interpolating thread
    corner_batch = min(tiling.load_batch, lane_rounds) if lanes else 1
    run_type = {2: "unsigned short", 4: "unsigned", 8: "uint2", 16: "uint4"}.get(vector * DTYPE_BYTES[dtype])

    def copy_run(destination, source):
        """One ``vector``-element load and store (both aligned to its size)."""
        return device_call(f"deft_copy_{vector * DTYPE_BYTES[dtype]}", "void* destination, const void* source",
                           f"*reinterpret_cast<{run_type}*>(destination) = "
                           f"*reinterpret_cast<const {run_type}*>(source);", destination, source)
    run_bytes = vector * DTYPE_BYTES[dtype]
    if tiling.async_copy and not tiling.copies_async(spec):
        raise ValueError(f"{tiling}: grad_output's runs of {run_bytes} bytes in {spec.dtype} staged as {stage_dtype} "
                         f"cannot be copied asynchronously (cp.async: 4, 8 or 16 bytes, no conversion)")

    def copy_async(destination, source, valid):
        """``cp.async`` of one run (16 bytes past L1, fewer through it), zeros where not ``valid``."""
        cache = "cg" if run_bytes == 16 else "ca"
        body = (f'asm volatile("cp.async.{cache}.shared.global [%0], [%1], {run_bytes}, %2;" :: '
                f'"r"(static_cast<unsigned>(__cvta_generic_to_shared(destination))), "l"(source), '
                f'"r"(valid ? {run_bytes} : 0) : "memory");')
        return device_call(f"deft_copy_async_{run_bytes}", "void* destination, const void* source, bool valid",
                           body, destination, source, valid)

    def copies_arrived():
        """Waits for this thread's asynchronous copies (``cp.async.wait_all``)."""
        return device_call("deft_copies_arrived", "", 'asm volatile("cp.async.wait_all;" ::: "memory");')
    min_blocks = resident_blocks(tiling.shared_bytes(spec), threads)
    if not tiling.fits(spec):
        raise ValueError(f"{tiling} takes {tiling.table_bytes(spec)} bytes of static and {tiling.shared_bytes(spec)} "
                         f"in all of shared memory, more than a block may ({SHARED_BYTES} and {DYNAMIC_SHARED_BYTES})")
    # Past 48 KB the staged operands take the dynamic buffer (padded to 48 KB, ``WeightTiling.shared_bytes``)
    # and the sampling-point tables stay static: TVM 0.27 merges every dynamic allocation into one buffer,
    # and its barrier planner, seeing a loop that reads the tables and writes the samples in one buffer,
    # asks for a barrier inside a branch ("Cannot insert syncs inside condition").
    scope = "shared"
    if tiling.dynamic(spec):  # the samples padded so that the dynamic buffer holds at least 48 KB
        scope = "shared.dyn"
        samples_size += -(-max(0, SHARED_BYTES - tiling.operand_bytes(spec)) // DTYPE_BYTES[stage_dtype])

    @T.macro
    def multiply(grads, samples, sums, bias_sums, a, b_, thread):
        """This thread's sums += the staged step's grad_output x samples products (and the
        grad_output row sums, for grad_bias)."""
        if tensor_cores:
            warp = thread // 32
            wo = warp // c_threads
            wc = warp % c_threads
            lane_g = thread % 32 // 4
            lane_t = thread % 4
            for ks in T.unroll(k_steps):
                for m in T.unroll(o_regs):
                    for i in T.unroll(a_elements):
                        ro, cq = T.meta_var(mma.a_element(i, lane_g, lane_t))
                        a[m * a_elements + i] = grads[grads_at(ks * mma.k + cq, (wo * o_regs + m) * 16 + ro)]
                if three_tf32:  # a's TF32 parts, then their rests
                    split_tf32(a, o_regs * a_elements, o_regs * a_elements)
                for nt in T.unroll(c_regs):
                    for i in T.unroll(b_elements):
                        kq, cn = T.meta_var(mma.b_element(i, lane_g, lane_t))
                        b_[i] = samples[samples_at(ks * mma.k + kq, (wc * c_regs + nt) * 8 + cn)]
                    if three_tf32:
                        split_tf32(b_, b_elements, b_elements)
                    for m in T.unroll(o_regs):
                        if three_tf32:  # the rests' products first (small x big, big x small), then big x big
                            T.evaluate(mma.sync(a, (o_regs + m) * a_elements, b_, 0, sums, (m * c_regs + nt) * 4))
                            T.evaluate(mma.sync(a, m * a_elements, b_, b_elements, sums, (m * c_regs + nt) * 4))
                        T.evaluate(mma.sync(a, m * a_elements, b_, 0, sums, (m * c_regs + nt) * 4))
            if has_bias:  # output channel k * threads + thread (a block may have fewer threads than channels)
                for k in T.unroll(bias_rounds):
                    if k * threads + thread < o_tile:
                        for q in range(p):
                            bias_sums[k] = bias_sums[k] + T.Cast(acc, grads[grads_at(q, k * threads + thread)])
        else:
            ty = thread // c_threads
            tx = thread % c_threads
            for pl in range(p):
                for i in T.unroll(o_regs):
                    a[i] = grads[grads_at(pl, ty * o_regs + i)]
                for j in T.unroll(c_regs):
                    b_[j] = samples[samples_at(pl, tx * c_regs + j)]
                for i in T.unroll(o_regs):
                    for j in T.unroll(c_regs):
                        sums[i * c_regs + j] = sums[i * c_regs + j] + a[i] * b_[j]
                if has_bias:
                    for i in T.unroll(o_regs):
                        bias_sums[i] = bias_sums[i] + a[i]

    @T.macro
    def store(sums, bias_sums, weight_part, bias_part, split, o0, o_end, ct, t, thread):
        if tensor_cores:
            warp = thread // 32
            wo = warp // c_threads
            wc = warp % c_threads
            lane_g = thread % 32 // 4
            lane_t = thread % 4
            for m in T.unroll(o_regs):
                for nt in T.unroll(c_regs):
                    for i in T.unroll(4):
                        ro, cn = T.meta_var(c_element(i, lane_g, lane_t))
                        o = o0 + (wo * o_regs + m) * 16 + ro
                        ch = ct * c_tile + (wc * c_regs + nt) * 8 + cn
                        if o < o_end and ch < ipg:
                            weight_part[split, o, ch, t] = sums[(m * c_regs + nt) * 4 + i]
            if has_bias and t == 0 and ct == 0:
                for k in T.unroll(bias_rounds):
                    if k * threads + thread < o_tile and o0 + k * threads + thread < o_end:
                        bias_part[split, o0 + k * threads + thread] = bias_sums[k]
        else:
            ty = thread // c_threads
            tx = thread % c_threads
            for i in T.unroll(o_regs):
                for j in T.unroll(c_regs):
                    weight_part[split, o0 + ty * o_regs + i, ct * c_tile + tx * c_regs + j, t] = sums[i * c_regs + j]
            if has_bias:
                if t == 0 and ct == 0 and tx == 0:
                    for i in T.unroll(o_regs):
                        bias_part[split, o0 + ty * o_regs + i] = bias_sums[i]

    @T.macro
    def copy_grads_async(q0, o0, o_end, grad_output, grads, thread):
        """This thread's runs of grad_output at the step from flat position ``q0`` into ``grads`` by
        ``cp.async`` (zeros past the output or the group's channels; read from grad_output's first)."""
        for i in range((o_tile * p // vector + threads - 1) // threads):
            e = (i * threads + thread) * vector
            if e < o_tile * p:
                q = q0 + e % p
                valid = q < total and o0 + e // p < o_end
                T.evaluate(copy_async(T.address_of(grads[grads_at(e % p, e // p)]),
                                      T.address_of(grad_output[T.Select(valid, q // positions, 0),
                                                               T.Select(valid, o0 + e // p, 0),
                                                               T.Select(valid, q % positions, 0)]), valid))

    @T.macro
    def corner_table(table, corner_index, corner_weight, point_index, point_weight, group, pl):
        """Position ``pl``'s four corners (table index, bilinear x mask weight) in the tile's offset
        group ``group`` into ``corner_index`` / ``corner_weight``, read from the shared tables only
        when ``group`` is not the one ``table[0]`` says they hold."""
        if group != table[0]:
            table[0] = group
            for k in T.unroll(4):
                corner_index[k] = point_index[(table[0] * p + pl) * 4 + k]
                corner_weight[k] = point_weight[(table[0] * p + pl) * 4 + k]

    @T.macro
    def body(block, thread, input, offset, mask, grad_output, weight_part, bias_part):
        split = block % splits
        ct = block // splits % c_tiles
        ot = block // (splits * c_tiles) % (g * o_tiles)
        t = block // (splits * c_tiles * g * o_tiles)
        ky = t // kw
        kx = t % kw
        o0 = ot // o_tiles * opg + ot % o_tiles * o_tile
        o_end = (ot // o_tiles + 1) * opg  # the group's last output channel + 1
        c0 = ot // o_tiles * ipg + ct * c_tile
        c_valid = ipg - ct * c_tile  # channels of the tile in the group
        first_group = c0 // cpg

        point_index = T.alloc_buffer((groups_in_tile * p * 4,), "int32", scope="shared")
        point_weight = T.alloc_buffer((groups_in_tile * p * 4,), acc, scope="shared")
        point_batch = T.alloc_buffer((p,), "int32", scope="shared")
        samples = T.alloc_buffer((samples_size,), stage_dtype, scope=scope)
        grads = T.alloc_buffer((grads_size,), stage_dtype, scope=scope)
        sums = T.alloc_buffer((sums_count,), acc, scope="local")
        bias_sums = T.alloc_buffer((bias_rounds,), acc, scope="local")
        a = T.alloc_buffer(((1 + three_tf32) * o_regs * a_elements,), stage_dtype, scope="local")  # 3xTF32: rests after
        b_ = T.alloc_buffer(((1 + three_tf32) * c_regs * b_elements,), stage_dtype, scope="local")
        table = T.alloc_buffer((1,), "int32", scope="local")  # the offset group whose corners are loaded
        image = T.alloc_buffer((1,), "int32", scope="local")  # the image of this thread's position (a thread each)
        corner_index = T.alloc_buffer((4,), "int32", scope="local")
        corner_weight = T.alloc_buffer((4,), acc, scope="local")
        corner_values = T.alloc_buffer((corner_batch * 4,), acc, scope="local")  # load_batch > 1: in flight
        corner_weights = T.alloc_buffer((corner_batch * 4 if groups_in_tile > 1 else 1,), acc, scope="local")
        for i in T.unroll(sums_count):
            sums[i] = zero
        for i in T.unroll(bias_rounds):
            bias_sums[i] = zero
        for step in range(steps):
            q0 = (split * steps + step) * p
            T.tvm_storage_sync("shared")
            if tiling.async_copy:  # in flight while the sampling points are computed
                copy_grads_async(q0, o0, o_end, grad_output, grads, thread)
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
                        if y <= -1 or y >= h_acc or x <= -1 or x >= w_acc:  # outside: no sample (even if NaN)
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
            if tiling.async_copy:
                T.evaluate(copies_arrived())
            elif vector > 1:  # runs of ``vector`` positions of one output channel, one 16-byte (or less) access
                for i in range((o_tile * p // vector + threads - 1) // threads):
                    e = (i * threads + thread) * vector
                    if e < o_tile * p:
                        q = q0 + e % p
                        if q < total and o0 + e // p < o_end:
                            T.evaluate(copy_run(T.address_of(grads[grads_at(e % p, e // p)]),
                                                T.address_of(grad_output[q // positions, o0 + e // p, q % positions])))
                        else:
                            for k in T.unroll(vector):
                                grads[grads_at(e % p + k, e // p)] = T.Cast(stage_dtype, 0)
            else:
                for i in range((o_tile * p + threads - 1) // threads):
                    e = i * threads + thread
                    if e < o_tile * p:
                        q = q0 + e % p
                        grads[grads_at(e % p, e // p)] = T.Cast(stage_dtype, 0)
                        if q < total and o0 + e // p < o_end:
                            grads[grads_at(e % p, e // p)] = T.Cast(stage_dtype, grad_output[q // positions, o0 + e // p,
                                                                                             q % positions])
            T.tvm_storage_sync("shared")
            if lanes > 0:  # a thread per position
                pl = thread % p
                image[0] = point_batch[pl]  # in a register: the samples' stores do not make it reload
                table[0] = -1
                if corner_batch > 1:  # ``load_batch`` channels' corners in flight
                    for k in T.unroll(4):
                        corner_weight[k] = zero
                    for i0 in range((lane_rounds + corner_batch - 1) // corner_batch):
                        for u in T.unroll(corner_batch):
                            ch = (i0 * corner_batch + u) * lanes + thread // p
                            for k in T.unroll(4):
                                corner_values[u * 4 + k] = zero
                                if groups_in_tile > 1:  # (one offset group: the table's weights serve every channel)
                                    corner_weights[u * 4 + k] = zero
                            if ch < c_tile and ch < c_valid:
                                corner_table(table, corner_index, corner_weight, point_index, point_weight,
                                             (c0 + ch) // cpg - first_group, pl)
                                for k in T.unroll(4):
                                    if groups_in_tile > 1:
                                        corner_weights[u * 4 + k] = corner_weight[k]
                                    if corner_index[k] >= 0:
                                        corner_values[u * 4 + k] = T.Cast(acc, input[image[0], c0 + ch,
                                                                                     corner_index[k]])
                        for u in T.unroll(corner_batch):
                            ch = (i0 * corner_batch + u) * lanes + thread // p
                            if ch < c_tile:
                                interpolated = zero
                                if ch < c_valid:
                                    for k in T.unroll(4):
                                        interpolated = interpolated + corner_values[u * 4 + k] * (
                                            corner_weights[u * 4 + k] if groups_in_tile > 1 else corner_weight[k])
                                samples[samples_at(pl, ch)] = T.Cast(stage_dtype, interpolated)
                else:  # its corners read from the tables once per offset group
                    for i in range((c_tile + lanes - 1) // lanes):
                        ch = i * lanes + thread // p
                        if ch < c_tile:
                            interpolated = zero
                            if ch < c_valid:
                                corner_table(table, corner_index, corner_weight, point_index, point_weight,
                                             (c0 + ch) // cpg - first_group, pl)
                                for k in T.unroll(4):
                                    corner = zero
                                    if corner_index[k] >= 0:
                                        corner = T.Cast(acc, input[image[0], c0 + ch, corner_index[k]])
                                    interpolated = interpolated + corner * corner_weight[k]
                            samples[samples_at(pl, ch)] = T.Cast(stage_dtype, interpolated)
            else:  # threads over (channel, position) pairs
                for i in range((c_tile * p + threads - 1) // threads):
                    e = i * threads + thread
                    if e < c_tile * p:
                        pl = e % p
                        interpolated = zero
                        if e // p < c_valid:
                            base = ((c0 + e // p) // cpg - first_group) * p * 4 + pl * 4
                            for k in T.unroll(4):
                                index = point_index[base + k]
                                corner = zero
                                if index >= 0:
                                    corner = T.Cast(acc, input[point_batch[pl], c0 + e // p, index])
                                interpolated = interpolated + corner * point_weight[base + k]
                        samples[samples_at(pl, e // p)] = T.Cast(stage_dtype, interpolated)
            T.tvm_storage_sync("shared")
            multiply(grads, samples, sums, bias_sums, a, b_, thread)
        store(sums, bias_sums, weight_part, bias_part, split, o0, o_end, ct, t, thread)

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
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks):
                    T.evaluate(launch_dependents())  # the entry's grad_data may start beside this kernel's last wave
                    body(block, thread, input, offset, mask, grad_output, weight_part, bias_part)

    return without_parameters(grad_weight, ("mask",) * (not has_mask) + ("bias_part",) * (not has_bias))


@dataclasses.dataclass(frozen=True)
class ReduceSegments:
    """Which of the data kernel's outputs ``reduce_primfunc`` finishes (sum of the channel splits
    and cast, or cast alone): grad_offset, grad_mask and grad_input. The others the runtime takes
    as they are (one split already in the spec's dtype: the buffer itself)."""

    offset: bool
    mask: bool
    input: bool


def _reduce_sizes(spec: DeformConvSpec) -> tuple[int, int, int, int, int]:
    """Elements of grad_weight, grad_bias, grad_offset, grad_mask and grad_input (0 where absent)."""
    weights = spec.out_channels * spec.in_channels // spec.groups * spec.kernel_h * spec.kernel_w
    return (weights, spec.out_channels * spec.has_bias, math.prod(spec.offset_shape),
            math.prod(spec.mask_shape) * spec.has_mask, math.prod(spec.input_shape))


def reduce_segments(spec: DeformConvSpec, data: DataTiling) -> ReduceSegments:
    """The segments ``reduce_primfunc`` takes for ``spec`` and its data tiling: grad_offset and
    grad_mask where there are several channel splits or a cast, grad_input where it is cast
    (float16, bfloat16; not the deterministic kernels' int64 fixed point, which the runtime scales);
    none past int32 indexing (a ``generic_spec``'s assume int32: the runtime runs it only for
    calls whose own segments are the same, ``runtime.backward.fused_choice``)."""
    cast = spec.dtype != accumulate_dtype(spec.dtype)
    fold = data.channel_splits > 1 or cast
    if not spec.shape_generic:  # (a configuration's sizes are TIR variables)
        sizes = _reduce_sizes(spec)
        if max(sum(sizes), data.channel_splits * sizes[2]) > INT32_MAX:
            return ReduceSegments(False, False, False)
    return ReduceSegments(fold, fold and spec.has_mask, cast and not data.deterministic)


def reduce_primfunc(spec: DeformConvSpec, data: DataTiling, weight: WeightTiling, bind_threads: bool = True):
    """The gradients in the spec's dtype from the partial sums, one thread per element, the splits
    added in split order: grad_weight (``weight_shape``) and grad_bias (``[out_channels]``) from
    ``grad_weight_primfunc``'s, and the ``reduce_segments`` of ``grad_data_primfunc``'s outputs
    (grad_offset, grad_mask: their channel splits; grad_input: its float32 sums). Parameters:
    ``weight_part, bias_part?, offset_part?, mask_part?, input_part?, grad_weight, grad_bias?,
    grad_offset?, grad_mask?, grad_input?``, the parts flat per split. ``bind_threads=False``: the
    same loops, serial (buildable for a CPU, where tests check the sums)."""

    blocks_loop, threads_loop = thread_loops(bind_threads)

    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    segments = reduce_segments(spec, data)
    o_ch, w_splits, c_splits = spec.out_channels, weight.splits, data.channel_splits
    weights, biases, offsets, _, inputs = _reduce_sizes(spec)
    masks = math.prod(spec.mask_shape)  # the mask buffer's size (unused where the layer has no mask)
    has_bias, has_offset, has_mask, has_input = spec.has_bias, segments.offset, segments.mask, segments.input
    bias_end = weights + biases  # the segments' ends in the flat element index
    offset_end = bias_end + offsets * has_offset
    mask_end = offset_end + masks * has_mask
    total = mask_end + inputs * has_input
    threads = 256
    blocks = -(-total // threads)
    zero = tirx.const(0, acc)

    @T.prim_func
    def reduce(
        weight_part: T.Buffer((w_splits, weights), acc),
        bias_part: T.Buffer((w_splits, o_ch), acc),
        offset_part: T.Buffer((c_splits, offsets), acc),
        mask_part: T.Buffer((c_splits, masks), acc),
        input_part: T.Buffer((inputs,), acc),
        grad_weight: T.Buffer((weights,), dtype),
        grad_bias: T.Buffer((o_ch,), dtype),
        grad_offset: T.Buffer((offsets,), dtype),
        grad_mask: T.Buffer((masks,), dtype),
        grad_input: T.Buffer((inputs,), dtype),
    ):
        T.func_attr({"global_symbol": "reduce", "tirx.noalias": True})
        for block in blocks_loop(blocks):
            for thread in threads_loop(threads):
                e = block * threads + thread
                sum_ = zero
                if e < weights:
                    for s in range(w_splits):
                        sum_ = sum_ + weight_part[s, e]
                    grad_weight[e] = T.Cast(dtype, sum_)
                if has_bias:
                    if e >= weights and e < bias_end:
                        for s in range(w_splits):
                            sum_ = sum_ + bias_part[s, e - weights]
                        grad_bias[e - weights] = T.Cast(dtype, sum_)
                if has_offset:
                    if e >= bias_end and e < offset_end:
                        for s in range(c_splits):
                            sum_ = sum_ + offset_part[s, e - bias_end]
                        grad_offset[e - bias_end] = T.Cast(dtype, sum_)
                if has_mask:
                    if e >= offset_end and e < mask_end:
                        for s in range(c_splits):
                            sum_ = sum_ + mask_part[s, e - offset_end]
                        grad_mask[e - offset_end] = T.Cast(dtype, sum_)
                if has_input:
                    if e >= mask_end and e < total:
                        grad_input[e - mask_end] = T.Cast(dtype, input_part[e - mask_end])

    unused = [("bias_part", "grad_bias")] * (not has_bias) + [("offset_part", "grad_offset")] * (not has_offset)
    unused += [("mask_part", "grad_mask")] * (not has_mask) + [("input_part", "grad_input")] * (not has_input)
    return without_parameters(reduce, tuple(name for pair in unused for name in pair))


PREPARE_THREADS = 256


def _slices(channels: int, bind_threads: bool) -> int:
    """Threads that share one bound table entry's reduction over ``channels``: the fewest (a power
    of 2, at most 16) that leave each at most 32 channels; 1 for a serial (CPU) build."""
    slices = 1
    while bind_threads and slices < 16 and -(-channels // slices) > 32:
        slices *= 2
    return slices


def prepare_primfunc(spec: DeformConvSpec, data: DataTiling, bind_threads: bool = True):
    """The backward's first kernel: ``accumulator [N * C * H * W]`` (grad_input's sums, int64 where
    ``data.deterministic``, else the accumulate dtype) set to zero, and, where the data kernel
    takes them (``DataTiling.bound_elements``), its bound tables in ``bounds`` (float32) from
    ``weight`` and ``grad_output`` (the spec's shapes and dtype): per (image, output position) the
    largest |grad_output| over the output channels (the largest float32 bits, so NaN wins), per
    (input channel, tap) the sum of |weight| over its group's output channels, each reduced by
    ``_slices`` threads (strided channels, then the slices' results in slice order: the same sums
    on every run). Computed once per call, where every block of the data kernel (and each of its
    channel splits) used to read all of its positions' output channels and its channels' weights.
    ``bind_threads=False``: the same loops, serial (buildable for a CPU)."""

    elements = math.prod(spec.input_shape)
    sums = "int64" if data.deterministic else accumulate_dtype(spec.dtype)
    tables = data.bound_elements(spec)
    threads = PREPARE_THREADS
    positions = spec.batch * spec.out_h * spec.out_w
    o_ch, opg, ipg = spec.out_channels, spec.out_channels // spec.groups, spec.in_channels // spec.groups
    oh, ow, kw, taps = spec.out_h, spec.out_w, spec.kernel_w, spec.kernel_h * spec.kernel_w
    pairs = spec.in_channels * taps
    peak_slices, sum_slices = _slices(o_ch, bind_threads), _slices(opg, bind_threads)
    peak_items, sum_items = threads // peak_slices, threads // sum_slices  # entries per block
    zero_blocks = -(-elements // threads)
    has_tables = data.takes_bounds
    table_shape = tables if has_tables else 1
    peak_blocks = -(-positions // peak_items) if has_tables else 0
    sum_blocks = -(-pairs // sum_items) if has_tables else 0
    largest = 0 if spec.shape_generic else max(elements, zero_blocks + peak_blocks + sum_blocks) * threads
    index = "int64" if largest > INT32_MAX else "int32"  # (a configuration's indices: int32)
    blocks, threads_, count, zero_end, peak_end = (tirx.IntImm(index, v) if isinstance(v, int) else v for v in (
        zero_blocks + peak_blocks + sum_blocks, threads, elements, zero_blocks, zero_blocks + peak_blocks))
    blocks_loop, threads_loop = thread_loops(bind_threads)
    zero = tirx.const(0, sums)
    batch = 8  # loads a thread issues before it reduces them
    peak_rounds, sum_rounds = -(-o_ch // peak_slices // batch), -(-opg // sum_slices // batch)
    scope = "shared" if bind_threads else "local"

    def peak_of(peak, value):
        """The larger magnitude of ``peak`` (float32 bits of one, sign clear) and |``value``|, by
        their bits (NaN wins)."""
        return T.reinterpret("float32", T.max(T.reinterpret("int32", peak), magnitude_bits(value)))

    def sum_of(total, value):
        return total + T.fabs(T.Cast("float32", value))

    @T.macro
    def table_entry(partial, entry, slice_, entries, channels, slices, rounds, load, combine, bounds, first):
        """``bounds[first + entry]``: ``combine`` over the ``channels`` values ``load(entry, o)``,
        thread ``slice_`` of ``slices`` combining the channels ``o = slice_ (mod slices)``, then
        its slices' results in slice order (``partial``: a block's threads, ``PREPARE_THREADS //
        slices`` entries per slice); ``combine`` takes a result as it takes the values it came
        from."""
        result = T.alloc_buffer((1,), "float32", scope="local")
        result[0] = T.float32(0)
        if entry < entries:
            for k0 in range(rounds):
                for u in T.unroll(batch):
                    o = (k0 * batch + u) * slices + slice_
                    if o < channels:
                        result[0] = combine(result[0], load(entry, o))
        if slices == 1:
            if entry < entries:
                bounds[first + entry] = result[0]
        else:
            partial[slice_ * (threads // slices) + entry % (threads // slices)] = result[0]
            T.tvm_storage_sync("shared")
            if slice_ == 0 and entry < entries:
                for s in range(1, slices):
                    result[0] = combine(result[0], partial[s * (threads // slices) + entry % (threads // slices)])
                bounds[first + entry] = result[0]

    @T.prim_func
    def prepare(
        accumulator: T.Buffer((count,), sums),
        weight: T.Buffer(spec.weight_shape, spec.dtype),
        grad_output: T.Buffer(spec.output_shape, spec.dtype),
        bounds: T.Buffer((table_shape,), "float32"),
    ):
        T.func_attr({"global_symbol": "prepare", "tirx.noalias": True})
        for block in blocks_loop(blocks):
            for thread in threads_loop(threads_):
                if block < zero_end:
                    if block * threads_ + thread < count:
                        accumulator[block * threads_ + thread] = zero
                if has_tables:
                    partial = T.alloc_buffer((threads,), "float32", scope=scope)  # the slices' results
                    if block >= zero_end and block < peak_end:  # the peak |grad_output| per position
                        table_entry(partial, (block - zero_end) * peak_items + thread % peak_items,
                                    thread // peak_items, positions, o_ch, peak_slices, peak_rounds,
                                    lambda q, o: grad_output[q // (oh * ow), o, q % (oh * ow) // ow, q % ow],
                                    peak_of, bounds, 0)
                    elif block >= peak_end:  # the sum of |weight| per (channel, tap)
                        table_entry(partial, (block - peak_end) * sum_items + thread % sum_items,
                                    thread // sum_items, pairs, opg, sum_slices, sum_rounds,
                                    lambda q, o: weight[q // taps // ipg * opg + o, q // taps % ipg, q % taps // kw,
                                                        q % kw],
                                    sum_of, bounds, positions)

    if has_tables:
        return prepare
    return without_parameters(prepare, ("weight", "grad_output", "bounds"))


WORKSPACE_ALIGN = 64  # elements between the starts of the workspace's regions (256 bytes of float32)


@dataclasses.dataclass(frozen=True)
class Workspace:
    """The backward entry's scratch buffer (accumulate dtype, ``elements`` long): the first element
    of each region it holds (partial sums: ``"weight"``, ``"bias"``, and the ``reduce_segments``
    among ``"offset"``, ``"mask"`` and ``"input"``; ``"bounds"``, the data kernel's bound tables
    where it reads them), in that order, each ``WORKSPACE_ALIGN``-aligned."""

    starts: tuple[tuple[str, int], ...]
    elements: int

    def start(self, region: str) -> int | None:
        return dict(self.starts).get(region)


def backward_workspace(spec: DeformConvSpec, data: DataTiling, weight: WeightTiling) -> Workspace:
    """The regions of ``backward_entry``'s workspace: the weight kernel's partial sums of grad_weight
    and grad_bias, the data kernel's sums that the reduce kernel finishes, and the data kernel's
    bound tables (``prepare_primfunc``)."""
    segments = reduce_segments(spec, data)
    weights, biases, offsets, masks, inputs = _reduce_sizes(spec)
    sizes = {"weight": weight.splits * weights, "bias": weight.splits * biases,
             "offset": data.channel_splits * offsets * segments.offset,
             "mask": data.channel_splits * masks * segments.mask, "input": inputs * segments.input,
             "bounds": data.bound_elements(spec)}
    starts, end = [], 0
    for region, size in sizes.items():
        if not isinstance(size, int) or size:  # (a generic_spec's size-dependent regions: expressions)
            starts.append((region, end))
            end += -(-size // WORKSPACE_ALIGN) * WORKSPACE_ALIGN
    return Workspace(tuple(starts), end)


def backward_entry(spec: DeformConvSpec, data: DataTiling, weight: WeightTiling, *, data_func=None,
                   weight_func=None, bind_threads: bool = True):
    """The whole fused backward as one host function (``backward``, one call from the runtime): it
    launches ``prepare_primfunc`` (grad_input's sums zeroed, the bound tables),
    ``grad_weight_primfunc``, ``grad_data_primfunc`` and ``reduce_primfunc`` in that order on the
    caller's stream (grad_data programmatically: its blocks start beside grad_weight's last wave
    and wait for grad_weight before they exit, so that the reduction sees both; ``cuda_launch``),
    their partial sums and tables in a scratch buffer the caller allocates (``backward_workspace``),
    every buffer of theirs declared over the entry's parameters or the workspace (no copies).
    Parameters: ``input, offset, mask?, weight, grad_output`` (the spec's shapes and dtype),
    ``contribution_bound [1]`` (float32, with ``data.deterministic``), ``workspace [elements]``
    (accumulate dtype), then the gradients: ``grad_input`` (input shape), ``grad_offset``,
    ``grad_mask?`` in the spec's dtype where ``reduce_segments`` folds them, else the data
    kernel's sums (grad_input ``[N, C, H, W]`` in the accumulate dtype, or int64 fixed point when
    deterministic; grad_offset / grad_mask ``[channel splits, *shape]`` accumulate dtype) that the
    caller finishes; ``grad_weight`` (weight shape) and ``grad_bias? [out_channels]`` in the
    spec's dtype. ``data_func`` / ``weight_func`` stand in for the two kernels (same parameters;
    tests) and ``bind_threads=False`` makes the first kernel and the reduction serial, for a CPU."""
    data_func = data_func or grad_data_primfunc(spec, data)
    weight_func = weight_func or grad_weight_primfunc(spec, weight)
    reduce_func = reduce_primfunc(spec, data, weight, bind_threads)
    segments = reduce_segments(spec, data)
    workspace = backward_workspace(spec, data, weight)
    dtype, acc = spec.dtype, accumulate_dtype(spec.dtype)
    split_shape = (data.channel_splits,)

    def buffer(name, shape, dtype_):
        return tirx.decl_buffer(tuple(shape), dtype_, name)

    sums = "int64" if data.deterministic else acc
    params = {
        "input": buffer("input", spec.input_shape, dtype),
        "offset": buffer("offset", spec.offset_shape, dtype),
        "mask": buffer("mask", spec.mask_shape, dtype) if spec.has_mask else None,
        "weight": buffer("weight", spec.weight_shape, dtype),
        "grad_output": buffer("grad_output", spec.output_shape, dtype),
        "contribution_bound": buffer("contribution_bound", (1,), "float32") if data.deterministic else None,
        "workspace": buffer("workspace", (workspace.elements,), acc),
        "grad_input": buffer("grad_input", spec.input_shape, dtype if segments.input else sums),
        "grad_offset": buffer("grad_offset", spec.offset_shape if segments.offset else
                              split_shape + spec.offset_shape, dtype if segments.offset else acc),
        "grad_mask": buffer("grad_mask", spec.mask_shape if segments.mask else split_shape + spec.mask_shape,
                            dtype if segments.mask else acc) if spec.has_mask else None,
        "grad_weight": buffer("grad_weight", spec.weight_shape, dtype),
        "grad_bias": buffer("grad_bias", (spec.out_channels,), dtype) if spec.has_bias else None,
    }
    index = "int32" if spec.shape_generic or workspace.elements <= INT32_MAX else "int64"

    def region(name):
        start = workspace.start(name)
        start = tirx.IntImm(index, start) if isinstance(start, int) else start
        return tirx.address_of(tirx.BufferLoad(params["workspace"], [start]))

    def entry(name):
        return params[name].data

    def data_sums(name):  # where the data kernel writes a gradient: the workspace where reduce folds it
        return region(name) if getattr(segments, name) else entry(f"grad_{name}")

    bounds = region("bounds") if data.takes_bounds else None
    sources = [  # each kernel, in launch order, and the pointer each of its parameters is declared over
        (prepare_primfunc(spec, data, bind_threads), {"accumulator": data_sums("input"), "weight": entry("weight"),
                                                      "grad_output": entry("grad_output"), "bounds": bounds}),
        (weight_func, {"input": entry("input"), "offset": entry("offset"),
                      "mask": entry("mask") if spec.has_mask else None, "grad_output": entry("grad_output"),
                      "weight_part": region("weight"), "bias_part": region("bias") if spec.has_bias else None}),
        (data_func, {"input": entry("input"), "offset": entry("offset"),
                    "mask": entry("mask") if spec.has_mask else None, "weight": entry("weight"), "grad_output": entry("grad_output"),
                    "grad_input": data_sums("input"), "grad_offset": data_sums("offset"),
                    "grad_mask": data_sums("mask") if spec.has_mask else None,
                    "contribution_bound": entry("contribution_bound") if data.deterministic else None,
                    "bounds": bounds}),
        (reduce_func, {"weight_part": region("weight"), "bias_part": region("bias") if spec.has_bias else None,
                      **{f"{name}_part": region(name) for name in ("offset", "mask", "input")
                         if getattr(segments, name)},
                      **{f"grad_{name}": entry(f"grad_{name}") for name in ("weight", "bias", "offset", "mask", "input")
                         if params[f"grad_{name}"] is not None}}),
    ]
    body = [tirx.DeclBuffer(p, data=pointers[p.name]) for func, pointers in sources for p in func.params]
    body += [func.body for func, _ in sources]
    entry_params = [p for p in params.values() if p is not None]
    return tirx.PrimFunc(entry_params, tirx.SeqStmt(body)).with_attrs(
        {"global_symbol": "backward", "tirx.noalias": True})


def device_call(name: str, parameters: str, body: str, *args):
    """A call of the inline CUDA function ``__device__ void name(parameters) { body }``, its source
    emitted with the kernel (``T.cuda.func_call``)."""

    source = f"__device__ __forceinline__ void {name}({parameters}) {{ {body} }}\n"
    return T.cuda.func_call(name, *args, source_code=source)


def without_parameters(func, names):
    """``func`` without the parameters ``names`` (buffers its body does not use)."""
    if not names:
        return func
    return tirx.PrimFunc([v for v in func.params if v.name not in names], func.body, func.ret_type, func.attrs)


@functools.lru_cache(maxsize=1024)
def default_tilings(spec: DeformConvSpec, arch: str = "sm_90") -> tuple[DataTiling, WeightTiling]:
    """The ``for_spec`` tilings, with one-pixel grad_input flushes before ``sm_90`` (no float4
    atomics there); of a ``generic_spec``, those of its configuration at ``CONFIGURATION_SIZES``
    (their channel and position splits fixed for every size). Kept per (spec, arch): every new
    input size of a configuration asks for the configuration's."""
    if spec.shape_generic:
        spec = DeformConvSpec.from_dict({**spec.to_dict(), **dict(zip(GENERIC_DIMENSIONS, CONFIGURATION_SIZES))})
    data = DataTiling.for_spec(spec)
    if compute_capability(arch) < 90:
        data = dataclasses.replace(data, flush_width=1)
    return data, WeightTiling.for_spec(spec)


def fingerprint(spec: DeformConvSpec, data: DataTiling, weight: WeightTiling, arch: str) -> str:
    """A hash of everything ``fused_backward_module`` output depends on besides TVM: the spec, the
    tilings, the architecture and the source of this module, ``cuda_mma``, ``cuda_launch`` and the
    sampling math (a changed schedule never reuses a stale cached library)."""
    from deft_tvm.compute import sampling
    from deft_tvm.schedules import cuda_launch, cuda_mma

    digest = hashlib.sha256(repr((spec.key(), data, weight, arch)).encode())
    for module in (sys.modules[__name__], cuda_mma, cuda_launch, sampling):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def fused_backward_module(spec: DeformConvSpec, data: DataTiling | None = None, weight: WeightTiling | None = None,
                          arch: str = "sm_90"):
    """``(module, data, weight)``: the IRModule of the four kernels (``prepare``, ``grad_data``,
    ``grad_weight``, ``reduce``) with the given tilings (default ``default_tilings``), and
    those tilings (the caller sizes the partial-sum buffers by them). Raises ValueError for a
    weight tiling with ``async_copy`` before ``sm_80``."""
    import tvm

    if data is None or weight is None:
        defaults = default_tilings(spec, arch)
        data, weight = data or defaults[0], weight or defaults[1]
    if weight.async_copy and compute_capability(arch) < 80:
        raise ValueError(f"{weight}: asynchronous copies (cp.async) need sm_80 or newer, got {arch}")
    module = tvm.IRModule({
        "prepare": prepare_primfunc(spec, data),
        "grad_data": grad_data_primfunc(spec, data),
        "grad_weight": grad_weight_primfunc(spec, weight),
        "reduce": reduce_primfunc(spec, data, weight),
    })
    return module, data, weight
