"""The preference-loss registry (``fusion_train/implicit/preference_losses.py``): the stage folders
of recipes that ran before it are unchanged, a loss declared there reaches the recipe (model name,
default and checks), and every loss's own setting has the fields and flag it needs."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest

pytest.importorskip("trl")

from recording_stages import training_folders

from fusion_train.implicit.dpo import DPOSettings, dpo_command
from fusion_train.implicit.preference_losses import DEFAULT_LOSS, LOSSES, SETTINGS, registry
from fusion_train.implicit.sections import MODEL_NAMES, DPOStage


# Computed by the code before the registry (commit 7a74a30): the runs made then are found again.
@pytest.mark.parametrize(
    ("quick", "mode", "dpo", "folder"),
    [
        (True, "fusechat3", {}, "dpo/implicit-dpo-norm-6727696de4e4"),
        (False, "fusechat3", {}, "dpo/implicit-dpo-norm-402f8e863af1"),
        (True, "wrpo", {}, "dpo/implicit-wrpo-4b5dfa02dac5"),
        (False, "wrpo", {}, "dpo/implicit-wrpo-7b9851c6aa12"),
        (True, "fusechat3", {"loss": "sigmoid"}, "dpo/implicit-dpo-1bda52c31a8a"),
        (True, "wrpo", {"loss": "sigmoid_norm"}, "dpo/implicit-dpo-norm-bcccece567f2"),
        (True, "wrpo", {"alpha_max": 0.2}, "dpo/implicit-wrpo-9c6bc7eef4cb"),
    ],
)
def test_the_stage_folders_of_earlier_recipes_are_unchanged(
    monkeypatch: pytest.MonkeyPatch, quick: bool, mode: str, dpo: dict[str, Any], folder: str
) -> None:
    """The dpo folder's key hashes every stage before it, so one folder pins the whole chain."""
    assert training_folders(monkeypatch, quick, mode, dpo)[-1] == folder


@pytest.mark.parametrize(("mode", "loss"), [("fusechat3", "ipo"), ("wrpo", "hinge")])
def test_a_recipe_trains_with_a_declared_loss_under_its_model_name(
    monkeypatch: pytest.MonkeyPatch, mode: str, loss: str
) -> None:
    folder = training_folders(monkeypatch, True, mode, {"loss": loss})[-1]
    assert folder.startswith(f"dpo/implicit-{loss}-") and f"implicit-{loss}" in MODEL_NAMES


def test_each_mode_has_a_default_loss_and_each_setting_its_field_and_flag() -> None:
    assert DEFAULT_LOSS == {"fusechat3": "sigmoid_norm", "wrpo": "wrpo"}  # the papers'
    flags = {option for parameter in dpo_command.params for option in parameter.opts}
    stage, settings = {f.name for f in fields(DPOStage)}, {f.name for f in fields(DPOSettings)}
    for setting, owner in SETTINGS.values():
        assert setting.name in stage and setting.name in settings and setting.flag in flags, setting
        assert setting in owner.settings and setting.low <= setting.default <= setting.high
    for name, loss in LOSSES.items():
        assert (
            name == loss.name and loss.model_name in MODEL_NAMES and set(loss.columns) >= {"prompt", "chosen"}
        )
    with pytest.raises(ValueError, match="declare implicit-dpo twice"):
        registry(LOSSES["sigmoid"], replace(LOSSES["ipo"], model_name="implicit-dpo"))
