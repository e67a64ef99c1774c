"""The one per-dtype tolerance table, used by tests and by the main job's self-check.

Kernels interpolate and accumulate in the accumulate dtype (float32 for the half types, float64
for float64) and round when writing the output. Against the float64 reference (fed the same rounded
inputs) the error is therefore:
  * the final rounding, at most half an ulp of the output: 2**-11 relative for float16 (10
    stored mantissa bits), 2**-8 for bfloat16 (7 bits); ``rtol`` allows two ulps of the output
    dtype (2e-3 and 1.6e-2), and 1e-5 (about 80 ulps) for float32;
  * the rounding of the K = in_channels / groups * kernel_h * kernel_w products summed in the
    accumulate dtype, which grows like sqrt(K) * eps * sum(|terms|): with unit-scale inputs and
    K <= 576 in the tests that is below 1e-5 in float32, so ``atol`` 1e-4 bounds it for outputs
    near zero (float64: 1e-10, far above sqrt(K) * 2**-53 * sum);
  * for the half types, the rounding of the interpolated values to the tensor dtype before the
    product (as torchvision's columns buffer; tensor cores take half operands): each product is
    off by at most half an ulp relative (2**-11 float16, 2**-8 bfloat16), and with independent
    signs the sum by about that times the root-sum-square of the products, which for layers with
    weights of scale 1/sqrt(K) on unit inputs is of order one: ~5e-4 (float16) and ~4e-3
    (bfloat16), inside ``atol`` 1e-3 and 8e-3;
  * float32 on TF32 tensor cores (row "tf32", ``tolerance_key``): both operands of each product
    lose their low 13 mantissa bits (truncated to 10: up to 2**-10 relative each), so by the
    argument above the sum is off by about 2**-10 times the root-sum-square of the products
    (~1e-3 for those layers, more where the truncations add up): ``rtol`` and ``atol`` 5e-3.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    "float32": {"rtol": 1e-5, "atol": 1e-4},
    "float16": {"rtol": 2e-3, "atol": 1e-3},
    "bfloat16": {"rtol": 1.6e-2, "atol": 8e-3},
    "tf32": {"rtol": 5e-3, "atol": 5e-3},
}


def tolerance_key(dtype: str, tf32: bool = False) -> str:
    """The row of ``TOLERANCES`` for a kernel of ``dtype`` (``"tf32"`` for float32 on TF32)."""
    return "tf32" if tf32 and dtype == "float32" else dtype


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: str) -> None:
    """Compare a kernel's output with the float64 reference using the table's tolerance for ``dtype``."""
    torch.testing.assert_close(actual.to(torch.float64), reference, equal_nan=True, **TOLERANCES[dtype])


def assert_close_to_largest(actual: torch.Tensor, reference: torch.Tensor, dtype: str) -> None:
    """``assert_close`` of ``actual`` and ``reference`` both divided by the larger of 1 and the
    largest |reference| (NaN left out; NaN must match NaN): for sums of many samples (gradients,
    atomic or split sums), whose rounding grows with the largest term rather than with each element."""
    scale = max(reference.nan_to_num(0.0).abs().max().item(), 1.0)
    assert_close(actual.double() / scale, reference.double() / scale, dtype)
