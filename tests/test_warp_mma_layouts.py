"""The warp-fragment index maps of the tensor-core forward (``schedules.cuda_warp_mma``: TF32
m16n8k8, bfloat16 m16n8k16) agree with the PTX fragment layouts of ``schedules.cuda_mma`` (which
the fused backward's mma.sync kernels use), element by element, and invert."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deft_tvm.schedules.cuda_mma import MMA_SHAPES
from deft_tvm.schedules.cuda_warp_mma import OPERAND_DTYPES, a_map, b_map, ldmatrix_row, load_intrin, sync_intrin

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
                held.add((position, channel))
    assert held == {(n, c) for n in range(16) for c in range(k)}


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
def test_sync_intrinsic_issues_two_mma_of_the_precision(precision):
    mma = MMA_SHAPES[precision]
    desc, impl = sync_intrin(precision)
    text = impl.script()
    assert text.count(f'"{mma.shape}"') == 2 and f'"{mma.ptx_type}"' in text
    assert f"tx * {mma.k // 2} + {mma.k // 4}" in text  # the second mma takes B's second n8 half


@pytest.mark.parametrize("precision", list(OPERAND_DTYPES))
@pytest.mark.parametrize("is_b", [False, True])
def test_ldmatrix_rows_fill_the_fragments(is_b, precision):
    # ldmatrix.x4 (PTX ISA 8.x, 9.7.14.5.15): lanes 8 m .. 8 m + 7 give the addresses of matrix m's
    # 8 rows of 16 bytes; lane t receives, in its register m, 32 bits of row t // 4 of matrix m at
    # byte 4 (t % 4): two bfloat16 (elements 2 m, 2 m + 1 of the lane) or one TF32 (element m).
    k = MMA_SHAPES[precision].k
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
