"""An exported CUDA library holds what calls of its layers run (issue 16), compiled with nvcc for
sm_90 here: ``deft-tvm export --backward`` puts in each workload's fused backward entry (and its
deterministic variant where deterministic calls take it), of the workload's sizes with its record's
tilings where one is recorded, else of its layer configuration with that configuration's default
tilings, the staged backward's gradient kernels and sorted gather, and the channels-last copies of
its channels-last forwards; the manifest keeps the tilings, and once the library is loaded the
runtime takes its kernels, the configuration's for every size they serve, with no compile.
(Loading a CUDA library needs the CUDA runtime, which this CPU build lacks: the module loader is
replaced by one handing out a sentinel per function; ``tests/test_gpu_shape_generic.py`` trains on
a real library's kernels on a GPU.)"""
from __future__ import annotations

import dataclasses
import json

import pytest
import tvm

from deft_tvm import cli
from deft_tvm.compute.spec import generic_spec, kernel_key
from deft_tvm.runtime import backward, kernel_cache, library, records
from deft_tvm.runtime.targets import cuda_target, target_for_device
from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling, default_tilings
from deft_tvm.tuning.export import companion_entries, library_entries
from deft_tvm.tuning.workloads import get_workload

from test_fused_backward_codegen import needs_nvcc

pytestmark = needs_nvcc
TARGET = cuda_target("sm_90")
WORKLOAD = "test_tensor_core_small"


def _spec(dtype: str):
    """The op's backward spec (NCHW) of the workload in ``dtype``."""
    return dataclasses.replace(get_workload(WORKLOAD, dtype).spec, layout="NCHW")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(manifest, recorded tilings)``: ``deft-tvm export --device cuda --arch sm_90 --backward``
    of the workload in float16 and float32, with a fused-backward record of the float16 spec under
    ``--logs`` (the default tilings with one more px of halo)."""
    root = tmp_path_factory.mktemp("fused_library")
    data, weight = default_tilings(_spec("float16"))
    data = dataclasses.replace(data, halo=data.halo + 1)
    records.write_fused_backward(records.fused_backward_dir(root / "logs", _spec("float16"), TARGET), {
        "spec": _spec("float16").to_dict(), "data": dataclasses.asdict(data), "weight": dataclasses.asdict(weight)})
    assert cli.main(["export", "--device", "cuda", "--arch", "sm_90", "--logs", str(root / "logs"),
                     "--out", str(root / "lib"), "--workloads", WORKLOAD, "--dtypes", "float16", "float32",
                     "--backward"]) == 0
    return root / "lib" / "deft_kernels.json", (data, weight)


def _fused(manifest: dict) -> dict:
    return {k["workload"]: k for k in manifest["kernels"] if k["part"].startswith("fused_backward")}


def test_the_manifest_names_each_fused_entry_and_its_tilings(exported):
    path, (data, weight) = exported
    fused = _fused(json.loads(path.read_text()))
    half, single = _spec("float16"), generic_spec(_spec("float32"))
    deterministic = dataclasses.replace(data, fixed_point=True, deterministic=True)
    assert set(fused) == {kernel_key(half, "fused_backward"), kernel_key(half, "fused_backward_deterministic"),
                          kernel_key(single, "fused_backward")}  # float32 (no TF32): deterministic calls are staged
    for part, tiling in (("fused_backward", data), ("fused_backward_deterministic", deterministic)):
        entry = fused[kernel_key(half, part)]
        assert entry["origin"] == str(records.fused_backward_dir(path.parent.parent / "logs", half, TARGET))
        assert entry["tilings"] == {"data": dataclasses.asdict(tiling), "weight": dataclasses.asdict(weight)}
    entry = fused[kernel_key(single, "fused_backward")]
    assert entry["origin"] == "default tilings" and entry["spec"]["height"] == "H"
    assert (DataTiling(**entry["tilings"]["data"]), WeightTiling(**entry["tilings"]["weight"])) == \
        default_tilings(single, "sm_90")


@pytest.fixture
def loaded(exported, monkeypatch):
    """The exported library registered (its module loader handing out a sentinel per function),
    the backward's kernels forgotten and building one an error; every library unloaded
    afterwards."""
    monkeypatch.setattr(library, "_current_arch", lambda kind: "sm_90")
    monkeypatch.setattr(tvm.runtime, "load_module", lambda path: {k["function"]: f"sentinel {k['function']}" for k in
                                                                  json.loads(exported[0].read_text())["kernels"]})
    monkeypatch.setattr(backward, "_kernels", {})

    def no_compile(*args):
        raise AssertionError("compiled a kernel that the library holds")

    monkeypatch.setattr(backward, "_build", no_compile)
    monkeypatch.setattr(kernel_cache, "_layout_kernel", no_compile)
    yield library.load_library(exported[0])
    library.unload_all()


def _sized(spec, batch: int, height: int, width: int):
    return dataclasses.replace(spec, batch=batch, height=height, width=width)


def test_the_configurations_entry_serves_every_size_with_its_tilings(loaded):
    manifest = json.loads(loaded.manifest_path.read_text())
    configuration = _fused(manifest)[kernel_key(generic_spec(_spec("float32")), "fused_backward")]
    for size in ((1, 17, 300), (4, 123, 45), (2, 10, 16)):
        sized = _sized(_spec("float32"), *size)
        kernels = backward._kernel(sized, TARGET, "fused")
        assert kernels.entry == f"sentinel {configuration['function']}"
        assert (dataclasses.asdict(kernels.data_tiling), dataclasses.asdict(kernels.weight_tiling)) == (
            configuration["tilings"]["data"], configuration["tilings"]["weight"])
        for part, library_part in (("gradients", "backward"), ("gather", "gather")):  # the staged backward's
            expected = f"sentinel {library.function_name(generic_spec(sized), library_part)}"
            assert backward._kernel(sized, TARGET, part) == expected


def test_a_recorded_entry_serves_its_own_sizes_and_others_compile(loaded, exported):
    _, (data, weight) = exported
    half = _spec("float16")
    for part, library_part in backward.FUSED_PARTS.items():
        kernels = backward._kernel(half, TARGET, part)
        assert kernels.entry == f"sentinel {library.function_name(half, library_part)}"
        assert kernels.weight_tiling == weight and kernels.data_tiling.halo == data.halo
        other = _sized(half, 3, 40, 56)  # no configuration entry in the library: compiled, as without one
        assert backward._library_or_compiled(other, TARGET, part) == (None, generic_spec(other))
    huge = _sized(_spec("float32"), 4096, 256, 256)  # int64 indices: its own kernels, compiled
    assert huge.index_dtype == "int64" and backward._library_or_compiled(huge, TARGET, "fused") == (None, huge)


def test_the_channels_last_copies_of_its_forwards_are_in_it(loaded):
    manifest = json.loads(loaded.manifest_path.read_text())
    copies = {k["workload"]: k["function"] for k in manifest["kernels"] if k["part"] == "channels_last"}
    forwards = [get_workload(WORKLOAD, dtype).for_target(TARGET).spec for dtype in ("float16", "float32")]
    assert all(f.layout == "NHWC" for f in forwards)
    assert set(copies) == {kernel_key(generic_spec(f), "channels_last") for f in forwards}
    for forward in forwards:
        # a call's forward is the library's configuration kernel, and so are its copies
        loaded_forward, compiled = kernel_cache.library_kernel(_sized(forward, 3, 40, 56), TARGET)
        assert loaded_forward is not None and compiled is generic_spec(forward)
        expected = f"sentinel {copies[kernel_key(compiled, 'channels_last')]}"
        assert kernel_cache.channels_last_kernel(compiled, TARGET) == expected


def test_a_cuda_library_gets_the_kernels_its_kernels_run_beside():
    """Each channels-last forward or columns kernel's channels-last copies, each columns kernel's
    output transpose and each gradient kernel's sorted gather, for the spec it was compiled for (a
    configuration's where it is one), once; on the CPU the gradient kernel's scatter only."""
    c5, c3 = (get_workload(n, "float16").for_target(TARGET).spec for n in ("r50dcn_c5", "r50dcn_c3"))
    gradients = generic_spec(_spec("float32"))
    entries = [library.KernelEntry(c5, None, "tuned"), library.KernelEntry(c3, None, "tuned"),
               library.KernelEntry(generic_spec(c5), None, "default schedule", part="columns"),
               library.KernelEntry(gradients, None, "default schedule", part="backward")]
    companions = companion_entries(TARGET, entries)
    assert c5.layout == c3.layout == "NHWC"
    assert [(e.part, e.spec.key()) for e in companions] == [
        ("channels_last", c5.key()), ("channels_last", c3.key()), ("channels_last", generic_spec(c5).key()),
        ("channels_first_output", generic_spec(c5).key()), ("gather", gradients.key())]
    assert [e.function.params[-1].name for e in companions] == ["weight_ohwi"] * 3 + ["output", "starts"]
    assert companion_entries(TARGET, entries + companions) == []
    on_cpu = companion_entries(target_for_device("cpu"), entries)
    assert [(e.part, e.spec.key()) for e in on_cpu] == [("scatter", gradients.key())]


def test_a_model_librarys_entries_include_its_configurations_fused_backward(tmp_path):
    """``tune_model``'s library (``configurations=True``): a workload with a fused-backward record of
    its own sizes also gets its layer configuration's fused entries, with the configuration's
    default tilings, for the calls of other sizes."""
    workload = get_workload("test_tensor_core_small", "float16")
    spec = dataclasses.replace(workload.spec, layout="NCHW")  # the op's backward spec
    generic = generic_spec(spec)
    assert backward.fused_choice(generic, TARGET, "fused") == (generic, *default_tilings(generic))
    data, weight = default_tilings(spec)
    records.write_fused_backward(records.fused_backward_dir(tmp_path, spec, TARGET), {
        "spec": spec.to_dict(), "data": dataclasses.asdict(data), "weight": dataclasses.asdict(weight)})
    entries = library_entries([workload], TARGET, [], True, [tmp_path], configurations=True)
    fused = {kernel_key(e.spec, e.part) for e in entries if e.part.startswith("fused")}
    assert fused == {kernel_key(s, part) for s in (spec, generic)
                     for part in ("fused_backward", "fused_backward_deterministic")}
