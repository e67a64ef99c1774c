"""The fused CUDA backward on a GPU (``pytest -m gpu``): extreme and NaN offsets give the float64
reference's gradients (NaN exactly where it has NaN) and read nothing out of range; the staged
patches and the tensor cores are pure speed choices (staged and unstaged kernels agree, tensor-core
and SIMT kernels agree up to the operands' rounding)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os

import pytest
import torch
import tvm

import deft_tvm
from deft_tvm.bench import deterministic_mode, tf32_mode
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest
from deft_tvm.runtime import backward, records
from deft_tvm.runtime.targets import compile_kernel, target_for_device
from deft_tvm.schedules.cuda_backward_fused import SHARED_BYTES, DataTiling, WeightTiling, fused_backward_module
from deft_tvm.schedules.cuda_mma import mma_shape
from deft_tvm.tuning.fused_backward import STEP_FACTORS, chunk_variants, data_call
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

from helpers import float32_sampled_offsets, grad_leaves, make_case
from test_bound_tables import assert_tables
from test_forward import SHAPES

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

# Offset groups, groups, a 5x3 kernel at stride 2, with and without mask and bias, and more output
# channels than one weight stage takes.
CASES = {
    "asymmetric": SHAPES["asymmetric"],
    "og4_nobias": DeformConvSpec(3, 64, 20, 37, 32, 3, 3, padding=(1, 1), offset_groups=4, has_bias=False),
    "k5x3_og5_nomask": DeformConvSpec(1, 40, 33, 70, 24, 5, 3, stride=(2, 2), padding=(2, 1), offset_groups=5,
                                      has_mask=False),
    "two_weight_stages": DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1)),  # 64 out: two stages of 32
}
EXTREMES = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1e6, -1e6, 70.0, -70.0, -1.0, 3.5], dtype=torch.float64)


def _extreme(offset: torch.Tensor, seed: int) -> torch.Tensor:
    """40 % of the offsets replaced by extreme values, 0.2 % by NaN."""
    gen = torch.Generator().manual_seed(seed)
    pick = EXTREMES[torch.randint(0, len(EXTREMES), offset.shape, generator=gen)].to(offset.dtype)
    offset = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset)
    return torch.where(torch.rand(offset.shape, generator=gen) < 0.002, math.nan, offset)


def _gpu_case(case: str, dtype: str, seed: int, extreme: bool = False):
    """``(spec, args, grad_output)`` of ``CASES[case]`` in ``dtype`` ("tf32": float32 with TF32 on):
    the case's tensors (seeded; ``_extreme`` offsets with ``extreme``) and a random grad_output of
    its dtype, on the GPU."""
    spec = dataclasses.replace(CASES[case], dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    args = make_case(spec, seed=seed)
    if extreme:
        args["offset"] = _extreme(args["offset"], seed=seed + 1)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return spec, args, torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)


def _check_extreme_offsets(case: str, dtype: str) -> None:
    """The op's gradients on ``_extreme`` offsets are the float64 reference's (NaN exactly where it has
    NaN); ``dtype`` "tf32" is float32 with TF32 on."""
    spec = dataclasses.replace(CASES[case], dtype="float32" if dtype == "tf32" else dtype)
    args = make_case(spec, seed=21)
    args["offset"] = _extreme(args["offset"], seed=22)
    _check_reference_gradients(spec, args, dtype)


def _check_reference_gradients(spec, args: dict, dtype: str, reference_device: str = "cpu") -> None:
    """The op's gradients of the call ``args`` (CPU tensors) on the GPU are the float64 reference's
    (computed on ``reference_device`` at the points float32 arithmetic samples,
    ``float32_sampled_offsets``; NaN exactly where it has NaN)."""
    grad_output = torch.randn(spec.output_shape, dtype=torch.float64).to(args["input"].dtype)
    in_float64 = {k: v.to(reference_device, torch.float64) if isinstance(v, torch.Tensor) else v
                  for k, v in args.items()}
    in_float64["offset"] = float32_sampled_offsets(spec, in_float64["offset"])
    expected = deform_conv2d_reference_backward(grad_output.to(reference_device, torch.float64),
                                                **in_float64)._asdict()
    expected = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in expected.items()}
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    leaves = {k: v.cuda() for k, v in grad_leaves(args).items()}
    with tf32_mode("on" if dtype == "tf32" else "off"):
        out = deft_tvm.deform_conv2d(**{**on_gpu, **leaves})
        grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_output.cuda())))
    torch.cuda.synchronize()  # an out-of-range access fails here
    for name, grad in grads.items():
        value = expected[name]
        assert torch.equal(torch.isnan(grad.cpu()), torch.isnan(value)), name
        assert_close_to_largest(grad.cpu(), value, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_extreme_offsets_give_the_reference_gradients(case, dtype):
    _check_extreme_offsets(case, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32", "float32"])
@pytest.mark.parametrize("name", BENCHMARK_WORKLOADS)
def test_committed_records_on_extreme_offsets_give_the_reference_gradients(name, dtype):
    """Each benchmark layer's fused backward as the op runs it, on its committed record (``deft-tvm
    tune --fused-backward``; every layer has one in float16, bfloat16 and TF32, float32 where it was
    tuned, else the default tilings), on ``_extreme`` offsets: the float64 reference's gradients (on
    the GPU), NaN exactly where it has NaN."""
    workload = get_workload(name, "float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    recorded = records.recorded_fused_tilings(workload.spec, target_for_device("cuda")) is not None
    assert recorded or dtype == "float32"
    args = workload.make_inputs(seed=51)
    args["offset"] = _extreme(args["offset"], seed=52)
    _check_reference_gradients(workload.spec, args, dtype, reference_device="cuda")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_grad_bias_of_more_output_channels_than_the_weight_blocks_threads(dtype):
    """48 output channels on 16 input channels: the default tensor-core grad_weight block is one warp
    (32 threads) for 48 output channels, whose grad_bias sums each thread takes two of."""
    spec = DeformConvSpec(2, 16, 9, 11, 48, 3, 3, stride=(2, 1), padding=(1, 0),
                          dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    tiling = WeightTiling.for_spec(spec)
    assert tiling.tensor_cores and tiling.o_tile > tiling.threads, tiling
    _check_reference_gradients(spec, make_case(spec, seed=31), dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("case", ["asymmetric", "og4_nobias", "k5x3_og5_nomask"])
def test_deterministic_mode_on_extreme_offsets_gives_the_reference_gradients(case, dtype, monkeypatch):
    """The fixed-point deterministic kernels (int64 grad_input at the call's quantum) on extreme and NaN
    offsets."""
    from deft_tvm.runtime import backward

    monkeypatch.setattr(backward, "_kernels", {})
    with deterministic_mode(True):
        _check_extreme_offsets(case, dtype)
    assert [key[2] for key in backward._kernels] == ["fused_deterministic"]


@pytest.mark.parametrize("dtype, tensor_cores", [("float32", False), ("float16", False), ("float16", True)])
@pytest.mark.parametrize("case", list(CASES))
def test_staged_and_unstaged_data_kernels_agree(case, dtype, tensor_cores):
    """Staged patches flushed in groups of 4, 2 and 1 pixels (float4 / float2 / scalar atomics, rows
    of 37, 70 and 13 px: groups across row ends) and with a 16 px halo (dynamic shared memory past
    48 KB where the chunk has 4 or more channels) add up to the unstaged kernel's gradients: float
    patches within float32's tolerance, fixed-point ones (float16's default) within the dtype's."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=23)
    results = []
    default = DataTiling.for_spec(spec, tensor_cores=tensor_cores)
    assert default.fixed_point == (dtype == "float16")
    tilings = [dataclasses.replace(default, **variant) for variant in (
        dict(staged=False), dict(flush_width=4), dict(flush_width=2), dict(flush_width=1), dict(halo=16),
        dict(fixed_point=False), dict(fixed_point=False, flush_width=1))]
    for tiling in tilings:
        results.append(_run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output))
    for tiling, staged in zip(tilings[1:], results[1:]):
        for flushed, unstaged in zip(staged, results[0]):
            assert_close_to_largest(flushed, unstaged, dtype if tiling.fixed_point else "float32")


@pytest.mark.parametrize("dtype", ["float32", "float16", "tf32"])
@pytest.mark.parametrize("case", list(CASES))
def test_tap_groups_give_the_per_tap_sums(case, dtype):
    """The SIMT grad_columns of a kernel row's taps and of every tap in one pass over grad_output
    (``tap_group``; every tap's sums in dynamic shared memory where they pass 48 KB), and the
    tensor-core ones of a kernel row's taps per ``mma.sync`` pass (float16, TF32), give the per-tap
    SIMT kernel's gradients."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=26)
    default = DataTiling.for_spec(spec)
    taps = spec.kernel_h * spec.kernel_w
    tilings = [default] + [dataclasses.replace(default, tap_group=g) for g in dict.fromkeys((spec.kernel_w, taps))]
    if dtype != "float32" and spec.kernel_w > 1:
        tilings.append(dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=spec.kernel_w))
    results = []
    for tiling in tilings:
        results.append(_run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output))
    for grouped in results[1:]:
        for got, expected in zip(grouped, results[0]):
            assert_close_to_largest(got, expected, dtype)


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "tf32"])
@pytest.mark.parametrize("case", list(CASES))
def test_interior_path_gives_the_general_loops_gradients(case, dtype, extreme):
    """The branch-free loop of samples whose corners are all in the patch (``interior_path``) gives
    the general loop's gradients, SIMT and tensor-core tap groups, on normal and on ``_extreme``
    offsets (NaN exactly where the general loop has NaN; float patches within float32's tolerance,
    fixed-point ones within the dtype's)."""
    _assert_data_variant_agrees(case, dtype, {"interior_path": True}, seed=27, extreme=extreme)


@pytest.mark.parametrize("dtype", ["float32", "float16", "tf32"])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_staging_loads_give_the_same_gradients(case, dtype):
    """Staging the patch and the weights with 5 loads per thread in flight (``load_batch``; 5 divides
    no staging, so the last round has a tail) gives one load at a time's gradients, SIMT and
    tensor-core tap groups, on extreme offsets (NaN where the other has NaN)."""
    _assert_data_variant_agrees(case, dtype, {"load_batch": 5}, seed=29, extreme=True)


def _assert_data_variant_agrees(case, dtype, change: dict, seed: int, extreme: bool):
    """The default data tiling and (tensor-core dtypes, kernel rows of several taps) the tensor-core
    tap groups, each as it is and with ``change``, on the case's inputs (seeded; ``_extreme`` offsets
    with ``extreme``): NaN in the same places, the rest within the dtype's tolerance (float32's for
    float patches)."""
    spec, args, grad_output = _gpu_case(case, dtype, seed, extreme)
    bases = [DataTiling.for_spec(spec)]
    if dtype != "float32" and spec.kernel_w > 1:
        bases.append(dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=spec.kernel_w))
    for base in bases:
        original, changed = (_run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output)
                             for tiling in (base, dataclasses.replace(base, **change)))
        torch.cuda.synchronize()  # an out-of-range access fails here
        _assert_same_nans_and_close(changed, original, dtype if base.fixed_point else "float32")


def _assert_same_nans_and_close(got: list, expected: list, key: str) -> None:
    """Each of ``got`` has NaN where ``expected``'s has, and the rest within the tolerance row ``key``
    relative to the largest |expected| (``assert_close_to_largest``)."""
    for actual, wanted in zip(got, expected):
        assert torch.equal(torch.isnan(actual), torch.isnan(wanted))
        assert_close_to_largest(actual.cpu().nan_to_num(), wanted.cpu().nan_to_num(), key)


def _data_kernel(spec, tiling):
    """The compiled prepare and grad_data kernels of ``tiling`` for the GPU (one module)."""
    module, _, _ = fused_backward_module(spec, tiling)
    return compile_kernel(tvm.IRModule({name: module[name] for name in ("prepare", "grad_data")}),
                          target_for_device("cuda"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_weight_stages_and_prefetched_fragments_give_the_same_gradients(case, dtype):
    """The tensor-core tap groups with double-buffered weight stages (``pipelined``; with one and
    with 5 staging loads in flight; with grad_output's fragments prefetched, ``prefetch``, by row
    and of every tap) give the single buffer's gradients on extreme offsets (NaN where it has
    NaN); stages of one mma depth, several where a group has more output channels (odd and even
    numbers of them)."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=31, extreme=True)
    base = dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=spec.kernel_w,
                               o_step=mma_shape(spec).k)
    pipelined = dataclasses.replace(base, pipelined=True)
    prefetch = dataclasses.replace(pipelined, prefetch=True)
    tilings = (base, pipelined, dataclasses.replace(pipelined, load_batch=5), prefetch,
               dataclasses.replace(prefetch, load_batch=5, tap_group=spec.kernel_h * spec.kernel_w))
    results = [_run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output) for tiling in tilings]
    torch.cuda.synchronize()  # an out-of-range access fails here
    for variant in results[1:]:
        _assert_same_nans_and_close(variant, results[0], dtype)


def _run_data(kernels, spec, tiling, args, grad_output):
    """``kernels`` (``_data_kernel``'s, of ``tiling``) on the case as the op runs them (``data_call``):
    grad_input, grad_offset and grad_mask? (summed over the channel splits, float32)."""
    n, c, h, w = spec.input_shape
    inputs = {**args, "input": args["input"].view(n, c, h * w), "grad_output": grad_output}
    return data_call(spec, kernels, tiling, inputs)()


def _run_fused(spec, data, weight, args, grad_output):
    """The fused kernels with the given tilings: grad_input, grad_offset, grad_mask?, grad_weight and
    grad_bias? (summed over the splits, float32)."""
    module, data, weight = fused_backward_module(spec, data, weight)
    kernels = compile_kernel(module, target_for_device("cuda"))
    return [*_run_data(kernels, spec, data, args, grad_output),
            *_weight_sums(kernels["grad_weight"], spec, weight, args, grad_output)]


def _weight_sums(kernel, spec, weight, args, grad_output):
    """grad_weight and grad_bias? of the compiled grad_weight ``kernel`` of ``weight`` (summed over
    the splits, in the accumulate dtype: float64's, else float32)."""
    n, c, h, w = spec.input_shape
    mask = [args["mask"]] * spec.has_mask
    taps = spec.kernel_h * spec.kernel_w
    acc = torch.float64 if spec.dtype == "float64" else torch.float32
    weight_part = torch.empty((weight.splits, spec.out_channels, c // spec.groups, taps), device="cuda", dtype=acc)
    bias_part = [torch.empty((weight.splits, spec.out_channels), device="cuda", dtype=acc)] * spec.has_bias
    kernel(args["input"].view(n, c, h * w), args["offset"], *mask, grad_output.view(n, spec.out_channels, -1),
           weight_part, *bias_part)
    return [weight_part.sum(0), *[b.sum(0) for b in bias_part]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("case", list(CASES))
def test_tensor_core_and_simt_kernels_agree(case, dtype):
    """The mma.sync grad_columns and grad_weight (channels padded to whole mma tiles) give the SIMT
    kernels' sums up to the operands' rounding (float16 / bfloat16 samples, TF32 truncation)."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=24)
    data, weight = DataTiling.for_spec(spec, tensor_cores=True), WeightTiling.for_spec(spec)
    assert weight.tensor_cores
    simt = dataclasses.replace(spec, tf32=False)
    results = [_run_fused(spec, data, weight, args, grad_output),
               _run_fused(spec, DataTiling.for_spec(simt), WeightTiling.for_spec(simt, tensor_cores=False), args,
                          grad_output)]
    for tensor_cores, simt_sums in zip(*results):
        assert_close_to_largest(tensor_cores, simt_sums, "tf32" if dtype == "tf32" else dtype)


def test_fused_kernels_load_from_the_disk_cache_without_compiling(isolated_cache, monkeypatch):
    from deft_tvm.runtime import backward

    monkeypatch.setattr(backward, "_kernels", {})  # kernels of earlier tests are not on this cache's disk
    spec = dataclasses.replace(CASES["og4_nobias"], dtype="float16")
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=25).items()}
    leaves = {k: v.cuda() for k, v in grad_leaves(make_case(spec, seed=25)).items()}

    def gradients():
        out = deft_tvm.deform_conv2d(**{**args, **leaves})
        return torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))

    first = gradients()
    assert list(isolated_cache.rglob(f"{spec.key()}-fused_backward-*.so"))
    backward._kernels.clear()
    monkeypatch.setattr(backward, "compile_kernel", lambda *a: pytest.fail("cached fused kernels were recompiled"))
    for a, b in zip(first, gradients()):
        assert_close(b.double(), a.double(), "float32")


@pytest.mark.parametrize("dtype", ["float16", "tf32"])
def test_misaligned_grad_output_gives_the_aligned_gradients(dtype):
    """A grad_output whose data starts off a 16-byte boundary (a view at an odd element; the weight
    kernel reads grad_output in 16-byte runs where positions allow, here 128 per image) gives the
    gradients of the same values aligned, bit for bit (deterministic mode: fixed-point grad_input)."""
    spec = DeformConvSpec(2, 16, 8, 16, 32, 3, 3, padding=(1, 1), dtype="float32" if dtype == "tf32" else dtype)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=27).items()}
    leaves = {k: v.cuda() for k, v in grad_leaves(make_case(spec, seed=27)).items()}
    aligned = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    storage = torch.empty(aligned.numel() + 1, dtype=aligned.dtype, device="cuda")
    misaligned = storage[1:].view(spec.output_shape)
    misaligned.copy_(aligned)
    assert misaligned.data_ptr() % 16 and misaligned.is_contiguous()
    results = []
    with tf32_mode("on" if dtype == "tf32" else "off"), deterministic_mode(True):
        for grad_output in (aligned, misaligned):
            out = deft_tvm.deform_conv2d(**{**args, **leaves})
            results.append(torch.autograd.grad(out, list(leaves.values()), grad_output))
    torch.cuda.synchronize()
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", ["float16", "tf32"])
def test_wider_weight_tiles_give_the_same_sums(dtype):
    """grad_weight tiles of 128 and 256 output channels (4 and 8 warps on output channels; 160
    channels: the last tile padded) give the 64-channel tiles' sums exactly (same mma, same order)."""
    spec = DeformConvSpec(2, 16, 9, 11, 160, 3, 3, padding=(1, 1), dtype="float32" if dtype == "tf32" else dtype,
                          tf32=dtype == "tf32")
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=25).items()}
    grad_output = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    data = DataTiling.for_spec(spec)
    narrow = WeightTiling.for_spec(spec, o_channels=64)
    results = [_run_fused(spec, data, dataclasses.replace(WeightTiling.for_spec(spec, o_channels=o_channels),
                                                          splits=narrow.splits), args, grad_output)
               for o_channels in (64, 128, 256)]
    for wider in results[1:]:
        for got, expected in zip(wider[-2:], results[0][-2:]):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_deeper_weight_steps_in_dynamic_shared_memory_give_the_same_sums(dtype):
    """grad_weight steps of 2x and 4x the positions (``step_variants``; the deepest past 48 KB of
    shared memory, in a dynamic buffer) give one split's sums exactly: the same mma k-chunks in the
    same order, the steps' padding adding zeros; on extreme offsets (NaN where they are NaN)."""
    spec = DeformConvSpec(2, 16, 9, 11, 160, 3, 3, padding=(1, 1), dtype="float32" if dtype == "tf32" else dtype,
                          tf32=dtype == "tf32")
    args = make_case(spec, seed=26)
    args["offset"] = _extreme(args["offset"], seed=27)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    grad_output = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    data = DataTiling.for_spec(spec)
    base = dataclasses.replace(WeightTiling.for_spec(spec), splits=1)
    deeper = [dataclasses.replace(base, positions=base.positions * f) for f in STEP_FACTORS]
    assert deeper[-1].shared_bytes(spec) > SHARED_BYTES
    expected = _run_fused(spec, data, base, args, grad_output)[-2:]
    for tiling in deeper:
        for got, sums in zip(_run_fused(spec, data, tiling, args, grad_output)[-2:], expected):
            assert torch.equal(got.nan_to_num(), sums.nan_to_num()) and torch.equal(got.isnan(), sums.isnan())
    assert any(s.isnan().any() for s in expected) and all(s.isfinite().any() for s in expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_wider_chunks_in_dynamic_shared_memory_give_the_same_gradients(dtype):
    """The chunk variants (``chunk_variants``: twice the channels per chunk, in the same and half the
    channel splits, the halo and up to 2 px less; the widest patches past 48 KB of shared memory, in
    a dynamic buffer) of the default SIMT tiling and of the tensor-core tap groups, each in blocks
    of two 8-channel chunks, give their gradients, on profile-like and on extreme offsets (NaN where
    they have NaN), with two offset groups of 32 channels."""
    spec = DeformConvSpec(2, 64, 20, 37, 48, 3, 3, padding=(1, 1), offset_groups=2,
                          dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    bases = [dataclasses.replace(DataTiling.for_spec(spec), channel_splits=2),
             dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=3, channel_splits=2)]
    pairs = [(base, variant) for base in bases for variant in chunk_variants(spec, base)]
    assert {2 * v.channel_splits // b.channel_splits for b, v in pairs} == {1, 2}  # the same and half the splits
    assert any(v.shared_bytes(spec) > SHARED_BYTES for _, v in pairs) and all(v.chunk == 16 for _, v in pairs)
    tilings = list(dict.fromkeys(t for pair in pairs for t in pair))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        kernels = dict(zip(tilings, pool.map(lambda t: _data_kernel(spec, t), tilings)))
    args = make_case(spec, seed=47)
    for extreme in (False, True):
        offset = _extreme(args["offset"], seed=48) if extreme else args["offset"]
        case = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in {**args, "offset": offset}.items()}
        grad_output = torch.randn(spec.output_shape, device="cuda").to(case["input"].dtype)
        results = {t: _run_data(kernels[t], spec, t, case, grad_output) for t in tilings}
        torch.cuda.synchronize()  # an out-of-range access fails here
        for base, variant in pairs:
            _assert_same_nans_and_close(results[variant], results[base], dtype)
        assert any(r.isnan().any() for r in results[bases[0]]) == extreme


@pytest.mark.parametrize("extreme", [False, True], ids=["normal", "extreme"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_data_kernel_on_3xtf32_tensor_cores_gives_the_simt_gradients(case, extreme):
    """float32 grad_columns on tensor cores as 3xTF32 (``backward_mma``; one tap and a kernel row's
    taps per pass) give the SIMT default's gradients within float32's tolerance (NaN where they have
    NaN, on ``_extreme`` offsets), and on normal offsets 16x closer to them than one TF32 product
    per tile does."""
    spec, args, grad_output = _gpu_case(case, "float32", seed=53, extreme=extreme)
    simt = DataTiling.for_spec(spec)
    cores = DataTiling.for_spec(spec, tensor_cores=True)
    expected = _run_data(_data_kernel(spec, simt), spec, simt, args, grad_output)
    tf32 = dataclasses.replace(spec, tf32=True)
    for tiling in [cores] + [dataclasses.replace(cores, tap_group=spec.kernel_w)] * (spec.kernel_w > 1):
        got = _run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output)
        torch.cuda.synchronize()  # an out-of-range access fails here
        _assert_same_nans_and_close(got, expected, "float32")
        if not extreme:
            one = _run_data(_data_kernel(tf32, tiling), tf32, tiling, args, grad_output)
            error, tf32_error = (max((x - e).abs().max().item() for x, e in zip(result, expected))
                                 for result in (got, one))
            assert error < tf32_error / 16


def test_float32_weight_kernel_on_3xtf32_tensor_cores_gives_the_simt_sums():
    """float32 grad_weight and grad_bias on tensor cores as 3xTF32 (``backward_mma``; blocks of 256 x
    64 channels, the positions split over 22 of them) give the SIMT kernel's sums within float32's
    tolerance, on extreme offsets (NaN where they have NaN), and closer to them than one TF32
    product per tile does."""
    spec = DeformConvSpec(2, 64, 25, 42, 256, 3, 3, padding=(1, 1), dtype="float32")
    data = DataTiling.for_spec(spec)
    cores = WeightTiling.for_spec(spec, tensor_cores=True)
    for extreme in (False, True):  # (NaN offsets make every grad_weight entry NaN: one offset group)
        args = make_case(spec, seed=49)
        if extreme:
            args["offset"] = _extreme(args["offset"], seed=50)
        args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        grad_output = torch.randn(spec.output_shape, device="cuda")
        simt, three, one = (_run_fused(s, data, t, args, grad_output)[-2:] for s, t in (
            (spec, WeightTiling.for_spec(spec, tensor_cores=False)), (spec, cores),
            (dataclasses.replace(spec, tf32=True), cores)))
        _assert_same_nans_and_close(three, simt, "float32")
        if not extreme:  # grad_weight's products (grad_bias sums grad_output alone, on SIMT cores in each)
            error, tf32_error = ((x[0] - simt[0]).abs().max() for x in (three, one))
            assert error < tf32_error / 16


@pytest.mark.parametrize("dtype", ["float16", "tf32"])
def test_programmatic_grad_data_leaves_the_reduction_every_sum(dtype):
    """grad_data launched programmatically beside grad_weight's last wave (``cuda_launch``) and the
    reduction after both: 30 deterministic-mode backward calls of a layer whose grad_weight takes
    several waves give the same bits, and the gradients of the kernels launched one at a time
    (``_run_fused``, grad_input float atomics) up to the tolerance."""
    spec = DeformConvSpec(2, 64, 25, 42, 256, 3, 3, padding=(1, 1), dtype="float32" if dtype == "tf32" else dtype,
                          tf32=dtype == "tf32")
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=43).items()}
    grad_output = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    assert spec.has_mask and spec.has_bias
    target = target_for_device("cuda")
    tensors = (grad_output, args["input"], args["offset"], args["mask"], args["weight"])
    bound = backward.contribution_bound(spec, grad_output, args["mask"], args["weight"])
    # The kernels of these sizes (a call of them runs its configuration's, whose splits are not chosen for them).
    part = "fused_deterministic"
    kernels = backward.fused_kernels(spec, target, *backward._fused_tilings(spec, target, part), part)
    runs = [backward.run_fused_backward(spec, kernels, *tensors, bound) for _ in range(30)]
    torch.cuda.synchronize()
    for run in runs[1:]:
        for got, expected in zip(run, runs[0]):
            assert (got is None and expected is None) or torch.equal(got, expected)
    alone = _run_fused(spec, DataTiling.for_spec(spec), WeightTiling.for_spec(spec), args, grad_output)
    grad_input, grad_offset, grad_weight, grad_bias, grad_mask = runs[0]
    key = "tf32" if dtype == "tf32" else dtype
    for got, expected in zip((grad_input, grad_offset, grad_mask, grad_weight, grad_bias), alone):
        assert_close_to_largest(got.float().flatten(), expected.flatten(), key)


@pytest.mark.parametrize("dtype", ["float32", "float16", "tf32"])
@pytest.mark.parametrize("case", ["og4_nobias", "two_weight_stages"])  # the cases with a thread per position
def test_weight_corners_in_flight_give_the_same_sums(case, dtype):
    """grad_weight with 3 channels' corners in flight per interpolating thread (``WeightTiling.load_batch``;
    3 divides no channel count here: a tail) gives one channel at a time's sums exactly (the same
    samples, the same order), on extreme offsets, with 4 offset groups per channel tile and with one;
    float32 on SIMT cores."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=33, extreme=True)
    data = DataTiling.for_spec(spec)
    weight = WeightTiling.for_spec(spec, tensor_cores=False if dtype == "float32" else None)
    single, batched = (_run_fused(spec, data, dataclasses.replace(weight, load_batch=b), args, grad_output)
                       for b in (1, 3))
    for got, expected in zip(batched[-1 - spec.has_bias:], single[-1 - spec.has_bias:]):
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan())


@pytest.mark.parametrize(("case", "dtype"), [
    ("asymmetric", "float16"), ("og4_nobias", "tf32"),  # runs of 16 bytes (groups; no bias)
    ("og4_nobias", "bfloat16"), ("two_weight_stages", "float32"),  # 8 bytes (3xTF32)
    ("two_weight_stages", "float16"), ("k5x3_og5_nomask", "tf32"), ("k5x3_og5_nomask", "float32"),  # 4 (no mask)
    ("asymmetric", "float64")])  # SIMT, runs of one element
def test_asynchronous_grad_output_copies_give_the_same_sums(case, dtype):
    """grad_weight with grad_output staged by ``cp.async`` (``WeightTiling.async_copy``: runs of 4, 8
    and 16 bytes, zero-filled past the output) gives the loads' and stores' sums exactly (the same
    staged values, the same order) on extreme offsets, in one split of many steps (the staging
    buffer reused) and in the default's splits: float16 / bfloat16 / TF32 tensor cores, float32 on
    3xTF32, float64 on SIMT cores."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=35, extreme=True)
    default = WeightTiling.for_spec(spec)
    tilings = [dataclasses.replace(w, async_copy=a) for w in (default.with_splits(spec, 1), default)
               for a in (True, False)]
    assert all(t.copies_async(spec) for t in tilings) and tilings[0].steps(spec) > 1

    def build(tiling):
        module, _, _ = fused_backward_module(spec, weight=tiling)
        return compile_kernel(tvm.IRModule({"grad_weight": module["grad_weight"]}), target_for_device("cuda"))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # nvcc runs outside the GIL
        kernels = list(pool.map(build, tilings))
    sums = [_weight_sums(k["grad_weight"], spec, t, args, grad_output) for k, t in zip(kernels, tilings)]
    torch.cuda.synchronize()  # an out-of-range access fails here
    for copied, stored in (sums[:2], sums[2:]):
        for got, expected in zip(copied, stored):
            assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and torch.equal(got.isnan(), expected.isnan())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fixed_point_blocks_with_non_finite_bounds_add_floats(dtype):
    """A block whose grad_output holds NaN or infinity (no finite bound for its fixed-point sums)
    adds floats: grad_input is NaN / infinite exactly where the unstaged kernel's is, and equal
    elsewhere up to the dtype's tolerance."""
    spec = dataclasses.replace(CASES["og4_nobias"], dtype=dtype)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in make_case(spec, seed=26).items()}
    grad_output = torch.randn(spec.output_shape, device="cuda")
    grad_output[0, 3, 2, 5], grad_output[1, 7, 12, 30] = math.nan, math.inf
    grad_output = grad_output.to(args["input"].dtype)
    default = DataTiling.for_spec(spec)
    assert default.fixed_point
    results = []
    for tiling in (dataclasses.replace(default, staged=False), default):
        results.append(_run_data(_data_kernel(spec, tiling), spec, tiling, args, grad_output)[0])
    unstaged, fixed = results
    assert torch.equal(torch.isnan(fixed), torch.isnan(unstaged)) and torch.isnan(fixed).any()
    assert torch.equal(torch.isinf(fixed), torch.isinf(unstaged))
    finite = torch.isfinite(unstaged)
    assert_close_to_largest(fixed[finite], unstaged[finite], dtype)


@pytest.mark.parametrize("dtype, out_channels, groups, slices", [("float16", 100, 2, 4), ("tf32", 512, 1, 16)])
def test_prepare_kernel_tables_reduce_over_thread_slices(dtype, out_channels, groups, slices):
    """The bound tables of ``prepare_primfunc`` on the GPU, where 4 and 16 threads (``_slices``) share
    an entry: the peak |grad_output| per position (NaN and infinity kept), the sum of |weight| over
    each group's output channels per (channel, tap); grad_input's sums zeroed."""
    from deft_tvm.schedules.cuda_backward_fused import _slices, prepare_primfunc

    spec = DeformConvSpec(2, 20, 9, 11, out_channels, 3, 3, padding=(1, 1), groups=groups,
                          dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    data = DataTiling.for_spec(spec)
    assert data.fixed_point and _slices(out_channels, True) == slices
    kernel = compile_kernel(tvm.IRModule({"prepare": prepare_primfunc(spec, data)}), target_for_device("cuda"))
    torch_dtype = getattr(torch, spec.dtype)
    weight = torch.randn(spec.weight_shape, device="cuda").to(torch_dtype)
    grad_output = torch.randn(spec.output_shape, device="cuda").to(torch_dtype)
    grad_output[1, 37, 4, 6], grad_output[0, 99, 8, 10] = math.nan, -math.inf
    accumulator = torch.full((math.prod(spec.input_shape),), 7.0, device="cuda")
    bounds = torch.full((data.bound_elements(spec),), 7.0, device="cuda")
    kernel["prepare"](accumulator, weight, grad_output, bounds)
    assert not accumulator.any()
    assert_tables(bounds, spec, weight, grad_output, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("case", ["og4_nobias", "k5x3_og5_nomask"])
def test_deterministic_data_kernel_repeats_its_bits(case, dtype):
    """Deterministic grad_input (int64 fixed point at the quantum of a bound on |column x mask|):
    two runs give the same bits, and the sums times the quantum are the float kernel's up to the
    dtype's tolerance."""
    spec, args, grad_output = _gpu_case(case, dtype, seed=27)
    default = DataTiling.for_spec(spec)
    deterministic = dataclasses.replace(default, deterministic=True)
    n, c, h, w = spec.input_shape
    bound = args["weight"].float().abs().sum(0).amax() * grad_output.float().abs().amax()
    if spec.has_mask:
        bound = bound * args["mask"].float().abs().amax()
    bound = bound.reshape(1)
    kernel = _data_kernel(spec, deterministic)["grad_data"]
    mask = [args["mask"]] * spec.has_mask
    runs = []
    for _ in range(2):
        grad_input = torch.zeros((n, c, h * w), dtype=torch.int64, device="cuda")
        grad_offset = torch.empty((deterministic.channel_splits, *spec.offset_shape), device="cuda")
        grad_mask = [torch.empty((deterministic.channel_splits, *spec.mask_shape), device="cuda")] * spec.has_mask
        kernel(args["input"].view(n, c, h * w), args["offset"], *mask, args["weight"], grad_output, grad_input,
               grad_offset, *grad_mask, bound)
        runs.append([grad_input, grad_offset, *grad_mask])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    unstaged = dataclasses.replace(default, staged=False)
    expected = _run_data(_data_kernel(spec, unstaged), spec, unstaged, args, grad_output)[0]
    got = runs[0][0].double() * deterministic.fixed_point_quantum(spec, bound.item())
    assert_close_to_largest(got, expected, dtype)


def test_tiling_search_times_every_candidate_on_the_gpu():
    from deft_tvm.tuning.fused_backward import data_space, tune_fused_backward, weight_space

    workload = get_workload("test_paper_small", "float16")
    record = tune_fused_backward(workload.spec, workload.profile, target_for_device("cuda"),
                                 torch.cuda.get_device_name())
    # the spaces first, in order, then the refinement rounds' variants (each measured once)
    for kind, space in (("data", data_space(workload.spec, workload.profile)), ("weight", weight_space(workload.spec))):
        tilings = [tiling for tiling, _ in record[f"{kind}_ms"]]
        assert tilings[:len(space)] == [dataclasses.asdict(t) for t in space]
        assert len({json.dumps(t, sort_keys=True) for t in tilings}) == len(tilings)
        assert record[kind] in tilings
    # every candidate gives the default's gradients, so none is rejected
    assert all(ms is not None and 0 < ms < 1e3 for _, ms in record["data_ms"] + record["weight_ms"])
