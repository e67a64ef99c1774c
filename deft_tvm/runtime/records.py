"""MetaSchedule tuning databases as they are laid out under ``tuning_logs/``, and where they are.

The op looks for a workload's records under the user's tuning directory (``user_root``:
``deft-tvm tune``'s default ``--logs``, the same wherever a process runs), then under the records
shipped with the package (``committed_root``); the first that holds one wins.

``<root>/<target-tag>/<kernel-key>/`` holds ``workload.json`` (the ``DeformConvSpec`` and the kernel
part: ``forward``, or ``backward`` for the gradient kernels, whose folders' keys end in
``_backward``; folders without a part are forward ones) and the MetaSchedule JSON database
(``database_workload.json``, ``database_tuning_record.json``); a layer configuration's folder
(``compute.spec.generic_spec``) holds its tiling record instead (``CONFIGURATION_FILE``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from deft_tvm.compute.kernels import kernel_primfunc
from deft_tvm.compute.spec import DeformConvSpec, kernel_key

SPEC_FILE = "workload.json"
TUNING_DIR_ENV = "DEFT_TVM_TUNING_DIR"


def target_tag(target: tvm.target.Target) -> str:
    """Folder name of a target's databases: ``cuda-sm_90``, ``llvm``."""
    if target.kind.name == "cuda":
        return f"cuda-{target.arch}"
    return target.kind.name


def _database_folder(spec: DeformConvSpec, target: tvm.target.Target, part: str) -> str:
    """A database folder's path under a root: ``<target-tag>/<kernel key>``."""
    return os.path.join(target_tag(target), kernel_key(spec, part))


def database_dir(root: Path, spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward") -> Path:
    return Path(root) / _database_folder(spec, target, part)


def write_spec(directory: Path, spec: DeformConvSpec, part: str = "forward") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fields = {**spec.to_dict(), "part": part}
    (directory / SPEC_FILE).write_text(json.dumps(fields, indent=1) + "\n")


def read_kernel(directory: Path) -> tuple[DeformConvSpec, str]:
    """``(spec, part)`` of a database folder (part ``forward`` where it records none)."""
    fields = json.loads((Path(directory) / SPEC_FILE).read_text())
    part = fields.pop("part", "forward")
    return DeformConvSpec.from_dict(fields), part


def read_part(directory: Path) -> str:
    """The kernel part a database folder tunes (``forward`` where it records none)."""
    return read_kernel(directory)[1]


def open_database(directory: Path) -> ms.database.JSONDatabase:
    directory.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(directory))


def commit_schedule(directory: Path, spec: DeformConvSpec, sch, target: tvm.target.Target, run_secs: float,
                    part: str = "forward") -> None:
    """Store ``sch`` (a schedule of ``kernel_primfunc(spec, part)``) as a measured tuning record."""
    write_spec(directory, spec, part)
    db = open_database(directory)
    mod = kernel_primfunc(spec, part)
    workload = db.commit_workload(mod)
    args_info = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [run_secs], target, args_info))


def best_schedule(directory: Path, target: tvm.target.Target):
    """``(spec, schedule)`` of the fastest record in a database folder (of the folder's part,
    ``read_part``), or ``(spec, None)``."""
    from deft_tvm.schedules import register_tensor_intrinsics

    register_tensor_intrinsics(target)
    spec, part = read_kernel(directory)
    db = open_database(Path(directory))
    sch = ms.tir_integration.compile_tir(db, kernel_primfunc(spec, part), target)
    return spec, sch


@functools.cache
def committed_root() -> Path:
    """The ``tuning_logs`` folder shipped with the package (``deft_tvm.tuning_logs``)."""
    import deft_tvm.tuning_logs

    return Path(deft_tvm.tuning_logs.__file__).parent


def user_root() -> Path:
    """The user's tuning databases: ``$DEFT_TVM_TUNING_DIR``, else
    ``$XDG_DATA_HOME/deft_tvm/tuning_logs`` (``XDG_DATA_HOME`` default ``~/.local/share``, the XDG
    base directory convention)."""
    if os.environ.get(TUNING_DIR_ENV):
        return Path(os.environ[TUNING_DIR_ENV])
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(os.path.join(data_home, "deft_tvm", "tuning_logs"))


def record_roots() -> list[Path]:
    """Where the op looks for tuning records, in order: the user's (``user_root``), the shipped ones."""
    return [user_root(), committed_root()]


def _first_holding(roots, folder: str, file: str) -> Path | None:
    """``root/folder`` of the first of ``roots`` whose ``root/folder/file`` exists, or None: string
    joins and one ``stat`` per root, as the op asks on the first call of every input size."""
    for root in roots:
        directory = os.path.join(root, folder)
        if os.path.exists(os.path.join(directory, file)):
            return Path(directory)
    return None


def tuned_database(spec: DeformConvSpec, target: tvm.target.Target, part: str = "forward") -> Path | None:
    """The database folder of ``spec``'s ``part`` for ``target`` under the first of ``record_roots``
    where one holds a record (of a layer configuration, ``spec.shape_generic``: its tiling record,
    ``CONFIGURATION_FILE``), or None."""
    held = CONFIGURATION_FILE if spec.shape_generic else "database_tuning_record.json"
    return _first_holding(record_roots(), _database_folder(spec, target, part), held)


# A layer configuration's record (``deft-tvm tune --configuration``): the tiling of its kernel,
# measured at one size of it; a MetaSchedule record cannot hold it (the JSON database replays its
# traces when it loads them, and TVM 0.27 fails to replay layout transforms of variable extents).
CONFIGURATION_FILE = "configuration_tiling.json"


def write_configuration_record(directory: Path, spec: DeformConvSpec, record: dict, part: str = "forward") -> Path:
    """Write the tiling record of the layer configuration ``spec`` (``generic_spec``) in its
    database folder (``database_dir``), replacing one there."""
    write_spec(directory, spec, part)
    path = Path(directory) / CONFIGURATION_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def configuration_record(directory: Path) -> dict:
    """The tiling record in a configuration's database folder (``tuned_database``'s)."""
    return json.loads((Path(directory) / CONFIGURATION_FILE).read_text())


def configuration_schedule(directory: Path, target: tvm.target.Target):
    """``(spec, part, schedule)`` of the tiling record in a configuration's folder: its recorded
    tiling in its family's ``configuration_space`` applied to ``kernel_primfunc(spec, part)``.
    Raises ValueError where the family has no configuration space or the tiling is not in it."""
    from deft_tvm.schedules import configuration_space

    spec, part = read_kernel(directory)
    space = configuration_space(spec, target, part)
    if space is None:
        raise ValueError(f"{directory}: the {part} kernel of {spec.key()} on {target_tag(target)} has no "
                         f"configuration tilings")
    tiling = space.from_dict(configuration_record(directory)["tiling"])
    return spec, part, space.schedule(kernel_primfunc(spec, part), tiling)


def database_dirs(root: Path, target: tvm.target.Target) -> list[Path]:
    """Every workload folder of ``target`` under ``root`` that holds a MetaSchedule database (not a
    layer configuration's tiling record, ``configuration_dirs``), sorted."""
    base = Path(root) / target_tag(target)
    return sorted(p.parent for p in base.glob(f"*/{SPEC_FILE}") if not (p.parent / CONFIGURATION_FILE).exists())


def configuration_dirs(root: Path, target: tvm.target.Target) -> list[Path]:
    """Every layer configuration's folder of ``target`` under ``root`` that holds a tiling record
    (``CONFIGURATION_FILE``), sorted."""
    return sorted(p.parent for p in (Path(root) / target_tag(target)).glob(f"*/{CONFIGURATION_FILE}"))


FUSED_BACKWARD_FILE = "fused_backward.json"


def _fused_backward_folder(spec: DeformConvSpec, target: tvm.target.Target) -> str:
    return os.path.join(target_tag(target), f"{spec.key()}_fused_backward")


def fused_backward_dir(root: Path, spec: DeformConvSpec, target: tvm.target.Target) -> Path:
    """The folder of ``spec``'s fused-backward tiling record for ``target``: ``<root>/<target-tag>/
    <spec key>_fused_backward``."""
    return Path(root) / _fused_backward_folder(spec, target)


def write_fused_backward(directory: Path, record: dict) -> Path:
    """Write a fused-backward tiling record (``deft_tvm.tuning.fused_backward.tune_fused_backward``'s)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FUSED_BACKWARD_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def fused_backward_path(spec: DeformConvSpec, target: tvm.target.Target, roots: list[Path]) -> Path | None:
    """The fused-backward record file of ``spec`` for ``target`` under the first of ``roots`` that
    holds one, or None."""
    directory = _first_holding(roots, _fused_backward_folder(spec, target), FUSED_BACKWARD_FILE)
    return None if directory is None else directory / FUSED_BACKWARD_FILE


def fused_backward_record(spec: DeformConvSpec, target: tvm.target.Target, roots: list[Path]) -> dict | None:
    """The fused-backward record of ``spec`` for ``target`` under the first of ``roots`` that holds
    one (as written, with every candidate's time), or None."""
    path = fused_backward_path(spec, target, roots)
    return None if path is None else json.loads(path.read_text())


def fused_backward_specs(root: Path, target: tvm.target.Target) -> list[DeformConvSpec]:
    """The specs of every fused-backward record of ``target`` under ``root``, sorted by key."""
    paths = (Path(root) / target_tag(target)).glob(f"*_fused_backward/{FUSED_BACKWARD_FILE}")
    return sorted((DeformConvSpec.from_dict(json.loads(p.read_text())["spec"]) for p in paths), key=DeformConvSpec.key)


def recorded_fused_tilings(spec: DeformConvSpec, target: tvm.target.Target, roots: list[Path] | None = None):
    """``(data, weight)`` tilings of ``spec``'s fused-backward record for ``target`` under the first
    of ``roots`` that holds one (default: ``record_roots()``, the user's then the shipped ones), or
    None where there is none. Raises ValueError where the record found is another spec's."""
    from deft_tvm.schedules.cuda_backward_fused import DataTiling, WeightTiling

    path = fused_backward_path(spec, target, record_roots() if roots is None else roots)
    if path is None:
        return None
    record = json.loads(path.read_text())
    recorded = DeformConvSpec.from_dict(record["spec"])
    if recorded != spec:
        raise ValueError(f"{path} records {recorded.key()}, not {spec.key()}")
    return DataTiling(**record["data"]), WeightTiling(**record["weight"])
