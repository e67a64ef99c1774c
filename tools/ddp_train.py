"""Multi-GPU training: DistributedDataParallel of train_bench's DCN ResNet, checked against one process.

    torchrun --nproc-per-node 2 tools/ddp_train.py [--steps 20] [--warmup 3] [--batch 32] [--width 64]
                                                   [--canvas 64] [--dtype float32|float16|bfloat16]
                                                   [--tf32 off|on] [--variant deft_tvm|torchvision|plain]
                                                   [--bn sync|frozen] [--backend nccl|gloo]
                                                   [--csv PATH] [--seed 0] [--commit SHA]

Every rank (one per GPU, ``LOCAL_RANK``'s; the CPU with ``--backend gloo`` where there is none)
builds ``train_bench.build_resnet`` with ``--variant``'s 3x3 layers from one seed, wraps it in
``torch.nn.parallel.DistributedDataParallel`` and trains it with train_bench's SGD on the same
seeded global batches of ``--batch`` digits (the 360 real held-out digits that ship with the package,
``deft_tvm.examples.digits``, augmented, on a ``--canvas`` square), each rank on its
``--batch / world`` slice. Batch norm: ``sync`` (default; ``SyncBatchNorm``, statistics over the
global batch; CUDA only) or ``frozen`` (eval mode, running statistics, as detection backbones are
fine-tuned; the only choice on the CPU). Either way the model sees what one process training on
the global batch sees, so rank 0 then trains the same model without DDP on the whole global batches
(on its device) and compares the losses step by step (``ddp_tolerance``); the exit status is 1
where they differ.

Prints, and with ``--csv`` merges into a CSV by key, one row: world size, backend, device, variant,
dtype, TF32, batch norm, global batch, ``ddp_step_ms`` (median host time of the steps after
``--warmup``, all ranks synchronized around each step: the slowest rank's) and ``single_step_ms``
(the one-process run of the same global batch), their ratio ``speedup``, both loss sequences'
largest relative difference and whether they match, and the commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import (  # noqa: E402
    DTYPES,
    build_variants,
    compare_losses,
    dcn_layer_count,
    make_batches,
    read_rows,
    tf32_label,
    train,
)

from deft_tvm.bench import current_commit, int_at_least, merge_csv, tf32_mode  # noqa: E402
from deft_tvm.examples import digits  # noqa: E402
from deft_tvm.reference.tolerances import TOLERANCES, tolerance_key  # noqa: E402

COLUMNS = ["world", "backend", "device", "variant", "dtype", "tf32", "bn", "batch", "width", "canvas", "steps",
           "warmup", "ddp_step_ms", "single_step_ms", "speedup", "max_loss_difference", "losses_match",
           "ddp_losses", "single_losses", "commit"]
KEY = ("world", "backend", "device", "variant", "dtype", "tf32", "bn", "batch", "commit")


def prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, sync_bn: bool) -> nn.Module:
    """``model`` on ``device`` in ``dtype``, its batch norms ``SyncBatchNorm`` with ``sync_bn`` (the
    DDP model under ``--bn sync``; the one-process model keeps plain ones, which see the whole
    batch)."""
    model = model.to(device, dtype)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


def ddp_tolerance(dtype: str, tf32: bool, layers: int, step: int) -> float:
    """Largest relative difference allowed between the DDP run's loss and the one process's at
    ``step`` (from 0): ``rtol * layers * (step + 1)``, ``rtol`` the tolerance table's for the kernels.

    Both runs take the same kernels on the same samples, and with frozen or synchronized batch norm
    each sample's forward is the same computation; what differs is the order in which gradient sums
    are added (over each rank's half, then across ranks by the all-reduce) and batch norm's sums:
    a rounding of the order of ``rtol`` in each of the ``layers`` layers' gradients, which moves the
    parameters of each step by that relative amount, so the budget grows with the step. Ranks that
    did not share their gradients step on half the batch each and leave it at once (on the CPU test
    network 2e-3 after 3 steps against 4e-4 allowed; measured 1e-7 with the all-reduce)."""
    return TOLERANCES[tolerance_key(dtype, tf32)]["rtol"] * layers * (step + 1)


def conv3x3_count(model: nn.Module) -> int:
    """The 3x3 layers (DCN or plain) of a ``build_resnet`` network: the loss tolerance's layers."""
    plain = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    return dcn_layer_count(model) or plain


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int_at_least(1), default=20)
    parser.add_argument("--warmup", type=int_at_least(1), default=3, help="untimed steps first (kernels compile)")
    parser.add_argument("--batch", type=int_at_least(1), default=32, help="global batch, split over the ranks")
    parser.add_argument("--width", type=int_at_least(1), default=64)
    parser.add_argument("--canvas", type=int_at_least(8), default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--tf32", choices=("off", "on"), default="off")
    parser.add_argument("--variant", choices=("deft_tvm", "torchvision", "plain"), default="deft_tvm")
    parser.add_argument("--bn", choices=("sync", "frozen"), default=None,
                        help="batch norm: sync (default on CUDA) or frozen (eval mode; the CPU's only choice)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="default nccl where there is a GPU, else gloo (on the CPU)")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        sys.exit("tools/ddp_train.py: start it with torchrun (torchrun --nproc-per-node GPUS tools/ddp_train.py ...)")
    cuda = torch.cuda.is_available() and args.backend != "gloo"
    backend = args.backend or ("nccl" if cuda else "gloo")
    bn = args.bn or ("sync" if cuda else "frozen")
    if bn == "sync" and not cuda:
        sys.exit("tools/ddp_train.py: --bn sync needs CUDA (SyncBatchNorm); pass --bn frozen on the CPU")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.batch % world:
            raise SystemExit(f"tools/ddp_train.py: --batch {args.batch} must be a multiple of the {world} ranks")
        dtype = getattr(torch, args.dtype)
        images, labels = digits.held_out_digits()
        batches = [(x.to(device, dtype), y.to(device)) for x, y in make_batches(
            digits.to_canvas(images, args.canvas), labels, args.warmup + args.steps, args.batch, args.seed)]
        share = args.batch // world
        local = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]) for x, y in batches]
        tf32 = tf32_label(args.dtype, args.tf32 == "on", device)
        model = prepare(build_variants([args.variant], args.width, args.seed)[args.variant], device, dtype, bn == "sync")
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        with tf32_mode(tf32):
            run = train(ddp, local, args.warmup, device, frozen_bn=bn == "frozen", barrier=dist.barrier)
            ddp_losses = torch.tensor(run["losses"], dtype=torch.float64, device=device)
            dist.all_reduce(ddp_losses)  # each rank's mean loss over its slice -> the global batch's
            ddp_losses, ddp_ms = (ddp_losses / world).tolist(), run["host_ms"]
            if rank == 0:  # the same model, one process, the whole global batches
                single = prepare(build_variants([args.variant], args.width, args.seed)[args.variant], device, dtype, False)
                run = train(single, batches, args.warmup, device, frozen_bn=bn == "frozen")
                single_losses, single_ms = run["losses"], run["host_ms"]
        dist.barrier()
        if rank != 0:
            return 0
        layers = conv3x3_count(model)
        worst, match = compare_losses(ddp_losses, single_losses,
                                      lambda step: ddp_tolerance(args.dtype, tf32 == "on", layers, step))
        ddp_step, single_step = statistics.median(ddp_ms), statistics.median(single_ms)
        row = dict(world=world, backend=backend,
                   device=torch.cuda.get_device_name(device) if cuda else "cpu", variant=args.variant,
                   dtype=args.dtype, tf32=tf32, bn=bn, batch=args.batch, width=args.width, canvas=args.canvas,
                   steps=args.steps, warmup=args.warmup, ddp_step_ms=round(ddp_step, 3),
                   single_step_ms=round(single_step, 3), speedup=round(single_step / ddp_step, 3),
                   max_loss_difference=f"{worst:.3g}", losses_match=match,
                   ddp_losses=" ".join(f"{v:.8g}" for v in ddp_losses),
                   single_losses=" ".join(f"{v:.8g}" for v in single_losses), commit=args.commit or current_commit())
        print(" | ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_losses")))
        print(f"losses DDP ({world} ranks) vs one process: max relative difference {worst:.3g} over "
              f"{len(ddp_losses)} steps (tolerance {ddp_tolerance(args.dtype, tf32 == 'on', layers, 0):.3g} "
              f"x (step + 1)): " + ("match" if match else "MISMATCH"))
        if args.csv is not None:
            merge_csv(args.csv, [row], COLUMNS, KEY, read_rows)
        return 0 if match else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
