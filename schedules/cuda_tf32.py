"""TF32 tensor-core intrinsics for the DefT tensor-core schedule (float32 operands).

TVM 0.27's CUDA codegen accepts WMMA fragments of half and integer types only, so float32 operands
go through PTX ``mma.sync.m16n8k8.row.col.f32.tf32.tf32.f32`` on warp-scope fragments
(``[32 lanes][registers]``), whose register layouts the index maps below spell out:

* A, a 16 (output channels) x 8 (channels) tile: lane ``4 * (i % 8) + k % 4`` holds
  ``(i, k)`` in register ``i // 8 + 2 * (k // 4)`` (PTX: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
  a3 (g + 8, t + 4));
* B, a 16 (positions) x 8 (channels) tile stored position-major: two n8 halves, each with
  b0 (k = t, n = g) and b1 (k = t + 4, n = g);
* C, a 16 x 16 accumulator: the layout of TVM's m16n8k16 MMA intrinsics, so TVM's own
  ``mma_fill`` / ``mma_store`` intrinsics serve.

``register_tf32_intrinsics`` registers the operand loads (from shared memory) and the 16x16x8
multiply-accumulate (two m16n8k8).
"""
from __future__ import annotations

import sys

import tvm_ffi
from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

WARP = 32


def a_map(i, k):
    """(lane, register) of element (i, k) of a 16x8 A tile."""
    return (i % 8) * 4 + k % 4, i // 8 + 2 * (k // 4)


def b_map(n, k):
    """(lane, register) of element (n, k) of a 16x8 position-major B tile (two n8 halves)."""
    return (n % 8) * 4 + k % 4, (n // 8) * 2 + k // 4


def a_rev(t, l):
    """Inverse of ``a_map``."""
    return t // 4 + 8 * (l % 2), t % 4 + 4 * (l // 2)


def b_rev(t, l):
    """Inverse of ``b_map``."""
    return t // 4 + 8 * (l // 2), t % 4 + 4 * (l % 2)


def load_intrin(is_b: bool, scope: str = "shared"):
    """Copy of an A or B operand tile from ``scope`` into its warp fragment."""
    fmap, rev = (b_map, b_rev) if is_b else (a_map, a_rev)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, 8), "float32", align=64, offset_factor=8, scope=scope)
        C = T.match_buffer(c, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:8])
            T.writes(C[0:WARP, 0:4])
            for i, k in T.grid(16, 8):
                with T.sblock("load"):
                    vi, vk = T.axis.remap("SS", [i, k])
                    t, l = T.meta_var(fmap(vi, vk))
                    T.reads(A[vi, vk])
                    T.writes(C[t, l])
                    C[t, l] = A[vi, vk]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        A = T.match_buffer(a, (16, 8), "float32", align=64, offset_factor=8, scope=scope, strides=[s0, s1])
        C = T.match_buffer(c, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:8])
            T.writes(C[0:WARP, 0:4])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for l in T.unroll(4):
                    r, k = T.meta_var(rev(tx, l))
                    C[tx, l] = A[r, k]

    return desc, impl


def sync_intrin():
    """C (16x16, float32) += A (16x8) * B^T (16x8), as two m16n8k8 tf32 mma."""
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        B = T.match_buffer(b, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:4], B[0:WARP, 0:4])
            T.writes(C[0:WARP, 0:8])
            for i, j, k in T.grid(16, 16, 8):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(c_map(vi, vj))
                    ta, la = T.meta_var(a_map(vi, vk))
                    tb, lb = T.meta_var(b_map(vj, vk))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] = C[tc, lc] + A[ta, la] * B[tb, lb]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        B = T.match_buffer(b, (WARP, 4), "float32", align=64, offset_factor=4, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:4], B[0:WARP, 0:4])
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.mma("m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                            A.data, A.elem_offset + tx * 4, B.data, B.elem_offset + tx * 4,
                                            C.data, C.elem_offset + tx * 8, False, dtype="float32"))
                T.evaluate(T.ptx_legacy.mma("m16n8k8", "row", "col", "tf32", "tf32", "fp32",
                                            A.data, A.elem_offset + tx * 4, B.data, B.elem_offset + tx * 4 + 2,
                                            C.data, C.elem_offset + tx * 8 + 4, False, dtype="float32"))

    return desc, impl


NAMES = ("deft_mma_load_a_16x8_tf32_shared", "deft_mma_load_b_trans_16x8_tf32_shared", "deft_mma_sync_16x16x8_tf32")


# The index map TVM's CUDA codegen looks up to lower ``mma_store`` (the accumulator layout, c_map).
ACCUMULATOR_LAYOUT = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def register_accumulator_layout() -> None:
    """Register ``ACCUMULATOR_LAYOUT`` where it is missing. ``tvm.s_tir.tensor_intrin.cuda``
    registers it on import, which takes ~40 s; tuning's build workers compile scheduled TF32
    kernels without that import, so they register it here."""
    if tvm_ffi.get_global_func(ACCUMULATOR_LAYOUT, allow_missing=True) is None:
        tvm_ffi.register_global_func(ACCUMULATOR_LAYOUT, lambda index: convert(list(c_map(index[0], index[1]))))


def register_tf32_intrinsics():
    """Register (once) TVM's tensor intrinsics and these; returns the names of (load A, load B,
    multiply-accumulate)."""
    if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
        # TVM's module registers the accumulator layout itself (and fails if it exists).
        tvm_ffi.remove_global_func(ACCUMULATOR_LAYOUT)
    from tvm.s_tir.tensor_intrin import cuda  # noqa: F401 - TVM's WMMA/MMA intrinsics

    if TensorIntrin.get(NAMES[0], allow_missing=True) is not None:
        return NAMES
    TensorIntrin.register(NAMES[0], *load_intrin(False))
    TensorIntrin.register(NAMES[1], *load_intrin(True))
    TensorIntrin.register(NAMES[2], *sync_intrin())
    return NAMES


def c_map(i, j):
    """(lane, register) of element (i, j) of a 16x16 accumulator (TVM's m16n8k16 C layout)."""
    return (i % 8) * 4 + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + j % 2
