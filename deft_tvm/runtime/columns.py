"""The unfused CUDA forward: deft_tvm's columns kernel, then cuBLAS's GEMM (through torch).

For the layers ``schedules.unfused_forward`` picks (wide layers on tensor cores, where the fused
kernel gathers each sample again for every block of output channels), the forward is

  columns = interpolate(input, offset, mask)  # part "columns": [N*Ho*Wo, kh*kw*C]
  rows    = bias + columns @ weight.T         # torch.addmm (cuBLAS): [N*Ho*Wo, out_channels]
  output  = rows transposed per image         # cuda_layout.channels_first_output_primfunc

with the channels-last input and weight (``ForwardCall``'s copies); torch multiplies on TF32
exactly where the spec allows it (``spec.tf32`` follows ``torch.backends.cuda.matmul.allow_tf32``).
The columns (``N * Ho * Wo * kh * kw * C`` values of the dtype) and the rows come from torch's
caching allocator on each call. On the H200's host a torch op costs 10-25 us to issue and a TVM
kernel call 5-8 us (tools/results/unfused_forward_host_h200_1c4f8fe.txt): the transposing copy
is a TVM kernel rather than torch's ``copy_`` of a transposed view.
"""

from __future__ import annotations

from typing import Callable

import torch

from deft_tvm.compute.spec import DeformConvSpec


def unfused_forward_kernel(spec: DeformConvSpec, columns_kernel: Callable, output_kernel: Callable) -> Callable:
    """The forward of ``spec`` (layout ``NHWC``, groups 1) as a kernel with the fused kernel's
    arguments: ``(input [N, H, W, C], offset, mask?, weight [O, kh, kw, C], bias?, output [N, O,
    Ho, Wo])``, all contiguous, of ``spec.dtype``; writes ``output``. ``columns_kernel`` is the
    compiled part ``columns`` of ``spec``, ``output_kernel`` its
    ``channels_first_output_primfunc``. ValueError for another layout or grouped layers."""
    if spec.layout != "NHWC" or spec.groups != 1:
        raise ValueError(f"the unfused forward takes NHWC layers of one group, got layout {spec.layout!r} "
                         f"and {spec.groups} groups")
    batch, out_channels = spec.batch, spec.out_channels
    positions = spec.out_h * spec.out_w
    reduction = spec.in_channels * spec.kernel_h * spec.kernel_w
    columns_shape = (batch, spec.out_h, spec.out_w, spec.kernel_h, spec.kernel_w, spec.in_channels)
    rows_shape = (batch, positions, out_channels, 1)
    output_shape = (batch, out_channels, 1, positions)
    sampled = 3 if spec.has_mask else 2  # input, offset, mask?

    def forward(*args) -> None:
        weight = args[sampled].view(out_channels, reduction)
        columns = args[0].new_empty(columns_shape)
        columns_kernel(*args[:sampled], columns)
        columns = columns.view(batch * positions, reduction)
        rows = torch.addmm(args[sampled + 1], columns, weight.t()) if spec.has_bias else columns @ weight.t()
        output_kernel(rows.view(rows_shape), args[-1].view(output_shape))

    return forward
