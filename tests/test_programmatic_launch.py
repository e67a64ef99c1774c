"""Programmatic dependent launch (``schedules/cuda_launch.py``): on sm_90 the fused backward's
grad_data, and only it, is launched programmatically (the tag TVM 0.27's runtime reads, before the
dynamic shared memory's), after grad_weight, whose blocks let it start; the instructions assemble
for sm_90 and vanish below it."""

from __future__ import annotations

import dataclasses

import pytest
import tvm

from deft_tvm.runtime.targets import compile_kernel, cuda_target, exact_cuda_compilation
from deft_tvm.schedules.cuda import compute_capability
from deft_tvm.schedules.cuda_backward_fused import DataTiling, backward_entry, default_tilings
from deft_tvm.schedules.cuda_launch import PIPELINE, TAG, pipeline_for
from deft_tvm.tuning.workloads import WORKLOADS

from test_fused_backward_codegen import _kernel_body, needs_nvcc

SPEC = dataclasses.replace(WORKLOADS["r50dcn_c5"].spec, dtype="float32", tf32=True)


def _launch_params(data: DataTiling | None = None) -> dict[str, list[str]]:
    """Launch parameters of each device kernel of the fused entry lowered by ``PIPELINE``."""
    default_data, weight = default_tilings(SPEC)
    target = cuda_target("sm_90")
    mod = tvm.IRModule({"backward": backward_entry(SPEC, data or default_data, weight)})
    mod = tvm.tirx.transform.BindTarget(target.with_host("llvm"))(mod)
    lower, _, _ = tvm.tirx.get_tir_pipeline(PIPELINE)
    return {gv.name_hint: [str(p) for p in f.attrs["tirx.kernel_launch_params"]]
            for gv, f in lower(mod).functions.items() if f.attrs and "tirx.kernel_launch_params" in f.attrs}


def test_only_grad_data_launches_programmatically():
    params = _launch_params()
    assert sorted(params) == ["backward_kernel", "backward_kernel_1", "backward_kernel_2", "backward_kernel_3"]
    assert [name for name, tags in params.items() if TAG in tags] == ["backward_kernel_2"]  # zero, weight, data, reduce
    halo = dataclasses.replace(default_tilings(SPEC)[0], halo=8)  # patches past 48 KB: dynamic shared memory
    tags = _launch_params(halo)["backward_kernel_2"]
    assert tags[-2:] == [TAG, "tirx.use_dyn_shared_memory"]


def test_the_pipeline_follows_the_architecture():
    assert pipeline_for(cuda_target("sm_90")) == PIPELINE
    assert pipeline_for(cuda_target("sm_80")) == "default"
    assert pipeline_for(tvm.target.Target({"kind": "llvm"})) == "default"


def test_compute_capability_reads_the_arch_name():
    assert [compute_capability(a) for a in ("sm_90a", "sm_90", "sm_80", "sm_75")] == [90, 90, 80, 75]
    for bad in ("compute_90", "sm_", "sm_9x"):
        with pytest.raises(ValueError, match=f"not a CUDA arch name: '{bad}', expected sm_<digits>"):
            compute_capability(bad)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_the_grid_dependency_instructions_assemble_where_the_architecture_has_them(arch):
    from tvm.support import nvcc

    data, weight = default_tilings(SPEC, arch)
    module = tvm.IRModule({"backward": backward_entry(SPEC, data, weight)})
    source = compile_kernel(module, cuda_target(arch)).mod.imports[0].inspect_source()
    weight_kernel, data_kernel = (_kernel_body(source, name) for name in ("backward_kernel_1", "backward_kernel_2"))
    assert weight_kernel.index("deft_launch_dependents();") < weight_kernel.index("__syncthreads();")
    assert data_kernel.rstrip().endswith("deft_grid_dependency_wait();")
    assert "deft_grid_dependency_wait" not in weight_kernel and "deft_launch_dependents" not in data_kernel
    with exact_cuda_compilation(), cuda_target(arch):
        ptx = nvcc.compile_cuda(source, target_format="ptx", compiler="nvcc").decode()
    assert ("griddepcontrol.wait" in ptx) == (arch == "sm_90")
    assert ("griddepcontrol.launch_dependents" in ptx) == (arch == "sm_90")
