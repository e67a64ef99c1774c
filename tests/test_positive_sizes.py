"""Configuration kernels know their sizes are positive (``schedules/cuda_sizes.py``): on sm_90 the
tensor-core configuration forward divides flat positions by the output plane's runtime sizes with
plain ``/`` and ``%`` (no sign fix-ups), per-size kernels compile as before, and the disk cache's
folder names the pipeline (a changed pass never reuses a library compiled before). Results on a
GPU: ``test_gpu_shape_generic.py``."""

from __future__ import annotations

import dataclasses
import re
import shutil

import pytest
import tvm

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.targets import compile_kernel, cuda_target, kernel_compilation
from deft_tvm.schedules import cuda_launch, default_schedule

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")

TARGET = cuda_target("sm_90")
LAYER = DeformConvSpec(2, 64, 20, 24, 64, 3, 3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), dtype="float16",
                       layout="NHWC")
SIGN_FIX_UP = re.compile(r"\(O[HW] >= 0\)|\(\(OH \* OW\) >= 0\)")


def _source(spec: DeformConvSpec, pipeline: str | None = None) -> str:
    mod = default_schedule(kernel_primfunc(spec), spec, TARGET).mod
    if pipeline is None:
        executable = compile_kernel(mod, TARGET)
    else:
        with kernel_compilation():
            executable = tvm.compile(mod, target=TARGET, tir_pipeline=pipeline)
    (device_module,) = executable.mod.imports
    return device_module.inspect_source()


def test_the_configurations_forward_divides_positions_without_sign_fix_ups():
    generic = generic_spec(LAYER)
    before = _source(generic, "s_tir")  # TVM's pipeline alone: sizes may be negative
    assert SIGN_FIX_UP.search(before)
    source = _source(generic)
    # (every size the kernel takes; the batch only as the number of positions, N * OH * OW)
    assert re.search(r"if \(\(+0 < H\) && \(0 < OH\)\) && \(0 < OW\)\) && \(0 < W\)\)", source)
    assert not SIGN_FIX_UP.search(source)
    assert " / " in source and " % " in source  # the positions are still divided out at run time


def test_a_per_size_kernel_compiles_as_on_tvms_pipeline():
    spec = dataclasses.replace(LAYER, batch=1)
    assert _source(spec) == _source(spec, "s_tir")


def test_the_cache_folder_changes_with_the_pipelines_passes(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_cache.CACHE_DIR_ENV, str(tmp_path))
    before = kernel_cache.library_path("k", "0", TARGET)
    assert before == kernel_cache.library_path("k", "0", cuda_target("sm_90"))
    monkeypatch.setattr(cuda_launch, "pipeline_digest", lambda: "another")
    assert kernel_cache.library_path("k", "0", TARGET).parent != before.parent
