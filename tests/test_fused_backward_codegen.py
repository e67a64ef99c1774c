"""The fused CUDA backward (``schedules/cuda_backward_fused.py``): its default tilings fit every
registry layer, and its kernels generate and compile with nvcc for sm_90, on machines without a
GPU too."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import pytest
import tvm

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation
from deft_tvm.schedules.cuda_backward_fused import (
    SHARED_BYTES,
    SIMT_THREADS,
    TARGET_BLOCKS,
    DataTiling,
    WeightTiling,
    backward_mma,
    default_tilings,
    fingerprint,
    fused_backward_module,
    grad_data_primfunc,
    grad_weight_primfunc,
)
from deft_tvm.schedules.cuda_mma import mma_shape
from deft_tvm.tuning.workloads import WORKLOADS

from helpers import DTYPES
from test_forward import SHAPES
from test_large_index import HUGE_BACKWARD

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
REGISTRY_SPECS = [dataclasses.replace(w.spec, dtype=d) for w in WORKLOADS.values() for d in DTYPES] + [
    dataclasses.replace(w.spec, dtype="float32", tf32=True) for w in WORKLOADS.values()]


def _source(spec: DeformConvSpec, data: DataTiling | None = None) -> str:
    module, _, _ = fused_backward_module(spec, data)
    return compile_kernel(module, cuda_target("sm_90")).mod.imports[0].inspect_source()


def _compile(source: str) -> bytes:
    from tvm.support import nvcc

    with exact_cuda_compilation(), cuda_target("sm_90"):
        return nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")


C_TYPE_BYTES = {"half": 2, "nv_bfloat16": 2, "float": 4, "int": 4, "double": 8}


def _kernel_body(source: str, function: str) -> str:
    """The body of the definition of the device function ``function`` (``grad_data_kernel``,
    ``backward_kernel_2``) in a CUDA source."""
    start = re.search(rf" {function}\([^;{{]*{{", source).end()
    return source[start:source.index("\n}\n", start)]


def _shared_bytes(source: str, kernel: str) -> int:
    return sum(int(count) * C_TYPE_BYTES[ctype] for ctype, count in
               re.findall(r"__shared__ alignas\(\d+\) (\w+) \w+\[(\d+)\]", _kernel_body(source, f"{kernel}_kernel")))


def _parameters(source: str, kernel: str) -> list[str]:
    match = re.search(rf"__global__ void (?:__launch_bounds__\([\d, ]+\) )?{kernel}_kernel\(([^)]*)\)", source)
    return sorted(re.findall(r"(\w+)_ptr", match.group(1)))


@pytest.mark.parametrize("spec", REGISTRY_SPECS, ids=lambda s: s.key())
def test_default_tilings_divide_the_layer_and_fit_shared_memory(spec):
    data, weight = DataTiling.for_spec(spec), WeightTiling.for_spec(spec)
    cpg, ipg, opg = (spec.in_channels // spec.offset_groups, spec.in_channels // spec.groups,
                     spec.out_channels // spec.groups)
    assert cpg % (data.chunk * data.channel_splits) == 0 and ipg % data.chunk == 0
    # grad_weight on tensor cores wherever it has an mma (float16, bfloat16, TF32, float32 as
    # 3xTF32); the data kernel's grad_columns on SIMT cores unless asked (measured faster).
    cores = backward_mma(spec)
    assert weight.tensor_cores == (spec.dtype != "float64") == (cores is not None) and not data.tensor_cores
    assert opg % data.o_step == 0
    if cores is not None:
        mma = cores[0]
        assert weight.positions % mma.k == 0 and weight.o_tile % 16 == 0 and weight.c_tile % 8 == 0
        mma_data = DataTiling.for_spec(spec, tensor_cores=True)  # stages padded by less than one mma step
        assert mma_data.tensor_cores and mma_data.o_step % mma.k == 0 and mma_data.shared_bytes(spec) <= SHARED_BYTES
        assert 0 <= mma_data.stages(spec) * mma_data.o_step - opg < mma_data.stages(spec) * mma.k
    else:
        assert opg % weight.o_tile == 0 and ipg % weight.c_tile == 0
    assert data.shared_bytes(spec) <= SHARED_BYTES and weight.shared_bytes(spec) <= SHARED_BYTES
    assert data.tile_h * data.tile_w == 128
    # Every flat position is in exactly one split's steps.
    assert (weight.splits - 1) * weight.steps(spec) * weight.positions < spec.batch * spec.out_h * spec.out_w
    assert weight.splits * weight.steps(spec) * weight.positions >= spec.batch * spec.out_h * spec.out_w


@needs_nvcc
@pytest.mark.parametrize("spec", [s for s in REGISTRY_SPECS if s.dtype != "float64"], ids=lambda s: s.key())
def test_registry_kernels_compile_within_the_shared_memory_they_claim(spec):
    """ptxas rejects static shared memory past 48 KB; the tilings' byte counts must cover what the
    kernels allocate, and tensor-core kernels must use mma.sync."""
    data, weight = DataTiling.for_spec(spec), WeightTiling.for_spec(spec)
    source = _source(spec)
    for kernel, tiling in (("grad_data", data), ("grad_weight", weight)):
        body = _kernel_body(source, f"{kernel}_kernel")
        assert _shared_bytes(source, kernel) <= tiling.shared_bytes(spec) <= SHARED_BYTES, kernel
        assert ("mma.sync.aligned" in body) == tiling.tensor_cores, kernel
        # Fixed-point grad_input patches for the half types and TF32 (tolerances above its quantum).
        fixed = spec.dtype in ("float16", "bfloat16") or spec.tf32
        assert ("deft_shared_add_fixed(" in body) == (fixed and kernel == "grad_data"), kernel
        assert ("atomicAdd(reinterpret_cast<int*>" in source) == fixed
        # Tensor-core grad_weight stages grad_output in aligned runs: up to 16 bytes that divide the
        # positions of an image and of a step (r50 c5's 25 x 42: runs of 2).
        element = C_TYPE_BYTES["float" if spec.dtype == "float32" else "half"]
        run = math.gcd(16 // element, spec.out_h * spec.out_w, weight.positions) if weight.tensor_cores else 1
        copies = set(re.findall(r"deft_copy_(\d+)\(", body)) if kernel == "grad_weight" else set()
        assert copies == ({str(run * element)} if kernel == "grad_weight" and run > 1 else set()), kernel
    assert _compile(source)[:4] == b"\x7fELF"


def test_tilings_that_do_not_divide_the_layer_are_rejected():
    spec = SHAPES["asymmetric"]  # 6 channels, 3 per offset group, 3 per group
    with pytest.raises(ValueError, match=r"does not divide the layer's channels \(per offset group 2"):
        grad_data_primfunc(spec, dataclasses.replace(DataTiling.for_spec(spec), chunk=4))
    with pytest.raises(ValueError, match=r"does not divide the layer's channels per group \(2 out, 3 in\)"):
        grad_weight_primfunc(spec, dataclasses.replace(WeightTiling.for_spec(spec, tensor_cores=False), c_regs=2))
    double = dataclasses.replace(spec, dtype="float64")
    with pytest.raises(ValueError, match=r"cannot take tensor cores for float64: they need float16, bfloat16, TF32 "
                                         r"or float32"):
        grad_data_primfunc(double, dataclasses.replace(DataTiling.for_spec(double), tensor_cores=True))
    with pytest.raises(ValueError, match=r"float64 has no tensor-core mma \(float16, bfloat16, TF32, float32 as "
                                         r"3xTF32\)"):
        DataTiling.for_spec(double, tensor_cores=True)
    half = dataclasses.replace(spec, dtype="float16")
    with pytest.raises(ValueError, match=r"a multiple of the mma depth \(16\)"):
        grad_weight_primfunc(half, dataclasses.replace(WeightTiling.for_spec(half), positions=40))


@needs_nvcc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["mask_bias", "neither"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_kernels_compile_and_take_only_the_gradients_buffers(shape, variant, dtype):
    spec = dataclasses.replace(SHAPES[shape], dtype=dtype, has_mask=variant == "mask_bias",
                               has_bias=variant == "mask_bias")
    source = _source(spec)
    # No columns buffer and no per-sample tables: the kernels take the op's tensors, the gradients
    # and the partial sums only (and the fixed-point patches' bound tables, one entry per position
    # and per (channel, tap)).
    mask = ["mask"] * spec.has_mask
    grad_mask = ["grad_mask"] * spec.has_mask
    bounds = ["bounds"] * (DataTiling.for_spec(spec).bound_elements(spec) > 0)
    assert _parameters(source, "grad_data") == sorted(
        ["input", "offset", *mask, "weight", "grad_output", "grad_input", "grad_offset", *grad_mask, *bounds])
    assert _parameters(source, "grad_weight") == sorted(
        ["input", "offset", *mask, "grad_output", "weight_part", *["bias_part"] * spec.has_bias])
    assert re.search(r"__shared__ [^;]* in_patch", source) and re.search(r"__shared__ [^;]* grad_patch", source)
    assert "atomicAdd" in source
    assert _compile(source)[:4] == b"\x7fELF"


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_tensor_core_data_kernel_compiles_with_mma(shape, dtype):
    spec = dataclasses.replace(SHAPES[shape], dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    source = _source(spec, DataTiling.for_spec(spec, tensor_cores=True))
    assert "mma.sync.aligned.m16n8k" in _kernel_body(source, "grad_data_kernel")
    assert _compile(source)[:4] == b"\x7fELF"


@needs_nvcc
def test_patches_flush_with_vector_atomics_on_sm_90_only():
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    source = _source(spec)
    assert "deft_atomic_add_float4(" in source and re.search(r"__launch_bounds__\(128, \d\) grad_data_kernel", source)
    assert _compile(source)[:4] == b"\x7fELF"
    module, data, _ = fused_backward_module(spec, arch="sm_80")
    assert data.flush_width == 1
    assert "deft_atomic_add_float" not in compile_kernel(module, cuda_target("sm_80")).mod.imports[0].inspect_source()
    with pytest.raises(ValueError, match=r"flushes groups of 1, 2 or 4 pixels, got 3"):
        grad_data_primfunc(spec, dataclasses.replace(DataTiling.for_spec(spec), flush_width=3))


@needs_nvcc
def test_data_kernel_past_48_kb_takes_dynamic_shared_memory():
    """ptxas rejects static shared memory past 48 KB: larger tilings allocate one dynamic buffer."""
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    tiling = DataTiling.for_spec(spec, halo=20, shared_limit=100 * 1024)  # 4 channels of 51 x 59 px
    assert tiling.shared_bytes(spec) > SHARED_BYTES
    source = _source(spec, tiling)
    body = _kernel_body(source, "grad_data_kernel")
    assert "extern __shared__" in body and "__shared__ alignas" not in body
    assert _compile(source)[:4] == b"\x7fELF"


@needs_nvcc
def test_weight_kernel_past_48_kb_takes_dynamic_shared_memory():
    """r50 c5's TF32 weight tiling (256 x 64 channels) 64 positions deep: its staged operands (85 KB)
    in one dynamic buffer, its sampling-point tables static, two blocks per SM in its launch bounds."""
    spec = dataclasses.replace(WORKLOADS["r50dcn_c5"].spec, dtype="float32", tf32=True)
    weight = WeightTiling(8, 2, 2, 4, positions=64, splits=3, tensor_cores=True, load_batch=2)
    assert weight.dynamic(spec) and weight.operand_bytes(spec) > SHARED_BYTES
    source, launch = _weight_kernel(spec, weight)
    assert "extern __shared__" in _kernel_body(source, "grad_weight_kernel")
    assert _shared_bytes(source, "grad_weight") == weight.table_bytes(spec)
    assert str(weight.operand_bytes(spec)) in launch
    assert "__launch_bounds__(512, 2) grad_weight_kernel" in source
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match=r"takes 9216 bytes of static and 342016 in all of shared memory, more "
                                         r"than a block may \(49152 and 232448\)"):
        grad_weight_primfunc(spec, dataclasses.replace(weight, positions=256))


def _weight_kernel(spec: DeformConvSpec, weight: WeightTiling) -> tuple[str, str]:
    """The CUDA source of ``weight``'s grad_weight kernel and the LLVM IR of its host launch."""
    kernel = compile_kernel(tvm.IRModule({"grad_weight": grad_weight_primfunc(spec, weight)}), cuda_target("sm_90"))
    return kernel.mod.imports[0].inspect_source(), kernel.mod.inspect_source("ll")


def test_dynamic_operands_below_48_kb_are_padded_to_48_kb():
    """Static tables and dynamic operands that pass 48 KB together, the operands alone not: the
    dynamic buffer is padded to 48 KB (below it the launch fails, ``WeightTiling.shared_bytes``)."""
    spec = DeformConvSpec(2, 16, 9, 11, 160, 3, 3, padding=(1, 1), dtype="float16")
    weight = WeightTiling(5, 2, 1, 2, positions=128, splits=1, tensor_cores=True)
    assert weight.dynamic(spec) and weight.operand_bytes(spec) < SHARED_BYTES
    assert weight.shared_bytes(spec) == weight.table_bytes(spec) + SHARED_BYTES
    _, launch = _weight_kernel(spec, weight)
    assert str(SHARED_BYTES) in launch and str(weight.operand_bytes(spec)) not in launch
    small = dataclasses.replace(weight, positions=64)
    assert not small.dynamic(spec) and small.shared_bytes(spec) == small.table_bytes(spec) + small.operand_bytes(spec)


@needs_nvcc
def test_unstaged_data_kernel_reads_and_adds_through_global_memory():
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    source = _source(spec, dataclasses.replace(DataTiling.for_spec(spec), staged=False))
    assert "in_patch" not in source and "grad_patch" not in source
    assert _compile(source)[:4] == b"\x7fELF"


@needs_nvcc
def test_fused_kernels_index_in_64_bits_past_int32():
    source = _source(HUGE_BACKWARD)
    assert "long long" in source or "int64_t" in source
    assert _compile(source)[:4] == b"\x7fELF"


def test_fingerprint_follows_the_spec_the_tilings_and_the_architecture():
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    data, weight = default_tilings(spec)
    base = fingerprint(spec, data, weight, "sm_90")
    assert base == fingerprint(spec, *default_tilings(spec), "sm_90") and len(base) == 16
    assert default_tilings(spec, "sm_80")[0].flush_width == 1 and data.flush_width == 4
    others = {fingerprint(dataclasses.replace(spec, dtype="bfloat16"), data, weight, "sm_90"),
              fingerprint(spec, dataclasses.replace(data, halo=2), weight, "sm_90"),
              fingerprint(spec, data, dataclasses.replace(weight, splits=weight.splits + 1), "sm_90"),
              fingerprint(spec, data, weight, "sm_80")}
    assert len(others) == 4 and base not in others


@needs_nvcc
@pytest.mark.parametrize("o_channels, warps", [(128, 8), (256, 16)])
def test_wider_weight_tiles_put_more_warps_on_output_channels(o_channels, warps):
    spec = dataclasses.replace(WORKLOADS["r50dcn_c5"].spec, dtype="float16")  # 512 output channels
    tiling = WeightTiling.for_spec(spec, o_channels=o_channels)
    assert (tiling.o_tile, tiling.c_tile, tiling.threads) == (o_channels, 64, 32 * warps)
    assert tiling.shared_bytes(spec) <= SHARED_BYTES
    module, _, _ = fused_backward_module(spec, weight=tiling)
    source = compile_kernel(module, cuda_target("sm_90")).mod.imports[0].inspect_source()
    assert re.search(rf"__launch_bounds__\({32 * warps}, \d\) grad_weight_kernel", source)
    assert _compile(source)[:4] == b"\x7fELF"


@pytest.mark.parametrize("name", ["train_stem_1to64_64x64_n32", "paper_64c_64x64_n32", "train_down_64to128_n32"])
def test_simt_weight_splits_fill_the_grid_with_threads(name):
    """SIMT grad_weight's default splits the positions until the grid holds about ``TARGET_BLOCKS``
    blocks of ``SIMT_THREADS`` threads, whatever threads its blocks have: the stem's one input
    channel leaves 16 threads per block, and 59 splits (the count by blocks) left 64 threads per SM."""
    spec = WORKLOADS[name].spec
    tiling = WeightTiling.for_spec(spec, tensor_cores=False)
    grid_threads = tiling.tiles(spec) * tiling.splits * tiling.threads
    assert TARGET_BLOCKS * SIMT_THREADS / 2 <= grid_threads <= TARGET_BLOCKS * SIMT_THREADS * 2
    assert tiling.threads == (16 if spec.in_channels == 1 else 128 if spec.out_channels > 64 else SIMT_THREADS)


@needs_nvcc
def test_float32_weight_kernel_on_tensor_cores_multiplies_as_3xtf32():
    """float32 without TF32 takes tensor cores in grad_weight by default (SIMT when a tiling asks):
    each m16 x n8 tile then takes three TF32 ``mma.sync`` (the operands' TF32 parts
    and rests: rest x part, part x rest, part x part) where TF32 takes one, the operands rounded to
    TF32 by their bits (+ 0x1000, & 0xFFFFE000); compiled by nvcc. float64 has no mma."""
    spec = dataclasses.replace(WORKLOADS["r50dcn_c5"].spec, dtype="float32")
    assert not WeightTiling.for_spec(spec, tensor_cores=False).tensor_cores
    tiling = WeightTiling.for_spec(spec)
    assert tiling.tensor_cores and tiling == WeightTiling.for_spec(dataclasses.replace(spec, tf32=True))
    source, _ = _weight_kernel(spec, tiling)
    tf32_source, _ = _weight_kernel(dataclasses.replace(spec, tf32=True), tiling)
    body, tf32_body = (_kernel_body(src, "grad_weight_kernel") for src in (source, tf32_source))
    assert body.count("mma.sync.aligned.m16n8k8") == 3 * tf32_body.count("mma.sync.aligned.m16n8k8") > 0
    assert "4294959104" in body and "4294959104" not in tf32_body  # 0xFFFFE000: TF32's bits
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="grad_weight has no tensor-core mma for float64"):
        WeightTiling.for_spec(dataclasses.replace(spec, dtype="float64"), tensor_cores=True)


@needs_nvcc
def test_float32_data_kernel_on_tensor_cores_multiplies_as_3xtf32():
    """float32 without TF32 computes grad_columns on tensor cores only when a tiling asks (the
    default stays SIMT): one tap or a kernel row's taps per pass, each m16 x n8 tile then takes
    three TF32 ``mma.sync`` where TF32 takes one, the operands rounded to TF32 by their bits
    (& 0xFFFFE000); the tap groups compiled by nvcc. float64 has no mma."""
    spec = dataclasses.replace(WORKLOADS["r50dcn_c5"].spec, dtype="float32")
    assert not DataTiling.for_spec(spec).tensor_cores
    cores = DataTiling.for_spec(spec, tensor_cores=True)
    assert not cores.fixed_point and cores == dataclasses.replace(
        DataTiling.for_spec(dataclasses.replace(spec, tf32=True), tensor_cores=True), fixed_point=False)
    for tiling in (cores, dataclasses.replace(cores, tap_group=spec.kernel_w)):
        source, tf32_source = (_source(s, tiling) for s in (spec, dataclasses.replace(spec, tf32=True)))
        body, tf32_body = (_kernel_body(src, "grad_data_kernel") for src in (source, tf32_source))
        assert body.count("mma.sync.aligned.m16n8k8") == 3 * tf32_body.count("mma.sync.aligned.m16n8k8") > 0
        assert "4294959104" in body and "4294959104" not in tf32_body  # 0xFFFFE000: TF32's bits
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="float64 has no tensor-core mma"):
        DataTiling.for_spec(dataclasses.replace(spec, dtype="float64"), tensor_cores=True)


def test_fixed_point_patches_need_float32_sums():
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float64")
    with pytest.raises(ValueError, match=r"fixed-point patches need float32 sums and at most 2\*\*22 samples per "
                                         r"block and channel, not float64 and 1152"):
        grad_data_primfunc(spec, DataTiling.for_spec(spec, fixed_point=True))
    assert not DataTiling.for_spec(dataclasses.replace(spec, dtype="float32")).fixed_point


@needs_nvcc
def test_deterministic_data_kernel_adds_fixed_point_grad_input():
    """Deterministic grad_input: int64 sums at the caller's quantum, added with native integer
    atomics (no float atomics into grad_input)."""
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    tiling = dataclasses.replace(DataTiling.for_spec(spec), deterministic=True)
    func = grad_data_primfunc(spec, tiling)
    assert [p.name for p in func.params][-2:] == ["grad_mask", "contribution_bound"]
    assert "int64_t* __restrict__ grad_input_ptr" in _source(spec, tiling)
    source = _source(spec, tiling)
    body = _kernel_body(source, "grad_data_kernel")
    assert "deft_global_add_fixed(" in body and "deft_atomic_add_float" not in body
    assert not re.search(r"tvm_builtin_cuda_atomic_add\(\(&\(grad_input", body)
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match=r"deterministic grad_input needs staged fixed-point patches"):
        grad_data_primfunc(spec, dataclasses.replace(tiling, fixed_point=False))


def test_fixed_point_quantum_follows_the_bounds_float32_exponent():
    spec = dataclasses.replace(SHAPES["3x3_pad1"], dtype="float16")
    tiling = DataTiling.for_spec(spec)
    assert tiling.quantum_bits(spec) == 19  # 128 threads x 9 taps < 2**11
    assert tiling.fixed_point_quantum(spec, 1.0) == 2.0 ** -18  # 1 < 2**1
    assert tiling.fixed_point_quantum(spec, 0.75) == 2.0 ** -19
    assert tiling.fixed_point_quantum(spec, 3.0e6) == 2.0 ** (22 - 19)
    assert tiling.fixed_point_quantum(spec, 0.0) == tiling.fixed_point_quantum(spec, 1e-40) == 2.0 ** -127


# 15 taps in rows of 3, 5 offset groups, stride 2, no mask (as the GPU tests' k5x3_og5_nomask).
KERNEL_5X3 = DeformConvSpec(1, 40, 33, 70, 24, 5, 3, stride=(2, 2), padding=(2, 1), offset_groups=5, has_mask=False)


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("spec", [SHAPES["asymmetric"], KERNEL_5X3], ids=["asymmetric", "kernel_5x3"])
def test_tap_groups_sum_in_one_pass_and_park_the_sums_in_shared_memory(spec, dtype):
    """Groups of a kernel row's taps and of every tap: the group's sums in shared memory (one slot
    per tap, channel and thread) within the bytes the tiling claims, and compiled by nvcc."""
    spec = dataclasses.replace(spec, dtype=dtype)
    taps = spec.kernel_h * spec.kernel_w
    default = DataTiling.for_spec(spec)
    for group in (spec.kernel_w, taps):  # of the chunks that divide the default's, the largest that fits 48 KB
        tiling = next(t for t in (dataclasses.replace(default, tap_group=group, chunk=chunk)
                                  for chunk in range(default.chunk, 0, -1) if default.chunk % chunk == 0)
                      if t.shared_bytes(spec) <= SHARED_BYTES)
        source = _source(spec, tiling)
        slots = re.search(r"__shared__ alignas\(\d+\) float group_columns_ptr\[(\d+)\]", source)
        assert int(slots.group(1)) == group * tiling.chunk * tiling.tile_h * tiling.tile_w
        assert _shared_bytes(source, "grad_data") <= tiling.shared_bytes(spec)
        assert _compile(source)[:4] == b"\x7fELF"


def test_tap_groups_must_divide_the_taps():
    spec = dataclasses.replace(KERNEL_5X3, dtype="float16")
    for tensor_cores in (False, True):
        tiling = dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=tensor_cores), tap_group=2)
        with pytest.raises(ValueError, match=r"groups of taps divide the kernel's 15 taps"):
            grad_data_primfunc(spec, tiling)


@needs_nvcc
@pytest.mark.parametrize("dtype, tf32", [("float16", False), ("bfloat16", False), ("float32", True)])
@pytest.mark.parametrize("spec", [SHAPES["asymmetric"], KERNEL_5X3], ids=["asymmetric", "kernel_5x3"])
def test_tensor_core_tap_groups_multiply_a_kernel_row_per_mma_pass(spec, dtype, tf32):
    """Tensor-core grad_columns of a kernel row's taps per pass: one n8 tile per tap and chunk
    (2 m16 tiles per warp, k-steps of the stage), the sums parked per position in shared memory
    within the bytes the tiling claims, no exchange buffer; compiled by nvcc."""
    spec = dataclasses.replace(spec, dtype=dtype, tf32=tf32)
    tensor_cores = DataTiling.for_spec(spec, tensor_cores=True)
    tiling = next(t for t in (dataclasses.replace(tensor_cores, tap_group=spec.kernel_w, halo=h)
                              for h in range(tensor_cores.halo, -1, -1)) if t.shared_bytes(spec) <= SHARED_BYTES)
    source = _source(spec, tiling)
    body = _kernel_body(source, "grad_data_kernel")
    mma = mma_shape(spec)
    n8 = -(-tiling.chunk // 8)
    assert body.count("mma.sync.aligned") == 2 * spec.kernel_w * n8 * (tiling.o_step // mma.k)
    assert "exchange" not in body and re.search(r"float group_columns_ptr\[(\d+)\]", body).group(1) == str(
        spec.kernel_w * tiling.chunk * tiling.tile_h * tiling.tile_w)
    assert _shared_bytes(source, "grad_data") <= tiling.shared_bytes(spec)
    assert _compile(source)[:4] == b"\x7fELF"


@needs_nvcc
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_interior_path_adds_a_branch_free_loop_beside_the_general_one(dtype):
    """``interior_path``: the general loop's per-corner tests stay (samples with a corner outside
    the patch), one more loop adds to the patch without them, its weights multiplied once per tap;
    compiled by nvcc. It needs staged patches."""
    spec = dataclasses.replace(SHAPES["asymmetric"], dtype=dtype)
    default = DataTiling.for_spec(spec)
    general, interior = (_source(spec, dataclasses.replace(default, interior_path=flag)) for flag in (False, True))
    adds = "deft_shared_add_fixed(" if default.fixed_point else "tvm_builtin_cuda_atomic_add("
    assert interior.count(adds) > general.count(adds)
    assert "weighted_ptr" in interior and "weighted_ptr" not in general
    assert _compile(interior)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="the interior path reads the staged patches"):
        grad_data_primfunc(spec, dataclasses.replace(default, staged=False, fixed_point=False, interior_path=True))


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "mma"])
def test_batched_staging_issues_its_loads_before_their_stores(tensor_cores):
    """``load_batch`` > 1: the patch's and the weights' loads go to registers in rounds, then to
    shared memory (one load at a time stays the code it was); compiled by nvcc. At least one load."""
    spec = dataclasses.replace(SHAPES["asymmetric"], dtype="float16")
    base = DataTiling.for_spec(spec, tensor_cores=tensor_cores)
    single, batched = (_source(spec, dataclasses.replace(base, load_batch=b)) for b in (1, 6))
    for buffer in ("patch_loads", "loaded"):
        assert buffer in batched and buffer not in single
    assert _compile(batched)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="at least one load per batch, got load_batch=0"):
        grad_data_primfunc(spec, dataclasses.replace(base, load_batch=0))


@pytest.mark.parametrize("dtype", ["float16", "tf32"])
def test_pipelined_tap_groups_double_buffer_their_weight_stages(dtype):
    """``pipelined``: the tensor-core tap groups load the next weight stage into registers while one
    multiplies and keep two stage buffers (the shared memory they claim covers both); compiled by
    nvcc, on two stages of 32 output channels. Only the tensor-core tap groups pipeline."""
    spec = DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1), dtype="float32" if dtype == "tf32" else dtype,
                          tf32=dtype == "tf32")
    base = dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=spec.kernel_w, o_step=32)
    assert base.stages(spec) == 2
    pipelined = dataclasses.replace(base, pipelined=True)
    source = _source(spec, pipelined)
    assert "next_weights" in source and "next_weights" not in _source(spec, base)
    stage = base.tap_group * 8 * (base.o_step * (2 if dtype == "float16" else 4) + 16)  # bytes of one weight stage
    assert pipelined.shared_bytes(spec) - base.shared_bytes(spec) == stage
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="only the tensor-core tap groups pipeline"):
        grad_data_primfunc(spec, dataclasses.replace(DataTiling.for_spec(spec), tap_group=spec.kernel_w, pipelined=True))


@pytest.mark.parametrize("dtype", ["float16", "tf32"])
@pytest.mark.parametrize("o_step", [16, 32])
def test_prefetching_tap_groups_hold_two_fragment_buffers(dtype, o_step):
    """``prefetch``: the pipelined tap groups load the next stage's grad_output fragments into a
    second register buffer while one multiplies, stages in pairs: four of 16 output channels and an
    odd number, three of 32 (80 channels, the last padded); compiled by nvcc. Only pipelined weight
    stages prefetch."""
    spec = DeformConvSpec(2, 16, 10, 13, 64 if o_step == 16 else 80, 3, 3, padding=(1, 1),
                          dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    base = dataclasses.replace(DataTiling.for_spec(spec, tensor_cores=True), tap_group=spec.kernel_w, o_step=o_step,
                               pipelined=True)
    prefetch = dataclasses.replace(base, prefetch=True)
    fragments = o_step  # a thread's elements of one stage: two m16 tiles x o_step // k steps x k // 2
    assert f"a_frag_ptr[{fragments}]" in _source(spec, base)
    source = _source(spec, prefetch)
    assert f"a_frag_ptr[{2 * fragments}]" in source and prefetch.shared_bytes(spec) == base.shared_bytes(spec)
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="only pipelined weight stages prefetch"):
        grad_data_primfunc(spec, dataclasses.replace(base, pipelined=False, prefetch=True))


def test_weight_interpolation_loads_several_channels_corners_before_summing_them():
    """``WeightTiling.load_batch`` > 1: the thread of a position loads that many channels' corners
    into registers, then sums and stores them (one channel at a time stays the code it was);
    compiled by nvcc. At least one channel per batch."""
    spec = DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1), dtype="float16")  # a thread per position
    weight = WeightTiling.for_spec(spec)
    single, batched = (_weight_source(spec, dataclasses.replace(weight, load_batch=b)) for b in (1, 3))
    assert "corner_values" in batched and "corner_values" not in single
    assert _compile(batched)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="at least one channel's corners per batch, got load_batch=0"):
        grad_weight_primfunc(spec, dataclasses.replace(weight, load_batch=0))


@pytest.mark.parametrize("load_batch", [1, 3])
def test_weight_interpolation_reads_its_image_from_a_register(load_batch):
    """The thread interpolating a position copies the position's image (``point_batch``, shared
    memory) into a register once per step: its corner loads index ``input`` by that register, so
    the samples' shared-memory stores between them do not make it re-read shared memory per load."""
    spec = DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1), dtype="float16")  # a thread per position
    source = _weight_source(spec, dataclasses.replace(WeightTiling.for_spec(spec), load_batch=load_batch))
    corner_loads = [line for line in source.splitlines() if "input_ptr[" in line and "corner_index_ptr[" in line]
    assert len(corner_loads) == 4 * load_batch
    assert all("image_ptr[0] * " in line and "point_batch_ptr" not in line for line in corner_loads)
    assert source.count("image_ptr[0] = point_batch_ptr[") == 1


def _weight_source(spec: DeformConvSpec, weight: WeightTiling) -> str:
    module, _, _ = fused_backward_module(spec, weight=weight)
    return compile_kernel(module, cuda_target("sm_90")).mod.imports[0].inspect_source()


@pytest.mark.parametrize(("dtype", "height", "width", "copy"), [
    ("float16", 16, 16, "cp.async.cg.shared.global [%0], [%1], 16,"),  # 256 positions: runs of 8
    ("float16", 10, 13, "cp.async.ca.shared.global [%0], [%1], 4,"),  # 130: runs of 2
    ("tf32", 10, 13, "cp.async.ca.shared.global [%0], [%1], 8,"),
    ("float64", 10, 13, "cp.async.ca.shared.global [%0], [%1], 8,"),  # SIMT, one element per run
])
def test_weight_staging_by_asynchronous_copies(dtype, height, width, copy):
    """``WeightTiling.async_copy``: grad_output's runs reach shared memory by ``cp.async`` (16-byte
    runs past L1), waited for before the step's barrier, in the same shared memory; compiled by nvcc.
    Runs of 2 bytes, runs converted on the way (SIMT float16) and targets before sm_80 raise."""
    spec = DeformConvSpec(2, 16, height, width, 64, 3, 3, padding=(1, 1),
                          dtype="float32" if dtype == "tf32" else dtype, tf32=dtype == "tf32")
    weight = WeightTiling.for_spec(spec)
    copied = dataclasses.replace(weight, async_copy=True)
    source, plain = _weight_source(spec, copied), _weight_source(spec, weight)
    assert copy in source and "cp.async.wait_all" in source and "cp.async" not in plain
    assert copied.shared_bytes(spec) == weight.shared_bytes(spec)
    assert _compile(source)[:4] == b"\x7fELF"
    with pytest.raises(ValueError, match="need sm_80 or newer, got sm_75"):
        fused_backward_module(spec, weight=copied, arch="sm_75")
    odd = dataclasses.replace(spec, height=9, width=11, dtype="float16", tf32=False)  # 99 positions: runs of 2 bytes
    simt = WeightTiling.for_spec(odd, tensor_cores=False)
    for tiling in (WeightTiling.for_spec(odd), simt):
        assert not tiling.copies_async(odd)
        with pytest.raises(ValueError, match="float16 staged as float(16|32) cannot be copied asynchronously"):
            grad_weight_primfunc(odd, dataclasses.replace(tiling, async_copy=True))
