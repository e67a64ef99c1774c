"""CUDA kernels against torchvision on a real GPU (``pytest -m gpu``); skipped where there is none."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import deft_tvm
from deft_tvm.bench import tf32_mode
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.schedules import kernel_spec
from deft_tvm.schedules.cuda_tensorcore import supports_tensor_cores
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

from helpers import TENSOR_CORE_SHAPES, grad_leaves, make_case, small_dcn_model
from test_forward import SHAPES

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)
torchvision_ops = pytest.importorskip("torchvision.ops", reason="torchvision is needed to compare against")

GPU_DTYPES = ["float32", "float16", "bfloat16"]
# float32 layers the TF32 tensor-core kernels take (TF32 on): the tensor-core test shapes.
TF32_SPECS = {"tensor_core_small": get_workload("test_tensor_core_small", "float32", tf32=True).spec,
              **{name: dataclasses.replace(s, dtype="float32", tf32=True) for name, s in TENSOR_CORE_SHAPES.items()}}


@pytest.fixture(scope="module", autouse=True)
def _prebuild_kernels():
    """Compile this module's kernels in parallel up front instead of one by one inside the tests."""
    specs = [dataclasses.replace(s, has_mask=m, dtype=d) for s in SHAPES.values() for m in (True, False)
             for d in GPU_DTYPES]
    specs += [get_workload(name, d).spec for name in BENCHMARK_WORKLOADS for d in GPU_DTYPES]
    specs += [dataclasses.replace(SHAPES["asymmetric"], has_bias=False, dtype=d) for d in GPU_DTYPES]
    specs += list(TENSOR_CORE_SHAPES.values())
    specs += [dataclasses.replace(s, dtype="float32", tf32=True) for s in TF32_SPECS.values()]
    specs += [get_workload(name, "float32", tf32=True).spec for name in BENCHMARK_WORKLOADS]
    target = target_for_device(torch.device("cuda"))
    kernel_cache.prebuild([kernel_spec(s, target) for s in specs], torch.device("cuda"))


def _to(args: dict, device="cuda", dtype=None) -> dict:
    return {k: (v.to(device=device, dtype=dtype or v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _torchvision_float64(args: dict) -> torch.Tensor:
    """torchvision's own CUDA kernel run in float64 on the same (already rounded) inputs."""
    return torchvision_ops.deform_conv2d(**_to(args, dtype=torch.float64))


def _check_against_torchvision(args: dict, dtype: str) -> torch.Tensor:
    with torch.no_grad():
        out = deft_tvm.deform_conv2d(**args)
        assert out.device == args["input"].device and out.dtype == args["input"].dtype
        assert_close(out, _torchvision_float64(args), dtype)
    return out


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("has_mask", [True, False], ids=["v2_mask", "v1_no_mask"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matrix_matches_torchvision(shape, has_mask, dtype):
    spec = dataclasses.replace(SHAPES[shape], has_mask=has_mask, dtype=dtype)
    _check_against_torchvision(_to(make_case(spec)), dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_no_bias_and_batch_zero(dtype):
    spec = dataclasses.replace(SHAPES["asymmetric"], has_bias=False, dtype=dtype)
    _check_against_torchvision(_to(make_case(spec)), dtype)
    empty = _to(make_case(dataclasses.replace(spec, batch=0)))
    assert deft_tvm.deform_conv2d(**empty).shape == (0, 4, spec.out_h, spec.out_w)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", BENCHMARK_WORKLOADS)
def test_benchmark_workloads_match_torchvision(name, dtype):
    workload = get_workload(name, dtype)
    _check_against_torchvision(workload.make_inputs(device="cuda"), dtype)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_fp32_matches_torchvision_fp32_directly(dtype):
    spec = dataclasses.replace(SHAPES["asymmetric"], dtype=dtype)
    args = _to(make_case(spec))
    ours = deft_tvm.deform_conv2d(**args)
    theirs = torchvision_ops.deform_conv2d(**_to(args, dtype=torch.float32))  # torchvision has no bf16
    assert_close(ours, theirs.double(), dtype)


def test_extreme_offsets_match_torchvision():
    spec = DeformConvSpec(2, 6, 9, 11, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                          offset_groups=3)
    args = _to(make_case(spec, seed=4))
    gen = torch.Generator().manual_seed(5)
    extremes = torch.tensor([1e6, -1e6, 1e30, -1e30, math.inf, -math.inf, 2.0, -1.0, 0.5])
    offset = args["offset"].cpu()
    pick = extremes[torch.randint(0, len(extremes), offset.shape, generator=gen)]
    args["offset"] = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset).cuda()
    out = _check_against_torchvision(args, "float32")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "variant", ["v2_mask", "v1_no_mask_no_bias", "extreme_offsets", "channels_last_input", "width_12", "batch_1"]
)
def test_tensor_core_schedule_matches_torchvision(variant, dtype):
    spec = get_workload("test_tensor_core_small", dtype).spec
    if variant == "v1_no_mask_no_bias":
        spec = dataclasses.replace(spec, has_mask=False, has_bias=False)
    if variant == "width_12":  # fragments of 16 positions span rows
        spec = dataclasses.replace(spec, width=12)
    if variant == "batch_1":
        spec = dataclasses.replace(spec, batch=1)
    assert supports_tensor_cores(spec)
    args = _to(make_case(spec, seed=6))
    if variant == "channels_last_input":  # taken without a copy
        args["input"] = args["input"].contiguous(memory_format=torch.channels_last)
    if variant == "extreme_offsets":
        gen = torch.Generator().manual_seed(7)
        extremes = torch.tensor([1e4, -1e4, math.inf, -math.inf, 20.0, -1.0, 0.5])
        offset = args["offset"].cpu()
        pick = extremes[torch.randint(0, len(extremes), offset.shape, generator=gen)].to(offset.dtype)
        args["offset"] = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset).cuda()
    out = _check_against_torchvision(args, dtype)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", list(TENSOR_CORE_SHAPES))
def test_tensor_core_schedule_matches_torchvision_on_asymmetric_layers(shape, dtype):
    spec = dataclasses.replace(TENSOR_CORE_SHAPES[shape], dtype=dtype)
    assert supports_tensor_cores(spec)
    out = _check_against_torchvision(_to(make_case(spec, seed=8)), dtype)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["plain", "extreme_offsets", "channels_last_input"])
@pytest.mark.parametrize("shape", list(TF32_SPECS))
def test_tf32_tensor_cores_match_torchvision(shape, variant):
    spec = TF32_SPECS[shape]
    assert kernel_spec(spec, target_for_device(torch.device("cuda"))).tf32  # the TF32 kernel runs
    args = _to(make_case(dataclasses.replace(spec, tf32=False), seed=9))
    if variant == "channels_last_input":
        args["input"] = args["input"].contiguous(memory_format=torch.channels_last)
    if variant == "extreme_offsets":
        gen = torch.Generator().manual_seed(10)
        extremes = torch.tensor([1e30, -1e30, math.inf, -math.inf, 20.0, -1.0, 0.5])
        offset = args["offset"].cpu()
        pick = extremes[torch.randint(0, len(extremes), offset.shape, generator=gen)]
        args["offset"] = torch.where(torch.rand(offset.shape, generator=gen) < 0.4, pick, offset).cuda()
    with tf32_mode("on"):
        out = _check_against_torchvision(args, "tf32")
    with tf32_mode("off"):
        exact = _check_against_torchvision(args, "float32")
    assert torch.isfinite(out).all()
    # TF32 really multiplied: operands lost mantissa bits, so the float32 kernel's result differs.
    assert (out - exact).abs().max() > 1e-6


@pytest.mark.parametrize("name", BENCHMARK_WORKLOADS)
def test_benchmark_workloads_match_torchvision_with_tf32(name):
    with tf32_mode("on"):
        _check_against_torchvision(get_workload(name, "float32").make_inputs(device="cuda"), "tf32")


def test_nan_offsets_give_nan_without_faulting():
    # torchvision faults on a NaN dx, so the expectation is the reference's (NaN only where used).
    spec = DeformConvSpec(1, 2, 6, 7, 3, 3, 3, padding=(1, 1))
    args = _to(make_case(spec))
    # A NaN coordinate gives NaN only while the other one is inside the image, so pin that one to 0.
    args["offset"][0, 0:2, 2, 3] = torch.tensor([0.0, math.nan])  # tap (0, 0) at output (2, 3): dx NaN
    args["offset"][0, 4:6, 4, 4] = torch.tensor([math.nan, 0.0])  # tap (0, 2) at output (4, 4): dy NaN
    out = deft_tvm.deform_conv2d(**args)
    torch.cuda.synchronize()
    reference = deft_tvm.deform_conv2d_reference(**_to(args, "cpu"))
    assert torch.isnan(reference[0]).any(dim=0).nonzero().tolist() == [[2, 3], [4, 4]]
    assert_close(out.cpu(), reference, "float32")  # NaN exactly where the reference has NaN


def test_runs_on_the_current_stream_after_queued_work():
    spec = DeformConvSpec(4, 16, 32, 32, 16, 3, 3, padding=(1, 1))
    args = _to(make_case(spec))
    expected = deft_tvm.deform_conv2d(**args)
    real_input = args["input"].clone()
    args["input"] = torch.zeros_like(real_input)
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # the input is written only after a long delay on this stream
        args["input"].copy_(real_input)
        out = deft_tvm.deform_conv2d(**args)
    stream.synchronize()
    assert torch.equal(out, expected)


def test_cuda_graph_capture_and_replay():
    spec = DeformConvSpec(2, 8, 16, 16, 8, 3, 3, padding=(1, 1))
    static = _to(make_case(spec, seed=1))
    fresh = _to(make_case(spec, seed=2))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        deft_tvm.deform_conv2d(**static)  # warm-up: compile/load outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = deft_tvm.deform_conv2d(**static)
    for name in ("input", "offset", "weight", "bias", "mask"):
        static[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, deft_tvm.deform_conv2d(**fresh))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device():
    spec = DeformConvSpec(2, 8, 16, 16, 8, 3, 3, padding=(1, 1))
    args = _to(make_case(spec), device="cuda:1")
    out = _check_against_torchvision(args, "float32")
    assert out.device == torch.device("cuda:1")


def test_torch_compile_fullgraph_on_gpu():
    model = small_dcn_model().cuda()
    x = torch.randn(2, 3, 10, 12, device="cuda")
    torch._dynamo.reset()
    # TF32 off: the offsets come from a plain convolution, and inductor may choose another
    # algorithm for it than eager, so only full-precision convolutions agree to the fp32 tolerance.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        compiled, eager = torch.compile(model, fullgraph=True)(x), model(x)
    assert_close(compiled, eager.double(), "float32")


def test_exported_cuda_library_round_trip(tmp_path):
    import subprocess
    import sys
    import textwrap

    from deft_tvm.compute.forward import deform_conv2d_primfunc
    from deft_tvm.runtime import library
    from deft_tvm.schedules import default_schedule

    target = target_for_device(torch.device("cuda"))
    specs = [dataclasses.replace(SHAPES["asymmetric"], dtype=d) for d in GPU_DTYPES]
    specs.append(kernel_spec(get_workload("test_tensor_core_small", "float16").spec, target))  # channels-last
    specs.append(kernel_spec(get_workload("test_tensor_core_small", "float32", tf32=True).spec, target))  # TF32
    entries = [library.KernelEntry(s, default_schedule(deform_conv2d_primfunc(s), s, target).mod["main"],
               "default schedule") for s in specs]
    manifest = library.export_library(entries, target, tmp_path / "lib")
    # A fresh interpreter, every way into the compiler forbidden: load, dispatch, compare.
    script = textwrap.dedent(f"""
        import dataclasses, warnings
        import torch, tvm
        import deft_tvm
        from deft_tvm.runtime import kernel_cache
        from deft_tvm.compute.spec import DeformConvSpec
        from torchvision.ops import deform_conv2d as tv

        def forbidden(*args, **kwargs):
            raise AssertionError("the TVM compiler was invoked")

        tvm.compile = forbidden
        kernel_cache.build = forbidden
        warnings.simplefilter("error", kernel_cache.UntunedKernelWarning)
        deft_tvm.load_library({str(manifest)!r})
        for fields in {[dataclasses.asdict(s) for s in specs]!r}:
            spec = DeformConvSpec(**fields)
            dtype = getattr(torch, spec.dtype)
            gen = torch.Generator().manual_seed(0)
            args = dict(
                input=torch.randn(spec.input_shape, generator=gen), offset=2 * torch.randn(spec.offset_shape, generator=gen),
                weight=0.2 * torch.randn(spec.weight_shape, generator=gen), bias=torch.randn(spec.out_channels, generator=gen),
                mask=torch.rand(spec.mask_shape, generator=gen))
            args = {{k: v.to("cuda", dtype) for k, v in args.items()}}
            torch.backends.cuda.matmul.allow_tf32 = spec.tf32  # the op then asks for the TF32 kernel
            out = deft_tvm.deform_conv2d(**args, stride=spec.stride, padding=spec.padding, dilation=spec.dilation)
            ref = tv(**{{k: v.double() for k, v in args.items()}}, stride=spec.stride, padding=spec.padding,
                     dilation=spec.dilation)
            from deft_tvm.reference.tolerances import assert_close, tolerance_key
            assert_close(out, ref, tolerance_key(spec.dtype, spec.tf32))
        print("ran without the compiler")
    """)
    # From another folder: the checkout's deft_tvm/ (without its schedules) must not shadow the install.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran without the compiler" in result.stdout


def _gradients(fn, args: dict, grad_output: torch.Tensor) -> dict:
    leaves = grad_leaves(args)
    out = fn(**{**args, **leaves})
    return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_output)))


@pytest.mark.parametrize("case", ["asymmetric", "point_at_minus_one"])
def test_reference_backward_matches_torchvision_gradients(case):
    # The float64 reference backward is the ground truth of the gradient tests: pin it to
    # torchvision's own gradients (float64, on the GPU), including its one-sided offset gradient
    # at y = -1 and x = -1.
    from deft_tvm.reference.backward import deform_conv2d_reference_backward

    spec = dataclasses.replace(SHAPES["asymmetric"], dtype="float64")
    args = _to(make_case(spec, seed=11))
    if case == "point_at_minus_one":  # offsets that put sampling points exactly on y = -1 or x = -1
        rows = torch.arange(spec.out_h, dtype=torch.float64, device="cuda")[:, None] * spec.stride[0] - spec.padding[0]
        cols = torch.arange(spec.out_w, dtype=torch.float64, device="cuda")[None, :] * spec.stride[1] - spec.padding[1]
        offset = args["offset"].reshape(spec.batch, spec.offset_groups, spec.kernel_h, spec.kernel_w, 2,
                                        spec.out_h, spec.out_w).clone()
        offset[:, :, 0, :, 0] = -1.0 - rows  # taps of kernel row 0: y = -1 exactly
        offset[:, :, 1, 0, 1] = -1.0 - cols  # tap (1, 0): x = -1 exactly
        args["offset"] = offset.reshape(spec.offset_shape)
    grad_output = torch.randn(spec.output_shape, dtype=torch.float64, device="cuda")
    expected = _gradients(torchvision_ops.deform_conv2d, args, grad_output)
    grads = deform_conv2d_reference_backward(grad_output, **args)._asdict()
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_backward_matches_torchvision_gradients(shape, deterministic, dtype):
    # Against torchvision's float64 gradients of the same (rounded) inputs.
    spec = dataclasses.replace(SHAPES[shape], dtype=dtype)
    args = _to(make_case(spec, seed=12))
    grad_output = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    expected = _gradients(torchvision_ops.deform_conv2d, _to(args, dtype=torch.float64), grad_output.double())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        grads = _gradients(deft_tvm.deform_conv2d, args, grad_output)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, value in expected.items():
        assert grads[name].dtype == args[name].dtype, name
        assert_close_to_largest(grads[name], value, dtype)  # sums over many samples


def test_cuda_backward_bfloat16_matches_the_reference():
    from deft_tvm.reference.backward import deform_conv2d_reference_backward

    spec = dataclasses.replace(SHAPES["asymmetric"], dtype="bfloat16")
    args = _to(make_case(spec, seed=13))
    grad_output = torch.randn(spec.output_shape, device="cuda").to(torch.bfloat16)
    grads = _gradients(deft_tvm.deform_conv2d, args, grad_output)
    expected = deform_conv2d_reference_backward(grad_output.double(), **_to(args, dtype=torch.float64))._asdict()
    for name, value in grads.items():
        assert_close_to_largest(value, expected[name], "bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "tf32"])
def test_deterministic_cuda_backward_is_bit_identical_across_runs(dtype, monkeypatch):
    """float32: the staged backward with the sorted gather; float16, bfloat16 and TF32: the fused
    kernels with int64 fixed-point grad_input. Two runs give the same bits, and the reference's
    gradients up to the dtype's tolerance."""
    from deft_tvm.reference.backward import deform_conv2d_reference_backward
    from deft_tvm.runtime import backward

    monkeypatch.setattr(backward, "_kernels", {})  # this test's kernels only
    spec = get_workload("paper_64c_64x64_n8", "float32" if dtype == "tf32" else dtype).spec
    args = _to(make_case(spec, seed=14))
    grad_output = torch.randn(spec.output_shape, device="cuda").to(args["input"].dtype)
    torch.use_deterministic_algorithms(True)
    try:
        with tf32_mode("on" if dtype == "tf32" else "off"):
            first = _gradients(deft_tvm.deform_conv2d, args, grad_output)
            second = _gradients(deft_tvm.deform_conv2d, args, grad_output)
    finally:
        torch.use_deterministic_algorithms(False)
    parts = {key[2] for key in backward._kernels}
    assert parts == ({"gradients", "gather"} if dtype == "float32" else {"fused_deterministic"})
    for name in first:
        assert torch.equal(first[name], second[name]), name
    expected = deform_conv2d_reference_backward(grad_output.double(), **_to(args, dtype=torch.float64))._asdict()
    for name, value in first.items():
        assert_close_to_largest(value, expected[name], dtype)
