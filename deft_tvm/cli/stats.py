"""``deft-tvm stats``: record the offset statistics of a model's DCN layers, or show a saved profile
(``deft_tvm.tuning.stats``)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn

from deft_tvm.cli.errors import UsageError
from deft_tvm.tuning.stats import Profile, collect, compare, dcn_classes, describe, load_profile


def _load_model(reference: str) -> nn.Module:
    """``MODULE:CALLABLE`` -> the ``nn.Module`` that ``MODULE.CALLABLE()`` returns.

    Raises:
        UsageError: ``reference`` is not ``MODULE:CALLABLE``, MODULE cannot be found, it has no
            callable CALLABLE, or CALLABLE returns something other than an ``nn.Module``. Errors
            raised while MODULE imports or CALLABLE runs are theirs and propagate.
    """
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {reference}: expected MODULE:CALLABLE, e.g. --model my_models:build_model")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not f"{module_name}.".startswith(f"{err.name}."):  # not MODULE or a package of it
            raise  # MODULE was found but imports something missing: its traceback says where
        raise UsageError(
            f"--model {reference}: no module named {err.name!r}; check the name and put the folder that "
            f"holds it on PYTHONPATH (e.g. PYTHONPATH=. deft-tvm stats ...)"
        ) from err
    if not hasattr(module, attr):
        raise UsageError(f"--model {reference}: module {module_name} has no attribute {attr!r}; "
                         f"name a function or class of it that builds the model")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UsageError(f"--model {reference}: {module_name}.{attr} is not callable (type {type(factory).__name__}); "
                         f"name a function or class that builds the model")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {reference}: {reference}() returned {type(model).__name__}, "
                         f"expected a torch.nn.Module")
    return model


def _read_profile(path: Path) -> Profile:
    """``load_profile(path)`` for ``--show``; UsageError when the file is missing, unreadable or not a profile."""
    remedy = "pass a file that `deft-tvm stats --model ... --out PATH.json` wrote"
    try:
        return load_profile(path)
    except FileNotFoundError as err:
        raise UsageError(f"--show {path}: no such file; {remedy}") from err
    except OSError as err:
        raise UsageError(f"--show {path}: cannot read it ({err.strerror or err}); {remedy}") from err
    except ValueError as err:  # not UTF-8 JSON, or not load_profile's format and version
        raise UsageError(f"--show {path}: not an offset profile ({err}); {remedy}") from err


def _cmd_stats(args, parser: argparse.ArgumentParser) -> int:
    if args.show is not None:
        profile = _read_profile(args.show)
        print(describe(profile))
        print()
        print(compare(profile))
        return 0
    if args.input_shape is None or args.out is None:
        parser.error("--model needs --input-shape and --out")
    if min(args.input_shape) < 1:
        raise UsageError(f"--input-shape {' '.join(map(str, args.input_shape))}: expected four positive sizes N C H W")
    if args.batches < 1:
        raise UsageError(f"--batches {args.batches}: expected at least 1")
    model = _load_model(args.model).eval()
    if not any(isinstance(m, dcn_classes()) for m in model.modules()):
        raise UsageError(f"--model {args.model}: {type(model).__name__} has no deformable convolution layer "
                         f"(deft_tvm.DeformConv2d, its subclasses, or torchvision's); name a model that has one")
    gen = torch.Generator().manual_seed(args.seed)
    batches = (torch.randn(args.input_shape, generator=gen) for _ in range(args.batches))
    source = (f"deft-tvm stats --model {args.model} --input-shape {' '.join(map(str, args.input_shape))} "
              f"--batches {args.batches} --seed {args.seed} (standard normal inputs)")
    profile = collect(model, batches, seed=args.seed, source=source)
    try:
        path = profile.save(args.out)
    except OSError as err:
        raise UsageError(f"--out {args.out}: cannot write it ({err.strerror or err}); pass a writable PATH.json") from err
    print(f"saved    {path}")
    return 0


_CLI_DESCRIPTION = """\
deft-tvm stats --model MODULE:CALLABLE --input-shape N C H W [--batches K] [--seed S] --out PATH.json
  builds MODULE.CALLABLE() in eval mode on the CPU, runs it under torch.no_grad() on K seeded
  torch.randn batches of that shape and saves the offset statistics of its DCN layers.
deft-tvm stats --show PATH.json
  prints a per-layer summary of a saved profile and compares it with the synthetic profiles."""


def register_cli(subparsers) -> None:
    """Add the ``stats`` subcommand (see ``_CLI_DESCRIPTION``) to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("stats", help="record or show the offset statistics of a model's DCN layers",
                                   description=_CLI_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODULE:CALLABLE", help="a callable returning the model")
    source.add_argument("--show", type=Path, metavar="PATH.json", help="print a saved profile")
    parser.add_argument("--input-shape", type=int, nargs=4, metavar=("N", "C", "H", "W"))
    parser.add_argument("--batches", type=int, default=4, help="number of random batches (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, metavar="PATH.json", help="where to save the profile")
    parser.set_defaults(func=lambda args: _cmd_stats(args, parser))
