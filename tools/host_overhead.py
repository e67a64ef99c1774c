"""Host cost of one call for a tiny layer, where the kernel itself takes next to no time.

    python tools/host_overhead.py [--calls 200] [--backward]

For deft_tvm, torchvision (on a GPU, where it is installed), a dense conv2d and the bare compiled
kernel (the TVM function called with preallocated torch tensors), all on a 1x4x8x8 3x3 DCNv2
layer, it reports the host time of one call (``--calls`` calls without synchronizing, few enough
that the launch queue never fills) and the time per call including the GPU (one synchronize at
the end of the same number of calls). ``--backward``: a call is the forward plus
``torch.autograd.grad`` of every input, and deft_tvm is timed twice: as ``deform_conv2d`` runs it
(the eager path, no dispatcher) and through the registered custom op (``deform_conv2d_op``, as
under ``torch.compile``); the bare kernel is left out.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import deft_tvm
from deft_tvm.frontend.checks import spec_from_tensors
from deft_tvm.frontend.ops import deform_conv2d_op
from deft_tvm.runtime.kernel_cache import UntunedKernelWarning, get_kernel


def _us_per_call(fn, calls: int, sync) -> tuple[float, float]:
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    sync()
    total = time.perf_counter() - start
    return host / calls * 1e6, total / calls * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backward", action="store_true", help="forward plus the gradients of every input")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warnings.simplefilter("ignore", UntunedKernelWarning)
    gen = torch.Generator().manual_seed(0)
    x, offset = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 18, 8, 8, generator=gen)
    mask, weight, bias = torch.rand(1, 9, 8, 8, generator=gen), torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4)
    x, offset, mask, weight, bias = (t.to(device) for t in (x, offset, mask, weight, bias))
    spec = spec_from_tensors(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
    kernel, out = get_kernel(spec, x.device), torch.empty(spec.output_shape, device=device)
    providers = {
        "deft_tvm.deform_conv2d": lambda: deft_tvm.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask),
        "compiled kernel alone": lambda: kernel(x, offset, mask, weight, bias, out),
        "dense conv2d": lambda: F.conv2d(x, weight, bias, 1, 1),
    }
    if args.backward:
        del providers["compiled kernel alone"]
        providers["deft_tvm custom op"] = lambda: deform_conv2d_op(x, offset, weight, bias, mask, 1, 1, 1, 1, 1, 1)
    if device == "cuda":
        try:
            from torchvision.ops import deform_conv2d as tv

            providers["torchvision deform_conv2d"] = lambda: tv(x, offset, weight, bias, 1, 1, 1, mask)
        except ImportError:
            pass
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'forward and backward' if args.backward else 'forward'}")
    leaves = (x, offset, weight, bias, mask)
    for t in leaves:
        t.requires_grad_(args.backward)
    grad_output = torch.randn(spec.output_shape, generator=gen).to(device)
    for name, fn in providers.items():
        if args.backward:
            inputs = leaves if name != "dense conv2d" else (x, weight, bias)
            call = lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(), inputs, grad_output)  # noqa: E731
        else:
            call = torch.no_grad()(fn)
        host, total = _us_per_call(call, args.calls, sync)
        print(f"{name:28s} host {host:7.1f} us per call, with the device {total:7.1f} us per call")


if __name__ == "__main__":
    main()
