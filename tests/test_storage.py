"""Crash-safe outputs (fusion_train/storage.py): written whole or not at all, and as readable as
the user's umask allows, so colleagues and other nodes can read them on shared storage."""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusion_train.represent import RepresentSettings, represent
from fusion_train.storage import (
    atomic_directory,
    atomic_file,
    atomic_write_text,
    finite_or_null,
    write_json_atomic,
)


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=lambda m: f"umask-{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    atomic_write_text(tmp_path / "report.json", "{}\n")
    with atomic_file(tmp_path / "map.npz") as handle:
        handle.write(b"\x93NUMPY")
    with atomic_directory(tmp_path / "part-00000") as tmp:
        (tmp / "data.arrow").write_bytes(b"rows")
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "model.safetensors").chmod(0o600)  # as safetensors writes it
        (tmp / "run.sh").write_bytes(b"#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
    assert _mode(tmp_path / "part-00000" / "model.safetensors") == 0o666 & ~umask
    assert _mode(tmp_path / "part-00000" / "run.sh") == 0o777 & ~umask
    assert _mode(tmp_path / "report.json") == _mode(tmp_path / "map.npz") == 0o666 & ~umask
    assert _mode(tmp_path / "part-00000") == 0o777 & ~umask
    assert (tmp_path / "report.json").read_text() == "{}\n"
    assert (tmp_path / "map.npz").read_bytes() == b"\x93NUMPY"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["map.npz", "part-00000", "report.json"]  # no temporaries left


def test_failed_writes_leave_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "part") as tmp:
        (tmp / "half.arrow").write_bytes(b"ro")
        raise RuntimeError("killed")
    with pytest.raises(TypeError):  # fails inside the write
        atomic_write_text(tmp_path / "report.json", b"not text")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "map.npz") as handle:
        handle.write(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_json_is_written_strict_naming_non_finite_numbers(tmp_path: Path) -> None:
    """NaN and Infinity are not JSON (Python writes them; strict readers refuse the file)."""
    payload = {"loss": {"start": 1.0, "end": math.nan}, "rates": [0.5, -math.inf], "note": "nan"}
    with pytest.raises(
        ValueError, match=r"report.json: not written, non-finite numbers at loss.end, rates\[1\]"
    ):
        write_json_atomic(tmp_path / "report.json", payload)
    assert list(tmp_path.iterdir()) == []
    cleaned = finite_or_null(payload)
    assert cleaned == {"loss": {"start": 1.0, "end": None}, "rates": [0.5, None], "note": "nan"}
    write_json_atomic(tmp_path / "report.json", cleaned)
    assert json.loads((tmp_path / "report.json").read_text(), parse_constant=pytest.fail) == cleaned


def test_a_stage_output_is_readable_by_others_under_umask_022(tiny_models, chats, tmp_path: Path) -> None:
    """Every file and folder `represent` writes (manifest, parts, Arrow files) is 0644/0755."""
    previous = os.umask(0o022)
    try:
        represent(tiny_models["smollm2"], chats, tmp_path / "repr", RepresentSettings(top_k=2, chunk_size=4),
                  batch_tokens=256, progress=False)  # fmt: skip
    finally:
        os.umask(previous)
    written = list((tmp_path / "repr").rglob("*"))
    assert any(p.name.endswith(".arrow") for p in written) and any(p.name == "manifest.json" for p in written)
    modes = {str(p.relative_to(tmp_path)): _mode(p) for p in written}
    assert {p: m for p, m in modes.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)} == {}
