"""What a kernel library of some workloads holds, and the checks of its kernels: the kernels
``deft-tvm tune``, ``deft-tvm export`` and ``tune_model`` put in one library beside the tuned
ones, so that, loaded, no call of those workloads' layer configurations compiles anything; the
forward and gradients of a workload against the float64 reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from deft_tvm.compute.spec import kernel_key
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest, tolerance_key


def kernel_parts(workload, target, backward: bool, columns: bool) -> tuple[str, ...]:
    """The kernels of ``workload`` (a ``tuning.workloads.Workload``) to tune or export: the
    forward, the backward's with ``backward`` and, with ``columns``, the unfused forward's columns
    kernel where ``target`` runs the workload's forward unfused (``schedules.unfused_forward``)."""
    from deft_tvm.schedules import unfused_forward

    columns = columns and unfused_forward(workload.for_target(target).spec, target)
    return ("forward",) + (("backward",) if backward else ()) + (("columns",) if columns else ())


def part_spec(workload, target, part: str):
    """The spec of ``workload``'s ``part`` kernel on ``target``: the forward's and the columns
    kernel's is the kernel spec (``Workload.for_target``); the backward reads NCHW tensors in full
    precision."""
    if part in ("forward", "columns"):
        return workload.for_target(target).spec
    return dataclasses.replace(workload.spec, layout="NCHW", tf32=False)


def default_entries(workloads, target, entries, backward: bool, configurations: bool = False) -> list:
    """``KernelEntry``s of the default schedule for the kernels of ``workloads`` that ``entries``
    lack (``kernel_parts``, the columns kernel included where the forward is unfused), so that a
    library serves every kernel the op runs: where the target's default kernel is shape-generic
    (``schedules.shape_generic``), that of the workload's layer configuration, which serves every
    batch and image size (with the tiling of its configuration record where the op finds one,
    ``runtime.kernel_cache.schedule_for``); with ``configurations``, that one also where
    ``entries`` hold a kernel of the workload's own sizes (a tuned one), for the calls of other
    sizes."""
    from deft_tvm.compute.kernels import kernel_primfunc
    from deft_tvm.compute.spec import generic_spec
    from deft_tvm.runtime.kernel_cache import schedule_for
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import tuned_database
    from deft_tvm.schedules import default_schedule, shape_generic

    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for workload in workloads:
        for part in kernel_parts(workload, target, backward, columns=True):
            spec = part_spec(workload, target, part)
            if kernel_key(spec, part) in have and not configurations:
                continue
            if shape_generic(spec, target, part):
                spec = generic_spec(spec)
            if kernel_key(spec, part) not in have:
                have.add(kernel_key(spec, part))
                sch, tuned = (schedule_for(spec, target, part) if spec.shape_generic
                              else (default_schedule(kernel_primfunc(spec, part), spec, target, part), False))
                origin = f"configuration record {tuned_database(spec, target, part)}" if tuned else "default schedule"
                extra.append(KernelEntry(spec, sch.mod["main"], origin=origin, part=part))
    return extra


def fused_specs(workloads, target, backward: bool) -> list:
    """The specs of the fused CUDA backward of ``workloads`` (the op's backward spec, NCHW) where
    ``backward`` and ``target`` is CUDA; else none."""
    if not backward or target.kind.name != "cuda":
        return []
    return [dataclasses.replace(workload.spec, layout="NCHW") for workload in workloads]


def fused_entries(specs, target, entries, roots) -> list:
    """``KernelEntry``s of the fused CUDA backward of ``specs`` that ``entries`` lack: the atomic
    entry and, where deterministic calls take it (``runtime.backward.takes_fixed_point``), the
    deterministic one, each with the tilings a call would compile
    (``runtime.backward.fused_choice``: the spec's record under the first of ``roots`` that holds
    one, else its layer configuration's defaults, an entry for every batch and image size), which
    the manifest keeps for the runtime."""
    from deft_tvm.runtime import backward
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.runtime.records import fused_backward_path
    from deft_tvm.schedules.cuda_backward_fused import backward_entry

    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for spec in dict.fromkeys(specs):
        for part in ("fused", "fused_deterministic") if backward.takes_fixed_point(spec) else ("fused",):
            compiled, data, weight = backward.fused_choice(spec, target, part, roots)
            library_part = backward.FUSED_PARTS[part]
            if kernel_key(compiled, library_part) in have:
                continue
            have.add(kernel_key(compiled, library_part))
            record = fused_backward_path(compiled, target, roots)
            extra.append(KernelEntry(compiled, backward_entry(compiled, data, weight),
                                     origin=str(record.parent) if record is not None else "default tilings",
                                     part=library_part,
                                     tilings={"data": dataclasses.asdict(data), "weight": dataclasses.asdict(weight)}))
    return extra


def companion_entries(target, entries) -> list:
    """``KernelEntry``s of the kernels the op runs beside those of ``entries`` that ``entries``
    lack, for the spec each was compiled for (its configuration's where it is one): on CUDA the
    channels-last copies of input and weight (``schedules.cuda_layout``) of channels-last forward
    and columns kernels, the output transpose of columns kernels (the unfused forward), and the
    sorted gather (grad_input of deterministic calls) of gradient kernels; on the CPU the plane
    scatter (grad_input) of gradient kernels."""
    from deft_tvm.compute.backward import scatter_primfunc, sorted_gather_primfunc
    from deft_tvm.runtime import kernel_cache
    from deft_tvm.runtime.library import KernelEntry
    from deft_tvm.schedules.cuda_backward import THREADS
    from deft_tvm.schedules.cuda_layout import channels_first_output_primfunc, channels_last_primfunc

    cuda = target.kind.name == "cuda"
    primfuncs = {"channels_last": channels_last_primfunc, "channels_first_output": channels_first_output_primfunc,
                 "gather": lambda spec: sorted_gather_primfunc(spec, THREADS), "scatter": scatter_primfunc}
    have = {kernel_key(e.spec, e.part) for e in entries}
    extra = []
    for entry in entries:
        wanted = {"channels_last": cuda and entry.part in ("forward", "columns") and entry.spec.layout == "NHWC",
                  "channels_first_output": cuda and entry.part == "columns",
                  "gather": cuda and entry.part == "backward", "scatter": not cuda and entry.part == "backward"}
        for part in (p for p, needed in wanted.items() if needed):
            if kernel_key(entry.spec, part) not in have:
                have.add(kernel_key(entry.spec, part))
                function = kernel_cache.scripted(lambda: primfuncs[part](entry.spec))
                extra.append(KernelEntry(entry.spec, function, origin="companion kernel", part=part))
    return extra


def library_entries(workloads, target, entries, backward: bool, roots: list[Path], fused=(),
                    configurations: bool = False) -> list:
    """``entries`` (tuned kernels) and the kernels a library of ``workloads`` adds to them:
    ``default_entries`` (``configurations`` as it takes it), the fused CUDA backward's of
    ``workloads`` with ``backward`` (with ``configurations``, of their layer configurations too)
    and of the specs ``fused`` (``fused_entries``, records under ``roots`` first), and
    ``companion_entries``."""
    from deft_tvm.compute.spec import generic_spec

    entries = list(entries)
    entries += default_entries(workloads, target, entries, backward, configurations)
    specs = fused_specs(workloads, target, backward)
    if configurations:  # the configurations' entries too, for the calls of other sizes
        specs += [generic_spec(spec) for spec in specs]
    entries += fused_entries([*fused, *specs], target, entries, roots)
    return entries + companion_entries(target, entries)


def check_forward(workload, device: str, seed: int) -> float:
    """The op's output on ``workload``'s inputs (``Workload.make_inputs``) against the float64
    reference (AssertionError past the dtype's tolerance); the largest absolute error."""
    from deft_tvm.frontend.functional import deform_conv2d
    from deft_tvm.reference.forward import deform_conv2d_reference
    from deft_tvm.runtime.kernel_cache import tf32_mode
    from deft_tvm.runtime.targets import target_for_device

    spec = workload.for_target(target_for_device(device)).spec  # tf32 only where the kernel is
    inputs = workload.make_inputs(seed=seed, device=device)
    with tf32_mode("on" if spec.tf32 else "off"), torch.no_grad():
        out = deform_conv2d(**inputs)
        ref = deform_conv2d_reference(**inputs)
    assert_close(out, ref, tolerance_key(spec.dtype, spec.tf32))
    return (out.double() - ref).abs().max().item()


def check_gradients(workload, device: str, seed: int) -> float:
    """The op's gradients of every input vs the float64 reference backward, each a sum over many
    samples (batch x positions for the weight's), so compared relative to its largest element
    (``assert_close_to_largest``; AssertionError past the tolerance of the kernel's dtype, TF32 where
    the target's kernel is); the largest absolute error."""
    from deft_tvm.frontend.functional import deform_conv2d
    from deft_tvm.reference.backward import deform_conv2d_reference_backward
    from deft_tvm.runtime.kernel_cache import tf32_mode
    from deft_tvm.runtime.targets import target_for_device

    spec = workload.for_target(target_for_device(device)).spec  # tf32 only where the kernel is
    inputs = workload.make_inputs(seed=seed, device=device)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with tf32_mode("on" if spec.tf32 else "off"):
        out = deform_conv2d(**{**inputs, **leaves})
        gen = torch.Generator().manual_seed(seed)
        grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(device=device, dtype=out.dtype))
    expected = deform_conv2d_reference_backward(grad_output.to(device), **inputs)._asdict()
    for name, grad in zip(leaves, grads):
        assert_close_to_largest(grad, expected[name], tolerance_key(spec.dtype, spec.tf32))
    return max((g.double() - expected[k]).abs().max().item() for k, g in zip(leaves, grads))
