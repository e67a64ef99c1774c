"""Default (untuned) schedule for CUDA targets.

The convolution is tiled like a GEMM of ``[out_channels] x [positions]`` reduced over
``(in_channels / groups, kernel_h, kernel_w)``:

* a thread block owns ``co_threads * co_regs`` output channels and a spatial tile of
  ``oy_threads * oy_regs`` rows by ``ox_threads`` columns of one image;
* for each chunk of ``k_chunk`` input channels it computes the bilinear interpolation of that
  chunk for the whole spatial tile and every kernel tap into shared memory, once per (sample,
  input channel), and stages the matching weights, cast to the accumulate dtype, in shared
  memory: every output channel of the block reuses them (no global "columns" buffer exists);
* each thread accumulates ``co_regs x oy_regs`` outputs in registers, and the bias add, cast and
  store happen from those registers, consecutive threads writing consecutive columns (coalesced).
"""

from __future__ import annotations

import dataclasses

from tvm import s_tir

from deft_tvm.compute import STAGE_CONV, STAGE_OUTPUT, STAGE_SAMPLED, STAGE_WEIGHT
from deft_tvm.spec import DeformConvSpec


@dataclasses.dataclass(frozen=True)
class CudaTiling:
    """Tile sizes of the default CUDA schedule."""

    co_threads: int = 8
    co_regs: int = 8
    oy_threads: int = 1
    oy_regs: int = 2
    ox_threads: int = 32
    k_chunk: int = 4

    @classmethod
    def for_spec(cls, spec: DeformConvSpec) -> "CudaTiling":
        """The default tile (best of a hand sweep on an H100, tools/sweep_cuda_tiling.py), shrunk
        where the layer is smaller than it."""
        out_per_group = spec.out_channels // spec.groups
        ox_threads = 32 if spec.out_w >= 24 else 16 if spec.out_w >= 12 else 8
        co_regs = min(8, out_per_group)
        return cls(
            co_threads=max(1, min(8, out_per_group // co_regs)),
            co_regs=co_regs,
            oy_threads=1,
            oy_regs=2 if spec.out_h >= 2 else 1,
            ox_threads=ox_threads,
            k_chunk=min(4, spec.in_channels // spec.groups),
        )


def schedule_cuda(mod, spec: DeformConvSpec, tiling: CudaTiling | None = None) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``deft_tvm.compute.deform_conv2d_primfunc(spec)``."""
    t = tiling or CudaTiling.for_spec(spec)
    sch = s_tir.Schedule(mod)
    sampled = sch.get_sblock(STAGE_SAMPLED)
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)

    n, co, oy, ox, rc, ky, kx = sch.get_loops(conv)
    co_b, co_t, co_r = sch.split(co, [None, t.co_threads, t.co_regs])
    oy_b, oy_t, oy_r = sch.split(oy, [None, t.oy_threads, t.oy_regs])
    ox_b, ox_t = sch.split(ox, [None, t.ox_threads])
    rc_o, rc_i = sch.split(rc, [None, t.k_chunk])
    sch.reorder(n, co_b, oy_b, ox_b, co_t, oy_t, ox_t, rc_o, rc_i, ky, kx, co_r, oy_r)
    block = sch.fuse(n, co_b, oy_b, ox_b)
    thread_x = sch.fuse(oy_t, ox_t)
    sch.bind(block, "blockIdx.x")
    sch.bind(co_t, "threadIdx.y")
    sch.bind(thread_x, "threadIdx.x")
    threads = t.co_threads * t.oy_threads * t.ox_threads

    # Accumulate in registers; bias, cast and the coalesced store run from them.
    sch.set_scope(conv, 0, "local")
    sch.reverse_compute_at(output, thread_x, preserve_unit_loops=True)

    # Interpolated tile of the current input-channel chunk, computed straight into shared memory.
    sampled_shared = sch.cache_read(conv, 0, "shared")
    sch.compute_at(sampled_shared, rc_o, preserve_unit_loops=True)
    sch.compute_inline(sampled)
    # Weights of the chunk, already cast to the accumulate dtype, in shared memory.
    weight_shared = sch.get_sblock(STAGE_WEIGHT)
    sch.set_scope(weight_shared, 0, "shared")
    sch.compute_at(weight_shared, rc_o, preserve_unit_loops=True)
    for stage in (sampled_shared, weight_shared):
        loops = sch.get_loops(stage)[-6 if stage == sampled_shared else -4:]
        fused = sch.fuse(*loops)
        _, ty, tx = sch.split(fused, [None, t.co_threads, threads // t.co_threads])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")

    sch.decompose_reduction(conv, rc_o)
    sch.unroll(co_r)
    sch.unroll(oy_r)
    return sch
