"""MetaSchedule tuning of one workload on the DefT design space, measured on realistic inputs.

* The design space is ``deft_tvm.schedules.design_space`` (``ScheduleFn``): the fused DefT
  schedule whose tile sizes are ``sample_perfect_tile`` instructions, so the XGBoost cost model and
  the evolutionary search tune them; ``VerifyGPUCode`` drops tiles that overflow the GPU's limits.
  ``space="generic"`` tunes MetaSchedule's own default space instead (``post-order-apply`` with
  the target's default rules, postprocessors and mutators), as the baseline ``deft-tvm bench
  --generic-trials`` measures; its databases are kept apart from ``tuning_logs/``.
* ``part="backward"`` tunes the backward's gradient kernels (``schedules.design_space(spec, target,
  "backward")``: CPU tiles; CUDA grad_weight tiles and threads per block) the same way, in a
  folder of its own.
* Every candidate is measured on inputs whose offsets and mask are drawn from the workload's
  offset profile (``ProfileInputs``, the runner's ``f_alloc_argument``), never on the runner's
  default uniform fill, which would shift every sample 1-10 px down-right.
* Records go to the MetaSchedule JSON database of ``tuning_logs/<target-tag>/<workload-key>/`` as
  they are measured; tuning again with the same folder resumes: it runs only the trials still
  missing from the requested total and starts its search from the records already there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.rpc.base import RPC_SESS_MASK
from tvm.s_tir import meta_schedule as ms

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, kernel_key
from deft_tvm.runtime.records import commit_schedule, open_database, target_tag, write_spec
from deft_tvm.runtime.targets import exact_cuda_compilation, kernel_compilation
from deft_tvm.tuning.stats import profile_digest

TUNING_FILE = "tuning.json"
FAILED_SECONDS = 1e10  # the run time MetaSchedule's databases give a candidate that failed to build or run


@dataclasses.dataclass(frozen=True)
class ProfileInputs:
    """The runner's ``f_alloc_argument``: the kernel's arguments with offsets and mask drawn from
    ``profile`` (a ``tuning.stats.offset_profile`` name), one seeded set per repeat. The inputs of
    the ``part`` kernel come first (the backward's: the forward's tensors but the bias, then a
    random grad_output; the columns kernel's: the forward's input, offset and mask); its outputs
    follow, zeroed."""

    spec: DeformConvSpec
    profile: str
    seed: int = 0
    part: str = "forward"

    def _inputs(self, seed: int) -> list:
        import torch

        from deft_tvm.tuning.workloads import Workload

        workload = Workload("tuning", self.spec, self.profile)
        inputs = workload.make_inputs(seed=seed)
        if self.part == "forward":
            return workload.kernel_tensors(inputs)
        if self.part == "columns":  # input, offset, mask? of the forward kernel
            return workload.kernel_tensors(inputs)[:3 if self.spec.has_mask else 2]
        gen = torch.Generator().manual_seed(seed)
        grad_output = torch.randn(self.spec.output_shape, generator=gen).to(inputs["input"].dtype)
        return [t for t in (inputs["input"], inputs["offset"], inputs["mask"], inputs["weight"], grad_output)
                if t is not None]

    def __call__(self, device, args_info, alloc_repeat: int):
        import torch

        expected = [(info[1], tuple(info[2])) for info in args_info]
        sets = []
        for repeat in range(alloc_repeat):
            tensors = self._inputs(self.seed + repeat)
            tensors += [torch.zeros(shape, dtype=getattr(torch, dtype)) for dtype, shape in expected[len(tensors):]]
            observed = [(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t in tensors]
            if observed != expected:
                raise ValueError(f"ProfileInputs: arguments {observed} do not match the kernel's {expected}")
            args = []
            remote = device.dlpack_device_type() >= RPC_SESS_MASK  # an RPC server's device: copied from host memory
            for t, (dtype, shape) in zip(tensors, observed):
                on_device = tvm.runtime.empty(shape, dtype, device)
                if remote:
                    on_device.copyfrom((t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy())
                else:
                    on_device.copyfrom(tvm.runtime.from_dlpack(t.contiguous()))
                args.append(on_device)
            sets.append(args)
        return sets


@dataclasses.dataclass(frozen=True)
class RemoteProfileInputs(ProfileInputs):
    """``ProfileInputs`` as MetaSchedule's RPC runner calls its ``f_alloc_argument`` (the session
    first): drawn on this machine, copied to the RPC server's device."""

    def __call__(self, session, device, args_info, alloc_repeat: int):
        return ProfileInputs.__call__(self, device, args_info, alloc_repeat)


def rpc_config(tracker: str, key: str, session_timeout_s: int = 120) -> ms.runner.RPCConfig:
    """The RPC configuration of the devices registered with a TVM RPC tracker (``python -m
    tvm.exec.rpc_tracker``) under ``key``: ``tracker`` is ``HOST:PORT``.

    Raises:
        ValueError: ``tracker`` is not ``HOST:PORT`` with an integer port.
    """
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"RPC tracker {tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                               session_timeout_sec=session_timeout_s)


def rpc_devices(config: ms.runner.RPCConfig) -> int:
    """The servers registered with ``config``'s tracker under its key (free or busy).

    Raises:
        RuntimeError: the tracker has none under the key, naming the keys it has.
    """
    summary = tvm.rpc.connect_tracker(config.tracker_host, config.tracker_port).summary()
    count = sum(server.get("key") == f"server:{config.tracker_key}" for server in summary.get("server_info", []))
    if count == 0:
        keys = ", ".join(summary.get("queue_info", {})) or "none"
        raise RuntimeError(f"RPC tracker {config.tracker_host}:{config.tracker_port} has no server under key "
                           f"{config.tracker_key!r}; keys: {keys}")
    return count


def _mean_seconds(run_secs) -> float:
    return sum(float(s) for s in run_secs) / len(run_secs)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 6)


@derived_object
class ProgressReport(ms.measure_callback.PyMeasureCallback):
    """Prints one line per measured round: trials so far, round time, best time, trials/minute (or,
    given a progress ``bar``, a tqdm-like object, advances it by the round's trials and shows the
    best time on it); keeps each round's candidates, failures, wall seconds and the best time so far
    (ms) in ``rounds``, after ``rounds`` given (the seed's)."""

    def __init__(self, label: str, already: int, best_s: float | None, rounds: list[dict], bar=None):
        self.label = label
        self.bar = bar
        self.trials = already
        self.best_s = best_s
        self.start = self.last = time.perf_counter()
        self.new = 0
        self.rounds: list[dict] = list(rounds)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        now = time.perf_counter()
        times = [_mean_seconds(r.run_secs) for r in runner_results if r.error_msg is None and r.run_secs]
        failed = len(runner_results) - len(times)
        if times:
            self.best_s = min(times) if self.best_s is None else min(self.best_s, *times)
        self.trials += len(runner_results)
        self.new += len(runner_results)
        round_s = now - self.last
        self.last = now
        per_minute = 60 * self.new / max(now - self.start, 1e-9)
        best = f"{self.best_s * 1e3:.4f} ms" if self.best_s is not None else "none yet"
        self.rounds.append({"candidates": len(runner_results), "failed": failed, "seconds": round(round_s, 2),
                            "best_ms": _ms(self.best_s)})
        if self.bar is not None:
            self.bar.update(len(runner_results))
            self.bar.set_postfix_str(f"best {best}", refresh=True)
            return
        print(
            f"[tune {self.label}] {self.trials} trials, round of {len(runner_results)} ({failed} failed) "
            f"in {round_s:.1f} s, best {best}, {per_minute:.1f} trials/min",
            flush=True,
        )


def _postprocs(target: tvm.target.Target):
    if target.kind.name == "cuda":
        return [ms.postproc.DisallowDynamicLoop(), ms.postproc.VerifyGPUCode()]
    return [ms.postproc.DisallowDynamicLoop()]


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params):
    """The builder's build: MetaSchedule's ``default_build`` without its import of
    ``tvm.s_tir.tensor_intrin``, which parses every tensor intrinsic (~40 s of CPU on Python 3.11)
    in each round's fresh build workers. A scheduled module carries its tensorized bodies, so
    building it needs no registered intrinsic, only the accumulator layout of warp-fragment (TF32,
    bfloat16) kernels."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from deft_tvm.schedules.cuda_warp_mma import register_accumulator_layout

    register_accumulator_layout()
    with kernel_compilation():
        return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _seed_database(spec: DeformConvSpec, profile: str, target: tvm.target.Target, directory: Path,
                   part: str, rpc: ms.runner.RPCConfig | None = None, measurement: Measurement | None = None) -> float:
    """Measure ``schedules.search_start`` (the default schedule as a point of the design space) as
    the search's candidates are measured (``_measure_candidates``: here, or with ``rpc`` on a
    tracker's device) and store it as the database's first record: the evolutionary search draws
    part of its initial population from measured records, so it starts from (and never ends worse
    than) the default. Returns its time in seconds.

    Raises:
        RuntimeError: the default schedule failed to build or run.
    """
    from deft_tvm.schedules import search_start

    seconds = _measure_candidates({directory: (spec, profile, [("default", search_start(spec, target, part))])},
                                  target, part, rpc, measurement)[directory]["default"]
    if seconds is None:
        raise RuntimeError(f"{kernel_key(spec, part)}: the default schedule failed to build or run "
                           f"({'RPC tracker ' + rpc.tracker_host if rpc else 'this machine'})")
    return seconds


def _runner(spec: DeformConvSpec, profile: str, target: tvm.target.Target, part: str,
            rpc: ms.runner.RPCConfig | None) -> ms.runner.Runner:
    """The runner that times candidates of ``spec``'s ``part`` on ``profile`` inputs: this machine's
    device (``ProfileInputs``), or with ``rpc`` the tracker's devices of its key, as many at once as
    it has servers (``RemoteProfileInputs``, drawn here and copied there)."""
    if rpc is None:
        return ms.runner.LocalRunner(evaluator_config=_evaluator_config(target),
                                     f_alloc_argument=ProfileInputs(spec, profile, part=part))
    return ms.runner.RPCRunner(rpc, _evaluator_config(target), max_workers=rpc_devices(rpc),
                               f_alloc_argument=RemoteProfileInputs(spec, profile, part=part))


class Measurement:
    """The builder and the runners (one per workload and part: its profile's inputs, ``_runner``)
    that a kernel's tuning measures with, each made once: a MetaSchedule ``LocalBuilder`` and
    every runner start a worker process to check themselves (3.8-3.9 s apiece on a 2-core CPU,
    where ``tune_kernel`` made a builder and a runner for the seed, the search and each step after
    it; ``deft-tvm tune --model`` of the digits network on the CPU, 8 trials, ``--backward``: 220
    -> 182 s), and a runner keeps its worker (the process that allocates the inputs and runs the
    candidates) until ``close``, which shuts the workers down (left to garbage collection, they
    outlived the process that made them). A context manager."""

    def __init__(self, target: tvm.target.Target, rpc: ms.runner.RPCConfig | None = None):
        self.target, self.rpc = target, rpc
        self._builder = None
        self._runners: dict[tuple, ms.runner.Runner] = {}

    @property
    def builder(self) -> ms.builder.Builder:
        if self._builder is None:
            self._builder = ms.builder.LocalBuilder(f_build=_build, timeout_sec=120)
        return self._builder

    def runner(self, spec: DeformConvSpec, profile: str, part: str) -> ms.runner.Runner:
        key = (spec, profile, part)
        if key not in self._runners:
            self._runners[key] = _runner(spec, profile, self.target, part, self.rpc)
        return self._runners[key]

    def close(self) -> None:
        for runner in self._runners.values():
            runner.pool.shutdown()
        self._runners.clear()

    def __enter__(self) -> Measurement:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _measurement(target: tvm.target.Target, rpc: ms.runner.RPCConfig | None, measurement: Measurement | None):
    """``measurement``, or a new one (closed at the block's end) for ``target`` and ``rpc``."""
    if measurement is not None:
        yield measurement
    else:
        with Measurement(target, rpc) as made:
            yield made


def _evaluator_config(target: tvm.target.Target) -> ms.runner.EvaluatorConfig:
    is_cuda = target.kind.name == "cuda"
    return ms.runner.EvaluatorConfig(
        number=5 if is_cuda else 2, repeat=3 if is_cuda else 1, min_repeat_ms=20 if is_cuda else 0,
        enable_cpu_cache_flush=not is_cuda,
    )


def _mutators(target: tvm.target.Target, part: str) -> dict:
    """What the evolutionary search mutates, with which probability: tile sizes, and for the CUDA
    backward also the threads per block of its other kernels."""
    if part == "backward" and target.kind.name == "cuda":
        return {ms.mutator.MutateTileSize(): 0.5, ms.mutator.MutateThreadBinding(): 0.5}
    return {ms.mutator.MutateTileSize(): 1.0}


def design_space_generator(spec: DeformConvSpec, target: tvm.target.Target,
                           part: str = "forward") -> ms.space_generator.ScheduleFn:
    """The DefT space of ``spec``'s ``part`` for ``target`` as a MetaSchedule space generator."""
    from deft_tvm.schedules import design_space

    return ms.space_generator.ScheduleFn(
        design_space(spec, target, part),
        sch_rules=[],
        postprocs=_postprocs(target),
        mutator_probs=_mutators(target, part),
    )


SPACES = ("deft", "generic")


def space_generator(space: str, spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward"):
    """The space ``tune`` searches: ``"deft"`` (the DefT space) or ``"generic"`` (MetaSchedule's
    default ``post-order-apply`` space with the target's default rules, postprocs and mutators;
    the forward's ablation only)."""
    if space == "deft":
        return design_space_generator(spec, target, part)
    if space == "generic" and part != "forward":
        raise ValueError(f"the generic space is the forward's ablation; tune the {part} kernels with space='deft'")
    if space == "generic":
        return "post-order-apply"
    raise ValueError(f"unknown design space {space!r}; choose one of {', '.join(SPACES)}")


def measured_records(directory: Path) -> list[ms.database.TuningRecord]:
    """The records of a database folder that ran successfully."""
    if not (Path(directory) / "database_tuning_record.json").exists():
        return []
    return [r for r in open_database(Path(directory)).get_all_tuning_records() if r.run_secs and
            all(float(s) < FAILED_SECONDS / 10 for s in r.run_secs)]


def record_count(directory: Path) -> int:
    """Every record of a database folder, failed runs included (they count as trials spent)."""
    path = Path(directory) / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def best_time(directory: Path) -> float | None:
    """Mean run time in seconds of the fastest measured record, or None."""
    times = [_mean_seconds(r.run_secs) for r in measured_records(directory)]
    return min(times) if times else None


def default_time(spec: DeformConvSpec, target: tvm.target.Target, directory: Path,
                 part: str = "forward") -> float | None:
    """Mean run time in seconds of a database folder's record of today's default schedule
    (``schedules.search_start``, which ``tune`` seeds and ``current_default`` adds), or None where
    it holds none that ran."""
    from deft_tvm.schedules import search_start

    trace = str(search_start(spec, target, part).trace)
    times = [_mean_seconds(r.run_secs) for r in measured_records(directory) if str(r.trace) == trace]
    return min(times) if times else None


def _held_traces(directory: Path) -> set[str]:
    """The traces of every record of a database folder (failed ones included), as text; none for a
    folder without a database (not created)."""
    if not (directory / "database_tuning_record.json").exists():
        return set()
    return {str(record.trace) for record in open_database(directory).get_all_tuning_records()}


def current_default(folders, target: tvm.target.Target, part: str = "forward",
                    rpc: ms.runner.RPCConfig | None = None,
                    measurement: Measurement | None = None) -> dict[Path, dict[str, float | None]]:
    """Measure today's default schedule (``schedules.search_start``) in each of ``folders`` (``(spec,
    profile, directory)`` triples of existing tuning databases) that does not hold it yet, and store
    it as a record: a folder tuned before the default improved then never keeps a best slower than
    the default (its first record is the default of its own day). Candidates of all folders are
    built in parallel and run one at a time, as ``refine``'s. Returns ``{directory: {"default":
    seconds, or None where it failed to build or run}}``."""
    from deft_tvm.schedules import register_tensor_intrinsics, search_start

    register_tensor_intrinsics(target)
    jobs = {}
    for spec, profile, directory in folders:
        directory = Path(directory)
        held = _held_traces(directory)
        if not held:
            continue  # no database: ``tune`` seeds it with the default
        sch = search_start(spec, target, part)
        if str(sch.trace) not in held:
            jobs[directory] = (spec, profile, [("default", sch)])
    return _measure_candidates(jobs, target, part, rpc, measurement)


def refine(folders, target: tvm.target.Target, part: str = "forward",
           rpc: ms.runner.RPCConfig | None = None,
           measurement: Measurement | None = None) -> dict[Path, dict[str, float | None]]:
    """Measure the ``schedules.refinements`` of the fastest record of each of ``folders`` (``(spec,
    profile, directory)`` triples of tuning databases) and store them as records of their folder,
    so that a faster one becomes its best. Candidates are built in parallel and run one at a time,
    as the tuning runner runs a round (``ProfileInputs``); those a folder already holds are skipped,
    and so is a folder without a database.
    Returns ``{directory: {label: seconds, or None where the candidate failed to build or run}}``."""
    from deft_tvm.runtime.records import best_schedule
    from deft_tvm.schedules import refinements, register_tensor_intrinsics

    register_tensor_intrinsics(target)
    jobs = {}  # directory -> (spec, profile, [(label, schedule)])
    for spec, profile, directory in folders:
        directory = Path(directory)
        held = _held_traces(directory)
        if not held:
            continue  # no database: nothing to refine
        _, best = best_schedule(directory, target)
        if best is None:
            continue
        candidates = [(label, sch) for label, sch in refinements(spec, target, best.trace, part).items()
                      if str(sch.trace) not in held]
        if candidates:
            jobs[directory] = (spec, profile, candidates)
    return _measure_candidates(jobs, target, part, rpc, measurement)


def transfer(folders, target: tvm.target.Target, part: str = "forward", top: int = 3,
             rpc: ms.runner.RPCConfig | None = None,
             measurement: Measurement | None = None) -> dict[Path, dict[str, float | None]]:
    """Measure, as points of each folder's design space, the tilings that the ``top`` fastest
    records of a database of the same layer in another dtype decided (``schedules.transferred``:
    float16 records for bfloat16, whose fragments are the same) and store them as records of the
    folder; ``folders`` are ``(spec, profile, directory, source_spec, source_directory)``. Those a
    folder already holds, and records the spec's family cannot take, are skipped. Returns
    ``{directory: {label: seconds, or None where the candidate failed to build or run}}``, labels
    naming the source record and its time."""
    from deft_tvm.schedules import register_tensor_intrinsics, transferred

    register_tensor_intrinsics(target)
    jobs = {}
    for spec, profile, directory, source, source_directory in folders:
        directory = Path(directory)
        ranked = sorted(measured_records(source_directory), key=lambda r: _mean_seconds(r.run_secs))
        candidates, traces = [], _held_traces(directory)
        for rank, record in enumerate(ranked):
            sch = transferred(spec, target, source, record.trace, part)
            if sch is None or str(sch.trace) in traces:
                continue
            traces.add(str(sch.trace))
            candidates.append((f"{source.dtype} record {rank + 1} ({_mean_seconds(record.run_secs) * 1e3:.4f} ms)",
                               sch))
            if len(candidates) == top:
                break
        if candidates:
            jobs[directory] = (spec, profile, candidates)
    return _measure_candidates(jobs, target, part, rpc, measurement)


def _measure_candidates(jobs: dict, target: tvm.target.Target, part: str, rpc: ms.runner.RPCConfig | None = None,
                        measurement: Measurement | None = None) -> dict[Path, dict[str, float | None]]:
    """Build ``jobs`` (``{directory: (spec, profile, [(label, schedule)])}``) in parallel, run
    them on their profile's inputs as the tuning runner runs a round (``_runner``: one at a time on
    this machine's device, or with ``rpc`` on the tracker's devices), and store each as a record of
    its folder (a failed one at ``FAILED_SECONDS``); with ``measurement``'s builder and runners
    (else a ``Measurement`` of this call)."""
    if not jobs:
        return {}
    with _measurement(target, rpc, measurement) as measuring:
        return _measure_jobs(jobs, target, part, measuring)


def _measure_jobs(jobs: dict, target: tvm.target.Target, part: str,
                  measurement: Measurement) -> dict[Path, dict[str, float | None]]:
    with exact_cuda_compilation():
        built = iter(measurement.builder.build(
            [ms.builder.BuilderInput(sch.mod, target) for _, _, candidates in jobs.values() for _, sch in candidates]))
    device_type = "cuda" if target.kind.name == "cuda" else "cpu"
    results: dict[Path, dict[str, float | None]] = {}
    for directory, (spec, profile, candidates) in jobs.items():  # one runner per folder: its profile's inputs
        builds = [next(built) for _ in candidates]
        runnable = [(label, sch, build) for (label, sch), build in zip(candidates, builds) if build.error_msg is None]
        runner = measurement.runner(spec, profile, part)
        futures = runner.run([ms.runner.RunnerInput(build.artifact_path, device_type,
                                                    ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"]))
                              for _, sch, build in runnable]) if runnable else []
        runs = {label: future.result() for (label, _, _), future in zip(runnable, futures)}
        for label, sch in candidates:
            run = runs.get(label)
            seconds = _mean_seconds(run.run_secs) if run is not None and run.error_msg is None else None
            commit_schedule(directory, spec, sch, target, FAILED_SECONDS if seconds is None else seconds, part)
            results.setdefault(directory, {})[label] = seconds
    return results


@contextlib.contextmanager
def _meta_schedule_log(verbose: bool):
    """MetaSchedule's logger at its own level (``verbose``) or at ERROR for the block."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass
class TuningResult:
    """What ``tune`` did: the database folder, its trials (records) now and this call's new ones,
    the best time (s), the search's wall seconds, and its rounds (``ProgressReport.rounds``, the
    default schedule's seeding first where this call seeded the folder)."""

    directory: Path
    trials: int
    new_trials: int
    best_s: float | None
    seconds: float
    rounds: list[dict]


def _check_folder(directory: Path, meta: dict, profile: str, digest: str, space: str) -> None:
    """Refuse to resume a database tuned on another offset distribution (``digest``, the profile's
    ``tuning.stats.profile_digest``: a recorded profile is its statistics, wherever it is saved;
    folders from before the digest compare the profiles' names) or on another design space."""
    recorded = meta.get("profile_digest")
    if (recorded != digest) if recorded is not None else (meta["profile"] != profile):
        was, now = (f"{name!r}" + (f" (statistics {statistics})" if statistics not in (None, name) else "")
                    for name, statistics in ((meta["profile"], recorded), (profile, digest)))
        raise ValueError(f"{directory} was tuned with offset profile {was}, not {now}; use another folder (--logs) "
                         f"for another offset profile")
    recorded_space = meta.get("space", "deft")  # older folders: the DefT space
    if recorded_space != space:
        raise ValueError(f"{directory} was tuned with design space {recorded_space!r}, not {space!r}; "
                         f"use another folder for another design space")


def tune(
    spec: DeformConvSpec,
    profile: str,
    target: tvm.target.Target,
    directory: Path,
    trials: int,
    *,
    trials_per_round: int = 32,
    population: int = 128,
    seed: int | None = None,
    num_tuning_cores: int | str = "physical",
    space: str = "deft",
    part: str = "forward",
    bar=None,
    rpc: ms.runner.RPCConfig | None = None,
    verbose: bool = False,
    measurement: Measurement | None = None,
) -> TuningResult:
    """Tune ``spec``'s ``part`` kernel (``deft_tvm.compute.spec.PARTS``) on ``space`` (see
    ``space_generator``) until ``directory``'s database holds ``trials`` records (resuming it).
    Progress: a line per round, or given ``bar`` (a tqdm-like progress bar of ``trials``), its
    advance by the trials measured (the folder's records first). The search's candidates are built
    here in parallel and run on this machine's device, or with ``rpc`` (``rpc_config``) on the
    devices of a TVM RPC tracker's key, as many at once as it has servers (``rpc_devices``), the
    seed (the default schedule) too. MetaSchedule's own log (its task tables, the
    cost model's lines) reaches the console only with ``verbose``. ``measurement``: the builder and
    runners to measure with (``Measurement``; else this call's own)."""
    from deft_tvm.schedules import register_tensor_intrinsics

    directory = Path(directory)
    with _measurement(target, rpc, measurement) as measurement:
        generator = space_generator(space, spec, target, part)
        register_tensor_intrinsics(target)  # resuming replays the stored traces
        write_spec(directory, spec, part)
        already = record_count(directory)
        meta_path = directory / TUNING_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"profile": profile, "space": space,
                                                                               "sessions": []}
        digest = profile_digest(profile)
        _check_folder(directory, meta, profile, digest, space)
        meta["profile_digest"] = digest  # written before any record: a resumed folder is checked
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        label = f"{kernel_key(spec, part)} {target.kind.name}"
        rounds = []  # the seed's, then the search's (ProgressReport)
        if bar is not None:
            bar.update(min(already, trials))
        if already == 0 and space == "deft" and trials > 0:
            start = time.perf_counter()
            seconds = _seed_database(spec, profile, target, directory, part, rpc, measurement)
            if bar is None:
                print(f"[tune {label}] 1 trial: the default schedule as the search's start, "
                      f"{seconds * 1e3:.4f} ms", flush=True)
            else:
                bar.update(1)
                bar.set_postfix_str(f"default {seconds * 1e3:.4f} ms", refresh=True)
            rounds.append({"candidates": 1, "failed": 0, "seconds": round(time.perf_counter() - start, 2),
                           "best_ms": _ms(seconds)})
            already = 1
        remaining = trials - already
        if remaining <= 0:
            if bar is None:
                print(f"[tune {label}] {already} trials already in {directory}, nothing to do", flush=True)
            return TuningResult(directory, already, 0, best_time(directory), 0.0, rounds)

        mod = kernel_primfunc(spec, part)
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(population, 32), genetic_num_iters=2,
        )
        progress = ProgressReport(label, already, best_time(directory), rounds, bar)
        start = time.perf_counter()
        with exact_cuda_compilation(), tempfile.TemporaryDirectory(prefix="deft_tune_") as scratch, \
                _meta_schedule_log(verbose):
            ms.tune_tir(
                mod,
                target,
                work_dir=scratch,
                max_trials_global=remaining,
                num_trials_per_iter=min(trials_per_round, remaining),
                space=generator,
                builder=measurement.builder,
                runner=measurement.runner(spec, profile, part),
                database=open_database(directory),
                cost_model="xgb",
                strategy=strategy,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
                seed=seed,
                num_tuning_cores=num_tuning_cores,
            )
        seconds = time.perf_counter() - start
        meta["sessions"].append({
            "target": target_tag(target),
            "new_trials": progress.new, "seconds": round(seconds, 1), "rounds": progress.rounds,
            "tvm": tvm.__version__,
        })
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        return TuningResult(directory, record_count(directory), progress.new, best_time(directory), seconds,
                            progress.rounds)


@dataclasses.dataclass
class KernelTuning:
    """What ``tune_kernel`` did: the search (``TuningResult``), the candidates measured after it
    (``{step: {label: seconds, or None where it failed}}``, steps ``transfer``, ``default`` and
    ``refine``), the folder's best and default times (s; None where none ran) and its best schedule
    (None where no candidate ran)."""

    search: TuningResult
    measured: dict[str, dict[str, float | None]]
    best_s: float | None
    default_s: float | None
    schedule: tvm.s_tir.Schedule | None


def tune_kernel(spec: DeformConvSpec, profile: str, target: tvm.target.Target, directory: Path, trials: int, *,
                trials_per_round: int = 32, seed: int | None = None, part: str = "forward", bar=None,
                rpc: ms.runner.RPCConfig | None = None, verbose: bool = False,
                seed_from: tuple[DeformConvSpec, Path] | None = None) -> KernelTuning:
    """A kernel's whole tuning, as ``deft-tvm tune`` and ``tune_model`` run it: ``tune`` (the search,
    resumed up to ``trials`` records), then, where ``seed_from`` (``(source spec, its database
    folder)``) is given, the ``transfer`` of its fastest records, ``current_default`` (today's
    default, where the folder does not hold it) and ``refine`` (the best's refinements), all measured
    as the search's candidates (here, or on ``rpc``'s devices), all with one ``Measurement``."""
    from deft_tvm.runtime.records import best_schedule

    directory = Path(directory)
    folder = (spec, profile, directory)
    measured = {}
    with Measurement(target, rpc) as measurement:
        search = tune(spec, profile, target, directory, trials, trials_per_round=trials_per_round, seed=seed,
                      part=part, bar=bar, rpc=rpc, verbose=verbose, measurement=measurement)
        if seed_from is not None:
            measured["transfer"] = transfer([(*folder, *seed_from)], target, part, rpc=rpc,
                                            measurement=measurement).get(directory, {})
        measured["default"] = current_default([folder], target, part, rpc, measurement).get(directory, {})
        measured["refine"] = refine([folder], target, part, rpc, measurement).get(directory, {})
    return KernelTuning(search, measured, best_time(directory), default_time(spec, target, directory, part),
                        best_schedule(directory, target)[1])
