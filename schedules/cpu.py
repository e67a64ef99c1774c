"""Default schedule for CPU targets (``llvm``).

One parallel task per (batch, output row): it interpolates the sampled columns of that row for
every input channel and kernel tap once (a ``[in_channels, kernel_h, kernel_w, out_w]`` tile that
stays in cache), then reduces them against the weights for every output channel into a row
accumulator, with the output-width loop innermost and vectorised over contiguous memory.
"""

from __future__ import annotations

from tvm import s_tir

from deft_tvm.compute import STAGE_CONV, STAGE_OUTPUT, STAGE_SAMPLED

VECTOR_LANES = 8


def schedule_cpu(mod) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``deft_tvm.compute.deform_conv2d_primfunc``."""
    sch = s_tir.Schedule(mod)
    sampled = sch.get_sblock(STAGE_SAMPLED)
    conv = sch.get_sblock(STAGE_CONV)
    output = sch.get_sblock(STAGE_OUTPUT)

    n, co, oy, ox, rc, ky, kx = sch.get_loops(conv)
    sch.reorder(n, oy, co, rc, ky, kx, ox)
    row = sch.fuse(n, oy)
    sch.parallel(row)
    sch.compute_at(sampled, row)
    sch.reverse_compute_at(output, row)
    # Keep one output channel's row of accumulators: the reduction runs over it, then it is written.
    sch.decompose_reduction(conv, rc)
    return sch
