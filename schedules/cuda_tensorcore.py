"""The DefT CUDA schedule on tensor cores (float16 operands, float32 accumulation, WMMA 16x16x16).

Same structure as ``schedules/cuda.py`` (a GEMM of ``[out_channels] x [positions]`` reduced over
``(kernel_h, kernel_w, in_channels / groups)``, kernel taps outermost, the interpolated tile of one
tap and channel chunk computed straight into shared memory, never a global columns buffer), with
the inner product on tensor cores:

* a thread block owns ``warps_co * frags_co * 16`` output channels and ``warps_oy`` rows of
  ``frags_ox * 16`` columns of one image; each warp accumulates ``frags_co x frags_ox`` 16x16
  fragments of one row in registers (``wmma.accumulator``);
* per (tap, chunk of ``k_frags * 16`` channels) every thread of the block interpolates positions of
  the tile (sampling point once per position, the chunk's channels in a loop) into a float16 tile
  in shared memory laid out ``[row][channel][column]``, and the chunk's weights are copied to shared
  memory laid out ``[out_channel][channel]``;
* each warp loads its 16x16 operand fragments from those tiles and issues ``mma_sync``;
* the accumulators go through shared memory (``store_matrix_sync``) to the bias + cast epilogue.

Applies when the layer's shape tiles exactly: ``in_channels / groups``, ``out_channels / groups``
and ``out_w`` multiples of 16 and a float16 dtype (``supports_tensor_cores``); other layers use
the SIMT schedule.
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from deft_tvm.compute import STAGE_CONV, STAGE_OUTPUT, STAGE_SAMPLED, STAGE_WEIGHT
from deft_tvm.schedules.cuda import largest_divisor, place_sampling_in_registers
from deft_tvm.spec import DeformConvSpec

FRAGMENT = 16
WARP = 32
# Largest factors the tuning space samples: fragments per warp along co and ox, warps along oy,
# fragments of channels per reduction chunk.
MAX_FRAGS = 4
MAX_WARPS_OY = 8
MAX_K_FRAGS = 4


@dataclasses.dataclass(frozen=True)
class TensorCoreTiling:
    """Warps of the block and 16x16 fragments per warp along each axis, 16-channel fragments per
    reduction chunk, and how many channels of the chunk's interpolation a thread unrolls."""

    warps_co: int = 2
    frags_co: int = 2
    warps_oy: int = 4
    frags_ox: int = 4
    k_frags: int = 2
    fill_unroll: int = 8

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "TensorCoreTiling":
        """The default tiling, shrunk where the layer is smaller than it."""
        co_frags = spec.out_channels // spec.groups // FRAGMENT
        ox_frags = spec.out_w // FRAGMENT
        k_frags = spec.in_channels // spec.groups // FRAGMENT
        # A chunk spanning several offset groups computes several sampling points per position:
        # with few channels per offset group, one fragment of channels per chunk is faster.
        if spec.in_channels // spec.offset_groups < 2 * FRAGMENT:
            k_frags = 1
        warps_co = 2 if co_frags % 2 == 0 else 1
        return cls(
            warps_co=warps_co,
            frags_co=largest_divisor(co_frags // warps_co, cls.frags_co),
            warps_oy=largest_divisor(spec.out_h, cls.warps_oy),
            frags_ox=largest_divisor(ox_frags, cls.frags_ox),
            k_frags=largest_divisor(k_frags, cls.k_frags),
            fill_unroll=cls.fill_unroll,
        )


class FixedTensorCoreTiles:
    """Split factors from a ``TensorCoreTiling``."""

    def __init__(self, tiling: TensorCoreTiling):
        self.t = tiling

    def co(self, sch, fragments):
        return [None, self.t.warps_co, self.t.frags_co]

    def oy(self, sch, loop):
        return [None, self.t.warps_oy]

    def ox(self, sch, fragments):
        return [None, self.t.frags_ox]

    def rc(self, sch, fragments):
        return [None, self.t.k_frags]

    def fill_unroll(self, sch):
        return self.t.fill_unroll


class SampledTensorCoreTiles:
    """Split factors sampled by MetaSchedule (divisors of the extents in fragments)."""

    def co(self, sch, fragments):
        return sch.sample_perfect_tile(fragments, n=3, max_innermost_factor=MAX_FRAGS)

    def oy(self, sch, loop):
        return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=MAX_WARPS_OY)

    def ox(self, sch, fragments):
        return sch.sample_perfect_tile(fragments, n=2, max_innermost_factor=MAX_FRAGS)

    def rc(self, sch, fragments):
        return sch.sample_perfect_tile(fragments, n=2, max_innermost_factor=MAX_K_FRAGS)

    def fill_unroll(self, sch):
        choices = [1, 2, 4, 8, 16]
        return sch.sample_categorical(choices, [1 / len(choices)] * len(choices))


def supports_tensor_cores(spec: DeformConvSpec) -> bool:
    """Whether the layer tiles exactly into 16x16x16 float16 fragments (one group)."""
    return (
        spec.dtype == "float16"
        and spec.groups == 1
        and (spec.in_channels // spec.groups) % FRAGMENT == 0
        and (spec.out_channels // spec.groups) % FRAGMENT == 0
        and spec.out_w % FRAGMENT == 0
    )


def _cooperative(sch, loops, warps_co, warps_oy):
    """Spread ``loops`` (fused) over the block's threads (warps on threadIdx.y, lanes on
    threadIdx.x); returns the lane loop."""
    fused = sch.fuse(*loops)
    _, warp_co, warp_oy, lane = sch.split(fused, [None, warps_co, warps_oy, WARP])
    sch.bind(sch.fuse(warp_co, warp_oy), "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    return lane


def apply_deft_cuda_tensorcore(sch: s_tir.Schedule, tiles) -> None:
    """Apply the tensor-core DefT schedule to ``sch`` (of ``deform_conv2d_primfunc``) in place,
    with split factors from ``tiles`` (``FixedTensorCoreTiles`` or ``SampledTensorCoreTiles``)."""
    # Importing TVM's tensor intrinsics registers all of them (about a minute on a slow CPU): only
    # schedules that use them pay for it.
    from tvm.s_tir.tensor_intrin import cuda as cuda_intrinsics

    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)
    sch.compute_inline(sch.get_sblock(STAGE_WEIGHT))

    # Operand and accumulator layouts whose 16x16 fragments are the two innermost dimensions.
    sampled_shared = sch.cache_read(conv, 1, "shared")
    weight_shared = sch.cache_read(conv, 0, "shared")
    sampled_frag = sch.cache_read(conv, 1, "wmma.matrix_b")
    weight_frag = sch.cache_read(conv, 0, "wmma.matrix_a")
    sch.set_scope(conv, 0, "wmma.accumulator")
    conv_shared = sch.cache_read(output, 0, "shared.dyn")
    for block in (sampled_shared, sampled_frag):
        sch.transform_layout(block, ("write", 0), lambda n, c, ky, kx, oy, ox: (n, ky, kx, oy, c, ox))
    for block in (weight_shared, weight_frag):
        sch.transform_layout(block, ("write", 0), lambda co, rc, ky, kx: (ky, kx, co, rc))
    sch.transform_layout(conv, ("write", 0), lambda n, co, oy, ox: (n, oy, co, ox))
    sch.transform_layout(conv_shared, ("write", 0), lambda n, co, oy, ox: (n, oy, co, ox))

    n, co, oy, ox, rc, ky, kx = sch.get_loops(conv)
    co, co_i = sch.split(co, [None, FRAGMENT])
    ox, ox_i = sch.split(ox, [None, FRAGMENT])
    rc, rc_i = sch.split(rc, [None, FRAGMENT])
    co_factors, oy_factors = tiles.co(sch, co), tiles.oy(sch, oy)
    ox_factors, rc_factors = tiles.ox(sch, ox), tiles.rc(sch, rc)
    warps_co, warps_oy = co_factors[1], oy_factors[1]
    co_b, co_w, co_f = sch.split(co, co_factors)
    oy_b, oy_w = sch.split(oy, oy_factors)
    ox_b, ox_f = sch.split(ox, ox_factors)
    rc_o, rc_f = sch.split(rc, rc_factors)
    sch.reorder(n, co_b, oy_b, ox_b, co_w, oy_w, ky, kx, rc_o, rc_f, co_f, ox_f, co_i, ox_i, rc_i)
    sch.bind(sch.fuse(n, co_b, oy_b, ox_b), "blockIdx.x")
    warp = sch.fuse(co_w, oy_w)
    sch.bind(warp, "threadIdx.y")

    # Epilogue, one accumulator fragment at a time: the warp stores it to shared memory, then its
    # lanes add the bias, cast and write it out (8 KB of staging for the whole block).
    sch.reverse_compute_at(conv_shared, warp, preserve_unit_loops=True)
    _, store_co, store_oy, store_ox = sch.get_loops(conv_shared)[-4:]
    store_co_f, store_co_i = sch.split(store_co, [None, FRAGMENT])
    store_ox_f, store_ox_i = sch.split(store_ox, [None, FRAGMENT])
    sch.reorder(store_oy, store_co_f, store_ox_f, store_co_i, store_ox_i)
    sch.reverse_compute_at(output, store_ox_f, preserve_unit_loops=True)
    out_lane = sch.fuse(*sch.get_loops(output)[-4:])
    _, lane = sch.split(out_lane, [None, WARP])
    sch.bind(lane, "threadIdx.x")

    # Operand fragments are loaded per 16-channel step (placed before their producers are).
    sch.compute_at(sampled_frag, rc_f, preserve_unit_loops=True)
    sch.compute_at(weight_frag, rc_f, preserve_unit_loops=True)

    # The interpolated float16 tile of one tap and channel chunk, into shared memory.
    sch.compute_at(sampled_shared, rc_o, preserve_unit_loops=True)
    sch.compute_inline(sch.get_sblock(STAGE_SAMPLED))
    _, s_c, s_ky, s_kx, s_y, s_x = sch.get_loops(sampled_shared)[-6:]
    sch.reorder(s_y, s_x, s_c, s_ky, s_kx)
    # Channels in steps of ``fill_unroll``, unrolled within a step: that many channels' corner
    # reads are in flight per thread while registers stay free for the accumulators.
    _, s_c = sch.split(s_c, [None, tiles.fill_unroll(sch)])
    place_sampling_in_registers(sch, s_c, _cooperative(sch, [s_y, s_x], warps_co, warps_oy))

    # The chunk's weights of the tap, into shared memory.
    sch.compute_at(weight_shared, rc_o, preserve_unit_loops=True)
    _cooperative(sch, sch.get_loops(weight_shared)[-4:], warps_co, warps_oy)

    # Per-warp operand fragments of one 16-channel step, then mma_sync.
    b_c, b_ky, b_kx, b_y, b_x = sch.get_loops(sampled_frag)[-5:]
    b_x_f, b_x_i = sch.split(b_x, [None, FRAGMENT])
    sch.reorder(b_y, b_ky, b_kx, b_x_f, b_c, b_x_i)
    sch.tensorize(b_c, cuda_intrinsics.WMMA_LOAD_16x16x16_F16_B_INTRIN)
    a_co, a_rc, a_ky, a_kx = sch.get_loops(weight_frag)[-4:]
    a_co_f, a_co_i = sch.split(a_co, [None, FRAGMENT])
    sch.reorder(a_ky, a_kx, a_co_f, a_co_i, a_rc)
    sch.tensorize(a_co_i, cuda_intrinsics.WMMA_LOAD_16x16x16_F16_A_INTRIN)

    sch.tensorize(store_co_i, cuda_intrinsics.WMMA_STORE_16x16x16_F32_SHARED_DYN_INTRIN)
    init = sch.decompose_reduction(conv, ky)
    init_co_i, init_ox_i = sch.get_loops(init)[-2:]
    sch.tensorize(init_co_i, cuda_intrinsics.WMMA_FILL_16x16x16_F32_INTRIN)
    sch.tensorize(co_i, cuda_intrinsics.WMMA_SYNC_16x16x16_f16f16f32_INTRIN)


def schedule_cuda_tensorcore(mod, spec: DeformConvSpec, tiling: TensorCoreTiling | None = None) -> s_tir.Schedule:
    """The tensor-core schedule of the ``main`` PrimFunc of ``deform_conv2d_primfunc(spec)``."""
    sch = s_tir.Schedule(mod)
    apply_deft_cuda_tensorcore(sch, FixedTensorCoreTiles(tiling or TensorCoreTiling.for_spec(spec)))
    return sch


def deft_cuda_tensorcore_space(spec: DeformConvSpec):
    """MetaSchedule design space (for ``ScheduleFn``): the tensor-core schedule with sampled tiles."""

    def space(sch: s_tir.Schedule) -> None:
        apply_deft_cuda_tensorcore(sch, SampledTensorCoreTiles())

    return space
