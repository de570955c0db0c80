"""The training settings, declared once (``fusion_train/settings.py``): the stage folders of the
demo recipes and the settings' defaults are what they were before, a field added to a settings
class is a flag, a value of the settings and a recipe key. (That a launched rank gets the
settings whole: tests/test_calls.py.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from recording_stages import RecordingStages, explicit_folders, training_folders

from fusion_train import explicit, recipe
from fusion_train.errors import Command
from fusion_train.implicit.dpo import DPOSettings
from fusion_train.implicit.sections import SFTStage, command_values
from fusion_train.implicit.sft import SFTSettings
from fusion_train.implicit.tuning import settings_of
from fusion_train.options import FRACTION
from fusion_train.recipe import RecipeError
from fusion_train.settings import options_from, setting, settings_from
from fusion_train.train import TrainConfig


# Computed by the code before the settings were declared once (commit 93f8edf): the runs made
# then are found again.
@pytest.mark.parametrize(
    ("quick", "folders"),
    [
        (True, ["train/target-smollm2-135m-2cb580f285f1", "train/target-gemma3-270m-c59cc3da3dfd",
                "train/clm-baseline-520e8b770535"]),
        (False, ["train/target-smollm2-135m-fd329f715e32", "train/target-gemma3-270m-9b015e16f827",
                 "train/clm-baseline-bf7d113656e0"]),
    ],
)  # fmt: skip
def test_the_train_folders_of_the_demo_recipe_are_unchanged(
    monkeypatch: pytest.MonkeyPatch, quick: bool, folders: list[str]
) -> None:
    found = explicit_folders(monkeypatch, quick, {})
    assert [folder for folder in found if folder.startswith("train/")] == folders


@pytest.mark.parametrize(
    ("quick", "mode", "folders"),
    [
        (True, "fusechat3", ["sft/implicit-sft-5d497f83f6e6", "dpo/implicit-dpo-norm-6727696de4e4"]),
        (True, "wrpo", ["sft/implicit-sft-cd02305625ef", "dpo/implicit-wrpo-4b5dfa02dac5"]),
        (False, "fusechat3", ["sft/implicit-sft-ce1e5fbdd291", "dpo/implicit-dpo-norm-402f8e863af1"]),
        (False, "wrpo", ["sft/implicit-sft-ecbd6e4ef805", "dpo/implicit-wrpo-7b9851c6aa12"]),
    ],
)
def test_the_sft_and_dpo_folders_of_the_implicit_demo_recipe_are_unchanged(
    monkeypatch: pytest.MonkeyPatch, quick: bool, mode: str, folders: list[str]
) -> None:
    found = training_folders(monkeypatch, quick, mode, {})
    assert [folder for folder in found if folder.startswith(("sft/", "dpo/"))] == folders


SHARED = {"deepspeed": "zero2", "max_steps": -1, "per_device_batch_size": 1, "grad_accumulation": 1,
          "scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False,
          "bf16": None, "seed": 42, "attn_implementation": "auto", "report_to": "none", "logging_steps": 10,
          "save_steps": 500, "save_total_limit": 2, "resume": False, "model": "m", "out": "o"}  # fmt: skip


def test_the_defaults_of_the_settings_are_unchanged() -> None:
    assert asdict(TrainConfig(model="m", fused="f", out="o")) == {
        **SHARED, "fused": "f", "learning_rate": 5e-6, "epochs": 3.0, "warmup_ratio": 0.03, "lm_weight": 0.9,
        "temperature": 1.0, "loss_chunk_tokens": 256,
    }  # fmt: skip
    tuned = {**SHARED, "prefs": "p", "warmup_ratio": 0.1, "max_length": 2048}
    assert asdict(SFTSettings(model="m", prefs="p", out="o")) == {
        **tuned,
        "learning_rate": 5e-6,
        "epochs": 3.0,
    }
    assert asdict(DPOSettings(model="m", prefs="p", out="o")) == {
        **tuned, "learning_rate": 8e-7, "epochs": 1.0, "loss": "sigmoid_norm", "beta": 10.0, "alpha_max": None,
    }  # fmt: skip


class TrainingStages(RecordingStages):
    """Records every stage's folder, and runs the train stages' work (the trainer is a stand-in)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def run(self, stage: str, name: str, inputs: dict[str, Any], work: Any) -> tuple[Path, str]:
        folder, key = super().run(stage, name, inputs, work)
        if stage == "train":
            work(self.run_dir / name)
        return folder, key


def test_the_train_stages_of_the_quick_demo_hand_the_trainer_the_same_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trained: list[TrainConfig] = []
    monkeypatch.setattr(explicit, "train", lambda config: trained.append(config))
    explicit_folders(monkeypatch, True, {}, stages=TrainingStages(tmp_path))
    # Computed by the code before the settings were declared once (commit 93f8edf).
    target = {**SHARED, "max_steps": 3, "learning_rate": 2e-5, "warmup_ratio": 0.0, "epochs": 3.0,
              "lm_weight": 0.9, "temperature": 1.0, "loss_chunk_tokens": 256, "model": "/models/pivot",
              "fused": "/run/fuse/smollm2-135m-42ec0c5e1911",
              "out": str(tmp_path / "target-smollm2-135m" / "model")}  # fmt: skip
    assert [asdict(config) for config in trained] == [
        target,
        {**target, "fused": "/run/fuse/gemma3-270m-083c60617869",
         "out": str(tmp_path / "target-gemma3-270m" / "model")},
        {**target, "lm_weight": 1.0, "out": str(tmp_path / "clm-baseline" / "model")},
    ]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Smoothing:
    """A setting as one added to ``training.Schedule`` would be declared."""

    label_smoothing: float = setting(0.0, type=FRACTION, help="Target mass spread over the vocabulary.")


@dataclass(frozen=True)
class SFTSettingsWithSmoothing(SFTSettings, Smoothing):
    """``SFTSettings`` with the added setting (as it inherits ``Schedule``'s)."""


@dataclass(frozen=True, kw_only=True)
class SFTStageWithSmoothing(SFTStage, Smoothing):
    """A recipe's ``sft`` section with the added setting (as it inherits ``Schedule``'s)."""


@click.command("sft", cls=Command, context_settings={"show_default": True})  # as `fusion-train`'s
@options_from(SFTSettingsWithSmoothing)
def sft_with_smoothing(**params: Any) -> None:
    click.echo(repr(settings_of(SFTSettingsWithSmoothing, params)))


def test_a_field_added_to_the_settings_is_a_flag_a_setting_and_a_recipe_key(tmp_path: Path) -> None:
    text = " ".join(CliRunner().invoke(sft_with_smoothing, ["--help"], terminal_width=200).output.split())
    assert (
        "--label-smoothing FLOAT RANGE Target mass spread over the vocabulary. [default: 0.0; 0.0<=x<=1.0]"
        in text
    )
    arguments = ["--model", str(tmp_path), "--prefs", str(tmp_path), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(sft_with_smoothing, [*arguments, "--label-smoothing", "0.1"])
    assert result.exit_code == 0 and "label_smoothing=0.1" in result.output, result.output
    result = CliRunner().invoke(sft_with_smoothing, [*arguments, "--label-smoothing", "2"])
    assert result.exit_code == 2 and "2.0 is not in the range 0.0<=x<=1.0" in result.output, result.output

    section = recipe.build_section(SFTStageWithSmoothing, {"label_smoothing": 0.2}, "recipe.yaml", "sft")
    values = command_values(section, "fusechat3", 1, 40)
    paths = {"model": str(tmp_path), "prefs": str(tmp_path), "out": str(tmp_path / "out")}
    settings = SFTSettingsWithSmoothing(**paths, **values)
    assert values["label_smoothing"] == settings.label_smoothing == 0.2
    with pytest.raises(
        RecipeError, match=r"recipe.yaml: sft.label_smoothing: 1.5 is not in the range 0.0<=x<=1.0"
    ):
        recipe.build_section(SFTStageWithSmoothing, {"label_smoothing": 1.5}, "recipe.yaml", "sft")


@dataclass(frozen=True)
class Drawing:
    """A settings class with each kind of field ``options_from`` makes a flag of."""

    stops: tuple[str, ...] = setting((), help="Repeatable.")
    sizes: tuple[int, ...] = setting((1,), type=click.IntRange(min=1))
    greedy: bool = setting(False)
    engine: str | None = setting(None, type=click.Choice(["hf", "vllm"]))


@click.command()
@options_from(Drawing)
def drawing_command(**params: object) -> None:
    click.echo(repr(settings_from(Drawing, params)))


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ([], Drawing()),
        (["--stops", "A", "--stops", "\nUser:", "--sizes", "3", "--sizes", "4", "--greedy", "--engine", "hf"],
         Drawing(stops=("A", "\nUser:"), sizes=(3, 4), greedy=True, engine="hf")),
    ],
)  # fmt: skip
def test_each_kind_of_field_is_a_flag_that_gives_it_back(arguments: list[str], expected: Drawing) -> None:
    """A tuple field is a repeatable flag (its element's declared range), a bool a switch, an
    optional choice a choice; what the command parses is the settings with those values."""
    result = CliRunner().invoke(drawing_command, arguments)
    assert result.exit_code == 0 and result.output.strip() == repr(expected), result.output
    refused = CliRunner().invoke(drawing_command, ["--sizes", "0"])
    assert refused.exit_code == 2 and "0 is not in the range x>=1" in refused.output
