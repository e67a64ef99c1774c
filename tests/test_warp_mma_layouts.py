"""The warp-fragment index maps of the tensor-core forward (``schedules.cuda_warp_mma``: TF32
m16n8k8, bfloat16 m16n8k16) agree with the PTX fragment layouts of ``schedules.cuda_mma`` (which
the fused backward's mma.sync kernels use), element by element, and invert."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deft_tvm.schedules.cuda_mma import MMA_SHAPES
from deft_tvm.schedules.cuda_warp_mma import (OPERAND_DTYPES, a_map, a_rev, b_map, b_rev, ldmatrix_row, load_intrin,
                                             sync_intrin)

WARP = 32


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_a_tiles_hold_the_ptx_fragment_elements(precision):
    shape = MMA_SHAPES[precision]
    k = shape.k
    held = set()
    for lane in range(WARP):
        for register in range(shape.a_elements):
            row, column = shape.a_element(register, lane // 4, lane % 4)
            assert a_map(row, column, k) == (lane, register)
            assert a_rev(lane, register, shape) == (row, column)
            held.add((row, column))
    assert held == {(i, c) for i in range(16) for c in range(k)}  # every element of the 16 x k tile once


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_b_tiles_hold_two_ptx_n8_fragments(precision):
    shape = MMA_SHAPES[precision]
    k = shape.k
    held = set()
    for half in range(2):  # positions 0-7, then 8-15, each one mma's B operand
        for lane in range(WARP):
            for register in range(shape.b_elements):
                channel, position = shape.b_element(register, lane // 4, lane % 4)
                position += 8 * half
                assert b_map(position, channel, k) == (lane, half * shape.b_elements + register)
                assert b_rev(lane, half * shape.b_elements + register, shape) == (position, channel)
                held.add((position, channel))
    assert held == {(n, c) for n in range(16) for c in range(k)}


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_sync_intrinsic_issues_two_mma_of_the_precision(precision):
    mma = MMA_SHAPES[precision]
    desc, impl = sync_intrin(precision)
    text = impl.script()
    assert text.count(f'"{mma.shape}"') == 2 and f'"{mma.ptx_type}"' in text
    assert f"tx * {mma.k // 2} + {mma.k // 4}" in text  # the second mma takes B's second n8 half


@pytest.mark.parametrize("is_b", [False, True])
def test_ldmatrix_rows_fill_the_bfloat16_fragments(is_b):
    # ldmatrix.x4 (PTX ISA 8.x, 9.7.14.5.15): lanes 8 m .. 8 m + 7 give the addresses of matrix m's
    # 8 rows of 8 16-bit elements; lane t receives, in its register m, row t // 4 of matrix m,
    # elements 2 (t % 4) and 2 (t % 4) + 1.
    shape = MMA_SHAPES["bfloat16"]
    rev = b_rev if is_b else a_rev
    for lane in range(WARP):
        for matrix in range(4):
            row, column = ldmatrix_row(8 * matrix + lane // 4, is_b)
            for element in range(2):
                assert rev(lane, 2 * matrix + element, shape) == (row, column + 2 * (lane % 4) + element)


def test_bfloat16_operands_load_with_ldmatrix_and_tf32_element_by_element():
    for is_b in (False, True):
        assert "ptx_legacy.ldmatrix" in load_intrin(is_b, "bfloat16")[1].script()
        assert "ldmatrix" not in load_intrin(is_b, "tf32")[1].script()


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
