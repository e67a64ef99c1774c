"""Host cost of one call for a tiny layer, where the kernel itself takes next to no time.

    python tools/host_overhead.py [--calls 200] [--backward] [--new-sizes]

For deft_tvm, torchvision (on a GPU, where it is installed), a dense conv2d and the bare compiled
kernel (the TVM function called with preallocated torch tensors), all on a 1x4x8x8 3x3 DCNv2
layer, it reports the host time of one call (``--calls`` calls without synchronizing, few enough
that the launch queue never fills) and the time per call including the GPU (one synchronize at
the end of the same number of calls). ``--backward``: a call is the forward plus
``torch.autograd.grad`` of every input, and deft_tvm is timed twice: as ``deform_conv2d`` runs it
(the eager path, no dispatcher) and through the registered custom op (``deform_conv2d_op``, as
under ``torch.compile``); the bare kernel is left out. ``--new-sizes``: every timed call has an
input size of its own (``--calls`` sizes from 8x8 up, the layer's configuration warmed up on
others first), as multi-scale training and video at the source resolution call: the host cost
of a size's first call on the layer configuration's kernels (issue 16), again without the bare
kernel.
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


def _us_per_call(warm_ups, timed, sync) -> tuple[float, float]:
    """Host and with-the-device microseconds per call of the ``timed`` calls, after ``warm_ups``."""
    for fn in warm_ups:
        fn()
    sync()
    start = time.perf_counter()
    for fn in timed:
        fn()
    host = time.perf_counter() - start
    sync()
    total = time.perf_counter() - start
    return host / len(timed) * 1e6, total / len(timed) * 1e6


def _case(height: int, width: int, device: str, gen: torch.Generator, requires_grad: bool) -> tuple:
    """``(input, offset, weight, bias, mask)`` of the 4-channel 3x3 DCNv2 layer at ``height x width``."""
    tensors = (torch.randn(1, 4, height, width, generator=gen), torch.randn(1, 18, height, width, generator=gen),
               torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, generator=gen),
               torch.rand(1, 9, height, width, generator=gen))
    return tuple(t.to(device).requires_grad_(requires_grad) for t in tensors)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backward", action="store_true", help="forward plus the gradients of every input")
    parser.add_argument("--new-sizes", action="store_true", help="every timed call at an input size of its own")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warnings.simplefilter("ignore", UntunedKernelWarning)
    gen = torch.Generator().manual_seed(0)
    sizes = iter((8 + i % 32, 8 + i // 32) for i in range(1 << 20))  # 8x8, 9x8, ...: each taken once

    def cases() -> tuple[list, list]:
        """Warm-up and timed inputs: with ``--new-sizes`` 10 and ``--calls`` sizes no call saw before
        (a provider's own), else one 8x8 case for every call."""
        if not args.new_sizes:
            case = _case(8, 8, device, gen, args.backward)
            return [case] * 10, [case] * args.calls
        new = [_case(*next(sizes), device, gen, args.backward) for _ in range(10 + args.calls)]
        return new[:10], new[10:]

    x, offset, weight, bias, mask = _case(8, 8, device, gen, False)
    spec = spec_from_tensors(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)
    kernel, out = get_kernel(spec, x.device), torch.empty(spec.output_shape, device=device)
    providers = {
        "deft_tvm.deform_conv2d": lambda x, offset, weight, bias, mask: deft_tvm.deform_conv2d(
            x, offset, weight, bias, 1, 1, 1, mask),
        "compiled kernel alone": lambda x, offset, weight, bias, mask: kernel(x, offset, mask, weight, bias, out),
        "dense conv2d": lambda x, offset, weight, bias, mask: F.conv2d(x, weight, bias, 1, 1),
    }
    if args.backward or args.new_sizes:
        del providers["compiled kernel alone"]
    if args.backward:
        providers["deft_tvm custom op"] = lambda x, offset, weight, bias, mask: deform_conv2d_op(
            x, offset, weight, bias, mask, 1, 1, 1, 1, 1, 1)
    if device == "cuda":
        try:
            from torchvision.ops import deform_conv2d as tv

            providers["torchvision deform_conv2d"] = lambda x, offset, weight, bias, mask: tv(
                x, offset, weight, bias, 1, 1, 1, mask)
        except ImportError:
            pass
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'forward and backward' if args.backward else 'forward'}"
          f"{', every call a new input size' if args.new_sizes else ''}")
    for name, fn in providers.items():
        def call(case, fn=fn, dense=name == "dense conv2d"):
            if not args.backward:
                with torch.no_grad():
                    return fn(*case)
            out = fn(*case)
            x, offset, weight, bias, mask = case
            inputs = (x, weight, bias) if dense else case
            return torch.autograd.grad(out, inputs, torch.ones_like(out))

        warm_ups, timed = cases()
        host, total = _us_per_call([lambda c=c: call(c) for c in warm_ups], [lambda c=c: call(c) for c in timed], sync)
        print(f"{name:28s} host {host:7.1f} us per call, with the device {total:7.1f} us per call")


if __name__ == "__main__":
    main()
