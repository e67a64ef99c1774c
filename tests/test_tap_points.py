"""The tensor-core forward's sampling points staged per tap (``TensorCoreTiling.tap_points``): a
decision of the design space that traces carry, the refinements offered from a record, and the
kernel it generates (CUDA source compiled for sm_90 with nvcc; no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules import refinements, search_start
from deft_tvm.schedules.cuda_tensorcore import TensorCoreTiling, tensorcore_schedule_at

TARGET = cuda_target("sm_90")
# A wide layer's structure at a small size: 64 channels, two 32-channel chunks per tap.
SPEC = DeformConvSpec(1, 64, 6, 10, 64, 3, 3, padding=(1, 1), dtype="float16", layout="NHWC")
RECORD = TensorCoreTiling(warps_co=2, frags_co=2, warps_p=1, frags_p=1, k_frags=1, vector=8)


def _at(tiling):
    return tensorcore_schedule_at(deform_conv2d_primfunc(SPEC), SPEC, tiling)


@pytest.mark.parametrize("tap_points", [False, True])
def test_traces_carry_the_tiling_and_its_tap_points(tap_points):
    tiling = dataclasses.replace(RECORD, tap_points=tap_points)
    assert TensorCoreTiling.of_trace(_at(tiling).trace, SPEC) == tiling


def test_traces_of_other_spaces_have_no_tensor_core_tiling():
    simt = dataclasses.replace(SPEC, dtype="float32", layout="NCHW")
    assert TensorCoreTiling.of_trace(search_start(simt, TARGET).trace, simt) is None
    assert refinements(simt, TARGET, search_start(simt, TARGET).trace) == {}


def test_refinements_of_a_record_stage_the_points_double_the_chunk_and_split_k():
    offered = {label: TensorCoreTiling.of_trace(sch.trace, SPEC)
               for label, sch in refinements(SPEC, TARGET, _at(RECORD).trace).items()}
    staged, default = dataclasses.replace(RECORD, tap_points=True), TensorCoreTiling.for_spec(SPEC)
    assert default.tap_points  # one offset group of 64 channels
    unstaged_default = dataclasses.replace(default, tap_points=False)
    assert offered == {"tap points": staged, "tap points, 2x chunk": dataclasses.replace(staged, k_frags=2),
                       "split-K 2": dataclasses.replace(RECORD, k_splits=2),
                       "split-K 4": dataclasses.replace(RECORD, k_splits=4),
                       "default": default, "default, tap points off": unstaged_default}
    # From the default (staged, chunks of 2 of the 4 channel fragments): the chunk doubled, split
    # 2 ways (4 ways leaves one fragment per split), and the default without staging; nothing repeated.
    assert {label: TensorCoreTiling.of_trace(sch.trace, SPEC)
            for label, sch in refinements(SPEC, TARGET, _at(default).trace).items()} == {
        "tap points, 2x chunk": dataclasses.replace(default, k_frags=2 * default.k_frags),
        "split-K 2": dataclasses.replace(default, k_splits=2),
        "default, tap points off": unstaged_default}


@pytest.mark.parametrize(("channels", "offset_groups", "staged"), [(64, 1, True), (64, 8, False), (128, 2, True),
                                                                    (32, 2, False), (32, 4, False)])
def test_the_default_stages_points_where_offset_groups_have_16_channels_and_taps_two_chunks(channels, offset_groups,
                                                                                           staged):
    # 32 channels in 2 groups: 16 per group, but one 32-channel chunk per tap.
    spec = dataclasses.replace(SPEC, in_channels=channels, offset_groups=offset_groups)
    assert TensorCoreTiling.for_spec(spec).tap_points is staged


def _source(tiling) -> str:
    (device,) = compile_kernel(_at(tiling).mod, TARGET).mod.imports
    return device.inspect_source()


def test_staged_points_are_read_from_shared_memory_in_the_chunk_loop():
    plain, staged = _source(RECORD), _source(dataclasses.replace(RECORD, tap_points=True))
    assert "sample_index_shared" not in plain
    for name in ("sample_index_shared", "sample_weight_shared"):
        assert f"__shared__ alignas(64) {'int' if 'index' in name else 'float'} {name}_ptr[" in staged
    # The offsets and mask are loaded once per tap: fewer load sites than when every chunk loads them.
    assert 0 < staged.count("offset_ptr[") < plain.count("offset_ptr[")
    assert 0 < staged.count("mask_ptr[") < plain.count("mask_ptr[")


def test_a_one_chunk_tap_with_staged_points_lowers():
    # 16 channels in 8 offset groups: one chunk per tap, so the points die within the tap; TVM's
    # StorageRewrite used to hand their int32 memory to a float16 tile the tensor cores load
    # ("tvm_access_ptr element type must match the source buffer").
    spec = DeformConvSpec(1, 16, 8, 16, 16, 3, 3, padding=(1, 1), offset_groups=8, dtype="float16", layout="NHWC")
    tiling = dataclasses.replace(TensorCoreTiling.for_spec(spec), tap_points=True)
    sch = tensorcore_schedule_at(deform_conv2d_primfunc(spec), spec, tiling)
    (device,) = compile_kernel(sch.mod, TARGET).mod.imports
    assert "sample_index_shared" in device.inspect_source()


def test_default_tiling_stages_points_only_where_a_tap_has_two_chunks():
    # 16 channels into 64 on a 10 x 13 map (tests/test_gpu_fused_backward.py): one 16-channel chunk
    # per tap; with staged points its default tiling failed to lower. Without, it lowers.
    one_chunk = DeformConvSpec(2, 16, 10, 13, 64, 3, 3, padding=(1, 1), dtype="float16", layout="NHWC")
    tiling = TensorCoreTiling.for_spec(one_chunk)
    assert tiling.k_frags == 1 and not tiling.tap_points
    compile_kernel(tensorcore_schedule_at(deform_conv2d_primfunc(one_chunk), one_chunk, tiling).mod, TARGET)
    two_chunks = dataclasses.replace(one_chunk, in_channels=64)  # 2 chunks of 32 channels
    assert TensorCoreTiling.for_spec(two_chunks).tap_points
    assert TensorCoreTiling.for_spec(dataclasses.replace(two_chunks, dtype="float32", tf32=True)).tap_points
