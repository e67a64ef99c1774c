"""The warp-fragment index maps of the tensor-core forward (``schedules.cuda_warp_mma``: TF32
m16n8k8, bfloat16 m16n8k16) agree with the PTX fragment layouts of ``schedules.cuda_mma`` (which
the fused backward's mma.sync kernels use), element by element, and invert; float32's multiply is
3xTF32, whose scheme meets float32's tolerance where one TF32 product does not."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deft_tvm.reference.tolerances import TOLERANCES
from deft_tvm.schedules.cuda_mma import MMA_SHAPES
from deft_tvm.schedules.cuda_warp_mma import (OPERAND_DTYPES, SHAPE_KEYS, TF32_HALF_ULP, TF32_MASK, a_map, b_map, ldmatrix_row,
                                              load_intrin, sync_intrin, tf32_part, tf32_rest)

WARP = 32


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_a_tiles_hold_the_ptx_fragment_elements(precision):
    shape = MMA_SHAPES[SHAPE_KEYS[precision]]
    k = shape.k
    held = set()
    for lane in range(WARP):
        for register in range(shape.a_elements):
            row, column = shape.a_element(register, lane // 4, lane % 4)
            assert a_map(row, column, k) == (lane, register)
            held.add((row, column))
    assert held == {(i, c) for i in range(16) for c in range(k)}  # every element of the 16 x k tile once


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_b_tiles_hold_two_ptx_n8_fragments(precision):
    shape = MMA_SHAPES[SHAPE_KEYS[precision]]
    k = shape.k
    held = set()
    for half in range(2):  # positions 0-7, then 8-15, each one mma's B operand
        for lane in range(WARP):
            for register in range(shape.b_elements):
                channel, position = shape.b_element(register, lane // 4, lane % 4)
                position += 8 * half
                assert b_map(position, channel, k) == (lane, half * shape.b_elements + register)
                held.add((position, channel))
    assert held == {(n, c) for n in range(16) for c in range(k)}


@pytest.mark.parametrize("precision", ["tf32", "bfloat16"])
def test_sync_intrinsic_issues_two_mma_of_the_precision(precision):
    mma = MMA_SHAPES[SHAPE_KEYS[precision]]
    desc, impl = sync_intrin(precision)
    text = impl.script()
    assert text.count(f'"{mma.shape}"') == 2 and f'"{mma.ptx_type}"' in text
    assert f"tx * {mma.k // 2} + {mma.k // 4}" in text  # the second mma takes B's second n8 half


def test_float32_sync_issues_three_tf32_mma_per_half_on_split_operands():
    text = sync_intrin("float32")[1].script()
    assert "T.unroll(2)" in text and text.count('"m16n8k8"') == 3 and text.count('"tf32"') == 6
    assert text.count(f"T.uint32({TF32_MASK})") == 4  # A and B, each split into two TF32 parts
    assert text.count(f"T.uint32({TF32_HALF_ULP})") == 4  # rounded to nearest
    # (small x big, big x small, big x big): A's small part at register 4, B's at 4 + its n8 half's
    assert "parts_a.data, 4, parts_b.data, n8 * 2," in text and "parts_a.data, 0, parts_b.data, 4 + n8 * 2," in text


def _tf32_part(x: np.ndarray) -> np.ndarray:  # cuda_warp_mma.tf32_part
    x = x.astype(np.float32)
    rounded = ((x.view(np.uint32) + np.uint32(TF32_HALF_ULP)) & np.uint32(TF32_MASK)).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


def _tf32_rest(x: np.ndarray, big: np.ndarray) -> np.ndarray:  # cuda_warp_mma.tf32_rest
    with np.errstate(invalid="ignore"):
        return _tf32_part(x - big)


def _products(a: np.ndarray, b: np.ndarray, passes: int) -> np.ndarray:
    """The float32 sync's scheme, emulated: fragments of k = 8 channels, each TF32 product exact
    (float64) and added to the float32 accumulator; ``passes`` 3 (3xTF32) or 1 (TF32 alone)."""
    a_big, b_big = _tf32_part(a), _tf32_part(b)
    terms = [(_tf32_rest(a, a_big), b_big), (a_big, _tf32_rest(b, b_big)), (a_big, b_big)][3 - passes:]
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for k0 in range(0, a.shape[1], 8):
            for x, y in terms:
                acc = (acc + x[:, k0:k0 + 8].astype(np.float64) @ y[k0:k0 + 8].astype(np.float64)).astype(np.float32)
    return acc


@pytest.mark.parametrize("passes", [1, 3])
def test_3xtf32_products_meet_the_float32_tolerance_and_tf32_alone_does_not(passes):
    # Over the test layers' K = 576 (64 channels x 9 taps), weights at torch's default scale.
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 576)) / 24).astype(np.float32)
    b = rng.standard_normal((576, 64)).astype(np.float32)
    reference = a.astype(np.float64) @ b.astype(np.float64)
    error = np.abs(_products(a, b, passes) - reference)
    tolerance = TOLERANCES["float32"]["atol"] + TOLERANCES["float32"]["rtol"] * np.abs(reference)
    assert np.all(error <= tolerance) == (passes == 3)


def test_3xtf32_turns_an_infinite_operand_into_nan():
    # The documented difference from a float32 multiply (README): inf - inf in the split.
    a, b = np.ones((1, 8), np.float32), np.full((8, 2), 0.5, np.float32)
    a[0, 3] = np.inf
    assert np.isnan(_products(a, b, 3)).all() and np.isinf(a.astype(np.float64) @ b).all()


def test_tf32_split_compiled_keeps_nan_and_rounds_to_nearest():
    # tf32_part / tf32_rest built for the CPU (llvm) on float32 bit patterns: CUDA's NaN 0x7fffffff
    # (whose payload plus half an ulp would carry into the sign bit), a quiet NaN, infinities, a tie
    # and random values; the parts are the numpy scheme's, the rests its rests.
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def split(x: T.Buffer((64,), "float32"), part: T.Buffer((64,), "float32"), rest: T.Buffer((64,), "float32")):
        for i in range(64):
            part[i] = tf32_part(x[i])
            rest[i] = tf32_rest(x[i], tf32_part(x[i]))

    bits = np.random.default_rng(1).standard_normal(64).astype(np.float32).view(np.uint32)
    bits[:6] = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800000, 0xFF800000, 0x3F801000]
    x = bits.view(np.float32)
    run = tvm.compile(split, target="llvm")
    part, rest = (tvm.runtime.tensor(np.zeros(64, np.float32)) for _ in range(2))
    run(tvm.runtime.tensor(x), part, rest)
    part, rest = part.numpy(), rest.numpy()
    assert np.isnan(part[:3]).all() and np.isnan(rest[:3]).all()
    assert list(part[3:5]) == [np.inf, -np.inf] and part[5] == np.float32(1 + 2.0 ** -10)  # a tie: away from zero
    np.testing.assert_array_equal(part, _tf32_part(x))
    np.testing.assert_array_equal(rest[5:], _tf32_rest(x, part)[5:])
    assert np.all(np.abs(rest[5:]) <= np.abs(x[5:]) * 2.0 ** -11)


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
@pytest.mark.parametrize("is_b", [False, True])
def test_ldmatrix_rows_fill_the_fragments(is_b, precision):
    # ldmatrix.x4 (PTX ISA 8.x, 9.7.14.5.15): lanes 8 m .. 8 m + 7 give the addresses of matrix m's
    # 8 rows of 16 bytes; lane t receives, in its register m, 32 bits of row t // 4 of matrix m at
    # byte 4 (t % 4): two bfloat16 (elements 2 m, 2 m + 1 of the lane) or one TF32 (element m).
    k = MMA_SHAPES[SHAPE_KEYS[precision]].k
    per_register = k // 8  # operands in 32 bits
    fmap = b_map if is_b else a_map
    loaded = set()
    for lane in range(WARP):
        for matrix in range(4):
            row, column = ldmatrix_row(8 * matrix + lane // 4, is_b, k)
            for element in range(per_register):
                held = (row, column + per_register * (lane % 4) + element)
                assert fmap(*held, k) == (lane, per_register * matrix + element)
                loaded.add(held)
    assert loaded == {(r, c) for r in range(16) for c in range(k)}


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_operands_load_with_ldmatrix(precision):
    for is_b in (False, True):
        assert "ptx_legacy.ldmatrix" in load_intrin(is_b, precision)[1].script()


def test_intrinsics_register_once_from_concurrent_threads():
    # A fresh interpreter: the first kernels of a process may be scheduled from several threads.
    script = """
import threading
from deft_tvm.schedules.cuda_warp_mma import NAMES, register_warp_mma_intrinsics
start, results = threading.Barrier(8), []
def register():
    start.wait()
    results.append(register_warp_mma_intrinsics("bfloat16"))
threads = [threading.Thread(target=register) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert results == [NAMES["bfloat16"]] * 8, results
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
