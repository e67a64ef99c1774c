"""Resident blocks an SM that a schedule asks of its CUDA kernels (``__launch_bounds__``).

ptxas fits a kernel declared ``__launch_bounds__(max_threads, min_blocks)`` in the registers that
let ``min_blocks`` blocks of ``max_threads`` threads reside on one multiprocessor (65536 32-bit
registers an SM on sm_90: 64 a thread for 4 blocks of 256 threads), spilling what does not fit to
local memory (CUDA C++ Programming Guide, "Launch Bounds"). TVM 0.27 writes the second argument
for a device function with the attribute ``tirx.launch_bounds_min_blocks_per_sm``, which it also
takes from a statement of that key inside the kernel's thread bindings: the kernels written in TIR
(``cuda_backward_fused``, ``cuda_patch_forward``) set theirs so, one per kernel. A schedule of a
compute cannot: no schedule primitive adds such a statement (a loop annotation of that key is not
turned into one), the device functions only exist after ``SplitHostDevice``, and the attributes of
``main`` stay on the host function (checked on 0.27.0.post1). So a schedule marks the PrimFunc it
schedules with ``with_min_blocks``, and ``min_blocks_per_sm``, a pass of the
``cuda_launch.PIPELINE`` after lowering, copies the request to the module's device kernels.
(ptxas ignores ``--maxrregcount`` for a kernel with ``__launch_bounds__``, which TVM writes for
these.)
"""

from __future__ import annotations

import tvm
from tvm import tirx

MIN_BLOCKS = "deft.min_blocks_per_sm"
_LAUNCH_BOUNDS = "tirx.launch_bounds_min_blocks_per_sm"


def with_min_blocks(mod: tvm.IRModule, blocks: int) -> tvm.IRModule:
    """A copy of ``mod`` whose ``main`` asks for ``blocks`` resident blocks an SM of each of its
    kernels. Raises ValueError for fewer than one block."""
    if blocks < 1:
        raise ValueError(f"resident blocks an SM must be 1 or more, got {blocks}")
    functions = {gv: func.with_attr(MIN_BLOCKS, blocks) if gv.name_hint == "main" else func
                 for gv, func in mod.functions.items()}
    return tvm.IRModule(functions, attrs=mod.attrs)


@tvm.transform.module_pass(opt_level=0, name="MinBlocksPerSM")
def min_blocks_per_sm(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Gives every device kernel (a function with launch parameters, after ``SplitHostDevice``) of
    a module whose entry function asks for resident blocks (``MIN_BLOCKS``; a kernel module has one
    entry, ``main``) TVM's launch-bounds attribute of that count."""
    asked = [func.attrs[MIN_BLOCKS] for func in mod.functions.values()
             if isinstance(func, tirx.PrimFunc) and func.attrs and MIN_BLOCKS in func.attrs]
    if not asked:
        return mod
    updates = {gv: func.with_attr(_LAUNCH_BOUNDS, int(asked[0])) for gv, func in mod.functions.items()
               if isinstance(func, tirx.PrimFunc) and func.attrs and "tirx.kernel_launch_params" in func.attrs}
    for global_var, func in updates.items():
        mod[global_var] = func
    return mod
