"""``fusion-train dpo --loss NAME`` (implicit stage 5): preference-train a model on ``fusion-train
prefer``'s ``pairs/``, with the reference model a frozen copy of it, on TRL's DPOTrainer.

The losses (DPO, length-normalised DPO, WRPO, IPO, SLiC's hinge), their defaults and what each
needs are declared in ``preference_losses``, their own trainers in ``preference_trainers``; this
stage reads its flags, checks and defaults from there. Launcher, ZeRO presets, bf16, checkpoints
and publishing are ``train``'s (``fusion_train/implicit/tuning.py``); ``--nproc``/``--hostfile``
re-run this module under the ``deepspeed`` launcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
import datasets
from trl import DPOConfig

from fusion_train.errors import Command
from fusion_train.implicit import tuning
from fusion_train.implicit.preference_losses import DEFAULT_LOSS, LOSSES, SETTINGS, PreferenceLoss
from fusion_train.implicit.preferences import PAIRS_DIR
from fusion_train.launch import launch_options
from fusion_train.options import POSITIVE_FLOAT
from fusion_train.settings import options_from, setting

STAGE = "dpo"
COMMAND_LOSS = DEFAULT_LOSS["fusechat3"]  # --loss without the flag: FuseChat-3.0's
TRAINING_KEYS = (
    "step",
    "loss",
    "grad_norm",
    "learning_rate",
)  # a summary's record of a step, before the loss's


def number(value: float) -> str:
    """A default as --help writes it: 0.01, 10, 3e-7."""
    return f"{value:g}".replace("e-0", "e-")


def by_loss(value: Callable[[PreferenceLoss], float]) -> str:
    """Each loss's default of a setting, with its source, for --help."""
    return ", ".join(f"{loss.name} {number(value(loss))} ({loss.source})" for loss in LOSSES.values())


def loss_help() -> str:
    def one(loss: PreferenceLoss) -> str:
        needs = f" (needs pairs of `fusion-train prefer --mode {loss.pairs_of}`)" if loss.pairs_of else ""
        return f"{loss.name}: {loss.title}{needs}"

    return "; ".join(one(loss) for loss in LOSSES.values()) + "."


def loss_setting(name: str) -> Any:
    """The field of a loss's own setting (``preference_losses.SETTINGS``), None unless that loss
    runs: its flag's range and help come from the loss's declaration."""
    declared, owner = SETTINGS[name]
    return setting(
        None,
        type=click.FloatRange(declared.low, declared.high),
        help=f"{owner.title}: {declared.help} (default {number(declared.default)}, {owner.source}).",
    )


@dataclass(frozen=True)
class DPOSettings(tuning.TuneSettings):
    """A preference-training run; ``beta``, ``learning_rate`` and the loss's own settings
    (``alpha_max``) default by loss (``preference_losses.LOSSES``)."""

    loss: str = setting(COMMAND_LOSS, type=click.Choice(list(LOSSES)), help=loss_help())
    beta: float | None = setting(
        None,
        type=POSITIVE_FLOAT,
        help=f"beta of the loss. Default by --loss: {by_loss(lambda loss: loss.beta)}.",
    )
    alpha_max: float | None = loss_setting("alpha_max")  # wrpo's
    learning_rate: float | None = setting(  # type: ignore[assignment]
        None,
        help=f"Peak learning rate. Default by --loss: {by_loss(lambda loss: loss.learning_rate)}. "
        f"{tuning.PAPERS_BATCH_HELP}",
        kw_only=True,
    )
    epochs: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise tuning.TuneInputError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}.")
        loss = LOSSES[self.loss]
        for declared, owner in SETTINGS.values():
            value = getattr(self, declared.name)
            if value is not None and owner is not loss:
                raise tuning.TuneInputError(
                    f"{declared.flag} is {owner.title}'s; drop it or use --loss {owner.name}."
                )
            if value is not None and not declared.low <= value <= declared.high:
                raise tuning.TuneInputError(
                    f"{declared.flag} must be in [{declared.low:g}, {declared.high:g}]."
                )
        if self.beta is not None and self.beta <= 0:
            raise tuning.TuneInputError("--beta must be positive.")
        defaults = {
            "beta": loss.beta,
            "learning_rate": loss.learning_rate,
            **{declared.name: declared.default for declared in loss.settings},
        }
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        super().__post_init__()

    @property
    def preference_loss(self) -> PreferenceLoss:
        return LOSSES[self.loss]


def load_pairs(settings: tuning.TuneSettings) -> datasets.Dataset:
    assert isinstance(settings, DPOSettings)
    loss = settings.preference_loss
    hint = (
        f": --loss {loss.name} needs pairs of `fusion-train prefer --mode {loss.pairs_of}`"
        if loss.pairs_of
        else ""
    )
    return tuning.load_split(settings.prefs, PAIRS_DIR, loss.columns, hint=hint)


def check(settings: tuning.TuneSettings, world_size: int) -> tuning.Prepared:
    """Every check ``dpo`` makes before training (the launching process makes them once)."""
    return tuning.prepare(settings, load_pairs, STAGE, world_size)


def dpo(settings: DPOSettings) -> dict[str, Any] | None:
    """Preference-train ``settings.model`` on ``prefs/pairs`` (the reference model: the same model,
    frozen) and publish it at ``settings.out``; return the summary on the main rank."""
    loss = settings.preference_loss

    def make_trainer(prepared: tuning.Prepared, callbacks: list[Any]) -> Any:
        args = tuning.trl_arguments(
            DPOConfig, settings, prepared, beta=settings.beta, loss_type=[loss.loss_type]
        )
        policy, reference = tuning.load_policy(settings, args), tuning.load_policy(settings, args)
        own = {setting.name: getattr(settings, setting.name) for setting in loss.settings}
        return loss.trainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=prepared.data,
            processing_class=prepared.tokenizer,
            callbacks=callbacks,
            **own,
        )

    return tuning.run(settings, STAGE, load_pairs, make_trainer, log_keys=(*TRAINING_KEYS, *loss.metrics))


@click.command("dpo", cls=Command)
@options_from(DPOSettings)
@launch_options
def dpo_command(**params: Any) -> None:
    """Preference-train a model on `fusion-train prefer`'s pairs (DPO, length-normalised DPO, WRPO,
    IPO or SLiC's hinge loss), on TRL's DPOTrainer and DeepSpeed ZeRO."""
    settings = tuning.settings_of(DPOSettings, params)
    tuning.command(params, settings, check, dpo)


if __name__ == "__main__":
    dpo_command(prog_name="fusion-train dpo")
