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
n8) of "tf32" or "bfloat16", and of "float32": three TF32 mma per n8 on each operand split into
two TF32 parts (3xTF32: about float32's accuracy on tensor cores).
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
OPERAND_DTYPES = {"tf32": "float32", "bfloat16": "bfloat16", "float32": "float32"}  # precision -> operand dtype
# precision -> its key in MMA_SHAPES: float32 multiplies as three TF32 products (split_tf32)
SHAPE_KEYS = {"tf32": "tf32", "bfloat16": "bfloat16", "float32": "tf32"}
TF32_MASK = 0xFFFFE000  # the bits of a float32 that TF32 keeps: sign, exponent, 10 mantissa bits
TF32_HALF_ULP = 0x1000  # half of TF32's last mantissa bit, in float32 bits


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
    shape, dtype = MMA_SHAPES[SHAPE_KEYS[precision]], OPERAND_DTYPES[precision]
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


def tf32_part(value):
    """``value`` (float32) rounded to TF32 (to nearest, ties away from zero, as ``cvt.rna.tf32.f32``:
    half a TF32 ulp added to the bits, then the 13 mantissa bits TF32 drops cleared); infinities
    stay what they are and NaN is kept as it is (the bit arithmetic alone would carry the payload
    of CUDA's NaN, 0x7fffffff, into the sign bit: -0.0, a NaN sample lost); values within half a
    TF32 ulp of float32's largest round to infinity."""
    rounded = T.reinterpret("float32", T.bitwise_and(T.reinterpret("uint32", value) + T.uint32(TF32_HALF_ULP),
                                                     T.uint32(TF32_MASK)))
    return T.Select(T.isnan(value), value, rounded)


def tf32_rest(value, big):
    """What TF32 part ``big`` of ``value`` leaves, itself rounded to TF32. An infinite ``value``
    leaves NaN (inf - inf): 3xTF32 turns infinite operands into NaN products, where a float32
    multiply gives infinities."""
    return tf32_part(value - big)


def sync_intrin(precision: str):
    """C (16x16, float32) += A (16 x k) * B^T (16 x k), as two mma of n8; "float32" as three TF32
    mma per n8 (``split_tf32``)."""
    mma, dtype = MMA_SHAPES[SHAPE_KEYS[precision]], OPERAND_DTYPES[precision]
    k = mma.k
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
                T.evaluate(mma.sync(A, A.elem_offset + tx * registers, B, B.elem_offset + tx * registers, C,
                                    C.elem_offset + tx * 8))
                T.evaluate(mma.sync(A, A.elem_offset + tx * registers, B, B.elem_offset + tx * registers + half, C,
                                    C.elem_offset + tx * 8 + 4))

    if precision != "float32":
        return desc, impl

    @T.macro
    def product(parts_a, parts_b, C, tx, n8, a_part, b_part):
        """C's n8 half ``n8`` += (A's part at ``a_part``) x (B's part at ``b_part``), one TF32 mma."""
        T.evaluate(mma.sync(parts_a, a_part, parts_b, b_part + n8 * half, C, C.elem_offset + tx * 8 + n8 * 4))

    @T.prim_func(s_tir=True)
    def split_tf32(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        B = T.match_buffer(b, (WARP, registers), dtype, align=64, offset_factor=registers, scope="warp")
        C = T.match_buffer(c, (WARP, 8), "float32", align=64, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:8], A[0:WARP, 0:registers], B[0:WARP, 0:registers])
            T.writes(C[0:WARP, 0:8])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                # Each operand as big + small, both TF32 (big: it rounded to TF32, small: the rest
                # rounded to TF32): A B ~ As Bb + Ab Bs + Ab Bb, the small products first, As Bs
                # dropped (NVIDIA's 3xTF32, as CUTLASS's float32 GEMMs on TF32 tensor cores).
                parts_a = T.alloc_buffer((2 * registers,), "float32", scope="local")  # big, then small
                parts_b = T.alloc_buffer((2 * registers,), "float32", scope="local")
                for r in T.unroll(registers):
                    parts_a[r] = tf32_part(A[tx, r])
                    parts_a[registers + r] = tf32_rest(A[tx, r], parts_a[r])
                    parts_b[r] = tf32_part(B[tx, r])
                    parts_b[registers + r] = tf32_rest(B[tx, r], parts_b[r])
                for n8 in T.unroll(2):
                    product(parts_a, parts_b, C, tx, n8, registers, 0)  # small x big
                    product(parts_a, parts_b, C, tx, n8, 0, registers)  # big x small
                    product(parts_a, parts_b, C, tx, n8, 0, 0)  # big x big

    return desc, split_tf32


NAMES = {
    "tf32": ("deft_mma_load_a_16x8_tf32_shared", "deft_mma_load_b_trans_16x8_tf32_shared",
             "deft_mma_sync_16x16x8_tf32"),
    "bfloat16": ("deft_mma_load_a_16x16_bf16_shared", "deft_mma_load_b_trans_16x16_bf16_shared",
                 "deft_mma_sync_16x16x16_bf16"),
    # float32 operands load as TF32's; the multiply is three TF32 products
    "float32": ("deft_mma_load_a_16x8_tf32_shared", "deft_mma_load_b_trans_16x8_tf32_shared",
                "deft_mma_sync_16x16x8_3xtf32"),
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
    (load A, load B, multiply-accumulate) of ``precision`` ("tf32", "bfloat16" or "float32"), or None."""
    with _registering:
        if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
            # TVM's module registers the accumulator layout itself (and fails if it exists).
            tvm_ffi.remove_global_func(ACCUMULATOR_LAYOUT)
        from tvm.s_tir.tensor_intrin import cuda  # noqa: F401 - TVM's WMMA/MMA intrinsics

        for name, (load_a, load_b, sync) in NAMES.items():
            for intrinsic, make in ((load_a, lambda: load_intrin(False, name)), (load_b, lambda: load_intrin(True, name)),
                                    (sync, lambda: sync_intrin(name))):
                if TensorIntrin.get(intrinsic, allow_missing=True) is None:
                    TensorIntrin.register(intrinsic, *make())
    return NAMES.get(precision)
