"""The fusion-criterion and merge-method registries (``fusion_train/fusion_criteria.py``,
``fusion_train/merge_methods.py``): the stage folders of recipes that ran before them are
unchanged, and every declared method reaches the CLI, the recipe and its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from recording_stages import RecordingStages

from fusion_train import demo, pipeline
from fusion_train.pipeline import STAGE_SETTINGS, DataSettings, ModelEntry, Recipe

MODELS = {"pivot": {"name": "pivot-smollm2-24l", "path": "/models/pivot"},
          "sources": [{"name": "smollm2-135m", "path": "/models/smollm2"},
                      {"name": "gemma3-270m", "path": "/models/gemma3"}],
          "data": {"train": "alpaca_eval_outputs.json"}, "run_dir": "."}  # fmt: skip


def explicit_folders(monkeypatch: pytest.MonkeyPatch, quick: bool, changes: dict[str, Any],
                     extra_sources: tuple[dict[str, str], ...] = ()) -> list[str]:  # fmt: skip
    """The folders of the explicit demo recipe's stages (represent to merge), as a CPU run names
    them (``device: cpu``: the dtype ``auto`` resolves to joins the represent keys); the models'
    fingerprints stand in for models, a key for the data."""
    monkeypatch.setattr(demo, "demo_models", lambda out: MODELS)
    monkeypatch.setattr(pipeline, "model_fingerprint", lambda path: f"fingerprint of {path}")
    raw = demo.demo_recipe(Path("/demo"), quick)
    raw["resources"]["device"] = "cpu"
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    sources = [*MODELS["sources"], *extra_sources]
    sections = {name: pipeline._build(cls, raw[name], "demo", name) for name, cls in STAGE_SETTINGS.items()
                if name in raw}  # fmt: skip
    recipe = Recipe(ModelEntry(**MODELS["pivot"]), tuple(ModelEntry(**s) for s in sources),
                    DataSettings(**raw["data"]), "/run", **sections)  # fmt: skip
    stages = RecordingStages()
    pipeline.explicit_models(recipe, stages, Path("train.jsonl"), "data-key")
    return stages.folders


QWEN = {"name": "qwen", "path": "/models/qwen"}


# Computed by the code before the registries (commit 5f5dec3): the runs made then are found again.
# A merge folder's key hashes the targets' keys, and those the fuse folders', so these pin the chain.
@pytest.mark.parametrize(
    ("quick", "changes", "folders"),
    [
        (True, {}, ["fuse/smollm2-135m-42ec0c5e1911", "fuse/gemma3-270m-083c60617869", "merge/varm-e4fd6fe25e64",
                    "merge/task_arithmetic-45d409e8e1d0", "merge/ties-76ed0b118dfc", "merge/slerp-fb1e3aa4b5d7",
                    "merge/sce-93ef88842924", "merge/linear-84ac5ecd6eaa", "merge/varm-weights-1c0d15f4db93"]),
        (False, {}, ["fuse/smollm2-135m-5d6efccfc7fe", "fuse/gemma3-270m-83285121341b", "merge/varm-e9a3cd9092bb",
                     "merge/task_arithmetic-58a80f23450a", "merge/ties-84cbb18c6a8a", "merge/slerp-5830c77aa549",
                     "merge/sce-5abbb47dd150", "merge/linear-07d4b1513ff0", "merge/varm-weights-90d3e1c8168b"]),
        (True, {"fuse": {"criterion": "avg-ce"}},
         ["fuse/smollm2-135m-2154c5cbe2f6", "fuse/gemma3-270m-83eef96c24f7", "merge/varm-1d8c2c31d823",
          "merge/task_arithmetic-322c58eb1417", "merge/ties-91d129766eab", "merge/slerp-3e302c74dcf3",
          "merge/sce-9a562b45e51a", "merge/linear-e317d241d00c", "merge/varm-weights-a39d515ae9aa"]),
        (False, {"fuse": {"criterion": "token-min-ce"}},
         ["fuse/smollm2-135m-dd42f8a807dd", "fuse/gemma3-270m-e740bfde0102", "merge/varm-7ff6982c6ff3",
          "merge/task_arithmetic-b7544e468ea9", "merge/ties-57ff6aaf12f4", "merge/slerp-4fd4de465ec2",
          "merge/sce-5c3041cff1f5", "merge/linear-1bf46b6cc1f3", "merge/varm-weights-23a79bcb2211"]),
    ],
)  # fmt: skip
def test_the_stage_folders_of_earlier_recipes_are_unchanged(
    monkeypatch: pytest.MonkeyPatch, quick: bool, changes: dict[str, Any], folders: list[str]
) -> None:
    found = explicit_folders(monkeypatch, quick, changes)
    assert [folder for folder in found if folder.startswith(("fuse/", "merge/"))] == folders


def test_a_two_target_method_is_skipped_with_three_targets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """slerp interpolates exactly two models: with a third source the run says so and merges the
    rest, into the folders the code before the registry made (commit 5f5dec3)."""
    found = explicit_folders(monkeypatch, True, {}, (QWEN,))
    assert [folder for folder in found if folder.startswith("merge/")] == [
        "merge/varm-bc7e0d42bd4a", "merge/task_arithmetic-cf9a9c3cddb9", "merge/ties-d3976c221bb1",
        "merge/sce-c8e8bf928690", "merge/linear-a5815e7fea2e", "merge/varm-weights-934caf365819",
    ]  # fmt: skip
    assert "- merge/slerp: skipped, it merges exactly 2 targets (3 here)\n" in capsys.readouterr().out
