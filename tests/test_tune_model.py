"""``deft_tvm.tune_model`` on a tiny two-configuration model on the CPU: each layer's statistics
recorded, each configuration's forward and backward tuned on them, one library exported and
checked; loaded in a new process, the model trains with no compile and no warning and matches the
float64 reference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deft_tvm
from deft_tvm.runtime import library
from deft_tvm.tuning.workloads import offset_profile

import tiny_dcn_model

TESTS = Path(__file__).parent

NEW_PROCESS = """
import copy, sys, warnings
import torch
import deft_tvm
from deft_tvm.reference.tolerances import assert_close
from deft_tvm.runtime import backward, kernel_cache
import tiny_dcn_model

warnings.simplefilter("error")  # an untuned-kernel warning fails the run
deft_tvm.load_library(sys.argv[1])
def refuse(*args):
    raise AssertionError("a kernel was compiled")
kernel_cache.compile_kernel = backward.compile_kernel = refuse
model = tiny_dcn_model.build()
x = torch.randn(tiny_dcn_model.INPUT_SHAPE, generator=torch.Generator().manual_seed(int(sys.argv[2])))
out = model(x)
out.square().sum().backward()
reference = copy.deepcopy(model).double()
expected = reference(x.double(), reference=True)
expected.square().sum().backward()
assert_close(out, expected, "float32")
for (name, p), q in zip(model.named_parameters(), reference.parameters()):
    assert_close(p.grad, q.grad, "float32"), name
print("ok", tuple(out.shape))
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """``tune_model`` of the tiny model on two batches, 2 trials per kernel, records in its own
    folder."""
    root = tmp_path_factory.mktemp("tune_model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEFT_TVM_CACHE_DIR", str(root / "cache"))
        batches = [torch.randn(tiny_dcn_model.INPUT_SHAPE, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        result = deft_tvm.tune_model(tiny_dcn_model.build(), batches, trials=2, out=root / "lib", logs=root / "logs",
                                     device="cpu")
    yield result
    library.unload_all()


def test_each_layer_configuration_is_tuned_on_its_own_layers_statistics(tuned):
    assert [w.spec.key() for w in tuned.workloads] == [
        "n2_c3_h9_w8_o6_k3x3_s1x1_p1x1_d1x1_g1_og1_mb_float32", "n2_c6_h9_w8_o4_k3x2_s2x1_p1x0_d1x2_g1_og2_mb_float32"]
    assert tuned.layers == {"dcn1": tuned.workloads[0].name, "dcn2": tuned.workloads[1].name}
    assert [w.profile for w in tuned.workloads] == [f"{tuned.profile}#dcn1", f"{tuned.profile}#dcn2"]
    recorded = json.loads(tuned.profile.read_text())["layers"]
    assert {name: layer["calls"] for name, layer in recorded.items()} == {"dcn1": 2, "dcn2": 2}
    offsets = offset_profile(tuned.workloads[1].profile).sample_offsets((1, 24, 5, 6), torch.Generator())
    assert offsets.abs().max() > 0.5  # the layer's own offsets (a few px), not zeros
    assert set(tuned.best_ms) == {f"{w.spec.key()}{part}" for w in tuned.workloads for part in ("", "_backward")}
    assert all(ms is not None and ms > 0 for ms in (*tuned.best_ms.values(), *tuned.default_ms.values()))


def test_the_manifest_names_the_model_its_layers_and_their_profile(tuned):
    manifest = json.loads(tuned.manifest.read_text())
    assert manifest["model"]["name"] == "TwoConfigurations" and manifest["model"]["profile"] == str(tuned.profile)
    assert {layer: entry["workload"] for layer, entry in manifest["model"]["layers"].items()} == tuned.layers
    kernels = {k["workload"]: k["origin"] for k in manifest["kernels"]}
    for workload in tuned.workloads:  # tuned at the model's sizes
        assert "logs" in kernels[workload.spec.key()] and "logs" in kernels[f"{workload.spec.key()}_backward"]
    assert any(key.startswith("nN_") and key.endswith("_scatter") for key in kernels)  # other sizes: configurations


@pytest.mark.parametrize("seed", [3])
def test_a_new_process_trains_the_model_on_the_library_with_no_compile_and_no_warning(tuned, tmp_path, seed):
    env = {**os.environ, "DEFT_TVM_CACHE_DIR": str(tmp_path / "empty_cache"),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(tuned.manifest), str(seed)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", "(2,", "4,", "5,", "6)"]


def test_the_command_line_tunes_a_model_named_by_module_and_callable(tuned, capsys, monkeypatch):
    """``deft-tvm tune --model`` into the same folders: the databases already hold the trials, so it
    measures no new candidate, exports and checks the library again."""
    from deft_tvm import cli

    monkeypatch.syspath_prepend(str(TESTS))
    root = tuned.manifest.parent.parent
    assert cli.main(["tune", "--model", "tiny_dcn_model:build", "--input-shape", *map(str, tiny_dcn_model.INPUT_SHAPE),
                     "--batches", "2", "--device", "cpu", "--trials", "2", "--backward", "--logs", str(root / "logs"),
                     "--out", str(tuned.manifest.parent)]) == 0
    printed = capsys.readouterr().out
    assert f"layer    dcn2: {tuned.layers['dcn2']}" in printed and f"exported {tuned.manifest}" in printed


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "2", "3", "0", "8"],
     r"--model needs --input-shape N C H W \(four positive sizes\), got \[2, 3, 0, 8\]"),
    (["--input-shape", "2", "3", "9", "8", "--batches", "0"], r"--batches 0: expected at least 1"),
])
def test_bad_model_tuning_arguments_name_the_observed_values(argv, message, capsys):
    from deft_tvm import cli

    assert cli.main(["tune", "--model", "tiny_dcn_model:build", "--device", "cpu", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
