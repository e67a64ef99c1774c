"""CUDA schedule of the backward compute (``deft_tvm.compute_backward``): one kernel per stage.

* ``coord_index`` / ``coord_share`` and ``grad_columns``: one thread per element (``grad_columns``
  reduces over the group's output channels in a loop);
* ``grad_offset`` / ``grad_mask``: one thread per element, the reduction over the offset group's
  channels in registers, the corner values read where they are used (``coord_corner`` inlined);
* ``grad_weight`` / ``grad_bias``: one thread block per element, its threads splitting the
  reduction over (batch, rows, columns) and combining their sums in a cross-thread reduction.

``scatter_atomic_primfunc`` scatters grad_input with atomics. A first, untuned schedule: any
layer, without tiling or shared-memory reuse.
"""

from __future__ import annotations

from tvm import s_tir

from deft_tvm.spec import DeformConvSpec, accumulate_dtype

THREADS = 256
REDUCTION_THREADS = 256


def _bind_elementwise(sch: s_tir.Schedule, block) -> None:
    """One thread per element of ``block``'s spatial loops (its reduction loops stay inside)."""
    spatial = [loop for loop, kind in zip(sch.get_loops(block), _iter_kinds(sch, block)) if kind == 0]
    fused = sch.fuse(*spatial)
    blocks, threads = sch.split(fused, [None, THREADS])
    sch.bind(blocks, "blockIdx.x")
    sch.bind(threads, "threadIdx.x")


def _iter_kinds(sch: s_tir.Schedule, block) -> list[int]:
    """The kind of each loop of ``block`` (0 spatial, 2 reduction), from its block iterators."""
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _accumulate_in_registers(sch: s_tir.Schedule, acc_name: str, cast_name: str) -> None:
    """The cast stage ``cast_name`` one thread per element, its reduction ``acc_name`` in registers."""
    cast = sch.get_sblock(cast_name)
    _bind_elementwise(sch, cast)
    acc = sch.get_sblock(acc_name)
    sch.compute_at(acc, sch.get_loops(cast)[-1], preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")


def _reduce_across_threads(sch: s_tir.Schedule, acc_name: str, cast_name: str | None) -> None:
    """One thread block per element of ``acc_name``: its reduction loops fused and split over the
    block's threads (a cross-thread reduction), cast by ``cast_name`` (if any) in the same kernel."""
    acc = sch.get_sblock(acc_name)
    if cast_name is not None:
        cast = sch.get_sblock(cast_name)
        element = sch.fuse(*sch.get_loops(cast))
        sch.bind(element, "blockIdx.x")
        sch.compute_at(acc, element, preserve_unit_loops=True)
        sch.set_scope(acc, 0, "local")
    loops, kinds = sch.get_loops(acc), _iter_kinds(sch, acc)
    reduction = sch.fuse(*[loop for loop, kind in zip(loops[-len(kinds):], kinds) if kind == 2])
    _, threads = sch.split(reduction, [None, REDUCTION_THREADS])
    sch.bind(threads, "threadIdx.x")
    if cast_name is None:
        spatial = [loop for loop, kind in zip(loops[-len(kinds):], kinds) if kind == 0]
        sch.bind(sch.fuse(*spatial), "blockIdx.x")


def schedule_backward_cuda(mod, has_mask: bool) -> s_tir.Schedule:
    """Schedule the ``main`` PrimFunc of ``te.create_prim_func`` over ``deform_conv2d_backward_te``."""
    sch = s_tir.Schedule(mod)
    sch.compute_inline(sch.get_sblock("coord_corner"))
    for name in ("coord_index", "coord_share", "grad_columns"):
        _bind_elementwise(sch, sch.get_sblock(name))
    _accumulate_in_registers(sch, "grad_offset_acc", "grad_offset")
    if has_mask:
        _accumulate_in_registers(sch, "grad_mask_acc", "grad_mask")
    _reduce_across_threads(sch, "grad_weight_acc", "grad_weight")
    _reduce_across_threads(sch, "grad_bias_acc", None)
    return sch


def scatter_atomic_primfunc(spec: DeformConvSpec):
    """grad_input on CUDA (in the accumulate dtype, zeroed by the caller): one thread per sample
    ``(batch, channel, tap, position)`` adds ``grad_columns * coord_share`` to each of its corners
    inside the image with ``atomicAdd`` (the order of the additions, hence the rounding, varies
    from run to run)."""
    from tvm.script import tirx as T

    acc = accumulate_dtype(spec.dtype)
    n, c, h, w = spec.input_shape
    kh, kw, og, oh, ow = spec.kernel_h, spec.kernel_w, spec.offset_groups, spec.out_h, spec.out_w
    cpg, samples = c // og, kh * kw * oh * ow
    total = n * c * samples
    blocks = (total + THREADS - 1) // THREADS

    @T.prim_func
    def scatter(
        grad_columns: T.Buffer((n, c, samples), acc),
        coord_index: T.Buffer((n, og, samples, 4), "int32"),
        coord_share: T.Buffer((n, og, samples, 4), acc),
        grad_input: T.Buffer((n, c, h * w), acc),
    ):
        T.func_attr({"global_symbol": "scatter", "tirx.noalias": True})
        for block in T.thread_binding(blocks, thread="blockIdx.x"):
            for thread in T.thread_binding(THREADS, thread="threadIdx.x"):
                if block * THREADS + thread < total:
                    b = (block * THREADS + thread) // (c * samples)
                    ch = (block * THREADS + thread) // samples % c
                    sample = (block * THREADS + thread) % samples
                    for k in T.unroll(4):
                        if coord_index[b, ch // cpg, sample, k] >= 0:
                            T.evaluate(T.cuda.atomic_add(
                                T.address_of(grad_input[b, ch, coord_index[b, ch // cpg, sample, k]]),
                                grad_columns[b, ch, sample] * coord_share[b, ch // cpg, sample, k]))

    return scatter
