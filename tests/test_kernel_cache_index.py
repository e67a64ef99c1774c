"""The disk cache's index: a new process finds a cached kernel without building its TIR or
schedule; a changed source, tuned record or missing or broken library file builds it again."""

from __future__ import annotations

import pytest
import torch

import deft_tvm
from deft_tvm.compute.spec import DeformConvSpec
from deft_tvm.reference.backward import deform_conv2d_reference_backward
from deft_tvm.reference.tolerances import assert_close, assert_close_to_largest
from deft_tvm.runtime import backward, kernel_cache

from helpers import grad_leaves, make_case

SPEC = DeformConvSpec(2, 3, 7, 6, 4, 3, 2, stride=(2, 1), padding=(1, 0), dilation=(1, 2), offset_groups=3)


@pytest.fixture(autouse=True)
def _new_process(isolated_cache):
    """No kernel in memory, the backward's included (``isolated_cache`` forgets the forward's)."""
    backward.clear_memory_cache()
    yield
    backward.clear_memory_cache()


def _train_and_check():
    """Forward and backward of ``SPEC`` against the float64 reference."""
    args = make_case(SPEC, seed=4)
    leaves = grad_leaves(args)
    with pytest.warns(kernel_cache.UntunedKernelWarning):  # the default schedule's, index hit or not
        out = deft_tvm.deform_conv2d(**{**args, **leaves})
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    in_float64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    assert_close(out, deft_tvm.deform_conv2d_reference(**args), SPEC.dtype)
    expected = deform_conv2d_reference_backward(grad_output.double(), **in_float64)._asdict()
    for name, grad in zip(leaves, grads):
        assert_close_to_largest(grad, expected[name].float(), SPEC.dtype)


def _count(monkeypatch, *names) -> dict[str, int]:
    """Counts the calls of ``kernel_cache``'s functions ``names`` (still called through)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(kernel_cache, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel_cache, name, counted)
    return counts


def test_a_new_process_loads_the_cached_kernels_without_building_them(isolated_cache, monkeypatch):
    _train_and_check()
    assert list(isolated_cache.rglob("index/*.json"))
    backward.clear_memory_cache()  # as a new process starts
    for name in ("schedule_for", "scripted", "compile_kernel"):
        monkeypatch.setattr(kernel_cache, name, lambda *a, _name=name: pytest.fail(f"{_name} was called"))
    _train_and_check()


def test_changed_source_builds_the_schedules_again_but_compiles_nothing(isolated_cache, monkeypatch):
    _train_and_check()
    backward.clear_memory_cache()
    monkeypatch.setattr(kernel_cache, "source_digest", lambda: "another source")
    counts = _count(monkeypatch, "schedule_for", "compile_kernel")
    _train_and_check()  # the same modules: their library files (named by structural hash) are found
    assert counts["schedule_for"] == 2 and counts["compile_kernel"] == 0, counts  # forward, gradients


def test_a_missing_library_file_is_compiled_again(isolated_cache, monkeypatch):
    _train_and_check()
    backward.clear_memory_cache()
    for path in isolated_cache.rglob("*.so"):
        path.unlink()
    counts = _count(monkeypatch, "compile_kernel")
    _train_and_check()
    assert counts["compile_kernel"] == 3, counts  # forward, gradients, scatter


def test_a_broken_library_file_is_rebuilt_with_a_warning(isolated_cache):
    _train_and_check()
    backward.clear_memory_cache()
    broken = sorted(isolated_cache.rglob("*.so"))[0]
    broken.write_bytes(b"not a shared library\x00" * 50)
    with pytest.warns(RuntimeWarning, match=r"could not be loaded .* rebuilding it"):
        _train_and_check()
    assert broken.stat().st_size > 1000


def test_a_tuned_records_identity_follows_its_files(tmp_path):
    assert kernel_cache.record_identity(None) == ""
    (tmp_path / "database_tuning_record.json").write_text("[1]\n")
    first = kernel_cache.record_identity(tmp_path)
    assert first and kernel_cache.record_identity(tmp_path) == first
    (tmp_path / "database_tuning_record.json").write_text("[1, 2]\n")
    assert kernel_cache.record_identity(tmp_path) != first
