"""``tools/ddp_train.py`` on the CPU: two ranks (torchrun, gloo) train the tiny DCN ResNet with frozen
batch norm; their losses are one process's on the global batch, and a rank that skipped the
gradient all-reduce would not match (the check can fail)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "ddp_train.py"
TINY = ["--steps", "2", "--warmup", "1", "--batch", "4", "--width", "4", "--canvas", "16", "--backend", "gloo"]


def torchrun(tmp_path: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFT_TVM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(TOOL), *TINY, *args], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)


def test_two_ranks_train_as_one_process_on_the_global_batch(tmp_path):
    run = torchrun(tmp_path, "--csv", str(tmp_path / "ddp.csv"), "--commit", "test")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "losses DDP (2 ranks) vs one process" in run.stdout and "match" in run.stdout
    (row,) = list(csv.DictReader(open(tmp_path / "ddp.csv")))
    assert (row["world"], row["backend"], row["device"], row["bn"], row["variant"]) == ("2", "gloo", "cpu", "frozen",
                                                                                         "deft_tvm")
    assert row["losses_match"] == "True" and len(row["ddp_losses"].split()) == 3
    assert float(row["ddp_step_ms"]) > 0 and float(row["single_step_ms"]) > 0


def test_ranks_that_do_not_share_gradients_do_not_match(tmp_path):
    """The same run with DDP's gradient all-reduce replaced by nothing (a no-op communication
    hook): each rank steps on its half batch's gradient alone, and the check says so."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(
        "import torch.nn.parallel as p\n"
        "_init = p.DistributedDataParallel.__init__\n"
        "def _no_allreduce(state, bucket):\n"
        "    import torch.futures\n"
        "    future = torch.futures.Future()\n"
        "    future.set_result(bucket.buffer())\n"
        "    return future\n"
        "def __init__(self, *a, **k):\n"
        "    _init(self, *a, **k)\n"
        "    self.register_comm_hook(None, _no_allreduce)\n"
        "p.DistributedDataParallel.__init__ = __init__\n")
    run = torchrun(tmp_path, "--steps", "3", env_extra={"PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert run.returncode != 0 and "MISMATCH" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_sync_batch_norm_on_the_cpu_is_refused_with_the_remedy(tmp_path):
    run = torchrun(tmp_path, "--bn", "sync")
    assert run.returncode != 0 and "--bn sync needs CUDA (SyncBatchNorm); pass --bn frozen on the CPU" in run.stderr


def test_a_global_batch_the_ranks_cannot_share_is_refused(tmp_path):
    run = torchrun(tmp_path, "--batch", "3")
    assert run.returncode != 0 and "--batch 3 must be a multiple of the 2 ranks" in run.stderr
