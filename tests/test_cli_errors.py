"""``deft-tvm`` user errors: one line on stderr, exit status 2, no traceback; ``--debug`` raises."""

from __future__ import annotations

import json

import pytest
import torch

import deft_tvm
from deft_tvm import cli

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")

NOT_CALLABLE = 3  # for --model test_cli_errors:NOT_CALLABLE


def not_a_module() -> str:
    """For ``--model test_cli_errors:not_a_module``."""
    return "a string"


def tiny_model() -> torch.nn.Module:
    """For ``--model test_cli_errors:tiny_model``: one DCN layer on 2 channels."""
    return torch.nn.Sequential(deft_tvm.ModulatedDeformConv2dPack(2, 2, 3, padding=1))


def broken_model():
    """For ``--model test_cli_errors:broken_model``: a bug in the user's callable."""
    raise RuntimeError("bug in the model's constructor")


def error_line(argv: list[str], capsys) -> str:
    """``cli.main(argv)``, which must return 2 and write exactly one line to stderr; that line."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def argparse_error_line(argv: list[str], capsys) -> str:
    """Like ``error_line`` for errors argparse finds, which exit with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    return err


@NO_GPU
def test_tune_on_cuda_without_a_gpu(capsys):
    err = error_line(["tune", "--device", "cuda"], capsys)
    assert err.startswith("deft-tvm tune: error: --device cuda: torch sees no CUDA GPU on this machine;")
    assert "--device cpu" in err


@NO_GPU
def test_export_on_cuda_without_a_gpu_or_arch(tmp_path, capsys):
    err = error_line(["export", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert err.startswith("deft-tvm export: error: --device cuda: torch sees no CUDA GPU") and "--arch" in err


@NO_GPU
def test_debug_raises_the_usage_error():
    with pytest.raises(cli.UsageError, match=r"^--device cuda: torch sees no CUDA GPU"):
        cli.main(["--debug", "tune", "--device", "cuda"])


def test_export_with_nothing_to_export(tmp_path, capsys):
    err = error_line(["export", "--device", "cpu", "--logs", str(tmp_path / "empty"), "--out", str(tmp_path)], capsys)
    assert f"nothing to export: --logs {tmp_path / 'empty'} holds no tuning records" in err


def test_stats_show_missing_and_foreign_files(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert f"--show {missing}: no such file; pass a file that" in error_line(["stats", "--show", str(missing)], capsys)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"format": "something else"}))
    err = error_line(["stats", "--show", str(foreign)], capsys)
    assert f"--show {foreign}: not an offset profile ({foreign}: format 'something else'" in err
    foreign.write_text("not json")
    assert "not an offset profile (Expecting value" in error_line(["stats", "--show", str(foreign)], capsys)
    assert "cannot read it (Is a directory)" in error_line(["stats", "--show", str(tmp_path)], capsys)


@pytest.mark.parametrize(
    "model, message",
    [
        ("build_model", r"--model build_model: expected MODULE:CALLABLE"),
        ("no_such_module_here:build", r"--model no_such_module_here:build: no module named 'no_such_module_here'; "
                                      r"check the name and put the folder that holds it on PYTHONPATH"),
        ("test_cli_errors:missing", r"module test_cli_errors has no attribute 'missing'"),
        ("test_cli_errors:NOT_CALLABLE", r"test_cli_errors.NOT_CALLABLE is not callable (type int)"),
        ("test_cli_errors:not_a_module", r"returned str, expected a torch.nn.Module"),
        ("torch.nn:Identity", r"--model torch.nn:Identity: Identity has no deformable convolution layer"),
    ],
)
def test_stats_bad_model(model, message, tmp_path, capsys):
    err = error_line(["stats", "--model", model, "--input-shape", "1", "2", "8", "8", "--out", str(tmp_path / "p.json")],
                     capsys)
    assert err.startswith("deft-tvm stats: error: --model ") and message in err


def test_stats_bad_sizes(tmp_path, capsys):
    argv = ["stats", "--model", "test_cli_errors:tiny_model", "--out", str(tmp_path / "p.json"), "--input-shape"]
    err = error_line([*argv, "1", "0", "8", "8"], capsys)
    assert err == "deft-tvm stats: error: --input-shape 1 0 8 8: expected four positive sizes N C H W\n"
    err = error_line([*argv, "1", "2", "8", "8", "--batches", "0"], capsys)
    assert err == "deft-tvm stats: error: --batches 0: expected at least 1\n"
    err = argparse_error_line([*argv, "1", "2", "8"], capsys)
    assert err.startswith("deft-tvm stats: error: argument --input-shape: expected 4 arguments")


def test_stats_unwritable_output(tmp_path, capsys):
    argv = ["stats", "--model", "test_cli_errors:tiny_model", "--input-shape", "1", "2", "8", "8", "--batches", "1",
            "--out", str(tmp_path)]
    assert f"--out {tmp_path}: cannot write it (Is a directory)" in error_line(argv, capsys)


def test_a_bug_in_the_model_keeps_its_traceback(tmp_path):
    with pytest.raises(RuntimeError, match="bug in the model's constructor"):
        cli.main(["stats", "--model", "test_cli_errors:broken_model", "--input-shape", "1", "2", "8", "8",
                  "--out", str(tmp_path / "p.json")])


@pytest.mark.parametrize(
    "argv, start",
    [
        (["tune", "--workloads", "nope"], "deft-tvm tune: error: argument --workloads: invalid choice: 'nope'"),
        (["build", "--dtype", "float8"], "deft-tvm build: error: argument --dtype: invalid choice: 'float8'"),
        (["stats", "--model", "m:f"], "deft-tvm stats: error: --model needs --input-shape and --out"),
        (["bench", "--iters", "0"], "deft-tvm bench: error: argument --iters: must be at least 1, not 0"),
        (["bench", "--from-csv", "missing.csv", "--markdown", "t.md"],
         "deft-tvm bench: error: --from-csv: no such file: missing.csv"),
        (["frobnicate"], "deft-tvm: error: argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_argparse_errors_are_one_line(argv, start, capsys):
    err = argparse_error_line(argv, capsys)
    prog = start.split(": error")[0]
    assert err.startswith(start) and err.endswith(f" (see {prog} --help)\n")
