"""GPU time of a callable, as the benchmarks and the fused backward's tiling search measure it."""

from __future__ import annotations


def gpu_ms(fn, iters: int = 20) -> float:
    """GPU time per call (ms) of ``iters`` back-to-back calls of ``fn``, CUDA events, after a warm-up."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
