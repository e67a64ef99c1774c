"""The end-to-end training benchmark (``tools/train_bench.py``) on the CPU: a tiny fully-DCN ResNet
trained on injected synthetic images (no scikit-learn needed), and the digits loader's error."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deft_tvm

TOOLS = Path(__file__).parents[1] / "tools"
WIDTH, BATCH, CANVAS, WARMUP, STEPS = 8, 4, 16, 1, 2
TINY = ["--steps", str(STEPS), "--warmup", str(WARMUP), "--batch", str(BATCH), "--width", str(WIDTH),
        "--canvas", str(CANVAS)]


@pytest.fixture(scope="module")
def tools():
    """``tools/train_bench.py`` and ``tools/digits_data.py`` as modules."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS))
        import digits_data
        import train_bench

        yield types.SimpleNamespace(train_bench=train_bench, digits_data=digits_data)


@pytest.fixture(scope="module")
def data():
    """Synthetic stand-in for the digits: 16 images ``[16, 1, 16, 16]`` in [0, 1], labels ``[16]``."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, CANVAS, CANVAS, generator=gen), torch.randint(0, 10, (16,), generator=gen)


@pytest.fixture(scope="module")
def trained(tools, data):
    """One run of deft_tvm, the float64 reference and plain convs: ``(rows, mismatched variants)``."""
    return tools.train_bench.run(*data, variants=["deft_tvm", "reference", "plain"], steps=STEPS, warmup=WARMUP,
                                 batch=BATCH, width=WIDTH, dtype="float32", tf32=False, device=torch.device("cpu"),
                                 seed=0, commit="test")


def _losses(row: dict) -> list[float]:
    return [float(v) for v in row["losses"].split()]


def test_deft_tvm_losses_match_the_reference_step_by_step(tools, trained):
    rows, mismatched = trained
    assert mismatched == []
    deft, reference, plain = (_losses(r) for r in rows)
    assert len(deft) == len(reference) == WARMUP + STEPS
    tolerance = [tools.train_bench.loss_tolerance("float32", False, 9, step) for step in range(len(deft))]
    assert all(abs(a - b) / b <= t for a, b, t in zip(deft, reference, tolerance))
    # In the first steps from zero offsets few sampling points have crossed a pixel border (where
    # the offset gradient jumps), and the float32 losses stay within about 1e-5 of the float64
    # reference's: far inside the budget above. The border offset gradient of autograd through the
    # reference forward (zero at -1, not torchvision's one-sided one) differs by 6e-4 at step 2 here.
    assert max(abs(a - b) / b for a, b in zip(deft, reference)) < 1e-4
    assert len(plain) == len(deft) and plain[0] != deft[0]  # plain has parameters of its own


def test_variants_share_parameters_and_every_3x3_conv_is_deformable(tools):
    train_bench = tools.train_bench
    variants = ["deft_tvm", "reference", "plain"]
    if train_bench.torchvision_deform_conv2d() is not None:
        variants.insert(1, "torchvision")
    networks = train_bench.build_variants(variants, WIDTH, seed=0)
    deft = networks["deft_tvm"].state_dict()
    for variant in variants[1:-1]:
        other = networks[variant].state_dict()
        assert list(other) == list(deft) and all(torch.equal(other[k], deft[k]) for k in deft)

    def layers(network):
        packs = [m for m in network.modules() if isinstance(m, deft_tvm.ModulatedDeformConv2dPack)]
        offset_convs = {id(p.conv_offset) for p in packs}
        plain_3x3 = [m for m in network.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                     and id(m) not in offset_convs]
        return packs, plain_3x3

    for variant in variants[:-1]:
        packs, plain_3x3 = layers(networks[variant])
        assert len(packs) == 9 and plain_3x3 == []
        assert {type(p) for p in packs} == {train_bench.DCN_CLASSES[variant]}
        assert [p.stride for p in packs].count((2, 2)) == 1
    packs, plain_3x3 = layers(networks["plain"])
    assert packs == [] and len(plain_3x3) == 9
    x = torch.rand(BATCH, 1, CANVAS, CANVAS)
    with torch.no_grad():
        assert networks["plain"](x).shape == networks["deft_tvm"](x).shape == (BATCH, 10)


def test_main_writes_the_csv_and_merges_by_key(tools, data, tmp_path, capsys):
    train_bench = tools.train_bench
    path = tmp_path / "train.csv"
    assert train_bench.main([*TINY, "--variants", "deft_tvm", "plain", "--check-reference", "--csv", str(path)],
                            data=data) == 0
    out = capsys.readouterr().out
    assert " | ".join(train_bench.COLUMNS[:-1]) in out
    assert "losses deft_tvm vs reference: max relative difference" in out and ": match" in out
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == train_bench.COLUMNS
        rows = list(reader)
    assert [r["variant"] for r in rows] == ["deft_tvm", "reference", "plain"]
    for row in rows:
        assert (row["device"], row["network"], row["dtype"], row["tf32"]) == (
            "cpu", f"resnet_{WIDTH}c_{CANVAS}x{CANVAS}_n{BATCH}", "float32", "n/a")
        assert (int(row["steps"]), int(row["warmup"])) == (STEPS, WARMUP)
        step_ms, p20, p80 = (float(row[c]) for c in ("step_ms", "step_p20_ms", "step_p80_ms"))
        assert 0 < p20 <= step_ms <= p80
        assert math.isnan(float(row["gpu_step_ms"])) and math.isnan(float(row["vs_torchvision"]))
        losses = _losses(row)
        assert len(losses) == WARMUP + STEPS and all(math.isfinite(v) for v in losses)
        assert float(row["first_loss"]) == pytest.approx(losses[0], abs=1e-6)
        assert float(row["last_loss"]) == pytest.approx(losses[-1], abs=1e-6)
    deft, _, plain = rows
    assert float(plain["vs_plain"]) == 1.0
    assert float(deft["vs_plain"]) == pytest.approx(float(deft["step_ms"]) / float(plain["step_ms"]), rel=1e-2)

    remeasured = {**deft, "step_ms": "123.0"}
    other_commit = {**plain, "commit": "other"}
    train_bench.write_csv(path, [remeasured, other_commit])
    with path.open(newline="") as f:
        merged = list(csv.DictReader(f))
    assert [(r["variant"], r["commit"]) for r in merged] == [
        ("reference", rows[0]["commit"]), ("plain", rows[0]["commit"]), ("deft_tvm", rows[0]["commit"]),
        ("plain", "other")]
    assert merged[2]["step_ms"] == "123.0"


def test_a_loss_mismatch_is_reported_and_fails_the_run(tools, data, monkeypatch, capsys):
    train_bench = tools.train_bench
    losses = {"deft_tvm": [2.30, 2.25, 2.20], "reference": [2.30, 2.25, 2.20 * 1.5], "plain": [2.4, 2.3, 2.2]}
    assert train_bench.check_losses(losses, "float32", False, 9) == ["reference"]
    assert "losses deft_tvm vs reference: max relative difference 0.333" in capsys.readouterr().out
    assert train_bench.check_losses({**losses, "reference": losses["deft_tvm"]}, "float32", False, 9) == []

    monkeypatch.setattr(train_bench, "run", lambda *args, **kwargs: ([], ["reference"]))
    assert train_bench.main([*TINY, "--variants", "deft_tvm", "--check-reference"], data=data) == 1


def test_loss_tolerance_follows_the_tolerance_table(tools):
    tolerance = tools.train_bench.loss_tolerance
    assert tolerance("float32", False, 9, 0) == pytest.approx(4 * 9 * (1e-5 + 1e-4))
    assert tolerance("float32", False, 9, 4) == pytest.approx(5 * tolerance("float32", False, 9, 0))
    assert tolerance("float32", True, 9, 0) == tolerance("tf32", False, 9, 0) > tolerance("float32", False, 9, 0)
    assert tolerance("float16", False, 9, 0) < tolerance("bfloat16", False, 9, 0)


def test_torchvision_variant_without_torchvision_is_a_clear_error(tools, data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torchvision.ops", None)
    train_bench = tools.train_bench
    with pytest.raises(SystemExit) as exit_info:
        train_bench.main([*TINY, "--variants", "deft_tvm", "torchvision"], data=data)
    assert exit_info.value.code == 2
    assert "--variants torchvision cannot run: torchvision does not import here: pip install torchvision" in \
        capsys.readouterr().err
    assert train_bench.select_variants(None, False, "float32") == ["deft_tvm", "plain"]  # left out by default
    assert train_bench.select_variants(None, True, "float32") == ["deft_tvm", "reference", "plain"]
    with pytest.raises(RuntimeError, match="needs torchvision"):
        train_bench.TorchvisionPack(4, 4, 3, padding=1)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "must be at least 1"),
    (["--warmup", "0"], "must be at least 1"),
    (["--dtype", "float64"], "invalid choice"),
    (["--variants", "reference"], "invalid choice"),
])
def test_argument_errors(tools, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tools.train_bench.parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_make_batches_are_seeded_augmented_draws(tools, data):
    make_batches = tools.train_bench.make_batches
    first, again = make_batches(*data, 3, BATCH, seed=5), make_batches(*data, 3, BATCH, seed=5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert [tuple(x.shape) for x, _ in first] == [(BATCH, 1, CANVAS, CANVAS)] * 3
    assert not torch.equal(first[0][0], first[1][0])
    with pytest.raises(ValueError, match="larger than the data set"):
        make_batches(*data, 1, 17, seed=0)


def test_digits_loader_without_scikit_learn_is_a_clear_error(tools, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        tools.digits_data.load_digits()
    with pytest.raises(SystemExit, match="pip install scikit-learn"):
        tools.train_bench.main(TINY)  # no injected data: the digits are loaded


def test_digits_are_centred_on_the_canvas(tools, monkeypatch):
    """The loader's geometry, on a stand-in for scikit-learn's data set (two all-ink 8x8 digits)."""
    fake = types.ModuleType("sklearn.datasets")
    fake.load_digits = lambda: types.SimpleNamespace(images=np.full((2, 8, 8), 16.0), target=np.array([3, 7]))
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    for canvas, size, before in ((32, 24, 4), (16, 12, 2), (33, 25, 4)):
        images, labels = tools.digits_data.load_digits(canvas)
        assert images.shape == (2, 1, canvas, canvas) and labels.tolist() == [3, 7]
        ink = images[0, 0] > 0.5
        rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
        assert (rows[0].item(), rows[-1].item() + 1) == (before, before + size) == (cols[0].item(), cols[-1].item() + 1)
        assert images.max().item() == pytest.approx(1.0)
    shifted = tools.digits_data.augment(images, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and not torch.equal(shifted, images)


def test_default_network_layers_are_registry_workloads(tools, monkeypatch):
    # The registry's train_* workloads are the default network's DCN layers, so tuning them tunes
    # the training benchmark; traced on the meta device through the op's fake kernel (no compile).
    from deft_tvm.frontend import ops
    from deft_tvm.tuning.workloads import BENCHMARK_WORKLOADS, get_workload

    seen = []
    original = ops.spec_from_tensors
    monkeypatch.setattr(ops, "spec_from_tensors", lambda *a: seen.append(original(*a)) or seen[-1])
    defaults = tools.train_bench.parse_args([])
    network = tools.train_bench.build_resnet(tools.train_bench.conv3x3_factory("deft_tvm"), defaults.width)
    with torch.no_grad():
        network.to("meta")(torch.empty(defaults.batch, 1, defaults.canvas, defaults.canvas, device="meta"))
    registry = {get_workload(n).spec: n for n in BENCHMARK_WORKLOADS if n.startswith("train_")}
    assert len(seen) == 9 and [registry.get(s) for s in seen] == [
        "train_stem_1to64_64x64_n32", *["train_64c_64x64_n32"] * 4, "train_down_64to128_n32",
        *["train_128c_32x32_n32"] * 3]
    assert set(registry.values()) == {n for n in BENCHMARK_WORKLOADS if n.startswith("train_")}
