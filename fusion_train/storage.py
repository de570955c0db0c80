"""Crash-safe outputs shared by every stage: atomic files and directories, and stage manifests.

A stage's output directory holds ``manifest.json`` (what produced it: model, data, settings)
and parts written whole or not at all. A rerun with the same manifest skips finished parts;
a rerun with a different one is refused instead of mixing two runs' results.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

from fusion_train.errors import UserError

MANIFEST = "manifest.json"
# Published beside a trained model by train, sft and dpo: a model folder without it is unfinished.
TRAINING_SUMMARY = "training_summary.json"


class OutputMismatchError(UserError, ValueError):
    """An output directory that already holds results of a different run."""


T = TypeVar("T")


def _beside(target: Path, create: Callable[[Path], T]) -> tuple[Path, T]:
    """A new, uniquely named temporary path beside ``target``, made by ``create``.

    ``create`` asks for the usual modes (0666 files, 0777 directories), so the umask decides what
    others may read once the path is renamed into place; tempfile's mkstemp and mkdtemp would
    make every output 0600/0700, unreadable to colleagues and other nodes on shared storage.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, create(tmp)
        except FileExistsError:  # another writer's temporary name, however unlikely
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


@contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """Yield a new file beside ``path``, opened with ``mode``, that becomes ``path`` only if the
    block finishes (a crash leaves the old file or none, never half of one)."""
    tmp, fd = _beside(path, lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, mode, **open_args) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def non_finite_keys(payload: Any, key: str = "") -> list[str]:
    """The dotted keys (``loss.end.grad_norm``, list items by index) of NaN and infinite numbers."""
    if isinstance(payload, float):
        return [] if math.isfinite(payload) else [key or "(the value)"]
    if isinstance(payload, dict):
        return [
            k
            for name, v in payload.items()
            for k in non_finite_keys(v, f"{key}.{name}" if key else str(name))
        ]
    if isinstance(payload, (list, tuple)):
        return [k for i, v in enumerate(payload) for k in non_finite_keys(v, f"{key}[{i}]")]
    return []


def finite_or_null(payload: Any) -> Any:
    """``payload`` with every NaN and infinite number replaced by None (JSON null)."""
    if isinstance(payload, float):
        return payload if math.isfinite(payload) else None
    if isinstance(payload, dict):
        return {k: finite_or_null(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_null(v) for v in payload]
    return payload


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON atomically (see :func:`atomic_write_text`), strict: NaN and Infinity are not JSON
    (other readers refuse them), so a payload holding them is refused, naming their keys; a
    stage decides what a non-finite number means before it writes one."""
    bad = non_finite_keys(payload)
    if bad:
        raise ValueError(f"{path}: not written, non-finite numbers at {', '.join(bad[:5])}")
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def open_to_umask(tree: Path) -> None:
    """Give every file and folder under ``tree`` the usual modes less the umask (0666 files,
    0777 folders and executables). Libraries writing into an output folder may make their files
    0600 (safetensors does, through tempfile); published outputs follow the umask like the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666
        path.chmod(full & ~umask)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block finishes, with the
    modes the umask asks for (see :func:`open_to_umask`)."""
    tmp, _ = _beside(target, lambda p: p.mkdir(mode=0o777))
    try:
        yield tmp
        if target.exists():  # another process finished the same part first; results are identical
            shutil.rmtree(tmp)
        else:
            open_to_umask(tmp)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_temporary(name: str) -> bool:
    """A name :func:`_beside` gives: what a killed writer leaves, never a user's file."""
    return name.startswith(".") and name.endswith(".tmp")


def _holds_something(path: Path) -> bool:
    """A file, or a folder with a file somewhere in it (temporary names aside)."""
    if is_temporary(path.name):
        return False
    return not path.is_dir() or any(_holds_something(p) for p in path.iterdir())


def _entries(folder: Path, leave_out: Collection[str] = ()) -> list[str]:
    """What ``folder`` holds besides ``leave_out``, folders marked with a slash; temporary names
    and folders without a file are left out (a run makes folders before their first file)."""
    if not folder.is_dir():
        return []
    return sorted(
        f"{p.name}/" if p.is_dir() else p.name
        for p in folder.iterdir()
        if p.name not in leave_out and _holds_something(p)
    )


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def refuse_unrelated(out_dir: Path, own: Collection[str] = ()) -> None:
    """The rule for every command's ``--out``: new, empty, or its own earlier output. A folder
    holding anything else (``own``: the names of a command's outputs without a manifest) is the
    user's, and a command would write into it; refused, naming what is there."""
    found = _entries(out_dir, own)
    if found:
        raise OutputMismatchError(
            f"{out_dir} holds files that are not an output of this command ({_listed(found)}; no {MANIFEST}). "
            "Pass a new or empty --out directory."
        )


_ABSENT = object()  # a key one manifest has and the other has not


def _shown(value: Any, width: int = 48) -> str:
    text = "(none)" if value is _ABSENT else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """Every value that differs between two manifests, as ``key: old -> new``, keys dotted down
    to the values (``settings.temperature: 0.8 -> 0.5``), list items by index."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            line
            for k in sorted(set(old) | set(new))
            for line in differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else k)
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        pairs = enumerate(zip(old, new, strict=True))
        return [line for i, (a, b) in pairs for line in differences(a, b, f"{key}[{i}]")]
    return [] if old == new else [f"{key}: {_shown(old)} -> {_shown(new)}"]


def check_output(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``out_dir`` already holds ``manifest``'s run (False: no run yet); a different run's,
    or files of anything else, are an error that says what the folder holds. Writes nothing."""
    manifest = json.loads(json.dumps(manifest))  # compare as it reads back (tuples become lists)
    path = out_dir / MANIFEST
    if not path.exists():
        refuse_unrelated(out_dir)
        return False
    existing = read_json(path)
    if existing == manifest:
        return True
    results = _entries(out_dir, {MANIFEST})
    holds = (
        f"already holds results of a different run ({_listed(results)})"
        if results
        else f"holds the {MANIFEST} of a different run, and no results yet"
    )
    if existing.get("format") != manifest.get("format"):
        why = f"its format is {existing.get('format')!r}, this command writes {manifest.get('format')!r}"
    else:
        why = f"differs in: {'; '.join(differences(existing, manifest))}"
    raise OutputMismatchError(
        f"{out_dir} {holds}: {why}. Use another --out directory, or delete this one to start over."
    )


def claim_output(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Record ``manifest`` in ``out_dir``, or check it matches the one already there."""
    if not check_output(out_dir, manifest):
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / MANIFEST, manifest)
