"""Shape-generic CUDA forward (issue 16), on machines without a GPU too: the tensor-core forward of a
layer configuration (batch, height and width as kernel parameters) generates CUDA and compiles with
nvcc for sm_90 in every precision; calls on CUDA choose it (or the unfused forward's columns kernel
of the configuration) where no tuned record of their sizes is committed. Its results on a GPU:
``test_gpu_shape_generic.py``; the generic columns kernel and transposes: ``test_unfused_forward.py``,
``test_channels_last_copies.py``."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import torch

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.runtime import backward, kernel_cache
from deft_tvm.runtime.records import recorded_fused_tilings
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules import default_schedule, kernel_spec, schedule_family, shape_generic
from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling
from deft_tvm.tuning.workloads import get_workload

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

TARGET = cuda_target("sm_90")
LAYER = DeformConvSpec(2, 64, 20, 24, 64, 3, 3, padding=(1, 1), layout="NHWC")
# Output sizes other than the input's (out_h = (H - 1) // 2 + 1, out_w = W - 1): TVM 0.27 fails on fused loops of
# such expressions of H and W (the configuration's OH and OW are variables of their own).
ASYMMETRIC = DeformConvSpec(2, 32, 20, 24, 48, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(2, 1), offset_groups=2,
                            layout="NHWC")
SIZE_DIVISION = re.compile(r"[/%] \(OH \* OW\)|[/%] O[HW]\b")
PRECISIONS = {  # dtype, TF32: WMMA float16, mma m16n8k16 bfloat16, m16n8k8 TF32 and 3xTF32
    "float16": ("float16", False), "bfloat16": ("bfloat16", False), "tf32": ("float32", True),
    "3xtf32": ("float32", False),
}


@pytest.mark.parametrize("layer", [LAYER, ASYMMETRIC], ids=["same_size", "asymmetric"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_the_configurations_tensor_core_forward_compiles_with_sizes_as_parameters(precision, layer):
    dtype, tf32 = PRECISIONS[precision]
    generic = generic_spec(dataclasses.replace(layer, dtype=dtype, tf32=tf32))
    sch = default_schedule(kernel_primfunc(generic), generic, TARGET)
    (device_module,) = compile_kernel(sch.mod, TARGET).mod.imports
    source = device_module.inspect_source()
    signature = re.search(r"main_kernel\(([^)]*)\)", source).group(1)
    # (The batch enters as the number of positions, N * OH * OW, which the host computes.)
    assert {"int H", "int W", "int OH", "int OW"} <= {a.strip() for a in signature.split(",")}, signature
    # Every shared and local buffer has a constant size (blocks of whole positions: no clipped tail).
    assert re.findall(r"__shared__ [^;\[]*\[(\d+)\]", source) and "extern __shared__" in source
    # The block's positions are divided out of their flat index once (sample_position, in shared memory), not in
    # the sampling of every tap: the only divisions by the run-time sizes fill that table and place the outputs.
    divisions = SIZE_DIVISION.findall(source)
    assert "sample_position_shared" in source and 0 < len(divisions) <= 8, divisions


@pytest.mark.parametrize("dtype, channels", [("float32", 1), ("float16", 4), ("bfloat16", 8), ("float64", 64)])
def test_the_configurations_simt_forward_compiles_with_sizes_as_parameters(dtype, channels):
    # Layers off the tensor cores (a 1-channel stem, channels not in multiples of 16, float64): output rows and
    # columns padded to whole tiles, so that the shared tile has a constant size.
    layer = dataclasses.replace(ASYMMETRIC, in_channels=channels, offset_groups=1 if channels == 1 else 2, dtype=dtype)
    generic = generic_spec(kernel_spec(layer, TARGET))
    assert schedule_family(generic, TARGET).name == "cuda_simt"
    sch = default_schedule(kernel_primfunc(generic), generic, TARGET)
    source = compile_kernel(sch.mod, TARGET).mod.imports[0].inspect_source()
    signature = re.search(r"main_kernel\(([^)]*)\)", source).group(1)
    assert {"int N", "int H", "int W", "int OH", "int OW"} <= {a.strip() for a in signature.split(",")}, signature
    assert re.findall(r"__shared__ [^;\[]*sampled_pad_shared_ptr\[(\d+)\]", source)


def test_the_tiling_of_a_configuration_is_a_large_maps():
    generic = generic_spec(dataclasses.replace(LAYER, in_channels=512, out_channels=512))
    tiling = TensorCoreTiling.for_spec(generic)
    assert (tiling.frags_p, tiling.k_splits, tiling.tap_points) == (4, 1, False)


def test_cuda_calls_take_the_configurations_forward_unless_a_record_of_their_sizes_is_committed():
    call = kernel_spec(dataclasses.replace(LAYER, batch=3, height=37, width=41), TARGET)
    assert kernel_cache.compiled_spec(call, TARGET) is generic_spec(call)
    staged = dataclasses.replace(call, layout="NCHW", tf32=False)  # the staged backward's (deterministic float32)
    assert shape_generic(staged, TARGET, "backward")
    for part in ("gradients", "gather"):
        assert backward._library_or_compiled(staged, TARGET, part) == (None, generic_spec(staged))
    tuned = get_workload("paper_64c_64x64_n32", "float16").for_target(TARGET).spec
    assert kernel_cache.compiled_spec(tuned, TARGET) is tuned
    simt = kernel_spec(dataclasses.replace(LAYER, dtype="float64"), TARGET)  # float64: the SIMT schedule
    assert kernel_cache.compiled_spec(simt, TARGET) is generic_spec(simt)
    grouped = kernel_spec(dataclasses.replace(LAYER, dtype="float16", groups=2), TARGET)  # SIMT, not an einsum
    assert kernel_cache.compiled_spec(grouped, TARGET) is grouped
    wide = kernel_spec(dataclasses.replace(LAYER, in_channels=256, out_channels=256, dtype="float16"), TARGET)
    assert kernel_cache.compiled_spec(wide, TARGET, "columns") is generic_spec(wide)  # the unfused forward's
    assert kernel_cache._forward_library_kernel(wide, TARGET) == ("columns", None, generic_spec(wide))
    assert kernel_cache._forward_library_kernel(call, TARGET) == ("forward", None, generic_spec(call))


@pytest.mark.parametrize("part", ["fused", "fused_deterministic"])
def test_cuda_backwards_take_the_configurations_fused_kernels_unless_a_record_of_their_sizes_is_committed(part):
    call = dataclasses.replace(LAYER, batch=3, height=37, width=41, layout="NCHW", dtype="float16")  # the backward's
    assert backward.fused_choice(call, TARGET, part)[0] is generic_spec(call)
    tuned = get_workload("paper_64c_64x64_n32", "float16").spec
    assert recorded_fused_tilings(tuned, TARGET) and backward.fused_choice(tuned, TARGET, part)[0] is tuned
    huge = dataclasses.replace(call, batch=64, height=512, width=512)  # corners past int32 indexing
    assert huge.index_dtype == "int64" and backward.fused_choice(huge, TARGET, part)[0] is huge


def test_prebuild_builds_the_configurations_kernels_and_copies(isolated_cache, monkeypatch):
    built, layouts = [], []
    monkeypatch.setattr(kernel_cache, "target_for_device", lambda device: TARGET)
    monkeypatch.setattr(kernel_cache, "build", lambda spec, target, sch: built.append(spec.key()))
    monkeypatch.setattr(kernel_cache, "_export_atomically", lambda executable, path: None)
    monkeypatch.setattr(kernel_cache, "channels_last_kernel", lambda spec, target: layouts.append(("last", spec)))
    monkeypatch.setattr(kernel_cache, "channels_first_output_kernel",
                        lambda spec, target: layouts.append(("first", spec)))
    fused = kernel_spec(dataclasses.replace(LAYER, dtype="float16"), TARGET)
    wide = kernel_spec(dataclasses.replace(LAYER, in_channels=256, out_channels=256, dtype="float16"), TARGET)
    assert kernel_cache.prebuild([fused, wide], torch.device("cuda")) == 3
    # the forward; the wide configuration's columns kernel and its fused kernel (for calls of larger columns)
    assert sorted(built) == sorted([generic_spec(fused).key()] + [generic_spec(wide).key()] * 2)
    assert sorted(layouts, key=str) == sorted([("last", generic_spec(fused)), ("last", generic_spec(wide)),
                                               ("first", generic_spec(wide))], key=str)
