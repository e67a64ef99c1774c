"""Layer configuration kernels (``compute.spec.generic_spec``) told that their sizes are positive.

A configuration kernel takes its batch, image and output sizes (``N``, ``H``, ``W``, ``OH``,
``OW``) as int32 parameters, and a schedule that tiles flat positions divides a position's image,
row and column out of them at run time. TVM 0.27 has no size variable (a ``tirx.Var`` may be
negative), so each ``floordiv`` / ``floormod`` by a product of them lowers to a C division and
remainder with sign fix-ups (``(OW >= 0 && r >= 0) || (OW < 0 && r <= 0) ? q : q - 1``), which
CUDA C cannot fold either: the paper layer's configuration forward had 377 ``/`` and 1019 ``%``
in its source. Under a condition that the sizes are positive, TVM's lowering (``LowerIntrin``, whose
analyzer takes an enclosing ``if``'s condition as known) divides the non-negative flat position
with a plain ``/`` and ``%`` instead.

``positive_sizes`` wraps the body of every device kernel that takes any of those parameters in
``if (N > 0 && ...)``: exact, since a kernel is only launched for a spec that ``DeformConvSpec``
validated (height, width and output sizes positive) and a batch of one image or more (the front
end returns an empty batch's result without a kernel).
"""

from __future__ import annotations

import functools

import tvm
from tvm import tirx

from deft_tvm.compute.spec import GENERIC_SIZE_NAMES


def _size_condition(func: tirx.PrimFunc):
    """``size > 0`` for each int32 parameter of ``func`` named as a configuration's size, joined
    with ``&&``; None where it has none."""
    sizes = [p for p in func.params if str(p.ty) == "int32" and p.name in GENERIC_SIZE_NAMES]
    if not sizes:
        return None
    return functools.reduce(tirx.And, (tirx.GT(p, tirx.const(0, "int32")) for p in sizes))


@tvm.transform.module_pass(opt_level=0, name="PositiveSizes")
def positive_sizes(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Wraps the body of each device kernel (a function with launch parameters, after
    ``SplitHostDevice``) that takes configuration sizes in ``if (sizes > 0)``."""
    updates = {}
    for global_var, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or not func.attrs or "tirx.kernel_launch_params" not in func.attrs:
            continue
        condition = _size_condition(func)
        if condition is not None:
            updates[global_var] = func.with_body(tirx.IfThenElse(condition, func.body, None))
    for global_var, func in updates.items():
        mod[global_var] = func
    return mod
