"""Stages that claim to resume, killed at chosen points and run again: the rerun finishes, and its
outputs equal an uninterrupted run's. Each kill is a real SIGKILL of a real ``fusion-train``
process (tests/kill_driver.py patches the call to die at, inside that process only)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from train_fixtures import build_fused

from fusion_train.train import TrainConfig, TrainInputError, checkpoints, prepare, work_dir

KILL_DRIVER = Path(__file__).with_name("kill_driver.py")


def _checkpoint(work: Path, step: int, state: str | None) -> Path:
    """A checkpoint directory whose trainer_state.json holds ``state`` (None: not written yet)."""
    path = work / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_checkpoints_killed_while_being_written_are_ignored(tiny_models, tmp_path, caplog):
    pivot = tiny_models["mistral"]
    fused = build_fused(pivot, tmp_path / "fused")
    config = TrainConfig(model=str(pivot), fused=str(fused), out=str(tmp_path / "target"), resume=True)
    work = work_dir(config.out)
    complete = json.dumps({"global_step": 2})
    _checkpoint(work, 2, complete)
    _checkpoint(work, 10, complete)  # later than checkpoint-2 by step, earlier by name
    _checkpoint(work, 12, None)  # killed before its trainer_state.json
    _checkpoint(work, 14, complete[:7])  # killed while writing it
    assert checkpoints(work) == (work / "checkpoint-10", [work / "checkpoint-12", work / "checkpoint-14"])

    with caplog.at_level(logging.WARNING):
        assert prepare(config, world_size=1).resume_from == str(work / "checkpoint-10")
    assert (
        "ignoring checkpoint-12, checkpoint-14 (killed while being written); resuming from checkpoint-10"
        in caplog.text
    )

    for step in (2, 10):
        (work / f"checkpoint-{step}" / "trainer_state.json").unlink()
    assert prepare(config, world_size=1).resume_from is None  # from the beginning, said so
    assert "resuming from the beginning" in caplog.text
    with pytest.raises(TrainInputError, match=r"earlier run \(checkpoint-14\); pass --resume"):
        prepare(TrainConfig(**{**config.__dict__, "resume": False}), world_size=1)
