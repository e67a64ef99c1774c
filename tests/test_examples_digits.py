"""``deft_tvm.examples.digits``, the README's main job: the shipped weights are a trained network,
the shipped held-out digits are real data, and the shipped profile is what they give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deft_tvm.examples import digits
from deft_tvm.reference.tolerances import TOLERANCES, assert_close
from deft_tvm.tuning import stats

PROFILE = Path(__file__).resolve().parent.parent / "tuning_logs" / "profiles" / "digits_dcn.json"


@pytest.fixture(scope="module")
def network():
    return digits.network()


def test_held_out_batches_are_the_shipped_digits_augmented_on_the_canvas():
    images, labels = digits.held_out_digits()
    assert images.dtype == torch.uint8 and images.shape == (360, 8, 8) and images.max().item() == 16
    assert labels.dtype == torch.int64 and sorted(set(labels.tolist())) == list(range(10))
    batches = digits.held_out()
    assert [tuple(b.shape) for b in batches] == [(120, 1, 32, 32)] * 3
    assert all(b.dtype == torch.float32 and b.min() >= 0 and b.max() <= 1 for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, digits.held_out()))  # seeded
    assert not torch.equal(batches[0], digits.held_out(seed=1)[0])


def test_the_shipped_network_classifies_the_held_out_digits(network):
    """Through deft_tvm's op (CPU kernels): a trained network, not initial weights (10 %)."""
    images, labels = digits.held_out_digits()
    with torch.no_grad():
        clean = torch.cat([network(b).argmax(1) for b in digits.to_canvas(images).split(digits.EVAL_BATCH)])
        augmented = torch.cat([network(b).argmax(1) for b in digits.held_out()])
    assert (clean == labels).float().mean().item() >= 0.97
    assert (augmented == labels).float().mean().item() >= 0.97


def test_the_shipped_profile_is_the_shipped_network_on_the_held_out_batches(network):
    """Statistics within the float32 tolerance; counts of samples (histogram bins, samples within a
    halo) within the float32 rtol times the layer's samples: a float32 rounding of an offset on
    another CPU (the kernels are compiled for the host's vector units) moves a sample across a bin's
    edge (on an AMD EPYC one of 829440 samples moved, failing a relative 1e-5 on its bin's count)."""
    shipped = json.loads(PROFILE.read_text())
    recorded = json.loads(json.dumps(stats.collect(network, digits.held_out(), seed=0).to_json()))
    assert recorded["layers"].keys() == shipped["layers"].keys() == {"4", "8"}

    def numbers(tree, kind):
        if isinstance(tree, dict):
            return [x for key in sorted(tree) for x in numbers(tree[key], kind)]
        if isinstance(tree, list):
            return [x for item in tree for x in numbers(item, kind)]
        return [float(tree)] if isinstance(tree, kind) and not isinstance(tree, bool) else []

    for name, layer in recorded["layers"].items():
        expected = shipped["layers"][name]
        assert layer["spec"] == expected["spec"] and layer["samples"] == expected["samples"]
        assert_close(torch.tensor(numbers(layer, float)), torch.tensor(numbers(expected, float), dtype=torch.float64),
                     "float32")
        moved = TOLERANCES["float32"]["rtol"] * expected["samples"]
        torch.testing.assert_close(torch.tensor(numbers(layer, int)), torch.tensor(numbers(expected, int)),
                                   rtol=0, atol=moved)
