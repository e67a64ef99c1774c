"""Benchmark of the forward (and forward+backward): deft_tvm vs torchvision vs a dense conv2d of the
same shape, in one run.

    deft-tvm bench [--workloads NAME ... | --library MANIFEST] [--dtypes float32 float16 ...] [--tf32 off on]
                   [--modes forward forward_backward forward_backward_deterministic] [--iters 20]
                   [--generic-trials N [--generic-dir DIR]] [--commit SHA]
                   [--csv PATH.csv] [--markdown PATH.md] [--plot PATH.png]
    deft-tvm bench --from-csv PATH.csv [--markdown PATH.md] [--plot PATH.png]

(``python tools/bench.py`` takes the same arguments.)

Workloads: registry names (``deft-tvm list``), in every ``--dtypes`` and ``--tf32`` mode; or, with
``--library``, the layers a model's library was tuned for (``deft_tvm.tune_model``, ``deft-tvm tune
--model``; ``tuning.model.library_workloads``), the library loaded, each layer in its own dtype and
TF32 setting and measured on offsets drawn from its own recorded statistics.

Providers: ``deft_tvm`` (what users get: a loaded library's kernel, else the committed tuned record
when there is one, else the default schedule; the ``schedule`` column says which: library, tuned,
default), ``deft_tvm_kernel`` (where a tuned record
exists: the op's kernel, the record's, called directly on the kernel's tensors, so that its gap to
``deft_tvm`` is the op's own path, copies and host, and its gap to ``deft_tvm_default`` the
record's), ``deft_tvm_default`` (the default schedule called directly: always on a GPU, on a CPU
only where a tuned record exists, as the ablation), ``generic_ms`` (only
with ``--generic-trials N``: the best of N trials of MetaSchedule's generic space on the same TE
compute, measured on the same profile inputs; its database lives under ``--generic-dir``, never
under ``tuning_logs/``, so the package never uses it), and the baselines: on a GPU torchvision (if
importable; it has no bfloat16 kernel) and cuDNN's dense conv2d in NCHW and channels_last, on a
CPU the plain-torch float64 reference and torch's dense conv2d. Offsets come from each workload's
profile.

Modes: ``forward`` (under ``torch.no_grad``) and ``forward_backward``: one call is the forward plus
``torch.autograd.grad`` of every input (input, offset, mask, weight, bias; a dense conv2d has
gradients of its input, weight and bias only) for a fixed random grad_output, through each
provider's own autograd; ``forward_backward_deterministic`` the same under
``torch.use_deterministic_algorithms(True, warn_only=True)`` (deft_tvm's deterministic backward,
cuDNN's deterministic algorithms; torchvision has none and warns). The kernels called directly
(``deft_tvm_kernel``, ``deft_tvm_default``, ``generic_ms``) have no backward and are timed in forward mode only.

Timing on a GPU: ``gpu_ms`` is CUDA-event time per call over ``--iters`` back-to-back calls after a
warm-up (host overhead hides under it once kernels are long enough); ``cold_*_ms`` are the median,
20th and 80th percentiles of ``--iters`` single calls, each timed by its own event pair after a
buffer of twice the L2 size (at least 256 MiB) is overwritten, so no input is served from L2;
``latency_ms`` is the median host time of ``--iters`` single calls with a synchronize around each.
On a CPU only ``latency_ms`` is measured. ``vs_dense`` is a provider's time over the fastest dense
conv2d's and ``vs_torchvision`` torchvision's time over the provider's, in GPU time per call
(``gpu_ms``) on a GPU and in latency on a CPU.

Outputs: a table on stdout; ``--csv`` (rows keyed by device, workload, dtype, tf32, profile,
provider, mode and commit: rows of an existing file under other keys are kept, same-key rows
replaced; written after each workload, dtype and mode, so a run cut short keeps its rows),
``--markdown`` (one table per mode, one row per workload, dtype and TF32 mode) and ``--plot``
(deft_tvm's speedup over torchvision, needs matplotlib). ``--from-csv`` renders the markdown and
plot of a CSV measured elsewhere without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deft_tvm.compute.forward import deform_conv2d_primfunc
from deft_tvm.compute.spec import SUPPORTED_DTYPES
from deft_tvm.frontend.functional import deform_conv2d
from deft_tvm.reference.forward import deform_conv2d_reference
from deft_tvm.runtime import kernel_cache
from deft_tvm.runtime.kernel_cache import tf32_mode
from deft_tvm.runtime.records import best_schedule, database_dir, record_roots
from deft_tvm.runtime.targets import target_for_device
from deft_tvm.tuning.search import tune
from deft_tvm.tuning.timing import gpu_ms
from deft_tvm.tuning.workloads import DEFAULT_WORKLOAD, WORKLOADS, Workload, get_workload

COLUMNS = ["device", "workload", "dtype", "tf32", "profile", "provider", "schedule", "mode", "gpu_ms",
           "cold_median_ms", "cold_p20_ms", "cold_p80_ms", "latency_ms", "vs_dense", "vs_torchvision", "commit"]
KEY = ("device", "workload", "dtype", "tf32", "profile", "provider", "mode", "commit")
TIME_COLUMNS = ("gpu_ms", "cold_median_ms", "cold_p20_ms", "cold_p80_ms", "latency_ms")
# What markdown and plot read; CSVs of older benches lack the other columns.
RENDERED_COLUMNS = ("device", "workload", "dtype", "tf32", "profile", "provider", "gpu_ms", "latency_ms", "commit")
FORWARD, FORWARD_BACKWARD, DETERMINISTIC = "forward", "forward_backward", "forward_backward_deterministic"
MODES = (FORWARD, FORWARD_BACKWARD, DETERMINISTIC)
DENSE_PROVIDERS = ("cudnn_nchw", "cudnn_channels_last", "dense_conv2d")
PLOTTED_PROVIDERS = ("deft_tvm", "deft_tvm_default", "generic_ms")
FLUSH_MIN_BYTES = 256 * 2**20
DEFAULT_GENERIC_DIR = kernel_cache.cache_dir() / "generic"
NAN = float("nan")


def current_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- timing ---------------------------------------------------------------------------------------

def l2_flush_buffer() -> torch.Tensor:
    """A GPU buffer of twice the L2 size, at least 256 MiB: overwriting it evicts everything from L2."""
    l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return torch.empty(max(2 * l2_bytes, FLUSH_MIN_BYTES), dtype=torch.uint8, device="cuda")


def cold_gpu_ms(fn, iters: int, flush: torch.Tensor) -> list[float]:
    """GPU times (ms) of ``iters`` single calls of ``fn``, each after ``flush`` is zeroed (a cold L2),
    each timed by its own pair of CUDA events."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def latency_ms(fn, device: str, repeats: int = 20) -> float:
    """Median host time (ms) of single calls of ``fn`` with the device synchronized around each."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(fn, device: str, iters: int, flush: torch.Tensor | None) -> dict[str, float]:
    """The ``TIME_COLUMNS`` of one provider; GPU columns are NaN on a CPU."""
    if device != "cuda":
        return {**dict.fromkeys(TIME_COLUMNS, NAN), "latency_ms": latency_ms(fn, device, iters)}
    median, p20, p80 = np.percentile(cold_gpu_ms(fn, iters, flush), [50, 20, 80])
    return {"gpu_ms": gpu_ms(fn, iters), "cold_median_ms": float(median), "cold_p20_ms": float(p20),
            "cold_p80_ms": float(p80), "latency_ms": latency_ms(fn, device, iters)}


# --- providers ------------------------------------------------------------------------------------

def _generic_kernel(workload, target, trials: int, root: Path):
    """``(kernel, schedule label)`` of the best generic-MetaSchedule record of ``workload`` after
    topping its database under ``root`` up to ``trials`` records, or None if no trial succeeded."""
    spec = workload.spec
    directory = database_dir(root, spec, target)
    result = tune(spec, workload.profile, target, directory, trials, space="generic")
    _, sch = best_schedule(directory, target)
    if sch is None:
        print(f"generic_ms: no successful trial of {workload.name} {spec.dtype} in {result.trials} trials; "
              "row left out", file=sys.stderr)
        return None
    return kernel_cache.load_or_build(spec, target, sch), f"generic ({result.trials} trials)"


def deft_kernels(workload, device: str, tuned: bool, generic_trials: int, generic_dir: Path) -> dict:
    """Provider -> ``(kernel, schedule label)`` of the kernels called directly: the op's own kernel
    (where a tuned record exists: ``kernel_cache.get_kernel``, the one the op calls), the default
    schedule (on a GPU, or where a tuned record exists) and generic MetaSchedule's best (if asked for)."""
    from deft_tvm.schedules import default_schedule  # imported on use, as kernel_cache does: it is slow to import

    spec = workload.spec
    target = target_for_device(device)
    kernels = {}
    if tuned:
        from deft_tvm.schedules import unfused_forward

        label = "unfused, tuned GEMM by cuBLAS" if unfused_forward(spec, target) else "tuned"
        kernels["deft_tvm_kernel"] = (kernel_cache.forward_kernel(spec, torch.device(device)), label)
    if tuned or device == "cuda":
        sch = default_schedule(deform_conv2d_primfunc(spec), spec, target)
        kernels["deft_tvm_default"] = (kernel_cache.load_or_build(spec, target, sch), "default")
    if generic_trials > 0:
        generic = _generic_kernel(workload, target, generic_trials, generic_dir)
        if generic is not None:
            kernels["generic_ms"] = generic
    return kernels


def torchvision_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d as tv_deform_conv2d
    except ImportError:
        return None
    return tv_deform_conv2d


def channels_last_copies(inputs: dict) -> dict[str, torch.Tensor]:
    """``input`` and ``weight`` of ``inputs`` in channels_last memory format, as leaves of their own
    (needing gradients where the originals do)."""
    return {k: inputs[k].detach().contiguous(memory_format=torch.channels_last).requires_grad_(inputs[k].requires_grad)
            for k in ("input", "weight")}


def baselines(spec, inputs: dict, channels_last: dict, device: str) -> dict:
    """Provider -> callable of the non-deft_tvm providers on ``inputs`` (``channels_last``: their
    channels_last copies, see ``channels_last_copies``)."""
    dense = (inputs["input"], inputs["weight"], inputs["bias"], spec.stride, spec.padding, spec.dilation, spec.groups)
    if device != "cuda":
        return {"reference_float64": lambda: deform_conv2d_reference(**inputs),
                "dense_conv2d": lambda: F.conv2d(*dense)}
    providers = {}
    tv_deform_conv2d = torchvision_deform_conv2d()
    if tv_deform_conv2d is not None and spec.dtype != "bfloat16":  # torchvision has no bf16 kernel
        providers["torchvision"] = lambda: tv_deform_conv2d(**inputs)
    providers["cudnn_nchw"] = lambda: F.conv2d(*dense)
    providers["cudnn_channels_last"] = lambda: F.conv2d(channels_last["input"], channels_last["weight"], *dense[2:])
    return providers


def _forward_backward(forward, leaves: list[torch.Tensor], grad_output: torch.Tensor):
    """A call of ``forward`` and of the gradients of ``leaves`` (those it does not use get None)."""
    return lambda: torch.autograd.grad(forward(), leaves, grad_output, allow_unused=True)


def providers(workload, device: str, kernels: dict, mode: str = FORWARD) -> dict:
    """Provider -> callable, every provider on the same inputs of ``workload``; in ``forward_backward``
    mode each call also computes the gradients, and the directly called ``kernels`` are left out."""
    spec = workload.spec
    inputs = workload.make_inputs(device=device)
    backward = mode != FORWARD
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            value.requires_grad_(backward)
    channels_last = channels_last_copies(inputs)
    calls = {"deft_tvm": lambda: deform_conv2d(**inputs)}
    if not backward:
        args = workload.kernel_tensors(inputs)
        out = torch.empty(spec.output_shape, dtype=args[0].dtype, device=device)
        calls.update({name: functools.partial(kernel, *args, out) for name, (kernel, _) in kernels.items()})
    calls.update(baselines(spec, inputs, channels_last, device))
    if not backward:
        return calls
    leaves = [t for t in (*inputs.values(), *channels_last.values()) if isinstance(t, torch.Tensor)]
    gen = torch.Generator().manual_seed(1)
    grad_output = torch.randn(spec.output_shape, generator=gen).to(dtype=getattr(torch, spec.dtype), device=device)
    return {name: _forward_backward(fn, leaves, grad_output) for name, fn in calls.items()}


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """While active (``enabled``), ``torch.use_deterministic_algorithms(True, warn_only=True)``: every
    provider takes its deterministic algorithms, one without any (torchvision's backward) warns and
    runs as it is."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


# --- rows -----------------------------------------------------------------------------------------

def headline_ms(row: dict) -> float:
    """The time a row is compared by: GPU time per call where measured, else host latency."""
    gpu = float(row["gpu_ms"])
    return gpu if math.isfinite(gpu) else float(row["latency_ms"])


def _best(rows: list[dict], names) -> float:
    times = [headline_ms(r) for r in rows if r["provider"] in names]
    return min(times) if times else NAN


def add_ratios(rows: list[dict]) -> list[dict]:
    """Fill ``vs_dense`` and ``vs_torchvision`` of the rows of one workload, dtype and TF32 mode."""
    dense, torchvision = _best(rows, DENSE_PROVIDERS), _best(rows, ("torchvision",))
    for row in rows:
        own = headline_ms(row)
        row["vs_dense"] = round(own / dense, 2)
        row["vs_torchvision"] = round(torchvision / own, 2)
    return rows


def _tf32_modes(dtype: str, device: str, modes) -> list[str]:
    return list(modes) if dtype == "float32" and device == "cuda" else ["n/a"]


def print_row(row: dict) -> None:
    print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)


def _cases(workloads, dtypes, tf32_modes, device: str) -> dict[tuple[str, str, str], Workload]:
    """(name, dtype, TF32 mode) -> the workload the op calls in that case: a registry name in each of
    ``dtypes`` and ``tf32_modes`` (float32 with TF32 on takes the TF32 kernels), a ``Workload`` (a
    model's layer, ``--library``) in its own dtype and TF32 setting."""
    cases = {}
    for workload in workloads:
        if isinstance(workload, Workload):
            spec = workload.spec
            tf32 = _tf32_modes(spec.dtype, device, ["on" if spec.tf32 else "off"])[0]
            cases[(workload.name, spec.dtype, tf32)] = workload
            continue
        for dtype in dtypes:
            for tf32 in _tf32_modes(dtype, device, tf32_modes):
                cases[(workload, dtype, tf32)] = get_workload(workload, dtype, tf32 == "on")
    return cases


def run(workloads, dtypes, tf32_modes, iters: int, device: str, commit: str, *, modes=(FORWARD,),
        generic_trials: int = 0, generic_dir: Path = DEFAULT_GENERIC_DIR, csv_path: Path | None = None) -> list[dict]:
    """Time every provider on every workload (registry names, or ``Workload`` objects: ``_cases``), dtype,
    TF32 mode and mode (``MODES``); one row
    (``COLUMNS``) each, merged into ``csv_path`` (``write_csv``) group by group as measured, so
    that a run cut short keeps what it measured."""
    target = target_for_device(device)
    call_workloads = _cases(workloads, dtypes, tf32_modes, device)
    case_workloads = {case: workload.for_target(target) for case, workload in call_workloads.items()}
    kernel_cache.prebuild(list(dict.fromkeys(w.spec for w in case_workloads.values())), torch.device(device))
    backward_modes = [mode for mode in modes if mode != FORWARD]
    if backward_modes:  # the backward kernels too, as the op's backward takes them (TF32 ones where on)
        from deft_tvm.runtime import backward

        backward_specs = list(dict.fromkeys(w.spec for w in call_workloads.values()))
        for deterministic in dict.fromkeys(mode == DETERMINISTIC for mode in backward_modes):
            backward.prebuild(backward_specs, torch.device(device), deterministic=deterministic)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    flush = l2_flush_buffer() if device == "cuda" else None
    rows = []
    for (name, dtype, tf32), workload in case_workloads.items():
        tuned = kernel_cache.schedule_for(workload.spec, target)[1]
        kernels = deft_kernels(workload, device, tuned, generic_trials, generic_dir)
        served = kernel_cache.library_kernel(workload.spec, target)[0] is not None  # a loaded library's kernel
        schedules = {"deft_tvm": "library" if served else "tuned" if tuned else "default",
                     **{k: v[1] for k, v in kernels.items()}}
        for mode in modes:
            group = []
            with tf32_mode(tf32), torch.set_grad_enabled(mode != FORWARD), deterministic_mode(mode == DETERMINISTIC):
                for provider, fn in providers(workload, device, kernels, mode).items():
                    group.append(dict(device=device_name, workload=name, dtype=dtype, tf32=tf32,
                                      profile=workload.profile, provider=provider,
                                      schedule=schedules.get(provider, ""), mode=mode,
                                      **{k: round(v, 4) for k, v in measure(fn, device, iters, flush).items()},
                                      commit=commit))
            for row in add_ratios(group):
                print_row(row)
            if csv_path is not None:
                write_csv(csv_path, group)
            rows += group
    return rows


# --- CSV ------------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict]:
    """The rows of a bench CSV, with the columns older benches lacked filled (``mode`` forward, NaN times)."""
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RENDERED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not a bench CSV: it lacks the columns {', '.join(missing)}")
        defaults = {**dict.fromkeys(COLUMNS, ""), **dict.fromkeys(TIME_COLUMNS, "nan"), "mode": FORWARD}
        return [{c: row.get(c) or defaults[c] for c in COLUMNS} for row in reader]


def merge_csv(path: Path, rows: list[dict], columns, key, read) -> None:
    """Write ``rows`` (dicts with ``columns``) to ``path``, keeping the rows already there (as
    ``read(path)`` returns them) whose values of the ``key`` columns no new row has."""
    path = Path(path)

    def row_key(row):
        return tuple(str(row[c]) for c in key)

    new_keys = {row_key(r) for r in rows}
    kept = [r for r in read(path) if row_key(r) not in new_keys] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept + rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path``, keeping the rows already there whose key (``KEY``) no new row has."""
    merge_csv(path, rows, COLUMNS, KEY, read_csv)


# --- markdown and plot ----------------------------------------------------------------------------

def _groups(rows: list[dict], columns) -> dict[tuple, list[dict]]:
    """Rows grouped by the values of ``columns``, groups in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[c] for c in columns), []).append(row)
    return groups


def summary(rows: list[dict]) -> dict[str, float]:
    """deft_tvm, torchvision and best dense times of one workload, dtype, TF32 mode and mode, and the ratios."""
    deft, torchvision, dense = _best(rows, ("deft_tvm",)), _best(rows, ("torchvision",)), _best(rows, DENSE_PROVIDERS)
    return {"deft_tvm": deft, "torchvision": torchvision, "dense": dense,
            "speedup_vs_torchvision": torchvision / deft, "slowdown_vs_dense": deft / dense}


def _ms(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "—"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "—"


MODE_TITLES = {FORWARD: "forward", FORWARD_BACKWARD: "forward+backward",
               DETERMINISTIC: "forward+backward, deterministic algorithms"}


def _markdown_section(key: tuple, rows: list[dict]) -> list[str]:
    device, commit, profile, mode = key
    on_gpu = any(math.isfinite(float(r["gpu_ms"])) for r in rows)
    dense = "cuDNN best" if on_gpu else "dense conv2d"
    metric = "GPU time per call (CUDA events, back-to-back calls)" if on_gpu else "host latency per call"
    lines = [f"{device}, commit {commit}, offset profile {profile}: {MODE_TITLES[mode]} {metric}", "",
             f"| workload | dtype | TF32 | deft_tvm ms | torchvision ms | {dense} ms | "
             f"deft speedup over torchvision | deft slowdown vs {dense} |",
             "|---|---|---|---|---|---|---|---|"]
    for (workload, dtype, tf32), group in _groups(rows, ("workload", "dtype", "tf32")).items():
        s = summary(group)
        lines.append(f"| {workload} | {dtype} | {tf32} | {_ms(s['deft_tvm'])} | {_ms(s['torchvision'])} | "
                     f"{_ms(s['dense'])} | {_ratio(s['speedup_vs_torchvision'])} | {_ratio(s['slowdown_vs_dense'])} |")
    return lines


def markdown(rows: list[dict]) -> str:
    """Markdown tables of ``rows``: one per device, commit, offset profile and mode, one line per
    workload, dtype and TF32 mode."""
    sections = [_markdown_section(key, group)
                for key, group in _groups(rows, ("device", "commit", "profile", "mode")).items()]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def _figure_class():
    """matplotlib's ``Figure`` (imported only when a plot is asked for)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the package's [plot] extra)") from err
    return Figure


def speedups(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Bar labels (workload, dtype, TF32, mode other than forward) and, per plotted provider present,
    its speedup over torchvision."""
    groups = {k: g for k, g in _groups(rows, ("device", "workload", "dtype", "tf32", "mode")).items()
              if any(r["provider"] == "torchvision" for r in g)}
    if not groups:
        raise ValueError("no torchvision rows to compare with (torchvision is measured on GPUs only)")
    present = [p for p in PLOTTED_PROVIDERS if any(r["provider"] == p for g in groups.values() for r in g)]
    labels = [f"{w}\n{d}" + (f" TF32 {t}" if t != "n/a" else "") + (f"\n{MODE_TITLES[m]}" if m != FORWARD else "")
              for _, w, d, t, m in groups]
    bars = {p: [_best(g, ("torchvision",)) / _best(g, (p,)) for g in groups.values()] for p in present}
    return labels, bars


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of deft_tvm's (and deft_tvm_default's, generic_ms's) speedup over torchvision."""
    labels, bars = speedups(rows)
    figure = _figure_class()(figsize=(max(6.0, 1.2 * len(labels) * len(bars)), 4.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(bars)
    for i, (provider, values) in enumerate(bars.items()):
        ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in range(len(labels))], values, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylim(0, 1.2 * max([1.0, *(v for values in bars.values() for v in values if math.isfinite(v))]))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("speedup over torchvision (x)")
    devices = sorted({r["device"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    modes = ", ".join(MODE_TITLES[m] for m in dict.fromkeys(r["mode"] for r in rows))
    ax.set_title(f"{', '.join(devices)}, commit {', '.join(commits)}: {modes} GPU time per call", fontsize=10)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# --- command line ---------------------------------------------------------------------------------

def int_at_least(minimum: int):
    """An argparse ``type``: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``deft-tvm bench`` and ``tools/bench.py``."""
    parser.add_argument("--workloads", nargs="+", default=[DEFAULT_WORKLOAD], choices=list(WORKLOADS))
    parser.add_argument("--library", type=Path, default=None, metavar="MANIFEST",
                        help="instead of --workloads: the layers of a model's library (deft_tvm.tune_model, "
                        "`deft-tvm tune --model`), loaded, in their own dtype and TF32 setting")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=SUPPORTED_DTYPES)
    parser.add_argument("--tf32", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="TF32 modes of float32 rows on a GPU (default: off on)")
    parser.add_argument("--modes", nargs="+", default=[FORWARD], choices=MODES,
                        help="forward, forward_backward and/or forward_backward_deterministic (default: forward)")
    parser.add_argument("--iters", type=int_at_least(1), default=20, help="calls timed per measurement (default 20)")
    parser.add_argument("--generic-trials", type=int_at_least(0), default=0,
                        help="also tune and time generic MetaSchedule with this many trials (default 0: not)")
    parser.add_argument("--generic-dir", type=Path, default=DEFAULT_GENERIC_DIR,
                        help=f"root of the generic databases, outside tuning_logs/ (default {DEFAULT_GENERIC_DIR})")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--csv", type=Path, default=None, help="write (merge) the rows into this CSV file")
    parser.add_argument("--markdown", type=Path, default=None, help="write a markdown summary table here")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here; needs matplotlib")
    parser.add_argument("--from-csv", type=Path, default=None,
                        help="render --markdown/--plot from this CSV instead of running the benchmark")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def check_arguments(args, parser: argparse.ArgumentParser) -> list:
    """Reject combinations argparse cannot (exits through ``parser.error``); the workloads to run:
    ``--workloads``' names, or the ``Workload``s of ``--library``'s manifest."""
    workloads = args.workloads
    if args.library is not None:
        try:
            from deft_tvm.tuning.model import library_workloads

            workloads = library_workloads(args.library)
        except (OSError, ValueError) as err:
            parser.error(f"--library {args.library}: {err}")
    if args.from_csv is not None:
        if not args.from_csv.is_file():
            parser.error(f"--from-csv: no such file: {args.from_csv}")
        if args.csv is not None:
            parser.error("--from-csv runs nothing, so there are no new rows for --csv")
        if args.markdown is None and args.plot is None:
            parser.error("--from-csv needs --markdown and/or --plot")
    if args.generic_trials and any(_inside(args.generic_dir, root) for root in (*record_roots(), Path("tuning_logs"))):
        parser.error(f"--generic-dir {args.generic_dir} is inside a tuning directory whose records the package uses "
                     f"({', '.join(str(r) for r in record_roots())} or tuning_logs/); pick a folder outside them")
    if args.plot is not None:
        try:
            _figure_class()
        except RuntimeError as err:
            parser.error(str(err))
    return workloads


def run_command(args, parser: argparse.ArgumentParser) -> int:
    """Run (or, with ``--from-csv``, read) the benchmark and write the outputs asked for."""
    workloads = check_arguments(args, parser)
    if args.from_csv is not None:
        rows = read_csv(args.from_csv)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"torch {torch.__version__}; vs_dense = own time / fastest dense conv2d of the same shape, "
              f"vs_torchvision = torchvision time / own time ({'GPU time' if device == 'cuda' else 'latency'})")
        print(" | ".join(COLUMNS))
        if args.library is not None:
            from deft_tvm.runtime.library import load_library

            load_library(args.library)
        rows = run(workloads, args.dtypes, args.tf32, args.iters, device, args.commit or current_commit(),
                   modes=args.modes, generic_trials=args.generic_trials, generic_dir=args.generic_dir,
                   csv_path=args.csv)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows))
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


def register_cli(subparsers) -> None:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("bench", help="time deft_tvm against torchvision and cuDNN (forward, forward+backward)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run_command(args, parser))


def main(argv=None) -> int:
    """``deft-tvm bench`` as a function (``tools/bench.py`` calls it)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(args, parser)
