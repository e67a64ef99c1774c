"""One exported kernel library per target, with a manifest, and loading it without the compiler.

``export_library`` compiles many workloads for one target into ONE shared library (one function
per workload and kernel part: the forward, the backward's gradient kernels where tuned or asked
for and, on CUDA, the fused backward's host entry and the kernels run beside them: layout kernels
and the sorted gather) and writes ``<name>.json`` beside it: kernel key -> function name, part,
dtype, target and arch, TVM and tvm-ffi versions, the library's sha256, where each schedule came
from and a fused backward's tilings.
``load_library`` checks all of that against this process and machine before registering the
kernels; calling them needs only the TVM runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
import tvm
import tvm_ffi

from deft_tvm.compute.spec import DeformConvSpec, kernel_key

MANIFEST_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A workload kernel (``part``: ``deft_tvm.compute.spec.PARTS``) to put in a library: its
    PrimFunc (a schedule's ``mod["main"]``, or the fused backward's host entry); ``origin`` says
    where the schedule came from; ``tilings``: JSON-ready values the runtime needs to call it (the
    fused backward's ``{"data": ..., "weight": ...}``), kept in the manifest."""

    spec: DeformConvSpec
    function: object  # tvm.tirx.PrimFunc
    origin: str
    part: str = "forward"
    tilings: dict | None = None


def function_name(spec: DeformConvSpec, part: str = "forward") -> str:
    return f"deft_{kernel_key(spec, part)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _target_arch(target: tvm.target.Target) -> str:
    return str(target.arch) if target.kind.name == "cuda" else str(target.attrs.get("mtriple", "host"))


def export_library(entries: Iterable[KernelEntry], target: tvm.target.Target, out_dir: Path,
                   name: str = "deft_kernels", model: dict | None = None) -> Path:
    """Compile ``entries`` for ``target`` into ``out_dir/<name>.so``; returns the manifest's path.
    ``model`` (JSON-ready: the model, its layers and their offset profile, as ``tune_model``
    describes them) is kept in the manifest under ``"model"``."""
    from deft_tvm.runtime.targets import compile_kernel

    entries = list(entries)
    if not entries:
        raise ValueError("nothing to export: no workloads were given or found")
    functions = {}
    for entry in entries:
        fname = function_name(entry.spec, entry.part)
        if fname in functions:
            raise ValueError(f"workload kernel {kernel_key(entry.spec, entry.part)} appears twice")
        functions[fname] = entry.function.with_attr("global_symbol", fname)
    executable = compile_kernel(tvm.IRModule(functions), target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"{name}.so"
    executable.export_library(str(library))
    manifest = {
        "format": MANIFEST_FORMAT,
        "library": library.name,
        "sha256": _sha256(library),
        "target": json.loads(str(target)),
        "target_kind": target.kind.name,
        "arch": _target_arch(target),
        "tvm_version": tvm.__version__,
        "tvm_ffi_version": tvm_ffi.__version__,
        "kernels": [
            {
                "workload": kernel_key(entry.spec, entry.part),
                "part": entry.part,
                "function": function_name(entry.spec, entry.part),
                "dtype": entry.spec.dtype,
                "spec": entry.spec.to_dict(),
                "origin": entry.origin,
                **({} if entry.tilings is None else {"tilings": entry.tilings}),
            }
            for entry in entries
        ],
        **({} if model is None else {"model": model}),
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def _current_arch(kind: str) -> str:
    from deft_tvm.runtime.targets import device_arch, target_for_device

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("this kernel library is for CUDA, but no CUDA GPU is available")
        return device_arch()
    return _target_arch(target_for_device("cpu"))


@dataclasses.dataclass
class LoadedLibrary:
    """An exported library whose kernels were registered for dispatch."""

    manifest_path: Path
    target_kind: str
    kernels: dict[str, Callable]  # kernel key -> function


_loaded: dict[tuple[str, str], Callable] = {}  # (target kind, kernel key) -> function
_tilings: dict[tuple[str, str], dict] = {}  # (target kind, kernel key) -> its manifest's tilings
generation = 0
"""How many times the registered kernels changed (``load_library``, ``unload_all``): callers that keep
what ``loaded_kernel`` answered key it by this."""


def load_library(manifest_path: str | Path) -> LoadedLibrary:
    """Verify an exported library against its manifest and register its kernels for dispatch."""
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        candidates = sorted(manifest_path.glob("*.json"))
        if len(candidates) != 1:
            raise ValueError(f"{manifest_path} holds {len(candidates)} manifests; pass the .json file")
        manifest_path = candidates[0]
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path}: manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    library = manifest_path.parent / manifest["library"]
    checks = [
        ("sha256 of " + library.name, _sha256(library) if library.exists() else "missing file", manifest["sha256"]),
        ("TVM version", tvm.__version__, manifest["tvm_version"]),
        ("tvm-ffi version", tvm_ffi.__version__, manifest["tvm_ffi_version"]),
        (f"{manifest['target_kind']} architecture", _current_arch(manifest["target_kind"]), manifest["arch"]),
    ]
    for what, observed, expected in checks:
        if observed != expected:
            raise ValueError(
                f"refusing kernel library {library}: {what} is {observed!r} here but {expected!r} in its manifest"
            )
    module = tvm.runtime.load_module(str(library))
    kernels = {k["workload"]: module[k["function"]] for k in manifest["kernels"]}
    global generation
    for record in manifest["kernels"]:
        key = (manifest["target_kind"], record["workload"])
        _loaded[key] = kernels[record["workload"]]
        _tilings.pop(key, None)
        if "tilings" in record:
            _tilings[key] = record["tilings"]
    generation += 1
    return LoadedLibrary(manifest_path, manifest["target_kind"], kernels)


def loaded_kernel(target_kind: str, workload_key: str) -> Callable | None:
    """The kernel a loaded library registered under this kernel key (``deft_tvm.compute.spec.kernel_key``), if any."""
    return _loaded.get((target_kind, workload_key))


def loaded_tilings(target_kind: str, workload_key: str) -> dict | None:
    """The tilings the manifest of the loaded library that registered this kernel key gives it (a
    fused backward's ``{"data": ..., "weight": ...}``), if any."""
    return _tilings.get((target_kind, workload_key))


def unload_all() -> None:
    """Forget every registered library kernel (for tests)."""
    global generation
    _loaded.clear()
    _tilings.clear()
    generation += 1
