"""The backward kernels: ``deft_tvm.compute.backward`` compiled for the tensors' device and kept in memory
per workload.

* On CUDA with atomics allowed (``torch.use_deterministic_algorithms`` off, torch's default): the
  fused kernels of ``schedules/cuda_backward_fused.py`` (grad_input, grad_offset and grad_mask in
  one kernel that never writes the columns; grad_weight and grad_bias as split partial sums and
  their fixed-order sum), launched by one host function (``backward_entry``), with the tilings
  of the workload's tuned record (``deft-tvm tune --fused-backward``: the user's or the shipped
  one, ``records.record_roots``), or else its layer configuration's (one entry for every batch
  and image size; the tilings of its record, ``--configuration``, else the defaults;
  ``fused_choice``):
  a loaded kernel library's (``deft-tvm export --backward``; of the call's sizes, else of its
  configuration, with the tilings its manifest names), else compiled through the kernel cache
  (memory and disk; the file is keyed by ``cuda_backward_fused.fingerprint``).
* On CUDA in deterministic mode, for float16, bfloat16 and TF32 with finite inputs: the same
  fused kernels with grad_input in int64 fixed point at one quantum (``contribution_bound``),
  whose sums are the same bits on every run.
* Otherwise the staged backward: the gradient kernels (every stage but grad_input's) are the
  workload's ``backward`` part: from a loaded kernel library if it has them, else the committed
  tuned record or the default schedule (``schedules/cpu_backward.py``,
  ``schedules/cuda_backward.py``; of the layer configuration, ``kernel_cache.compiled_spec``),
  compiled through the kernel cache (memory and disk), as the forward's are; grad_input is, on
  the CPU, the plane scatter (parallel over (batch, channel) planes, deterministic) and, on CUDA
  in deterministic mode, the sorted gather (no atomics, the same bits on every run), each of the
  same spec as the gradient kernels.

``deform_conv2d_backward`` returns torchvision's gradients of every argument.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
from typing import Callable

import torch
import tvm

from deft_tvm.compute.backward import deform_conv2d_backward_te, scatter_primfunc, sorted_gather_primfunc
from deft_tvm.compute.spec import INT32_MAX, DeformConvSpec, accumulate_dtype, generic_spec, kernel_key
from deft_tvm.runtime import kernel_cache, library
from deft_tvm.runtime.targets import compile_kernel, exact_cuda_compilation, target_for_device

# (spec, target, part): a compiled kernel; (spec, target, part, library generation): a call's kernel. The
# target: target_for_device's.
_kernels: dict[tuple, Callable] = {}
_lock = threading.Lock()
# The fused backward's parts (``_kernel``'s) -> their kernel parts (``compute.spec.PARTS``): the names of
# their disk-cache files and library functions.
FUSED_PARTS = {"fused": "fused_backward", "fused_deterministic": "fused_backward_deterministic"}


def _build(spec: DeformConvSpec, target: tvm.target.Target, part: str) -> Callable:
    cuda = target.kind.name == "cuda"
    if part == "gradients":
        return kernel_cache.scheduled_kernel(spec, target, "backward")[0]
    if part in FUSED_PARTS:
        return fused_kernels(spec, target, *_fused_tilings(spec, target, part), part)
    if part == "gather":
        from deft_tvm.schedules.cuda_backward import THREADS

        def primfunc():
            return sorted_gather_primfunc(spec, THREADS if cuda else None)
    else:
        def primfunc():
            return scatter_primfunc(spec)
    return kernel_cache.indexed_library(kernel_key(spec, part), repr(spec), target,
                                        lambda: (tvm.IRModule({part: kernel_cache.scripted(primfunc)}), {}),
                                        (part,))[0][0]


@dataclasses.dataclass(frozen=True)
class FusedKernels:
    """The fused CUDA backward (``schedules/cuda_backward_fused.py``) of a spec or of its layer
    configuration: its one host function (``backward_entry``), its tilings and which of the data
    kernel's sums it finishes."""

    entry: Callable
    data_tiling: object  # schedules.cuda_backward_fused.DataTiling
    weight_tiling: object  # WeightTiling
    segments: object  # ReduceSegments

    @property
    def channel_splits(self) -> int:
        return self.data_tiling.channel_splits

    def workspace_elements(self, spec: DeformConvSpec) -> int:
        """Elements of the scratch buffer the entry takes for a call of ``spec``'s sizes."""
        return _workspace_elements(spec, self.data_tiling, self.weight_tiling)


def fused_library(spec: DeformConvSpec, target: tvm.target.Target, data, weight,
                  part: str = "fused") -> tuple[str, str, Callable]:
    """``(name, fingerprint, build)`` of the disk-cache library of ``spec``'s fused backward with
    the given tilings (``kernel_cache.library_path``; ``part``: ``FUSED_PARTS``' key, which names the
    file), ``build()`` compiling it."""
    from deft_tvm.schedules.cuda_backward_fused import backward_entry, fingerprint

    return (f"{spec.key()}-{FUSED_PARTS[part]}", fingerprint(spec, data, weight, str(target.attrs["arch"])),
            lambda: compile_kernel(tvm.IRModule({"backward": kernel_cache.scripted(
                lambda: backward_entry(spec, data, weight))}), target))


def fused_kernels(spec: DeformConvSpec, target: tvm.target.Target, data, weight,
                  part: str = "fused") -> FusedKernels:
    """The fused backward of ``spec`` (or of its layer configuration, ``generic_spec``) with the
    given tilings, loaded from the disk cache or compiled (``fused_library``)."""
    from deft_tvm.schedules.cuda_backward_fused import reduce_segments

    name, fingerprint, build = fused_library(spec, target, data, weight, part)
    entry, = kernel_cache.load_or_build_library(name, fingerprint, target, build, ("backward",))
    return FusedKernels(entry, data, weight, reduce_segments(spec, data))


@functools.lru_cache(maxsize=1024)
def _workspace_elements(spec: DeformConvSpec, data, weight) -> int:
    from deft_tvm.schedules.cuda_backward_fused import backward_workspace

    return backward_workspace(spec, data, weight).elements


def _library_or_compiled(spec: DeformConvSpec, target: tvm.target.Target,
                         part: str) -> tuple[Callable | None, DeformConvSpec]:
    """``(kernel, compiled)`` of ``part``: a loaded library's kernel (``deft_tvm.load_library``: the
    gradient kernels, ``kernel_cache.library_kernel``, the fused backward, ``_library_fused``, and
    the sorted gather; of the call's sizes, else of its layer configuration) or None, and the spec
    compiled otherwise: the fused kernels' ``fused_choice``'s; the gradient kernels', the
    scatter's and the gather's that of the layer configuration where ``kernel_cache.compiled_spec``
    says so for the backward, else ``spec``."""
    if part == "gradients":
        return kernel_cache.library_kernel(spec, target, "backward")
    if part in FUSED_PARTS:
        loaded = _library_fused(spec, target, part)
        return loaded, spec if loaded is not None else fused_choice(spec, target, part)[0]
    compiled = kernel_cache.compiled_spec(spec, target, "backward")  # the scatter's and the gather's
    if part in ("gather", "scatter"):  # exported with the gradient kernels
        for candidate in dict.fromkeys((spec, compiled)):
            loaded = library.loaded_kernel(target.kind.name, kernel_key(candidate, part))
            if loaded is not None:
                return loaded, candidate
    return None, compiled


def _library_fused(spec: DeformConvSpec, target: tvm.target.Target, part: str) -> FusedKernels | None:
    """A loaded library's fused kernels (``part``) for a call of ``spec``, with the tilings its
    manifest gives them: of the call's sizes, else of its layer configuration where they serve
    them (``serves``); or None."""
    from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling, reduce_segments

    for candidate in (spec, generic_spec(spec)):
        key = kernel_key(candidate, FUSED_PARTS[part])
        entry, tilings = library.loaded_kernel(target.kind.name, key), library.loaded_tilings(target.kind.name, key)
        if entry is None or tilings is None:
            continue
        data, weight = DataTiling(**tilings["data"]), WeightTiling(**tilings["weight"])
        if candidate is spec or serves(spec, candidate, data, weight):
            return FusedKernels(entry, data, weight, reduce_segments(candidate, data))
    return None


def _fused_tilings(spec: DeformConvSpec, target: tvm.target.Target, part: str, roots=None) -> tuple:
    """The (data, weight) tilings of ``spec``'s fused kernels (``part``): its record's under the
    first of ``roots`` that holds one (default: ``records.record_roots()``, the user's tuning
    directory, then the shipped ``tuning_logs``) or the defaults, the data kernel's deterministic
    for ``"fused_deterministic"``."""
    from deft_tvm.runtime.records import recorded_fused_tilings
    from deft_tvm.schedules.cuda_backward_fused import default_tilings

    data, weight = (recorded_fused_tilings(spec, target, roots)
                    or default_tilings(spec, str(target.attrs["arch"])))
    if part == "fused_deterministic":
        data = dataclasses.replace(data, fixed_point=True, deterministic=True)
    return data, weight


def serves(spec: DeformConvSpec, generic: DeformConvSpec, data, weight) -> bool:
    """Whether the fused kernels of the layer configuration ``generic`` with these tilings serve a
    call of ``spec``'s sizes: its indices fit int32, the reduction leaves the runtime the same sums
    (``reduce_segments``) and the workspace holds at most ``INT32_MAX`` elements."""
    from deft_tvm.schedules.cuda_backward_fused import reduce_segments

    return (spec.index_dtype == "int32" and reduce_segments(spec, data) == reduce_segments(generic, data)
            and _workspace_elements(spec, data, weight) <= INT32_MAX)


def fused_choice(spec: DeformConvSpec, target: tvm.target.Target, part: str,
                 roots=None) -> tuple[DeformConvSpec, object, object]:
    """``(compiled, data, weight)``: the spec and tilings of the fused kernels (``part``) a call of
    ``spec`` compiles where no library has them: the record of its sizes under the first of
    ``roots`` that holds one (default: ``records.record_roots()``), else its layer
    configuration's (``generic_spec``: one entry for every batch and image size) with that
    configuration's tilings (its record's under ``roots``, ``tune_fused_backward(configuration=
    True)``, else its defaults) where they serve its sizes (``serves``), else its own default
    tilings. A configuration's own choice: itself with its recorded or default tilings."""
    from deft_tvm.runtime.records import recorded_fused_tilings

    if spec.shape_generic:
        return (spec, *_fused_tilings(spec, target, part, roots))
    if recorded_fused_tilings(spec, target, roots) is None:
        generic = generic_spec(spec)
        data, weight = _fused_tilings(generic, target, part, roots)
        if serves(spec, generic, data, weight):
            return generic, data, weight
    return (spec, *_fused_tilings(spec, target, part, roots))


def _kernel(spec: DeformConvSpec, target: tvm.target.Target, part: str):
    """``part`` ("gradients", "scatter" (CPU), "gather" or "fused" (CUDA)) of ``spec``'s backward for
    ``target`` (``target_for_device``'s: kept per target object), compiled once (the gradient
    kernels of a loaded library win, of the call's sizes or else of its layer configuration). Which
    kernel a call takes is resolved once per loaded-library state: a repeated call costs a
    dictionary look-up."""
    call = (spec, target, part, library.generation)
    kernel = _kernels.get(call)
    if kernel is None:
        loaded, compiled = _library_or_compiled(spec, target, part)
        kernel = _kernels[call] = loaded if loaded is not None else kernel_cache.memoized(
            _kernels, _lock, (compiled, target, part), lambda: _build(compiled, target, part))
    return kernel


def clear_memory_cache() -> None:
    """Forget the forward and backward kernels loaded in this process (the disk cache stays), as a
    new process starts: ``kernel_cache.clear_memory_cache``, the backward's own and what the
    backward keeps per spec (buffer layouts, workspaces, default tilings)."""
    from deft_tvm.schedules.cuda_backward_fused import default_tilings

    with _lock:
        _kernels.clear()
    for per_spec in (_compute_outputs, _output_layout, _workspace_elements, default_tilings):
        per_spec.cache_clear()
    kernel_cache.clear_memory_cache()


def backward_parts(spec: DeformConvSpec, device_type: str, deterministic: bool) -> tuple[str, ...]:
    """The kernels (``_kernel`` parts) ``deform_conv2d_backward`` takes for ``spec`` (float32 with
    ``tf32`` where the call multiplies on TF32) on a ``device_type`` ("cpu" or "cuda") device,
    with ``torch.use_deterministic_algorithms`` on or off, for finite inputs."""
    if device_type != "cuda":
        return ("gradients", "scatter")
    if not deterministic:
        return ("fused",)
    return ("fused_deterministic",) if takes_fixed_point(spec) else ("gradients", "gather")


def takes_fixed_point(spec: DeformConvSpec) -> bool:
    """Whether deterministic calls of ``spec`` (as ``kernel_cache.with_torch_tf32`` gives it) take the
    fused kernels with grad_input in fixed point (float16, bfloat16, TF32), not the staged backward
    (float32, whose tolerance is below the fixed-point quantum, and float64)."""
    return spec.dtype in ("float16", "bfloat16") or spec.tf32


def prebuild(specs, device: torch.device, *, deterministic: bool = False, max_workers: int = 8,
             progress=None) -> int:
    """Load or compile, in parallel threads (nvcc and LLVM run outside the GIL, where ``_kernel``
    builds one at a time on first use), the backward kernels (``backward_parts``) of ``specs`` on
    ``device`` that this process has not loaded yet; compiled ones go into the disk cache as on
    first use. ``progress``: as ``kernel_cache.finish`` takes it. Returns how many were loaded or
    compiled."""
    target = target_for_device(device)
    jobs = {}
    for spec in specs:
        for part in backward_parts(spec, device.type, deterministic):
            loaded, compiled = _library_or_compiled(spec, target, part)
            key = (compiled, target, part)
            if key not in _kernels and loaded is None:
                jobs[key] = (compiled, part)
    with exact_cuda_compilation(), concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        futures = {key: pool.submit(_build, spec, target, part) for key, (spec, part) in jobs.items()}
        kernels = dict(zip(futures, kernel_cache.finish(list(futures.values()), progress)))
    with _lock:
        for key, kernel in kernels.items():
            _kernels.setdefault(key, kernel)
    return len(kernels)


@functools.lru_cache(maxsize=None)
def _compute_outputs(spec: DeformConvSpec) -> tuple[tuple[str, tuple, str], ...]:
    """(name, shape, dtype) of the gradient compute's outputs for ``spec``, a size's or a layer
    configuration's (``generic_spec``: shapes of constants and the variables N, OH, OW), in the
    kernel's parameter order; built once per spec (a TE build takes milliseconds)."""
    _, outputs = deform_conv2d_backward_te(spec)
    return tuple((o.op.name, tuple(o.shape), str(o.dtype)) for o in outputs)


@functools.lru_cache(maxsize=1024)
def _output_layout(spec: DeformConvSpec) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of the gradient kernel's outputs for a call of ``spec``'s sizes, in its
    parameter order: its layer configuration's compute with the sizes put in, so that a new input
    size costs no TE build (the compute's own where a dimension is another expression, or where
    the sizes need int64 indices and so a kernel of their own)."""
    if spec.index_dtype == "int32":
        sizes = {"N": spec.batch, "H": spec.height, "W": spec.width, "OH": spec.out_h, "OW": spec.out_w}
        layout = _compute_outputs(generic_spec(spec))
        if all(isinstance(d, tvm.tirx.IntImm) or getattr(d, "name", None) in sizes
               for _, shape, _ in layout for d in shape):
            return tuple((name, tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else sizes[d.name] for d in shape),
                          dtype) for name, shape, dtype in layout)
    return tuple((name, tuple(int(d) for d in shape), dtype) for name, shape, dtype in _compute_outputs(spec))


def _output_buffers(spec: DeformConvSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """Empty tensors for the gradient kernel's outputs, in its parameter order."""
    return {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            for name, shape, dtype in _output_layout(spec)}


def deform_conv2d_backward(spec: DeformConvSpec, grad_output, input, offset, mask, weight) -> tuple:
    """Gradients of every argument of the forward call ``spec`` describes (tensors of the spec's
    dtype on one CPU or CUDA device; NCHW): ``(grad_input, grad_offset, grad_weight, grad_bias,
    grad_mask)``, contiguous, in the tensors' dtype and shaped as the arguments; grad_bias and
    grad_mask None where the call has no bias or mask."""
    device = input.device
    target = target_for_device(device)
    if device.type == "cuda":
        fused = kernel_cache.with_torch_tf32(spec, device)  # float32 on TF32 where torch's matmuls are
        if not torch.are_deterministic_algorithms_enabled():
            return run_fused_backward(fused, _kernel(fused, target, "fused"), grad_output, input, offset, mask, weight)
        bound = contribution_bound(fused, grad_output, mask, weight)
        if bound is not None:
            kernels = _kernel(fused, target, "fused_deterministic")
            return run_fused_backward(fused, kernels, grad_output, input, offset, mask, weight, bound)
    results = _output_buffers(spec, device)
    given = [t.contiguous() for t in (input, offset, mask, weight, grad_output) if t is not None]
    _kernel(spec, target, "gradients")(*given, *results.values())

    acc = getattr(torch, accumulate_dtype(spec.dtype))
    columns, index, share = results["grad_columns"], results["coord_index"], results["coord_share"]
    grad_input = torch.empty(spec.input_shape, dtype=acc, device=device)
    if device.type == "cuda":  # deterministic mode (the fused kernels take the other case)
        order, starts = sort_by_pixel(index, spec.height * spec.width)
        _kernel(spec, target, "gather")(columns, share, order, grad_input, starts)
    else:
        _kernel(spec, target, "scatter")(columns, index, share, grad_input)
    return (grad_input.to(input.dtype), results["grad_offset"], results["grad_weight"],
            results["grad_bias_acc"].to(input.dtype) if spec.has_bias else None,
            results["grad_mask"] if spec.has_mask else None)


def contribution_bound(spec: DeformConvSpec, grad_output, mask, weight) -> float | None:
    """A bound on every |grad_column x mask| of a call (max over input channels and taps of the sum
    of |weight| over output channels, times max |grad_output| and max |mask|; a grad_column is
    weight^T . grad_output at one position), the float32 the deterministic fused kernels scale
    grad_input by; None where they do not apply: float32 without TF32 (its tolerance is below the
    fixed-point quantum), float64, or a bound that is not finite (NaN or infinite grad_output, mask
    or weight). ``grad_output [N, O, Ho, Wo]``, ``mask [N, offset_groups * taps, Ho, Wo]`` or None,
    ``weight [O, C / groups, kh, kw]``, of the spec's dtype; one host synchronisation."""
    if not takes_fixed_point(spec):
        return None
    norm = torch.linalg.vector_norm  # one reduction kernel each; NaN and infinity propagate
    bound = norm(weight, 1, dim=0, dtype=torch.float32).amax() * norm(grad_output, math.inf, dtype=torch.float32)
    if mask is not None:
        bound = bound * norm(mask, math.inf, dtype=torch.float32)
    value = bound.item()
    return value if math.isfinite(value) else None


def run_fused_backward(spec: DeformConvSpec, kernels: FusedKernels, grad_output, input, offset, mask, weight,
                       bound: float | None = None) -> tuple:
    """``deform_conv2d_backward`` on CUDA by the fused kernels, no columns buffer, for ``spec`` as
    ``kernel_cache.with_torch_tf32`` gives it (float32 multiplies on TF32 tensor cores where
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as torchvision's matmuls do then): one call of
    the fused entry (four kernels; ``kernels``: ``_kernel``'s part "fused", or with a ``bound``
    (``contribution_bound``) "fused_deterministic", of ``spec`` or its layer configuration), which
    finishes every gradient but those ``reduce_segments`` leaves to the runtime. The deterministic
    kernels' grad_input is int64 fixed point at the bound's quantum (the same bits on every run),
    converted here."""
    device, dtype, segments = input.device, input.dtype, kernels.segments
    acc = getattr(torch, accumulate_dtype(spec.dtype))
    grad_output = grad_output.contiguous()
    if grad_output.data_ptr() % 16:  # the weight kernel reads grad_output in aligned runs of up to 16 bytes
        grad_output = grad_output.clone()
    splits = (kernels.channel_splits,)

    def data_gradient(folded: bool, shape):  # folded by the entry, else the data kernel's channel-split sums
        return torch.empty(shape if folded else splits + shape, dtype=dtype if folded else acc, device=device)

    grad_input = torch.empty(spec.input_shape, device=device,
                             dtype=dtype if segments.input else acc if bound is None else torch.int64)
    grad_offset = data_gradient(segments.offset, spec.offset_shape)
    grad_mask = data_gradient(segments.mask, spec.mask_shape) if spec.has_mask else None
    grad_weight = torch.empty(spec.weight_shape, dtype=dtype, device=device)
    grad_bias = torch.empty((spec.out_channels,), dtype=dtype, device=device) if spec.has_bias else None
    bound_tensor = None if bound is None else torch.tensor([bound], dtype=torch.float32, device=device)
    workspace = torch.empty((kernels.workspace_elements(spec),), dtype=acc, device=device)
    kernels.entry(*[t for t in (input.contiguous(), offset.contiguous(), None if mask is None else mask.contiguous(),
                                weight.contiguous(), grad_output, bound_tensor, workspace, grad_input, grad_offset,
                                grad_mask, grad_weight, grad_bias) if t is not None])
    if bound is not None:  # the quantum, as the kernel derives it from the bound's float32 exponent
        grad_input = grad_input.double() * kernels.data_tiling.fixed_point_quantum(spec, bound)

    def split_sum(part, folded: bool):
        if folded or part is None:
            return part
        return (part[0] if len(part) == 1 else part.sum(0)).to(dtype)  # (one split: no copy)

    return (grad_input.to(dtype), split_sum(grad_offset, segments.offset), grad_weight, grad_bias,
            split_sum(grad_mask, segments.mask))


def sort_by_pixel(coord_index, pixels: int):
    """``(order, starts)`` for ``sorted_gather_primfunc`` from ``coord_index`` (a torch int32 tensor
    ``[batch, offset_groups, kh, kw, out_h, out_w, 4]``): a stable sort keeps equal pixels' entries
    in index order, so the sums are the same on every run."""
    import torch

    keys = coord_index.flatten(2)
    keys = torch.where(keys < 0, pixels, keys)
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    bounds = torch.arange(pixels + 1, device=keys.device, dtype=keys.dtype).expand(*keys.shape[:2], -1)
    starts = torch.searchsorted(sorted_keys, bounds.contiguous())
    return order.to(torch.int32).contiguous(), starts.to(torch.int32).contiguous()
