"""A stand-in for ``stages.Stages`` that names every stage's folder as a run would and runs
nothing: the tests that pin the folders of earlier runs compute them without models or data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusion_train.stages import stage_key


class RecordingStages:
    """Records each stage's folder, ``<stage>/<name>-<key>``, and runs nothing."""

    def __init__(self) -> None:
        self.folders: list[str] = []

    def run(self, stage: str, name: str, inputs: dict[str, Any], work: object) -> tuple[Path, str]:
        key = stage_key(stage, inputs)
        self.folders.append(f"{stage}/{name}-{key}")
        return Path("/run") / stage / f"{name}-{key}", key
