"""The implicit stages' sections of a recipe (sample, score, prefer, sft, dpo, rate): their keys
and defaults, and how a section becomes its stage's settings for the run.

Each key is declared where its stage's flag is (``settings.same_as``, or a section that derives
from the stage's settings), so a key accepts what the same flag accepts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import click

from fusion_train.implicit import dpo, prefer, rate, sample, score, sft, tuning
from fusion_train.implicit.preference_losses import DEFAULT_LOSS, LOSSES, PreferenceLoss
from fusion_train.settings import same_as, setting
from fusion_train.stages import RecipeError
from fusion_train.training import Schedule

SFT_NAME = "implicit-sft"  # the SFT model's name in reports, and its samples' source name (WRPO)


# every name the implicit stages give their models
MODEL_NAMES = (SFT_NAME, *(loss.model_name for loss in LOSSES.values()))


@dataclass(frozen=True, kw_only=True)
class SampleStage(sample.Sampling):
    """``fusion-train sample`` for every source, on the training prompts."""

    batch_size: int = same_as(sample.SampleBatch, "batch_size")
    dtype: str = same_as(sample.SampleSettings, "dtype")


@dataclass(frozen=True)
class ScoreStage:
    """``fusion-train score``: a reward model and/or verifiers (at least one)."""

    reward_model: str | None = setting(
        None, help="A sequence-classification reward model's directory, relative to the recipe."
    )
    reward_label: str | None = same_as(score.ScoreSettings, "reward_label")
    reward_output: str = same_as(score.ScoreSettings, "reward_output")
    trust_remote_code: bool = same_as(score.ScoreSettings, "trust_remote_code")  # ArmoRM needs it
    verifiers: tuple[str, ...] = same_as(score.ScoreSettings, "verifiers")
    batch_size: int = same_as(score.ScoreSettings, "batch_size")
    dtype: str = same_as(score.ScoreSettings, "dtype")


@dataclass(frozen=True)
class PreferStage:
    """``fusion-train prefer``; None: the mode's paper value (``prefer.PAPER_RULES``)."""

    mode: str = setting(
        "fusechat3",
        type=click.Choice(["fusechat3", "wrpo"]),
        help="fusechat3: FuseChat-3.0's SFT then DPO; wrpo: WRPO's SFT, the target's own samples, then WRPO.",
    )
    sft_share: float | str | None = same_as(prefer.PreferSettings, "sft_share")
    margin: float | None = same_as(prefer.PreferSettings, "margin")
    max_margin: float | str | None = same_as(prefer.PreferSettings, "max_margin")
    gate: str | None = same_as(prefer.PreferSettings, "gate")
    gate_pass: float = same_as(prefer.PreferSettings, "gate_pass")
    scorer: str | None = same_as(prefer.PreferSettings, "scorer")  # also rate's
    drop_truncated: bool = same_as(prefer.PreferSettings, "drop_truncated")

    def settings(self, mode: str, target: str | None) -> dict[str, Any]:
        """``prefer``'s arguments for one of its runs (mode sft: WRPO's first step), defaults
        resolved, so that the stage key says what runs; raises PreferError naming the recipe key."""
        values = prefer.data_settings(
            mode, self.sft_share, self.margin, self.max_margin, lambda k: f"prefer.{k}"
        )
        return {
            "mode": mode,
            **values,
            "gate": self.gate,
            "gate_pass": self.gate_pass,
            "target_source": target,
            "scorer": self.scorer,
            "drop_truncated": self.drop_truncated,
        }


@dataclass(frozen=True, kw_only=True)
class SFTStage(Schedule):
    """The flags of ``fusion-train sft`` that a recipe sets (the rest: resources, or the defaults).
    Learning rate and epochs default by ``prefer.mode`` to FuseChat-3.0's or WRPO's SFT
    (``sft.SFT_DEFAULTS``); gradient accumulation to the papers' global batch of 128, for which
    those rates are (:func:`tuning.papers_grad_accumulation`)."""

    learning_rate: float | None = None  # type: ignore[assignment]
    epochs: float | None = None  # type: ignore[assignment]
    grad_accumulation: int | None = None  # type: ignore[assignment]
    warmup_ratio: float = tuning.WARMUP_RATIO
    max_length: int = same_as(tuning.TuneSettings, "max_length")


@dataclass(frozen=True, kw_only=True)
class DPOStage(SFTStage):
    """``fusion-train dpo``; ``loss`` defaults by ``prefer.mode``, beta, learning rate and the loss's
    own settings by loss (both: ``preference_losses.LOSSES``), gradient accumulation as sft's."""

    loss: str | None = same_as(dpo.DPOSettings, "loss", default=None)
    beta: float | None = same_as(dpo.DPOSettings, "beta")
    alpha_max: float | None = same_as(dpo.DPOSettings, "alpha_max")
    epochs: float = 1.0


@dataclass(frozen=True, kw_only=True)
class RateStage(sample.Sampling):
    """Answers to the held-out prompts by every model of the report, scored as the training
    responses are, and compared with ``baseline`` (default: the pivot). One answer per prompt,
    shorter than the training samples; ``seed`` also seeds the bootstrap."""

    num_samples: int = 1
    max_new_tokens: int = 512
    seed: int = 1
    batch_size: int = same_as(sample.SampleBatch, "batch_size")
    baseline: str | None = same_as(rate.RateSettings, "baseline", default=None)
    resamples: int = same_as(rate.RateSettings, "resamples")
    confidence: float = same_as(rate.RateSettings, "confidence")


IMPLICIT_SETTINGS = {
    "sample": SampleStage,
    "score": ScoreStage,
    "prefer": PreferStage,
    "sft": SFTStage,
    "dpo": DPOStage,
    "rate": RateStage,
}


def check_prefer(p: PreferStage, verifiers: Sequence[str], scorers: Sequence[str], where: str) -> None:
    """The prefer section against the score section, and a split that leaves both training stages
    prompts (a recipe runs SFT and preference training: a share of 0 or 1 starves one)."""
    if len(scorers) > 1 and p.scorer is None:
        raise RecipeError(
            f"{where}: prefer.scorer: score gives several scores; say which one ranks the responses"
        )
    if p.scorer is not None and p.scorer not in scorers:
        raise RecipeError(
            f"{where}: prefer.scorer: {p.scorer!r} is not a score the score section gives ({', '.join(scorers)})"
        )
    if p.gate is not None and p.gate not in verifiers:
        raise RecipeError(
            f"{where}: prefer.gate: {p.gate!r} is not a verifier of the score section "
            f"({', '.join(verifiers) or 'none: add it to score.verifiers'})"
        )
    if p.gate is not None and p.gate == (p.scorer or scorers[0]):
        raise RecipeError(
            f"{where}: prefer.gate: {p.gate!r} also ranks the responses; set prefer.scorer to another"
        )
    try:
        values = p.settings(p.mode, None)
    except prefer.PreferError as error:
        raise RecipeError(f"{where}: {str(error).rstrip('.')}") from None
    if values["sft_share"] in (0, 1):
        raise RecipeError(
            f"{where}: prefer.sft_share: {prefer.shown(values['sft_share'])} leaves {'sft' if values['sft_share'] == 0 else 'dpo'} "
            f"no prompt, and a recipe runs both; give a share between 0 and 1, or {prefer.ALL}"
        )


def preference_loss(section: DPOStage, mode: str) -> PreferenceLoss:
    """The loss a recipe's dpo section trains with: its own, else the one of ``prefer.mode``."""
    return LOSSES[section.loss or DEFAULT_LOSS[mode]]


def command_values(
    section: SFTStage, mode: str, world_size: int, examples: int | None = None
) -> dict[str, Any]:
    """A recipe's sft or dpo section as its command's settings, the defaults that depend on the
    run filled in: dpo's loss by ``mode``, sft's learning rate and epochs by ``mode`` (dpo's come
    by loss, from ``dpo.DPOSettings``), and the gradient accumulation that makes the global batch
    the papers' over ``world_size`` ranks, for ``examples`` training examples (None: not known yet)."""
    values = asdict(section)
    if isinstance(section, DPOStage):
        values["loss"] = preference_loss(section, mode).name
    else:
        learning_rate, epochs = sft.SFT_DEFAULTS[mode]
        values["learning_rate"] = learning_rate if section.learning_rate is None else section.learning_rate
        values["epochs"] = epochs if section.epochs is None else section.epochs
    if section.grad_accumulation is None:
        values["grad_accumulation"] = tuning.papers_grad_accumulation(
            section.per_device_batch_size, world_size, examples
        )
    return values


@dataclass(frozen=True)
class Tuning:
    """A training stage of TRL (sft, dpo): its name, settings, checks and training function."""

    name: str
    settings: Callable[..., tuning.TuneSettings]
    check: Callable[[tuning.TuneSettings, int], Any]
    train: Callable[[Any], Any]  # in this process, or in every rank of a launched job


SFT = Tuning(sft.STAGE, sft.SFTSettings, sft.check, sft.sft)


DPO = Tuning(dpo.STAGE, dpo.DPOSettings, dpo.check, dpo.dpo)
