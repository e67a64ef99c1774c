"""Warp-level tensor-core multiply-accumulates (PTX ``mma.sync``) for hand-scheduled TIR.

A kernel keeps each operand tile of one ``mma.sync`` in per-thread (``local``) arrays and passes
them to ``T.ptx_legacy.mma`` (``MmaShape.sync``); the element each lane holds is fixed by the PTX
ISA ("Matrix Fragments for mma.m16n8k16" and "... mma.m16n8k8", PTX ISA 8.x, section 9.7.14.5), with
``g = lane // 4`` and ``t = lane % 4``:

* float16 / bfloat16, ``m16n8k16``: A (16 x 16, row-major) element ``i`` of 8 at row
  ``g + 8 * (i // 2 % 2)``, column ``2 t + i % 2 + 8 * (i // 4)``; B (16 x 8, column-major) element
  ``i`` of 4 at row ``2 t + i % 2 + 8 * (i // 2)``, column ``g``;
* float32 on TF32, ``m16n8k8``: A (16 x 8) element ``i`` of 4 at row ``g + 8 * (i % 2)``, column
  ``t + 4 * (i // 2)``; B (8 x 8) element ``i`` of 2 at row ``t + 4 i``, column ``g``; the
  tensor cores read the float32 bits and use the top 19 (truncation to TF32);
* C (16 x 8, float32 sums) element ``i`` of 4 at row ``g + 8 * (i // 2)``, column ``2 t + i % 2``.
"""

from __future__ import annotations

import dataclasses

from deft_tvm.compute.spec import DeformConvSpec


@dataclasses.dataclass(frozen=True)
class MmaShape:
    """One ``mma.sync``: its PTX shape and operand type, the reduction depth ``k`` and the elements
    of A and B each lane holds (C: always 4 float32)."""

    shape: str
    ptx_type: str
    k: int
    a_elements: int
    b_elements: int

    def a_element(self, i, g, t):
        """(row, column) of A element ``i`` held by lane ``4 g + t``."""
        if self.k == 16:
            return g + 8 * (i // 2 % 2), 2 * t + i % 2 + 8 * (i // 4)
        return g + 8 * (i % 2), t + 4 * (i // 2)

    def b_element(self, i, g, t):
        """(row = reduction index, column) of B element ``i`` held by lane ``4 g + t``."""
        if self.k == 16:
            return 2 * t + i % 2 + 8 * (i // 2), g
        return t + 4 * i, g

    def sync(self, a, a_at, b, b_at, c, c_at):
        """The ``mma.sync`` (a TIR call, for ``T.evaluate`` in hand-scheduled TIR and in the
        forward's tensor intrinsics) that adds the product of the A fragment at ``a[a_at:]`` and the
        B fragment at ``b[b_at:]`` to the C fragment at ``c[c_at:]`` (per-thread arrays or warp
        buffers; A row-major, B column-major, float32 sums)."""
        from tvm.script import tirx as T

        return T.ptx_legacy.mma(self.shape, "row", "col", self.ptx_type, self.ptx_type, "fp32", a.data, a_at,
                                b.data, b_at, c.data, c_at, False, dtype="float32")


def c_element(i, g, t):
    """(row, column) of C element ``i`` held by lane ``4 g + t``."""
    return g + 8 * (i // 2), 2 * t + i % 2


MMA_SHAPES = {
    "float16": MmaShape("m16n8k16", "fp16", 16, 8, 4),
    "bfloat16": MmaShape("m16n8k16", "bf16", 16, 8, 4),
    "tf32": MmaShape("m16n8k8", "tf32", 8, 4, 2),
}


def mma_shape(spec: DeformConvSpec) -> MmaShape | None:
    """The ``mma.sync`` the spec's products take on tensor cores (float16, bfloat16, float32 where
    the spec allows TF32), else None (float32 without TF32 and float64 stay on SIMT cores)."""
    return MMA_SHAPES.get("tf32" if spec.tf32 else spec.dtype)
