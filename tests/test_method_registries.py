"""The fusion-criterion and merge-method registries (``fusion_train/fusion_criteria.py``,
``fusion_train/merge_methods.py``): the stage folders of recipes that ran before them are
unchanged, and every declared method reaches the CLI, the recipe and its checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from mergekit.merge_methods import get as get_merge_method
from recording_stages import MODELS, explicit_folders

from fusion_train import demo, explicit, fusion_criteria, merge_methods, recipe
from fusion_train.fuse import FusionError, fuse, fuse_command
from fusion_train.fusion_criteria import CRITERIA, DEFAULT_CRITERION
from fusion_train.merge_methods import CONFIG_DIR, DEFAULT_MERGE_METHODS, MERGE_METHODS
from fusion_train.recipe import MergeStage, Recipe, RecipeError
from varm_merge.cli import TARGET_PLACEHOLDER, fill_placeholders, resolve_config
from varm_merge.weights import PNG_NAME

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


# --------------------------------------------------------------------------- the registries


def parse(tmp_path: Path, **sections: dict[str, Any]) -> Recipe:
    """A recipe of two sources with ``sections``, as ``fusion-train run`` reads it (the models are
    empty folders: nothing runs)."""
    for name in ("pivot", "a", "b"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "chats.json").write_text("[]")
    raw = {"pivot": {"name": "pivot", "path": "pivot"},
           "sources": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
           "data": {"train": "chats.json", "heldout_fraction": 0.25}, **sections}  # fmt: skip
    return recipe.parse_recipe(raw, base=tmp_path, default_run_dir=tmp_path / "run")


def test_every_criterion_reaches_the_cli_the_recipe_and_the_checks(tmp_path: Path) -> None:
    option = next(p for p in fuse_command.params if p.name == "criterion")
    assert isinstance(option.type, click.Choice) and list(option.type.choices) == list(CRITERIA)
    assert option.default == DEFAULT_CRITERION == recipe.FuseSettings().criterion
    for name, criterion in CRITERIA.items():
        assert name == criterion.name and f"{name}: {criterion.help}" in option.help
        assert parse(tmp_path, fuse={"criterion": name}).fuse.criterion == name
    with pytest.raises(RecipeError, match=r"fuse\.criterion: .*'median-ce' is not one of 'min-ce', 'avg-ce', "
                                          "'token-min-ce'"):  # fmt: skip
        parse(tmp_path, fuse={"criterion": "median-ce"})
    with pytest.raises(
        FusionError, match="unknown criterion 'median-ce'; choose one of min-ce, avg-ce, token-min-ce"
    ):
        fuse(tmp_path, [tmp_path], tmp_path / "out", "median-ce")


def test_every_merge_method_has_its_config_and_reaches_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert sorted(path.stem for path in CONFIG_DIR.glob("*.yml")) == sorted(MERGE_METHODS)  # none undeclared
    for name, method in MERGE_METHODS.items():
        assert name == method.name and resolve_config(name) == method.config
        text = method.config.read_text(encoding="utf-8")
        targets = sorted({int(n) for n in TARGET_PLACEHOLDER.findall(text)})
        assert targets == [1, 2] and method.targets in (None, len(targets))
        config = yaml.safe_load(fill_placeholders(text, "pivot", ["t1", "t2"]))  # a valid mergekit config
        assert config["merge_method"] == name and get_merge_method(name)
        if method.targets is None:  # the shipped per-target settings serve any number of targets
            three = explicit.merge_config(name, "pivot", ["t1", "t2", "t3"], "float32")
            assert [model["model"] for model in three["models"]] == ["t1", "t2", "t3"]
    monkeypatch.setattr(demo, "demo_models", lambda out: MODELS)
    assert (
        MergeStage().methods
        == DEFAULT_MERGE_METHODS
        == tuple(demo.demo_recipe(tmp_path, True)["merge"]["methods"])
    )
    assert parse(tmp_path, merge={"methods": list(MERGE_METHODS)}).merge.methods == tuple(MERGE_METHODS)
    with pytest.raises(RecipeError, match=r"merge\.methods: 'nuslerp': not a merge method; one of varm, "):
        parse(tmp_path, merge={"methods": ["varm", "nuslerp"]})
    assert MERGE_METHODS["varm"].analysis and MERGE_METHODS["varm"].analysis.figure == PNG_NAME


def test_a_method_declared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion criteria declare min-ce twice"):
        fusion_criteria.registry(CRITERIA["min-ce"], replace(CRITERIA["avg-ce"], name="min-ce"))
    with pytest.raises(ValueError, match="merge methods declare slerp twice"):
        merge_methods.registry(*MERGE_METHODS.values(), replace(MERGE_METHODS["linear"], name="slerp"))
    varm = MERGE_METHODS["varm"]
    with pytest.raises(ValueError, match="merge methods declare varm-weights twice"):
        merge_methods.registry(varm, replace(MERGE_METHODS["ties"], analysis=varm.analysis))


def test_the_docs_list_the_registered_methods() -> None:
    docs = Path(__file__).parent.parent / "docs"
    stages, recipe, varm = (
        (docs / name).read_text(encoding="utf-8") for name in ("stages.md", "recipe.md", "varm.md")
    )
    assert f"`--criterion {'|'.join(CRITERIA)}` (default `{DEFAULT_CRITERION}`)" in stages
    assert f"# {'|'.join(CRITERIA)};" in recipe
    assert f"  methods: [{', '.join(DEFAULT_MERGE_METHODS)}]" in recipe
    merging = stages[stages.index("## merge") : stages.index("## evaluate")]
    placeholders = varm[varm.index("- **Placeholders.**") : varm.index("What `varm-merge` refuses")]
    for name in MERGE_METHODS:
        assert f"`{name}`" in merging and f"`{name}`" in placeholders, name
