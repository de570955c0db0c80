"""A stand-in for ``stages.Stages`` that names every stage's folder as a run would and runs
nothing: the tests that pin the folders of earlier runs compute them without models or data,
with the demo recipes' folders computed here for all of them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fusion_train import demo, explicit
from fusion_train.implicit import pipeline as implicit_pipeline
from fusion_train.implicit import preferences
from fusion_train.implicit.pipeline import ImplicitRun
from fusion_train.implicit.sections import IMPLICIT_SETTINGS
from fusion_train.recipe import STAGE_SETTINGS, DataSettings, ModelEntry, Recipe, build_section
from fusion_train.stages import Resources, stage_key

MODELS = {"pivot": {"name": "pivot-smollm2-24l", "path": "/models/pivot"},
          "sources": [{"name": "smollm2-135m", "path": "/models/smollm2"},
                      {"name": "gemma3-270m", "path": "/models/gemma3"}],
          "data": {"train": "alpaca_eval_outputs.json"}, "run_dir": "."}  # fmt: skip


class RecordingStages:
    """Records each stage's folder, ``<stage>/<name>-<key>``, and runs nothing."""

    def __init__(self) -> None:
        self.folders: list[str] = []

    def run(self, stage: str, name: str, inputs: dict[str, Any], work: object) -> tuple[Path, str]:
        key = stage_key(stage, inputs)
        self.folders.append(f"{stage}/{name}-{key}")
        return Path("/run") / stage / f"{name}-{key}", key


def explicit_folders(monkeypatch: pytest.MonkeyPatch, quick: bool, changes: dict[str, Any],
                     extra_sources: tuple[dict[str, str], ...] = (),
                     stages: RecordingStages | None = None) -> list[str]:  # fmt: skip
    """The folders of the explicit demo recipe's stages (represent to merge), as a CPU run names
    them (``device: cpu``: the dtype ``auto`` resolves to joins the represent keys); the models'
    fingerprints stand in for models, a key for the data. ``stages``: one that runs some stages."""
    monkeypatch.setattr(demo, "demo_models", lambda out: MODELS)
    monkeypatch.setattr(explicit, "model_fingerprint", lambda path: f"fingerprint of {path}")
    raw = demo.demo_recipe(Path("/demo"), quick)
    raw["resources"]["device"] = "cpu"
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    sources = [*MODELS["sources"], *extra_sources]
    sections = {name: build_section(cls, raw[name], "demo", name) for name, cls in STAGE_SETTINGS.items()
                if name in raw}  # fmt: skip
    recipe = Recipe(ModelEntry(**MODELS["pivot"]), tuple(ModelEntry(**s) for s in sources),
                    DataSettings(**raw["data"]), "/run", **sections)  # fmt: skip
    stages = stages or RecordingStages()
    explicit.ExplicitRun(recipe, stages, Path("train.jsonl"), "data-key").models()
    return stages.folders


def training_folders(
    monkeypatch: pytest.MonkeyPatch, quick: bool, mode: str, dpo: dict[str, Any]
) -> list[str]:
    """The folders of the implicit demo recipe's training stages (sample to dpo), as a run names
    them; the models' fingerprints and the pairs' count stand in for models and data."""
    monkeypatch.setattr(demo, "demo_models", lambda out: MODELS)
    monkeypatch.setattr(implicit_pipeline, "model_fingerprint", lambda path: f"fingerprint of {path}")
    monkeypatch.setattr(preferences, "count_examples", lambda prefs, split: 40)
    raw = demo.implicit_demo_recipe(Path("/demo"), quick, 1, mode)
    raw["dpo"].update(dpo)
    sections = {name: build_section(cls, raw[name], "demo", name) for name, cls in IMPLICIT_SETTINGS.items()}
    recipe = SimpleNamespace(pivot=ModelEntry(**MODELS["pivot"]), sources=[ModelEntry(**s) for s in MODELS["sources"]],
                             resources=build_section(Resources, raw["resources"], "demo", "resources"), **sections)  # fmt: skip
    stages = RecordingStages()
    ImplicitRun(recipe, stages, Path("train.jsonl"), Path("heldout.jsonl"), "data-key").train_models()
    return stages.folders
