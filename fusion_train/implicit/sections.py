"""The implicit stages' sections of a recipe (sample, score, prefer, sft, dpo, rate): their keys
and defaults, and how a section becomes its stage's settings for the run.

Each section derives from, or is checked against, its stage's own settings, so a key accepts
what the same flag of the stage's command accepts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import click

from fusion_train import options
from fusion_train.implicit import dpo, prefer, sample, score, sft, tuning
from fusion_train.implicit.preference_losses import DEFAULT_LOSS, LOSSES, PreferenceLoss
from fusion_train.stages import RecipeError
from fusion_train.training import Schedule

SFT_NAME = "implicit-sft"  # the SFT model's name in reports, and its samples' source name (WRPO)


# every name the implicit stages give their models
MODEL_NAMES = (SFT_NAME, *(loss.model_name for loss in LOSSES.values()))


@dataclass(frozen=True, kw_only=True)
class SampleStage(sample.Sampling):
    """``fusion-train sample`` for every source, on the training prompts."""

    batch_size: int = 8
    dtype: str = "auto"  # as ``fusion-train sample``'s


@dataclass(frozen=True)
class ScoreStage:
    """``fusion-train score``: a reward model and/or verifiers (at least one)."""

    reward_model: str | None = None  # a directory, relative to the recipe
    reward_label: str | None = None
    reward_output: str = "auto"  # auto | score (ArmoRM-style .score) | logits
    trust_remote_code: bool = False  # a reward model with its own code (ArmoRM) needs it
    verifiers: tuple[str, ...] = ()
    batch_size: int = 8
    dtype: str = "float32"


@dataclass(frozen=True)
class PreferStage:
    """``fusion-train prefer``; None: the mode's paper value (``prefer.PAPER_RULES``)."""

    mode: str = "fusechat3"  # fusechat3 | wrpo
    sft_share: float | str | None = None  # fusechat3 0.4, wrpo 1/3; or all (both sets on every prompt)
    margin: float | None = None  # fusechat3 0.01, wrpo 0
    max_margin: float | str | None = None  # fusechat3 0.1, wrpo none
    gate: str | None = None  # a verifier of the score section: correctness before reward
    gate_pass: float = 1.0
    scorer: str | None = None  # which score ranks responses, when score gives several (also rate's)
    drop_truncated: bool = False

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
    max_length: int = tuning.MAX_LENGTH


@dataclass(frozen=True, kw_only=True)
class DPOStage(SFTStage):
    """``fusion-train dpo``; ``loss`` defaults by ``prefer.mode``, beta, learning rate and the loss's
    own settings by loss (both: ``preference_losses.LOSSES``), gradient accumulation as sft's."""

    loss: str | None = None
    beta: float | None = None
    alpha_max: float | None = None
    epochs: float = 1.0


@dataclass(frozen=True, kw_only=True)
class RateStage(sample.Sampling):
    """Answers to the held-out prompts by every model of the report, scored as the training
    responses are, and compared with ``baseline`` (default: the pivot). One answer per prompt,
    shorter than the training samples; ``seed`` also seeds the bootstrap."""

    num_samples: int = 1
    max_new_tokens: int = 512
    seed: int = 1
    batch_size: int = 8
    baseline: str | None = None
    resamples: int = 1000
    confidence: float = 0.95


IMPLICIT_SETTINGS = {
    "sample": SampleStage,
    "score": ScoreStage,
    "prefer": PreferStage,
    "sft": SFTStage,
    "dpo": DPOStage,
    "rate": RateStage,
}


IMPLICIT_COMMANDS = {
    SampleStage: sample.sample_command,
    ScoreStage: score.score_command,
    PreferStage: prefer.prefer_command,
    RateStage: sample.sample_command,
}


# The training sections' keys accept what the fields of their stage's settings declare.
IMPLICIT_DECLARED_BY: dict[type, type] = {SFTStage: sft.SFTSettings, DPOStage: dpo.DPOSettings}


IMPLICIT_ONLY_TYPES: dict[type, dict[str, click.ParamType]] = {
    ScoreStage: {"reward_model": click.STRING},  # a path relative to the recipe, checked by check_implicit
    PreferStage: {"mode": click.Choice(["fusechat3", "wrpo"])},
    RateStage: {
        "resamples": options.POSITIVE_INT,
        "confidence": click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    },
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
