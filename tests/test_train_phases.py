"""``tools/train_phases.py`` on the CPU: per-phase host times of a tiny DCN ResNet and plain convs
trained on injected synthetic images (no scikit-learn needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.fixture(scope="module")
def train_phases():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TOOLS))
        import train_phases

        yield train_phases


@pytest.fixture(scope="module")
def rows(train_phases):
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(16, 1, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    return train_phases.run(images, labels, variants=["deft_tvm", "plain"], steps=2, warmup=1, batch=4, width=4,
                            dtype="float32", tf32=False, device=torch.device("cpu"), seed=0)


def test_one_row_per_variant_with_every_column(train_phases, rows):
    assert [r["variant"] for r in rows] == ["deft_tvm", "plain"]
    assert all(set(r) == set(train_phases.COLUMNS) for r in rows)


def test_host_phases_are_positive_and_within_the_step(train_phases, rows):
    for row in rows:
        host = [row[f"{p}_host_ms"] for p in train_phases.PHASES]
        assert all(t > 0 for t in host)
        assert sum(host) <= row["step_ms"]


def test_gpu_columns_are_nan_on_the_cpu(train_phases, rows):
    assert all(math.isnan(r[f"{p}_gpu_ms"]) for r in rows for p in train_phases.PHASES)


def test_a_negative_kernel_count_is_refused(train_phases, capsys):
    with pytest.raises(SystemExit):
        train_phases.main(["--kernels", "-1"])
    assert "-1" in capsys.readouterr().err
