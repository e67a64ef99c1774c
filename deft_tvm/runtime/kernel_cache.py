"""Compiled kernels, cached in memory and on disk.

Which schedule a workload gets: the fastest record of its tuning database
(``<root>/<target-tag>/<workload-key>/``) under the user's tuning directory or else the one shipped
with the package (``records.record_roots``) when there is one, compiled from its trace with no
search; otherwise the target's default schedule, with a one-time warning.

On the CPU a workload without a tuned record or a loaded kernel of its sizes runs the default
kernel of its layer configuration (``compiled_spec``, ``compute.spec.generic_spec``), compiled once
for every batch and image size of the layer.

The disk cache lives in ``$DEFT_TVM_CACHE_DIR`` (default ``~/.cache/deft_tvm``), one shared
library per (TVM version, target, workload or configuration, schedule): the file name carries a
structural hash of the scheduled module, so a new record or schedule never reuses a stale kernel.
Its index (``index_path``: the kernel's spec, tuned record and deft_tvm's source -> that hash) lets
a later process load the file without building the module. A corrupted or unloadable entry is
rebuilt with a warning. Writes are atomic, so concurrent processes never see a half-written library.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch
import tvm
import tvm_ffi

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, generic_spec, kernel_key
from deft_tvm.runtime import library
from deft_tvm.runtime.columns import unfused_forward_kernel
from deft_tvm.runtime.library import loaded_kernel
from deft_tvm.runtime.records import best_schedule, configuration_schedule, target_tag, tuned_database
from deft_tvm.runtime.targets import compile_kernel, exact_cuda_compilation, target_for_device

CACHE_DIR_ENV = "DEFT_TVM_CACHE_DIR"

_memory: dict[tuple[str, str], Callable] = {}
_lock = threading.Lock()


class UntunedKernelWarning(UserWarning):
    """A workload ran with the default schedule because no loaded library has a tuned kernel for it."""


def cache_dir() -> Path:
    """Root of the on-disk kernel cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "deft_tvm")


def _target_tag(target: tvm.target.Target) -> str:
    """The target's folder of the disk cache: its kind and a hash of its attributes and of the TIR
    pipeline its kernels are compiled on (``cuda_launch.pipeline_for``; a changed pass never reuses
    a library compiled before)."""
    from deft_tvm.schedules.cuda_launch import PIPELINE, pipeline_digest, pipeline_for

    pipeline = pipeline_digest() if pipeline_for(target) == PIPELINE else "default"
    text = json.dumps(target.export(), sort_keys=True, default=str) + pipeline
    return f"{target.kind.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning issued by this module's caller to the first
    frame outside deft_tvm, its schedules, torch and TVM: the user's own line (Python 3.12's
    ``skip_file_prefixes``, on 3.10 too)."""
    import deft_tvm.schedules

    package = Path(__file__).parents[1]  # deft_tvm/
    internal = tuple(str(Path(m.__file__).parent) for m in (torch, tvm, deft_tvm.schedules)) + (str(package),)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def schedule_for(spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward"):
    """``(schedule, tuned)`` of ``spec``'s ``part`` kernel: the schedule of its tuned record (the
    user's or the shipped one, ``records.tuned_database``; a layer configuration's: the tiling of
    its record in its family's ``configuration_space``) if there is one, else the default."""
    from deft_tvm.schedules import default_schedule

    directory = tuned_database(spec, target, part)
    if directory is not None and spec.shape_generic:
        return configuration_schedule(directory, target)[2], True
    if directory is not None:
        _, sch = best_schedule(directory, target)
        if sch is not None:
            return sch, True
    return default_schedule(kernel_primfunc(spec, part), spec, target, part), False


def library_path(name: str, fingerprint: str, target: tvm.target.Target) -> Path:
    """Where the compiled library ``name`` (fingerprint: a hash of what its code is a function of)
    for ``target`` is cached."""
    return cache_dir() / f"tvm-{tvm.__version__}" / _target_tag(target) / f"{name}-{fingerprint}.so"


def module_fingerprint(mod: tvm.IRModule) -> str:
    """A structural hash of ``mod``, as a disk-cache file name carries it."""
    return f"{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def kernel_path(spec: DeformConvSpec, target: tvm.target.Target, sch=None, part: str = "forward") -> Path:
    """Where the compiled library of ``spec``'s ``part`` for ``target`` (scheduled by ``sch``,
    default: the schedule ``schedule_for`` picks for ``compiled_spec``'s spec, which it then
    compiles) is cached."""
    if sch is None:
        spec = compiled_spec(spec, target, part)
        sch = schedule_for(spec, target, part)[0]
    return library_path(kernel_key(spec, part), module_fingerprint(sch.mod), target)


def build(spec: DeformConvSpec, target: tvm.target.Target, sch=None):
    """Compile ``spec`` with ``sch`` (default: the schedule ``schedule_for`` picks); returns a TVM
    Executable."""
    sch = sch if sch is not None else schedule_for(spec, target)[0]
    return compile_kernel(sch.mod, target)


def _export_atomically(executable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_into_cache(name: str, fingerprint: str, target: tvm.target.Target, build_library: Callable) -> Path:
    """The path of the cached library ``name``-``fingerprint`` for ``target``, ``build_library()``
    (a TVM Executable) compiled and written there first where it is missing: a compile in another
    process than the one that loads it (``load_or_build_library`` then finds it)."""
    path = library_path(name, fingerprint, target)
    if not path.exists():
        _export_atomically(build_library(), path)
    return path


def load_or_build_library(name: str, fingerprint: str, target: tvm.target.Target, build_library: Callable,
                          functions: tuple[str, ...]) -> list[Callable]:
    """The ``functions`` of the cached library ``name``-``fingerprint`` for ``target``, or of
    ``build_library()`` (a TVM Executable, compiled only on a miss), written into the cache."""
    path = library_path(name, fingerprint, target)
    if path.exists():
        try:
            library = tvm.runtime.load_module(str(path))
            return [library[f] for f in functions]
        except Exception as err:  # noqa: BLE001 - any failure to load means: rebuild it
            warnings.warn(
                f"deft_tvm: cached kernel {path} could not be loaded ({type(err).__name__}: {err}); rebuilding it",
                RuntimeWarning,
                stacklevel=4,
            )
            path.unlink(missing_ok=True)
    executable = build_library()
    _export_atomically(executable, path)
    return [executable[f] for f in functions]


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A hash of the source of deft_tvm's modules and of its schedules (every ``*.py`` file): with a
    kernel's spec, part, target, tuned record and TVM's version, what its scheduled module is a
    function of."""
    import deft_tvm.schedules

    digest = hashlib.sha256()
    package, schedules = Path(__file__).resolve().parents[1], Path(deft_tvm.schedules.__file__).resolve().parent
    for root in dict.fromkeys((package, schedules)):
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def record_identity(directory: Path | None) -> str:
    """What names a tuned database folder's content for the disk cache's index: its path and its
    files' names, sizes and modification times ("" for no folder)."""
    if directory is None:
        return ""
    files = []
    for path in Path(directory).iterdir():
        if path.is_file():
            status = path.stat()
            files.append((path.name, status.st_size, status.st_mtime_ns))
    return repr((str(directory), sorted(files)))


def index_path(name: str, inputs: str, target: tvm.target.Target) -> Path:
    """The disk cache's index entry of the library ``name`` built from a module that is a function
    of ``inputs`` (a spec's repr, a tuned record's ``record_identity``) besides deft_tvm's source
    (``source_digest``), TVM's version and ``target``: it keeps the module's structural hash
    (``module_fingerprint``, the library file's), so that a later process finds the file without
    building the module (TIR, schedule, TVMScript: 0.1-0.3 s a kernel)."""
    key = hashlib.sha256(f"{name}\0{inputs}\0{source_digest()}".encode()).hexdigest()[:16]
    return cache_dir() / f"tvm-{tvm.__version__}" / _target_tag(target) / "index" / f"{name}-{key}.json"


def indexed(index: Path, name: str, target: tvm.target.Target) -> dict | None:
    """The entry ``{"fingerprint": ..., "notes": {...}}`` at ``index`` where its library file
    exists, else None."""
    try:
        entry = json.loads(index.read_text())
        return entry if library_path(name, entry["fingerprint"], target).exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(index: Path, fingerprint: str, notes: dict) -> None:
    """Writes the index entry ``index`` (atomically): the library's fingerprint and the notes."""
    index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=index.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"fingerprint": fingerprint, "notes": notes}, f)
    os.replace(tmp, index)


def indexed_library(name: str, inputs: str, target: tvm.target.Target,
                    schedule: Callable[[], tuple[tvm.IRModule, dict]],
                    functions: tuple[str, ...]) -> tuple[list[Callable], dict]:
    """The ``functions`` of the cached library ``name`` compiled from the module ``schedule()``
    returns, and the notes (a JSON-able dict) it returns with it: found through the index
    (``index_path``) without calling ``schedule()``, else loaded or compiled as
    ``load_or_build_library`` does and indexed."""
    index = index_path(name, inputs, target)
    entry = indexed(index, name, target)
    if entry is not None:
        try:
            return load_or_build_library(name, entry["fingerprint"], target, _unindexed, functions), entry["notes"]
        except _StaleIndexEntry:  # the file did not load (and is removed): built again below
            pass
    mod, notes = schedule()
    fingerprint = module_fingerprint(mod)
    kernels = load_or_build_library(name, fingerprint, target, lambda: compile_kernel(mod, target), functions)
    remember(index, fingerprint, notes)
    return kernels, notes


class _StaleIndexEntry(Exception):
    """An indexed library file that exists but does not load."""


def _unindexed():
    raise _StaleIndexEntry


def _kernel_inputs(spec: DeformConvSpec, target: tvm.target.Target, part: str) -> str:
    """``index_path``'s inputs of ``spec``'s ``part`` kernel: the spec and its tuned record."""
    return f"{spec!r}\0{record_identity(tuned_database(spec, target, part))}"


def scheduled_kernel(spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward") -> tuple[Callable, bool]:
    """``(kernel, tuned)``: ``spec``'s ``part`` kernel as ``schedule_for`` schedules it (``tuned``:
    from a record), from the disk cache (through its index, without building the schedule,
    ``indexed_library``) or compiled into it."""
    def schedule():
        sch, tuned = schedule_for(spec, target, part)
        return sch.mod, {"tuned": tuned}

    (kernel,), notes = indexed_library(kernel_key(spec, part), _kernel_inputs(spec, target, part), target, schedule,
                                       ("main",))
    return kernel, notes["tuned"]


def load_or_build(spec: DeformConvSpec, target: tvm.target.Target, sch, part: str = "forward") -> Callable:
    """The kernel of ``spec``'s ``part`` scheduled by ``sch``, from the disk cache or compiled into it."""
    return load_or_build_library(kernel_key(spec, part), module_fingerprint(sch.mod), target,
                                 lambda: build(spec, target, sch), ("main",))[0]


def compiled_spec(spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward") -> DeformConvSpec:
    """The spec that ``spec``'s ``part`` kernel on ``target`` is compiled for, where no loaded
    library has it: its layer configuration (``compute.spec.generic_spec``: one kernel for every
    batch and image size) where ``schedules.shape_generic`` allows and no tuned record of these
    exact sizes is found (``records.tuned_database``); else ``spec``."""
    from deft_tvm.schedules import shape_generic

    if shape_generic(spec, target, part) and tuned_database(spec, target, part) is None:
        return generic_spec(spec)
    return spec


def library_kernel(spec: DeformConvSpec, target: tvm.target.Target,
                   part: str = "forward") -> tuple[Callable | None, DeformConvSpec]:
    """``(kernel, compiled)``: a loaded library's kernel of ``spec``'s ``part`` (of the call's sizes,
    else of its layer configuration) or None, and the spec compiled where no library has one
    (``compiled_spec``)."""
    loaded = loaded_kernel(target.kind.name, kernel_key(spec, part))
    compiled = compiled_spec(spec, target, part) if loaded is None else spec
    if loaded is None and compiled is not spec:
        loaded = loaded_kernel(target.kind.name, kernel_key(compiled, part))
    return loaded, compiled


def get_kernel(spec: DeformConvSpec, device: torch.device, part: str = "forward") -> Callable:
    """The kernel of ``spec``'s ``part`` (the forward, or the unfused forward's ``columns``) on
    ``device`` (a CPU or a CUDA GPU).

    A kernel from a library registered by ``deft_tvm.load_library`` (of the call's sizes, else of
    its layer configuration) wins; otherwise the committed tuned record, else the default schedule
    (with a one-time warning for a forward), is compiled once and cached in memory and on disk: on
    the CPU, the default kernel of the layer configuration (``compiled_spec``), which any later
    batch and image size reuses. The forward takes ``(input, offset, mask?, weight, bias?,
    output)``, the columns kernel ``(input, offset, mask?, columns)``, as contiguous tensors on the
    device, and writes the last in place.
    """
    target = target_for_device(device)
    call_key = kernel_key(spec, part)
    loaded, spec = library_kernel(spec, target, part)
    if loaded is not None:
        return loaded
    key = kernel_key(spec, part)

    def compile_once():
        kernel, tuned = scheduled_kernel(spec, target, part)
        if not tuned and part == "forward":
            workload = call_key if key == call_key else f"{call_key} (compiled for its layer configuration {key})"
            warnings.warn(
                f"deft_tvm: no tuned kernel for workload {workload} on {target.kind.name} "
                f"({target_tag(target)}); using the default schedule, compiled once and cached in "
                f"{cache_dir()}. Tune your model's layers with deft_tvm.tune_model(model, inputs) or "
                "`deft-tvm tune --model MODULE:CALLABLE --input-shape N C H W` (registry workloads: "
                "`deft-tvm tune --workloads NAME`, see `deft-tvm list`); load the exported library with "
                "deft_tvm.load_library().",
                UntunedKernelWarning,
                stacklevel=_user_stacklevel(),
            )
        return kernel

    return memoized(_memory, _lock, (key, str(target)), compile_once)


def memoized(store: dict, lock: threading.Lock, key, load: Callable[[], Callable]) -> Callable:
    """``store[key]``, ``load()``-ed into it once (double-checked under ``lock``): a hit costs a
    dictionary look-up."""
    kernel = store.get(key)
    if kernel is None:
        with lock:
            kernel = store.get(key)
            if kernel is None:
                kernel = store[key] = load()
    return kernel


@contextlib.contextmanager
def tf32_mode(mode: str):
    """While active, TF32 in cuDNN and matmuls is on (``"on"``), off (``"off"``) or left as is
    (``"n/a"``): the matmuls' flag decides the op's float32 kernels on CUDA (``with_torch_tf32``)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if mode != "n/a":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "on"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_multiplies_on_tf32(spec: DeformConvSpec, device: torch.device) -> bool:
    return spec.dtype == "float32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def with_torch_tf32(spec: DeformConvSpec, device: torch.device) -> DeformConvSpec:
    """``spec`` allowed to multiply float32 on TF32 tensor cores where torch's matmuls do: on CUDA
    with ``torch.backends.cuda.matmul.allow_tf32`` set."""
    return _tf32_spec(spec) if _torch_multiplies_on_tf32(spec, device) else spec


# Per-call derived specs, cached: the op asks on every call, and a cached spec keeps its cached key.
@functools.lru_cache(maxsize=4096)
def _tf32_spec(spec: DeformConvSpec) -> DeformConvSpec:
    return dataclasses.replace(spec, tf32=True)


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardCall:
    """The forward of one call signature on one device, looked up once (``forward_call``): the
    kernel spec (float32 on TF32 where torch's matmuls are, the layout the target's schedule
    gathers from: ``schedules.kernel_spec``), its kernel and, for a channels-last kernel on CUDA,
    the function that makes the channels-last copies of NCHW input and weight in one call
    (``channels_last_kernel``; None otherwise).

    ``call(input, offset, mask, weight, bias)`` takes the tensors of the NCHW call
    (``DeformConvSpec``'s shapes, one dtype and device; mask and bias None where absent) and
    returns the output ``[batch, out_channels, out_h, out_w]``, contiguous, of their dtype."""

    spec: DeformConvSpec
    kernel: Callable
    channels_last: Callable | None
    # The spec's shapes, kept so that a call need not derive them again.
    output_shape: tuple[int, ...] = dataclasses.field(init=False)
    copy_shapes: tuple[tuple[int, ...], tuple[int, ...]] = dataclasses.field(init=False)  # channels-last input, weight

    def __post_init__(self):
        object.__setattr__(self, "output_shape", self.spec.output_shape)
        object.__setattr__(self, "copy_shapes", (self.spec.kernel_input_shape, self.spec.kernel_weight_shape))

    def arguments(self, input, offset, mask, weight, bias) -> list:
        """The kernel's tensors before the output: ``spec.kernel_arguments(...)``, except that a
        channels-last kernel given NCHW-contiguous input and weight gets their channels-last
        copies from one ``channels_last`` call (where torch takes two permuted copies; input
        already channels last is taken as it is)."""
        if self.channels_last is None or not (input.is_contiguous() and weight.is_contiguous()):
            return self.spec.kernel_arguments(input, offset, mask, weight, bias)
        input_nhwc, weight_ohwi = input.new_empty(self.copy_shapes[0]), weight.new_empty(self.copy_shapes[1])
        self.channels_last(input, weight, input_nhwc, weight_ohwi)
        return [t.contiguous() for t in (input_nhwc, offset, mask, weight_ohwi, bias) if t is not None]

    def call(self, input, offset, mask, weight, bias) -> torch.Tensor:
        output = input.new_empty(self.output_shape)
        self.kernel(*self.arguments(input, offset, mask, weight, bias), output)
        return output


_forward_calls: dict[tuple, ForwardCall] = {}


def forward_call(spec: DeformConvSpec, device: torch.device) -> ForwardCall:
    """The ``ForwardCall`` of the call ``spec`` describes (torch's NCHW view) on ``device``, built
    once per (spec, device, TF32 setting, loaded libraries): the op asks on every call, so a
    repeated one costs a dictionary look-up. The kernel takes ``forward_call(...).spec``'s
    ``kernel_arguments`` and the output."""
    tf32 = _torch_multiplies_on_tf32(spec, device)
    key = (spec, device, tf32, library.generation)
    found = _forward_calls.get(key)
    if found is None:
        target = target_for_device(device)
        kernel_spec = forward_spec(spec, device)
        copies = None
        if _takes_channels_last_copies(kernel_spec, device):
            copies = channels_last_kernel(_copies_spec(kernel_spec, _forward_library_kernel(kernel_spec, target)[2]),
                                          target)
        found = _forward_calls[key] = ForwardCall(kernel_spec, forward_kernel(kernel_spec, device), copies)
    return found


def forward_spec(spec: DeformConvSpec, device: torch.device) -> DeformConvSpec:
    """The kernel spec of the forward of the call ``spec`` describes on ``device`` (float32 on
    TF32 where torch's matmuls are, ``with_torch_tf32``; the layout of the target's schedule,
    ``schedules.kernel_spec``): what ``forward_call`` runs and ``prebuild`` takes."""
    return _kernel_spec(with_torch_tf32(spec, device), target_for_device(device))


def forward_kernel(spec: DeformConvSpec, device: torch.device) -> Callable:
    """The forward of ``spec`` (a kernel spec) on ``device``, with ``get_kernel``'s arguments: the
    unfused forward (``runtime.columns``) where ``schedules.unfused_forward`` takes the layer,
    unless a loaded library holds its fused forward kernel and not its columns kernel; else the
    fused kernel."""
    from deft_tvm.schedules import unfused_forward

    target = target_for_device(device)
    library_fused = (loaded_kernel(target.kind.name, spec.key()) is not None
                     and loaded_kernel(target.kind.name, kernel_key(spec, "columns")) is None)
    if not library_fused and unfused_forward(spec, target):
        columns = get_kernel(spec, device, "columns")
        compiled = library_kernel(spec, target, "columns")[1]  # a configuration's: so is the output transpose
        return unfused_forward_kernel(spec, columns, channels_first_output_kernel(compiled, target))
    return get_kernel(spec, device)


@functools.lru_cache(maxsize=4096)
def _kernel_spec(spec: DeformConvSpec, target: tvm.target.Target) -> DeformConvSpec:
    from deft_tvm.schedules import kernel_spec

    return kernel_spec(spec, target)


def _channels_last_key(spec: DeformConvSpec) -> str:
    (n, c, h, w), (o, ipg, kh, kw) = spec.input_shape, spec.weight_shape
    return f"channels_last_n{n}_c{c}_h{h}_w{w}_o{o}_i{ipg}_k{kh}x{kw}_{spec.dtype}"


def channels_last_kernel(spec: DeformConvSpec, target: tvm.target.Target) -> Callable:
    """``schedules.cuda_layout.channels_last_primfunc(spec)``: a loaded library's (``deft-tvm
    export`` puts in those of its channels-last forwards' specs), else compiled for ``target`` once
    (memory and disk cache, keyed by the input and weight shapes and dtype; a ``generic_spec``'s
    serves every batch and image size): ``(input, weight, input_nhwc, weight_ohwi)``, the last two
    written."""
    from deft_tvm.schedules.cuda_layout import channels_last_primfunc

    loaded = loaded_kernel(target.kind.name, kernel_key(spec, "channels_last"))
    if loaded is not None:
        return loaded
    return _layout_kernel(_channels_last_key(spec), "channels_last", lambda: channels_last_primfunc(spec), target)


def channels_first_output_kernel(spec: DeformConvSpec, target: tvm.target.Target) -> Callable:
    """``schedules.cuda_layout.channels_first_output_primfunc(spec)``: a loaded library's (``deft-tvm
    export`` puts in those of its columns kernels' specs), else compiled for ``target`` once (memory
    and disk cache, keyed by the output shape and dtype; a ``generic_spec``'s serves every size):
    ``(rows, output)``, the last written."""
    from deft_tvm.schedules.cuda_layout import channels_first_output_primfunc, output_positions

    loaded = loaded_kernel(target.kind.name, kernel_key(spec, "channels_first_output"))
    if loaded is not None:
        return loaded
    n, o = spec.output_shape[:2]
    return _layout_kernel(f"channels_first_output_n{n}_o{o}_p{output_positions(spec)}_{spec.dtype}",
                          "channels_first_output", lambda: channels_first_output_primfunc(spec), target)


# TVMScript builds a PrimFunc by parsing Python source with ast.parse, which CPython 3.11 does not
# make thread-safe ("SystemError: AST constructor recursion depth mismatch" when two threads parse):
# the prebuilds' threads build their TVMScript PrimFuncs under this lock (the compiles run outside it).
_script_lock = threading.Lock()


def scripted(build_primfunc: Callable):
    """``build_primfunc()`` (a function that builds a TVMScript PrimFunc) under the parse lock."""
    with _script_lock:
        return build_primfunc()


def _layout_kernel(name: str, function: str, primfunc: Callable, target: tvm.target.Target) -> Callable:
    """The PrimFunc ``primfunc()`` (global symbol ``function``) compiled for ``target`` once, cached
    in memory and on disk as the library ``name``."""

    def load():
        return indexed_library(name, "", target, lambda: (tvm.IRModule({function: scripted(primfunc)}), {}),
                               (function,))[0][0]

    return memoized(_memory, _lock, (name, str(target)), load)


def _takes_channels_last_copies(spec: DeformConvSpec, device: torch.device) -> bool:
    return spec.layout == "NHWC" and device.type == "cuda"


def _forward_library_kernel(spec: DeformConvSpec,
                            target: tvm.target.Target) -> tuple[str, Callable | None, DeformConvSpec]:
    """``(part, loaded, compiled)``: the part whose kernel does the work of ``spec``'s forward (a
    kernel spec): ``"columns"`` where the forward is unfused, else ``"forward"``; and its
    ``library_kernel`` pair."""
    from deft_tvm.schedules import unfused_forward

    part = "columns" if unfused_forward(spec, target) else "forward"
    return (part, *library_kernel(spec, target, part))


def _copies_spec(spec: DeformConvSpec, compiled: DeformConvSpec) -> DeformConvSpec:
    """The spec of the channels-last copies of ``spec``'s forward, whose fused or columns kernel is
    compiled for ``compiled``: its layer configuration's where that kernel is, else its own."""
    return compiled if compiled.shape_generic else spec


def finish(futures, progress: Callable[[int], object] | None) -> list:
    """The results of ``futures`` (a list), waited for as they complete; ``progress`` (e.g.
    ``lambda total: tqdm.tqdm(total=total)``), if given, is called with their number and what it
    returns gets ``update(1)`` per finished one and ``close()`` at the end."""
    bar = progress(len(futures)) if progress is not None else None
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [future.result() for future in futures]


def prebuild(specs, device: torch.device, max_workers: int = 8, progress: Callable[[int], object] | None = None) -> int:
    """Compile, in parallel, the forward kernels of ``specs`` (tuned record or default schedule, of
    the layer configuration where ``compiled_spec`` says; the columns kernel and the output
    transpose of an unfused forward, ``forward_kernel``, and for a configuration's columns kernel
    also the configuration's fused kernel, which its calls whose columns exceed
    ``schedules.UNFUSED_MAX_COLUMNS_BYTES`` take) that neither a loaded library nor the disk cache
    holds, and load or compile the channels-last copies (``ForwardCall.arguments``) of those that
    take them.

    Compilation is mostly spent in nvcc/LLVM outside the GIL, so threads overlap it; ``progress``
    as ``finish`` takes it. Returns the number of forward kernels built.
    """
    target = target_for_device(device)
    missing, unfused, layouts = {}, {}, {}
    for spec in specs:
        part, loaded, compiled = _forward_library_kernel(spec, target)
        if _takes_channels_last_copies(spec, device):  # the copies forward_call takes
            copies = _copies_spec(spec, compiled)
            layouts[_channels_last_key(copies)] = copies
        if loaded_kernel(target.kind.name, spec.key()) is None:
            if part == "columns":  # the output transpose of the compiled columns kernel's spec (forward_kernel)
                unfused[compiled] = compiled
            wanted = [] if loaded is not None else [(compiled, part)]
            if part == "columns" and compiled.shape_generic and loaded_kernel(target.kind.name, compiled.key()) is None:
                wanted.append((compiled, "forward"))  # the configuration's calls too large for the columns
            for kernel, kernel_part in wanted:
                index = index_path(kernel_key(kernel, kernel_part), _kernel_inputs(kernel, target, kernel_part), target)
                if indexed(index, kernel_key(kernel, kernel_part), target) is not None:
                    continue
                sch, tuned = schedule_for(kernel, target, kernel_part)
                fingerprint = module_fingerprint(sch.mod)
                if library_path(kernel_key(kernel, kernel_part), fingerprint, target).exists():
                    remember(index, fingerprint, {"tuned": tuned})
                else:
                    missing[kernel_key(kernel, kernel_part)] = (kernel, sch, kernel_part, tuned, index, fingerprint)

    def build_and_store(spec, sch, part, tuned, index, fingerprint):
        build_into_cache(kernel_key(spec, part), fingerprint, target, lambda: build(spec, target, sch))
        remember(index, fingerprint, {"tuned": tuned})

    with exact_cuda_compilation(), concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        futures = [pool.submit(build_and_store, *item) for item in missing.values()]
        futures += [pool.submit(channels_last_kernel, spec, target) for spec in layouts.values()]
        futures += [pool.submit(channels_first_output_kernel, spec, target) for spec in unfused.values()]
        finish(futures, progress)
    return len(missing)


def clear_memory_cache() -> None:
    """Forget the kernels loaded in this process (the disk cache stays)."""
    _memory.clear()
    _forward_calls.clear()
