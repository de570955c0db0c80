"""The training settings, declared once (``fusion_train/settings.py``): the stage folders of the
demo recipes and the settings' defaults are what they were before, and a field added to a
settings class is a flag, a value of the settings and a recipe key."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from recording_stages import RecordingStages, explicit_folders, training_folders

from fusion_train import pipeline
from fusion_train.implicit.dpo import DPOSettings
from fusion_train.implicit.sft import SFTSettings
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
    monkeypatch.setattr(pipeline, "train", trained.append)
    explicit_folders(monkeypatch, True, {}, stages=TrainingStages(tmp_path))
    # Computed by the code before the settings were declared once (commit 93f8edf).
    target = {**SHARED, "max_steps": 3, "learning_rate": 2e-5, "warmup_ratio": 0.0, "epochs": 3.0,
              "lm_weight": 0.9, "temperature": 1.0, "loss_chunk_tokens": 256, "model": "/models/pivot",
              "fused": "/run/fuse/smollm2-135m-42ec0c5e1911", "out": str(tmp_path / "target-smollm2-135m" / "model")}  # fmt: skip
    assert [asdict(config) for config in trained] == [
        target,
        {**target, "fused": "/run/fuse/gemma3-270m-083c60617869", "out": str(tmp_path / "target-gemma3-270m" / "model")},
        {**target, "lm_weight": 1.0, "out": str(tmp_path / "clm-baseline" / "model")},
    ]  # fmt: skip
