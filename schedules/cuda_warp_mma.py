"""Warp-fragment tensor-core intrinsics for the DefT tensor-core schedule: float32 operands on
TF32 and bfloat16 operands.

TVM 0.27's CUDA codegen accepts WMMA fragments of half and integer types only, so these operands
go through PTX ``mma.sync`` on warp-scope fragments (``[32 lanes][registers]``):
``m16n8k8.row.col.f32.tf32.tf32.f32`` (``k`` = 8 channels per fragment) and
``m16n8k16.row.col.f32.bf16.bf16.f32`` (``k`` = 16). The register layouts are those of
``cuda_mma.MmaShape`` (PTX ISA 8.x, section 9.7.14.5, "Matrix Fragments for mma.m16n8k8 /
mma.m16n8k16"), whose PTX shapes, operand types and lane elements this module takes from there,
written here also as index maps over a tile:

* A, a 16 (output channels) x ``k`` (channels) tile: element ``(i, c)`` in lane
  ``4 * (i % 8) + t`` with ``t = c % 4`` (k = 8) or ``c % 8 // 2`` (k = 16); register
  ``i // 8 + 2 * (c // 4)`` (k = 8) or ``c % 2 + 2 * (i // 8) + 4 * (c // 8)`` (k = 16);
* B, a 16 (positions) x ``k`` tile stored position-major: two n8 halves of ``k / 4`` registers
  each, element ``(n, c)`` in lane ``4 * (n % 8) + t``, register ``k / 4 * (n // 8)`` plus
  ``c // 4`` (k = 8) or ``c % 2 + 2 * (c // 8)`` (k = 16);
* C, a 16 x 16 float32 accumulator: the layout of TVM's m16n8k16 MMA intrinsics, so TVM's own
  ``mma_fill`` / ``mma_store`` intrinsics serve.

``register_warp_mma_intrinsics(precision)`` registers the operand loads (one ``ldmatrix.x4`` per
tile from shared memory, ``ldmatrix_row``) and the 16 x 16 x ``k`` multiply-accumulate (two mma of
n8) of "tf32" or "bfloat16".
"""
from __future__ import annotations

import sys
import threading

import tvm_ffi
from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from deft_tvm.schedules.cuda_mma import MMA_SHAPES

WARP = 32
OPERAND_DTYPES = {"tf32": "float32", "bfloat16": "bfloat16"}  # precision -> operand dtype (MMA_SHAPES' keys)


def a_map(i, c, k: int = 8):
    """(lane, register) of element (i, c) of a 16 x ``k`` A tile."""
    if k == 8:
        return (i % 8) * 4 + c % 4, i // 8 + 2 * (c // 4)
    return (i % 8) * 4 + c % 8 // 2, c % 2 + 2 * (i // 8) + 4 * (c // 8)


def b_map(n, c, k: int = 8):
    """(lane, register) of element (n, c) of a 16 x ``k`` position-major B tile (two n8 halves)."""
    if k == 8:
        return (n % 8) * 4 + c % 4, (n // 8) * 2 + c // 4
    return (n % 8) * 4 + c % 8 // 2, (n // 8) * 4 + c % 2 + 2 * (c // 8)


def ldmatrix_row(lane, is_b: bool, k: int = 16):
    """(row, column) of the 16-byte row whose shared-memory address lane ``lane`` gives
    ``ldmatrix.x4`` when loading a 16 x ``k`` operand tile (PTX ISA 8.x, section 9.7.14.5.15: four
    8 x 8 matrices of 16-bit elements, i.e. 8 rows of ``k / 2`` operands, 8 bfloat16 or 4 TF32):
    lanes 8 m .. 8 m + 7 address matrix ``m``'s rows, and each lane receives in its register ``m``
    32 bits of row ``lane // 4``, so the matrices are taken in ``a_map`` / ``b_map``'s register
    order: A's (rows 0-7, first half of the channels), (rows 8-15, first half), (0-7, second half),
    (8-15, second half); B's positions 0-7 then 8-15, each with the first then the second half."""
    matrix, half = lane // 8, k // 2
    if is_b:
        return lane % 8 + 8 * (matrix // 2), half * (matrix % 2)
    return lane % 8 + 8 * (matrix % 2), half * (matrix // 2)


def c_map(i, j):
    """(lane, register) of element (i, j) of a 16x16 accumulator (TVM's m16n8k16 C layout)."""
    return (i % 8) * 4 + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + j % 2


def load_intrin(is_b: bool, precision: str, scope: str = "shared"):
    """Copy of an A or B operand tile from ``scope`` into its warp fragment."""
    shape, dtype = MMA_SHAPES[precision], OPERAND_DTYPES[precision]
    k, registers = shape.k, shape.a_elements  # A and B (two n8 halves) hold as many registers
    fmap = b_map if is_b else a_map

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (16, k), dtype, align=64, offset_factor=k, scope=scope)
        C = T.match_buffer(c, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:k])
            T.writes(C[0:WARP, 0:registers])
            for i, kk in T.grid(16, k):
                with T.sblock("load"):
                    vi, vk = T.axis.remap("SS", [i, kk])
                    t, r = T.meta_var(fmap(vi, vk, k))
                    T.reads(A[vi, vk])
                    T.writes(C[t, r])
                    C[t, r] = A[vi, vk]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        A = T.match_buffer(a, (16, k), dtype, align=64, offset_factor=k, scope=scope, strides=[s0, s1])
        C = T.match_buffer(c, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        with T.sblock("root"):
            T.reads(A[0:16, 0:k])
            T.writes(C[0:WARP, 0:registers])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                row, column = T.meta_var(ldmatrix_row(tx, is_b, k))
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", C.data, C.elem_offset + tx * registers,
                                                 A.access_ptr("r"), row * s0 + column, dtype=dtype))

    # One ldmatrix.x4 per tile. Written element by element, a bfloat16 fragment stayed a whole
    # warp's array in every thread's local memory (tests/test_tensor_core_registers.py).
    return desc, impl


def sync_intrin(precision: str):
    """C (16x16, float32) += A (16 x k) * B^T (16 x k), as two mma of n8."""
    mma, dtype = MMA_SHAPES[precision], OPERAND_DTYPES[precision]
    shape, ptx_type, k = mma.shape, mma.ptx_type, mma.k
    registers, half = mma.a_elements, mma.b_elements  # operand registers per lane; B's per n8 half

    def acc(value):  # the product in float32, as the convolution's compute writes it
        return value if dtype == "float32" else T.Cast("float32", value)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        B = T.match_buffer(b, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:registers], B[0:WARP, 0:registers])
            T.writes(C[0:WARP, 0:8])
            for i, j, kk in T.grid(16, 16, k):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    tc, lc = T.meta_var(c_map(vi, vj))
                    ta, la = T.meta_var(a_map(vi, vk, k))
                    tb, lb = T.meta_var(b_map(vj, vk, k))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] = C[tc, lc] + acc(A[ta, la]) * acc(B[tb, lb])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        B = T.match_buffer(b, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:registers], B[0:WARP, 0:registers])
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.mma(shape, "row", "col", ptx_type, ptx_type, "fp32",
                                            A.data, A.elem_offset + tx * registers, B.data,
                                            B.elem_offset + tx * registers, C.data, C.elem_offset + tx * 8, False,
                                            dtype="float32"))
                T.evaluate(T.ptx_legacy.mma(shape, "row", "col", ptx_type, ptx_type, "fp32",
                                            A.data, A.elem_offset + tx * registers, B.data,
                                            B.elem_offset + tx * registers + half, C.data,
                                            C.elem_offset + tx * 8 + 4, False, dtype="float32"))

    return desc, impl


NAMES = {
    "tf32": ("deft_mma_load_a_16x8_tf32_shared", "deft_mma_load_b_trans_16x8_tf32_shared",
             "deft_mma_sync_16x16x8_tf32"),
    "bfloat16": ("deft_mma_load_a_16x16_bf16_shared", "deft_mma_load_b_trans_16x16_bf16_shared",
                 "deft_mma_sync_16x16x16_bf16"),
}


# The index map TVM's CUDA codegen looks up to lower ``mma_store`` (the accumulator layout, c_map).
ACCUMULATOR_LAYOUT = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"


def register_accumulator_layout() -> None:
    """Register ``ACCUMULATOR_LAYOUT`` where it is missing. ``tvm.s_tir.tensor_intrin.cuda``
    registers it on import, which takes ~40 s; tuning's build workers compile scheduled
    warp-fragment kernels without that import, so they register it here."""
    if tvm_ffi.get_global_func(ACCUMULATOR_LAYOUT, allow_missing=True) is None:
        tvm_ffi.register_global_func(ACCUMULATOR_LAYOUT, lambda index: convert(list(c_map(index[0], index[1]))))


_registering = threading.Lock()


def register_warp_mma_intrinsics(precision: str | None = None):
    """Register (once, from any number of threads: the first kernels of a process may be scheduled
    concurrently) TVM's tensor intrinsics and these, of every precision; returns the names of
    (load A, load B, multiply-accumulate) of ``precision`` ("tf32" or "bfloat16"), or None."""
    with _registering:
        if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
            # TVM's module registers the accumulator layout itself (and fails if it exists).
            tvm_ffi.remove_global_func(ACCUMULATOR_LAYOUT)
        from tvm.s_tir.tensor_intrin import cuda  # noqa: F401 - TVM's WMMA/MMA intrinsics

        for name, (load_a, load_b, sync) in NAMES.items():
            if TensorIntrin.get(load_a, allow_missing=True) is None:
                TensorIntrin.register(load_a, *load_intrin(False, name))
                TensorIntrin.register(load_b, *load_intrin(True, name))
                TensorIntrin.register(sync, *sync_intrin(name))
    return NAMES.get(precision)
