"""The channels-last copies the tensor-core forward gathers from, made by one host function.

The tensor-core schedule (``cuda_tensorcore.py``) reads input ``[N, H, W, C]`` and weight ``[O,
kh, kw, C / groups]`` (``kernel_spec``'s ``layout="NHWC"``). From torch's NCHW tensors that is two
permuted copies per call: in torch, each a view, an allocation and a copy kernel, about 60 us of
host time on the H200's host for a layer whose kernel takes 20 us. ``channels_last_primfunc``
makes both copies in one call (two kernels, a thread per element written, so the writes are
coalesced), into buffers the caller allocates.
"""

from __future__ import annotations

import math

from tvm import tirx

from deft_tvm.compute.spec import INT32_MAX, DeformConvSpec
from deft_tvm.schedules.cuda import thread_loops

THREADS = 256


def channels_last_primfunc(spec: DeformConvSpec, bind_threads: bool = True):
    """``channels_last(input [N, C, H, W], weight [O, C / groups, kh, kw], input_nhwc [N, H, W, C],
    weight_ohwi [O, kh, kw, C / groups])`` (the spec's dtype, all contiguous): the last two are the
    first two with the channels last. ``bind_threads=False``: the same loops, serial (buildable
    for a CPU, where tests check the copies)."""
    from tvm.script import tirx as T

    n, c, h, w = spec.input_shape
    o, ipg, kh, kw = spec.weight_shape
    dtype = spec.dtype
    inputs, weights = math.prod(spec.input_shape), math.prod(spec.weight_shape)
    index = "int64" if inputs > INT32_MAX else "int32"
    n, c, h, w, inputs = (tirx.IntImm(index, v) for v in (n, c, h, w, inputs))
    threads = tirx.IntImm(index, THREADS)
    input_blocks = tirx.IntImm(index, -(-int(inputs) // THREADS))
    weight_blocks = -(-weights // THREADS)
    blocks_loop, threads_loop = thread_loops(bind_threads)

    @T.macro
    def copy_input(input, input_nhwc, e):  # e: the flat index of input_nhwc
        if e < inputs:
            input_nhwc[e // (h * w * c), e // (w * c) % h, e // c % w, e % c] = \
                input[e // (h * w * c), e % c, e // (w * c) % h, e // c % w]

    @T.macro
    def copy_weight(weight, weight_ohwi, e):  # e: the flat index of weight_ohwi
        if e < weights:
            weight_ohwi[e // (kh * kw * ipg), e // (kw * ipg) % kh, e // ipg % kw, e % ipg] = \
                weight[e // (kh * kw * ipg), e % ipg, e // (kw * ipg) % kh, e // ipg % kw]

    @T.prim_func
    def channels_last(
        input: T.Buffer((n, c, h, w), dtype),
        weight: T.Buffer((o, ipg, kh, kw), dtype),
        input_nhwc: T.Buffer((n, h, w, c), dtype),
        weight_ohwi: T.Buffer((o, kh, kw, ipg), dtype),
    ):
        T.func_attr({"global_symbol": "channels_last", "tirx.noalias": True})
        for block in blocks_loop(input_blocks):
            for thread in threads_loop(threads):
                copy_input(input, input_nhwc, block * threads + thread)
        for block in blocks_loop(weight_blocks):
            for thread in threads_loop(THREADS):
                copy_weight(weight, weight_ohwi, block * THREADS + thread)

    return channels_last
