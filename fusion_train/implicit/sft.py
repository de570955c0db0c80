"""Implicit stage 4: supervised fine-tuning on the best responses (``fusion-train sft``).

FuseChat-3.0 (arXiv 2503.04222) fine-tunes the target on the best-scored source response per
prompt (``fusion-train prefer``'s ``sft/``, TRL's conversational prompt-completion format)
before preference training. This is TRL's ``SFTTrainer`` as it is: the loss covers the
completion tokens only, each conversation rendered in the model's chat template. Launcher,
ZeRO presets, bf16, checkpoints and publishing are ``train``'s (``fusion_train/implicit/tuning.py``).

``--nproc``/``--hostfile`` re-run this module under the ``deepspeed`` launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
import datasets

from fusion_train.errors import Command
from fusion_train.implicit import tuning
from fusion_train.implicit.preferences import SFT_DIR
from fusion_train.launch import launch_options
from fusion_train.settings import options_from, setting

STAGE = "sft"
# (learning rate, epochs) of the SFT step per prefer mode, for the papers' global batch of 128:
# FuseChat-3.0 fine-tunes Llama-3.1-8B for 3 epochs at 5e-6 (Qwen-2.5 and Gemma-2 at 2e-6); WRPO
# for 1 epoch at 7e-6 (its configs). The command's defaults are FuseChat-3.0's; a recipe with
# prefer.mode wrpo takes WRPO's.
SFT_DEFAULTS = {"fusechat3": (5e-6, 3.0), "wrpo": (7e-6, 1.0)}
LEARNING_RATE, EPOCHS = SFT_DEFAULTS["fusechat3"]


@dataclass(frozen=True)
class SFTSettings(tuning.TuneSettings):
    """An SFT run: ``TuneSettings`` with SFT's defaults."""

    learning_rate: float = setting(
        LEARNING_RATE,
        help="Peak learning rate. Default: FuseChat-3.0's (with 3 epochs; for Qwen-2.5 and Gemma-2 it gives "
        f"2e-6); WRPO's SFT: 7e-6 with --epochs 1. {tuning.PAPERS_BATCH_HELP}",
        kw_only=True,
    )
    epochs: float = field(default=EPOCHS, kw_only=True)


def load_sft(settings: tuning.TuneSettings) -> datasets.Dataset:
    return tuning.load_split(settings.prefs, SFT_DIR, ("prompt", "completion"))


def check(settings: tuning.TuneSettings, world_size: int) -> tuning.Prepared:
    """Every check ``sft`` makes before training (the launching process makes them once)."""
    return tuning.prepare(settings, load_sft, STAGE, world_size)


def sft(settings: SFTSettings) -> dict[str, Any] | None:
    """Fine-tune ``settings.model`` on ``prefs/sft`` and publish it at ``settings.out``; return
    the summary on the main rank."""
    from trl import SFTConfig, SFTTrainer

    def make_trainer(prepared: tuning.Prepared, callbacks: list[Any]) -> Any:
        args = tuning.trl_arguments(SFTConfig, settings, prepared)
        return SFTTrainer(
            model=tuning.load_policy(settings, args),
            args=args,
            train_dataset=prepared.data,
            processing_class=prepared.tokenizer,
            callbacks=callbacks,
        )

    return tuning.run(
        settings,
        STAGE,
        load_sft,
        make_trainer,
        log_keys=("step", "loss", "grad_norm", "learning_rate", "mean_token_accuracy"),
    )


@click.command("sft", cls=Command)
@options_from(SFTSettings)
@launch_options
def sft_command(**params: Any) -> None:
    """Fine-tune a model on the best response per prompt (`fusion-train prefer`'s sft/), on TRL's
    SFTTrainer and DeepSpeed ZeRO."""
    settings = tuning.settings_of(SFTSettings, params)
    tuning.command(params, settings, check, sft)


if __name__ == "__main__":
    sft_command(prog_name="fusion-train sft")
