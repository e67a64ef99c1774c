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
        batches = [inputs for inputs, _ in tiny_dcn_model.loader()]
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


def test_the_command_line_records_the_statistics_of_real_batches_from_data(tuned, capsys, monkeypatch):
    """``--data tiny_dcn_model:loader`` (``(input, labels)`` batches, the ones ``tuned`` ran): the same
    statistics as ``tune_model``'s, so the databases serve again; a third batch is not taken."""
    from deft_tvm import cli

    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr(tiny_dcn_model, "loader", lambda original=tiny_dcn_model.loader: [
        *original(), (torch.full(tiny_dcn_model.INPUT_SHAPE, float("nan")), None)])
    from deft_tvm.tuning.stats import collect

    expected = collect(tiny_dcn_model.build(), [inputs for inputs, _ in tiny_dcn_model.loader()[:2]], seed=0)
    root = tuned.manifest.parent.parent
    tuned.profile.unlink()  # written again from --data's batches (the databases keep the profile's path)
    assert cli.main(["tune", "--model", "tiny_dcn_model:build", "--data", "tiny_dcn_model:loader", "--batches", "2",
                     "--device", "cpu", "--trials", "2", "--backward", "--logs", str(root / "logs"),
                     "--out", str(tuned.manifest.parent)]) == 0
    assert f"exported {tuned.manifest}" in capsys.readouterr().out
    assert json.loads(tuned.profile.read_text())["layers"] == json.loads(json.dumps(expected.layers))


@pytest.mark.parametrize("argv, message", [
    (["--input-shape", "2", "3", "0", "8"],
     r"--model needs --data MODULE:CALLABLE or --input-shape N C H W \(four positive sizes\), got \[2, 3, 0, 8\]"),
    ([], r"--model needs --data MODULE:CALLABLE or --input-shape N C H W \(four positive sizes\), got None"),
    (["--input-shape", "2", "3", "9", "8", "--batches", "0"], r"--batches 0: expected at least 1"),
    (["--data", "tiny_dcn_model:loader", "--input-shape", "2", "3", "9", "8"],
     r"batches from --data tiny_dcn_model:loader or random ones of --input-shape 2 3 9 8, not both"),
    (["--data", "tiny_dcn_model"], r"--data tiny_dcn_model: expected MODULE:CALLABLE"),
    (["--data", "builtins:int"], r"--data builtins:int: returned a int, expected an iterable of batches"),
    (["--data", "builtins:list"], r"--data builtins:list: gave no batch"),
    (["--data", "itertools:count"], r"--data itertools:count: batch 0 is a int, expected a tensor or an \(input, ...\)"),
])
def test_bad_model_tuning_arguments_name_the_observed_values(argv, message, capsys):
    from deft_tvm import cli

    assert cli.main(["tune", "--model", "tiny_dcn_model:build", "--device", "cpu", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_benchmark_times_the_library_s_layers_in_their_own_dtype(tuned, tmp_path, capsys):
    """``deft-tvm bench --library``: one row per layer workload and provider, the op's rows served by
    the loaded library; a manifest without a model is refused by name."""
    from deft_tvm import bench

    csv_path = tmp_path / "layers.csv"
    assert bench.main(["--library", str(tuned.manifest), "--iters", "1", "--modes", "forward", "forward_backward",
                       "--csv", str(csv_path), "--commit", "test"]) == 0
    rows = bench.read_csv(csv_path)
    ours = [r for r in rows if r["provider"] == "deft_tvm"]
    assert sorted((r["workload"], r["mode"]) for r in ours) == sorted(
        (name, mode) for name in set(tuned.layers.values()) for mode in ("forward", "forward_backward"))
    assert all(r["schedule"] == "library" and r["dtype"] == "float32" and r["tf32"] == "n/a" for r in ours)
    assert all(r["profile"].startswith(f"{tuned.profile}#") for r in rows)
    no_model = tmp_path / "plain.json"
    no_model.write_text(json.dumps({"kernels": []}))
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        bench.main(["--library", str(no_model)])
    assert f'--library {no_model}: {no_model}: no "model" entry' in capsys.readouterr().err
