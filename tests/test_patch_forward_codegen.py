"""The patch-staged forward (``schedules/cuda_patch_forward.py``) without a GPU: the layers it takes (one
clear reason for each it refuses), the patch it stages (the fused backward's, whose coverage
``tuning.stats`` tabulates), and its kernels generate and compile with nvcc for sm_90 without spills in
the shared memory its tiling claims, for every registry layer it takes."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest

from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime.targets import compile_kernel, cuda_target
from deft_tvm.schedules.cuda_backward_fused import DataTiling
from deft_tvm.schedules.cuda_patch_forward import (
    COLUMNS,
    DYNAMIC_SHARED_BYTES,
    SHARED_BYTES,
    PatchTiling,
    patch_forward_module,
    patch_forward_primfunc,
    supports,
)
from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, WORKLOADS

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
PRECISIONS = {"float16": ("float16", False), "bfloat16": ("bfloat16", False), "tf32": ("float32", True)}


def _spec(name: str, precision: str) -> DeformConvSpec:
    dtype, tf32 = PRECISIONS[precision]
    return dataclasses.replace(WORKLOADS[name].spec, dtype=dtype, tf32=tf32, layout="NHWC")


TAKEN = list(dict.fromkeys(s for s in (_spec(n, p) for n in BENCHMARK_WORKLOADS for p in PRECISIONS)
                           if supports(s, PatchTiling.for_spec(s)) is None))
POINTWISE = DeformConvSpec(2, 32, 9, 13, 64, 1, 1, stride=(2, 1), layout="NHWC", dtype="float16")  # static shared


def test_the_registry_layers_it_takes():
    taken = {s.key() for s in TAKEN}
    for name in BENCHMARK_WORKLOADS:
        one_group = WORKLOADS[name].spec.offset_groups == 1 and WORKLOADS[name].spec.in_channels % 16 == 0
        assert all((_spec(name, p).key() in taken) == one_group for p in PRECISIONS), name


@pytest.mark.parametrize(("spec", "match"), [
    (DeformConvSpec(2, 32, 9, 9, 64, 3, 3, padding=(1, 1), groups=2, layout="NHWC", dtype="float16"),
     r"groups 2, offset groups 1: one of each"),
    (_spec("video_64c_180x320_og8", "float16"), r"groups 1, offset groups 8: one of each"),
    (DeformConvSpec(2, 32, 9, 9, 64, 3, 3, dtype="float16"), r"layout NCHW: the patch is staged channels last"),
    (DeformConvSpec(2, 32, 9, 9, 64, 3, 3, layout="NHWC"), r"float32 has no tensor-core mma"),
    (DeformConvSpec(2, 32, 9, 9, 64, 3, 3, layout="NHWC", dtype="float64"), r"float64 has no tensor-core mma"),
    (DeformConvSpec(2, 24, 9, 9, 64, 3, 3, layout="NHWC", dtype="float16"), r"chunk 16 .* divide the 24 input"),
    (DeformConvSpec(2, 32, 9, 9, 48, 3, 3, layout="NHWC", dtype="float16"), r"o_tile 64 .* divide the 48 output"),
])
def test_layers_it_refuses_say_why(spec, match):
    with pytest.raises(ValueError, match=match):
        patch_forward_primfunc(spec, PatchTiling.for_spec(spec))


def test_overflow_slots_come_in_fours():
    spec = _spec("r50dcn_c5", "float16")
    with pytest.raises(ValueError, match=r"6 overflow slots are not a multiple of 4"):
        patch_forward_primfunc(spec, dataclasses.replace(PatchTiling.for_spec(spec), overflow=6))


def test_columns_are_staged_in_shared_memory_or_registers():
    spec = _spec("r50dcn_c5", "float16")
    with pytest.raises(ValueError, match=r"columns 'global': one of shared, registers"):
        patch_forward_primfunc(spec, dataclasses.replace(PatchTiling.for_spec(spec), columns="global"))
    shared, registers = (PatchTiling.for_spec(spec, columns=c) for c in COLUMNS)
    assert (registers.warps_o, registers.warps_p) == (1, 4) and registers.threads == shared.threads
    same_tile = dataclasses.replace(registers, tile_w=shared.tile_w)
    layout = shared.regions(spec)
    row = shared.chunk * 2 + 16  # float16 channels of a chunk and the 16-byte pad
    assert layout["end"] - layout["columns"] == 9 * shared.positions * row
    assert same_tile.regions(spec) == {**layout, "end": layout["columns"]}


@needs_nvcc
@pytest.mark.parametrize("columns", COLUMNS)
def test_split_k_adds_a_second_kernel_and_a_workspace(columns, tmp_path):
    spec = _spec("r50dcn_c5", "tf32")
    tiling = dataclasses.replace(PatchTiling.for_spec(spec, columns=columns), k_splits=4)
    with pytest.raises(ValueError, match=r"k_splits 3 must divide the 64 chunks of 8 channels"):
        patch_forward_primfunc(spec, dataclasses.replace(tiling, k_splits=3))
    kernel = compile_kernel(patch_forward_module(spec, tiling), cuda_target("sm_90"))
    source = kernel.mod.imports[0].inspect_source()
    assert len(set(re.findall(r"__global__ void __launch_bounds__\([\d, ]+\) (\w+)\(", source))) == 2
    assert "TVMBackendAllocWorkspace" in kernel.mod.inspect_source("ll")
    (tmp_path / "forward.cu").write_text(source)
    ptxas = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "forward.cubin"),
                            str(tmp_path / "forward.cu")], capture_output=True, text=True, check=True).stderr
    assert ptxas.count("0 bytes spill stores, 0 bytes spill loads") == 2


def test_a_halo_past_a_blocks_shared_memory_is_refused():
    spec = _spec("r50dcn_c5", "float16")
    with pytest.raises(ValueError, match=rf"bytes of shared memory, more than {DYNAMIC_SHARED_BYTES}"):
        patch_forward_primfunc(spec, dataclasses.replace(PatchTiling.for_spec(spec), halo=40))


@pytest.mark.parametrize("spec", TAKEN, ids=lambda s: s.key())
def test_the_patch_is_the_fused_backwards(spec):
    for halo in range(5):
        tiling = dataclasses.replace(PatchTiling.for_spec(spec), halo=halo)
        data = DataTiling(tile_h=tiling.tile_h, tile_w=tiling.tile_w, halo=halo, chunk=tiling.chunk, o_step=8,
                          channel_splits=1)
        assert tiling.patch(spec) == data.patch(spec)


@needs_nvcc
@pytest.mark.parametrize("columns", COLUMNS)
@pytest.mark.parametrize("spec", [*TAKEN, POINTWISE], ids=lambda s: s.key())
def test_kernels_compile_for_sm_90_without_spills(spec, columns, tmp_path):
    """Past 48 KB the block's shared memory is one dynamic buffer of the claimed size (the host's
    launch passes it), else a static one that ptxas counts. Columns in registers: no columns
    buffer, the B fragments interpolated in place (only the weights go through ldmatrix)."""
    tiling = PatchTiling.for_spec(spec, columns=columns)
    kernel = compile_kernel(patch_forward_module(spec, tiling), cuda_target("sm_90"))
    source = kernel.mod.imports[0].inspect_source()
    interpolation = {"shared": "deft_interpolate_run", "registers": "deft_interpolate_fragment"}
    assert source.count("mma.sync.aligned") > 0 and interpolation[columns] in source
    assert all(name not in source for c, name in interpolation.items() if c != columns)
    assert "cp.async.cg" in source and "ldmatrix.sync.aligned" in source
    (tmp_path / "forward.cu").write_text(source)
    ptxas = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "forward.cubin"),
                            str(tmp_path / "forward.cu")], capture_output=True, text=True, check=True).stderr
    assert "0 bytes spill stores, 0 bytes spill loads" in ptxas
    static = re.search(r"(\d+) bytes smem", ptxas)
    if tiling.dynamic(spec):
        assert "extern __shared__" in source and static is None
        assert str(tiling.shared_bytes(spec)) in kernel.mod.inspect_source("ll")
    else:
        assert tiling.shared_bytes(spec) <= int(static.group(1)) <= min(tiling.shared_bytes(spec) + 64, SHARED_BYTES)
