"""``deft_tvm.layer_specs`` / ``build_model`` and ``deft-tvm build --model``: a model's deformable
convolutions traced on the meta device, their kernels built ahead in parallel, so that the model's
first calls compile nothing."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import deft_tvm
from deft_tvm import cli
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.runtime import backward, kernel_cache


def small_dcn_net() -> nn.Module:
    """Two DCNv2 layers (one strided, two offset groups) around a plain conv, and a third with the
    first one's configuration at another size."""
    torch.manual_seed(0)
    return nn.Sequential(
        deft_tvm.ModulatedDeformConv2dPack(3, 8, 3, padding=1),
        nn.ReLU(),
        deft_tvm.ModulatedDeformConv2dPack(8, 8, 3, stride=2, padding=1, offset_groups=2),
        nn.Conv2d(8, 3, 1),
        deft_tvm.ModulatedDeformConv2dPack(3, 8, 3, padding=1),
    )


EXPECTED = [
    DeformConvSpec(2, 3, 20, 24, 8, 3, 3, padding=(1, 1)),
    DeformConvSpec(2, 8, 20, 24, 8, 3, 3, stride=(2, 2), padding=(1, 1), offset_groups=2),
    DeformConvSpec(2, 3, 10, 12, 8, 3, 3, padding=(1, 1)),
]


def test_layer_specs_traces_the_calls_on_the_meta_device(monkeypatch):
    monkeypatch.setattr(kernel_cache, "forward_call", lambda *a: pytest.fail("a kernel was looked up"))
    net = small_dcn_net()
    assert deft_tvm.layer_specs(net, torch.randn(2, 3, 20, 24)) == EXPECTED
    assert all(p.device.type == "cpu" for p in net.parameters())  # the model itself is untouched


@pytest.fixture
def fresh_backward(isolated_cache, monkeypatch):
    monkeypatch.setattr(backward, "_kernels", {})
    return isolated_cache


def test_built_kernels_serve_the_models_calls_with_no_compile(fresh_backward, monkeypatch):
    net = small_dcn_net()
    built = deft_tvm.build_model(net, torch.empty(2, 3, 20, 24), device="cpu", progress=False)
    assert built.specs == EXPECTED
    # On the CPU the first and the last call share a configuration: 2 forward kernels, 2 x (gradients, scatter).
    assert built.forward_kernels == 2 and built.backward_kernels == 4
    assert deft_tvm.build_model(net, torch.empty(2, 3, 20, 24), device="cpu", progress=False)[1:] == (0, 0)
    compiled = []
    for module in (kernel_cache, backward):
        monkeypatch.setattr(module, "compile_kernel", lambda *args: compiled.append(args))
    for shape in ((2, 3, 20, 24), (1, 3, 33, 17)):  # on the CPU the configurations' kernels serve any size
        x = torch.randn(shape, requires_grad=True)
        net(x).square().sum().backward()
        assert torch.isfinite(x.grad).all()
    assert compiled == []


def test_the_command_builds_a_models_kernels(fresh_backward, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(textwrap.dedent('''
        from test_build_model import small_dcn_net

        def build():
            return small_dcn_net()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["build", "--model", "my_models:build", "--input-shape", "2", "3", "20", "24",
                     "--device", "cpu", "--no-backward"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("layer")] == [s.key() for s in EXPECTED]
    assert "built    2 forward and 0 backward kernels for 3 layer calls on cpu" in out


@pytest.mark.parametrize(("model", "match"), [
    ("my_models", r"--model my_models: expected MODULE:CALLABLE"),
    ("no_such_module_here:build", r"cannot import no_such_module_here .*is it on PYTHONPATH\?"),
    ("torch:no_such_factory", r"torch has no callable no_such_factory"),
    ("math:pi", r"math has no callable pi"),
    ("os:getcwd", r"getcwd\(\) returned a str, expected a torch.nn.Module"),
])
def test_bad_models_get_one_line(model, match, capsys):
    assert cli.main(["build", "--model", model, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(match, err), err
