"""Implicit fusion from a recipe (``method: implicit``, or ``both`` beside the explicit stages).

FuseChat-3.0 (``prefer.mode: fusechat3``):
    sample every source -> score -> prefer (SFT set, pairs) -> sft the pivot -> dpo from the SFT model
WRPO (``prefer.mode: wrpo``):
    sample every source -> score -> prefer (SFT set) -> sft the pivot -> sample the SFT model
    -> score it with the sources -> prefer (its own pairs, y_ws from the sources) -> dpo (WRPO loss)
Then every model of the report answers the held-out prompts (``rate``): the answers are scored
with the same scorer and compared with the pivot's (mean score and win rate, bootstrap intervals).

Each step is a stage of ``fusion_train.stages``: keyed by its settings and the keys of what it
reads, skipped when done, resumed inside itself (sample and score by parts, sft and dpo from
their last checkpoint) when a run was killed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fusion_train import options
from fusion_train.errors import UserError
from fusion_train.evaluate import ModelSpec
from fusion_train.implicit import dpo, prefer, sample, score, sft, tuning
from fusion_train.implicit.preference_losses import DEFAULT_LOSS, LOSSES, SETTINGS, PreferenceLoss
from fusion_train.implicit.rate import rate
from fusion_train.implicit.verifiers import get_verifier
from fusion_train.launch import command_arguments, launch, world_size_of
from fusion_train.models import load_tokenizer, model_fingerprint
from fusion_train.stages import RecipeError, Resources, Stages, launch_stage, recipe_error, train_in_stage
from fusion_train.train import PRESETS, Schedule, deepspeed_config, schedule_problem

if TYPE_CHECKING:
    from fusion_train.pipeline import ModelEntry, Recipe

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
        return {"mode": mode, **values, "gate": self.gate, "gate_pass": self.gate_pass, "target_source": target,
                "scorer": self.scorer, "drop_truncated": self.drop_truncated}  # fmt: skip


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


IMPLICIT_SETTINGS = {"sample": SampleStage, "score": ScoreStage, "prefer": PreferStage, "sft": SFTStage,
                     "dpo": DPOStage, "rate": RateStage}  # fmt: skip
IMPLICIT_COMMANDS = {SampleStage: sample.sample_command, ScoreStage: score.score_command,
                     PreferStage: prefer.prefer_command, RateStage: sample.sample_command}  # fmt: skip
# The training sections' keys accept what the fields of their stage's settings declare.
IMPLICIT_DECLARED_BY: dict[type, type] = {SFTStage: sft.SFTSettings, DPOStage: dpo.DPOSettings}
IMPLICIT_ONLY_TYPES: dict[type, dict[str, click.ParamType]] = {
    ScoreStage: {"reward_model": click.STRING},  # a path relative to the recipe, checked by check_implicit
    PreferStage: {"mode": click.Choice(["fusechat3", "wrpo"])},
    RateStage: {"resamples": options.POSITIVE_INT,
                "confidence": click.FloatRange(0.0, 1.0, min_open=True, max_open=True)},
}  # fmt: skip


def check_implicit(
    settings: dict[str, Any],
    base: Path,
    where: str,
    models: Sequence[tuple[str, ModelEntry]],
    resources: Resources,
) -> dict[str, Any]:
    """What the implicit stages will check, checked here, naming the recipe key: across keys of the
    implicit sections (each value was checked on its own), the models' tokenizers, the pivot's chat
    template (sft, dpo), prefer's scorer, and sft's and dpo's settings as their commands build them.
    Paths become absolute. ``models``: (recipe key, entry), the pivot first."""
    s: ScoreStage = settings["score"]
    if s.reward_model is None and not s.verifiers:
        raise RecipeError(
            f"{where}: score: give reward_model and/or verifiers (e.g. verifiers: [reference-overlap])"
        )
    for name in s.verifiers:
        try:
            get_verifier(name)
        except UserError as error:
            raise RecipeError(f"{where}: score.verifiers: {error}") from None
    scorers = list(s.verifiers)
    if s.reward_model is not None:
        path = (base / s.reward_model).expanduser().resolve()
        if not path.is_dir():
            raise RecipeError(f"{where}: score.reward_model: model directory {path} does not exist")
        try:
            spec = score.reward_model_spec(path, s.reward_label, None, s.trust_remote_code, s.reward_output)
            load_tokenizer(path, trust_remote_code=s.trust_remote_code)
        except UserError as error:
            raise RecipeError(f"{where}: score.reward_model: {error}") from None
        scorers.insert(0, spec.name)
        settings["score"] = s = ScoreStage(**{**asdict(s), "reward_model": str(path)})
    elif s.reward_label is not None:
        raise RecipeError(f"{where}: score.reward_label: needs score.reward_model")
    p, d = settings["prefer"], settings["dpo"]
    check_prefer(p, s.verifiers, scorers, where)
    for key, entry in models:  # sample (every model) and sft (the pivot) read them
        try:
            tokenizer = load_tokenizer(entry.path)
            if key == "pivot":
                tuning.require_chat_template(tokenizer, entry.path)
        except tuning.TuneInputError as error:
            raise RecipeError(
                f"{where}: {key}: {error} sft and dpo train the pivot in that template; {key}.chat_template "
                "is for sampling and evaluation only."
            ) from None
        except UserError as error:
            raise RecipeError(f"{where}: {key}.path: {error}") from None
    loss = preference_loss(d, p.mode)
    if loss.pairs_of not in (None, p.mode):
        raise RecipeError(
            f"{where}: dpo.loss: {loss.name} needs the pairs of prefer.mode {loss.pairs_of}; set prefer.mode: "
            f"{loss.pairs_of}"
        )
    for setting, owner in SETTINGS.values():
        if getattr(d, setting.name) is not None and owner is not loss:
            raise RecipeError(
                f"{where}: dpo.{setting.name}: {owner.title}'s; drop it or use dpo.loss: {owner.name}"
            )
    world_size = world_size_of(resources.nproc, resources.hostfile)
    for stage in (SFT, DPO):
        section = settings[stage.name]
        if section.deepspeed not in PRESETS:
            path = (base / section.deepspeed).expanduser().resolve()
            if not path.is_file():
                raise RecipeError(
                    f"{where}: {stage.name}.deepspeed: neither a preset ({', '.join(PRESETS)}) nor a file: {path}"
                )
            settings[stage.name] = section = replace(section, deepspeed=str(path))
        values = command_values(section, p.mode, world_size)
        if values["epochs"] <= 0 and section.max_steps <= 0:
            raise RecipeError(
                f"{where}: {stage.name}.epochs: must be positive (or set {stage.name}.max_steps)"
            )
        problem = schedule_problem(section, None, 1, lambda key, stage=stage: f"{stage.name}.{key}")
        if problem:  # a schedule of max_steps is judged here; one of epochs once the data is there
            raise RecipeError(f"{where}: {problem}")
        try:  # the settings, and the ZeRO config against them, as the stage's command checks them
            trial = stage.settings(model="", prefs="", out="", **values)
            deepspeed_config(trial.deepspeed, trial, world_size)
        except UserError as error:
            raise recipe_error(where, stage.name, error, {f.name for f in fields(section)}) from None
    names = [entry.name for _, entry in models]
    baseline = settings["rate"].baseline
    if baseline is not None and baseline not in names:
        raise RecipeError(
            f"{where}: rate.baseline: {baseline!r} is not a model of the recipe ({', '.join(names)})"
        )
    return settings


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


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Tuning:
    """A training stage of TRL (sft, dpo): how to check, launch and name it."""

    name: str
    module: str
    command: click.Command
    settings: Callable[..., tuning.TuneSettings]
    check: Callable[[tuning.TuneSettings, int], Any]
    train: Callable[[Any], Any]  # in this process, a world of one


SFT = Tuning(sft.STAGE, sft.MODULE, sft.sft_command, sft.SFTSettings, sft.check, sft.sft)
DPO = Tuning(dpo.STAGE, dpo.MODULE, dpo.dpo_command, dpo.DPOSettings, dpo.check, dpo.dpo)


class ImplicitRun:
    """The implicit stages of one recipe run, over the run's training and held-out prompts."""

    def __init__(
        self, recipe: Recipe, stages: Stages, train_file: Path, heldout_file: Path, data_key: str
    ) -> None:
        self.recipe, self.stages = recipe, stages
        self.train_file, self.heldout_file, self.data_key = train_file, heldout_file, data_key
        self.resources: Resources = recipe.resources

    def sample(self, name: str, model: str, model_key: str, chat_template: str | None, prompts: str,
               settings: sample.SampleSettings, batch_size: int) -> tuple[Path, str]:  # fmt: skip
        """One model's answers to the training (``prompts="train"``) or held-out prompts."""
        data = self.train_file if prompts == "train" else self.heldout_file
        inputs = {"model": model_key, "data": self.data_key, "prompts": prompts, "settings": settings.record(),
                  "chat_template": chat_template, "batch_size": batch_size, "format": sample.FORMAT}  # fmt: skip

        # the template is in the key on its own (keys of earlier runs stay), and in what samples
        settings = replace(settings, chat_template=chat_template)

        def work(out: Path) -> None:
            if not self.resources.launches:
                sample.sample(model, data, out, settings, source_name=name, batch_size=batch_size,
                              tensor_parallel_size=self.resources.tensor_parallel_size)  # fmt: skip
                return
            arguments = {"model_path": model, "data_path": data, "out_dir": out, "source_name": name,
                         "batch_size": batch_size, **asdict(settings)}  # fmt: skip
            launch_stage(
                f"sample {name}", sample.MODULE, sample.sample_command, arguments, self.resources, out
            )

        stage = "sample" if prompts == "train" else "answer"
        return self.stages.run(stage, name, inputs, work)

    def score(self, name: str, samples: list[tuple[Path, str]]) -> tuple[Path, str]:
        s = self.recipe.score
        reward = (
            score.reward_model_spec(
                s.reward_model, s.reward_label, None, s.trust_remote_code, s.reward_output
            )
            if s.reward_model
            else None
        )
        inputs = {"samples": [key for _, key in samples], "settings": asdict(s), "format": score.FORMAT,
                  "reward_model": model_fingerprint(s.reward_model) if s.reward_model else None}  # fmt: skip

        def work(out: Path) -> None:
            dirs = [str(path) for path, _ in samples]
            if not self.resources.launches:
                score.score(dirs, out, reward_model=reward, verifiers=s.verifiers, batch_size=s.batch_size,
                            dtype=s.dtype, trust_remote_code=s.trust_remote_code)  # fmt: skip
                return
            arguments = {"samples_dirs": dirs, "out_dir": out, "reward_model": s.reward_model,
                         "reward_label": s.reward_label, "reward_output": s.reward_output, "verifiers": s.verifiers,
                         "batch_size": s.batch_size, "dtype": s.dtype, "trust_remote_code": s.trust_remote_code}  # fmt: skip
            launch_stage(f"score {name}", score.MODULE, score.score_command, arguments, self.resources, out)

        return self.stages.run("score", name, inputs, work)

    def prefer(self, mode: str, scored: tuple[Path, str], target: str | None = None) -> tuple[Path, str]:
        settings = self.recipe.prefer.settings(mode, target)
        return self.stages.run(
            "prefer", mode, {"scored": scored[1], "settings": settings},
            lambda out: prefer.prefer(scored[0], out, **settings),
        )  # fmt: skip

    def tune(
        self, name: str, stage: Tuning, model: str, model_key: str, prefs: tuple[Path, str]
    ) -> tuple[Path, str]:
        """SFT or preference training of ``model`` on ``prefs``, in the recipe's ranks."""
        resources = self.resources
        world_size = world_size_of(resources.nproc, resources.hostfile)
        examples = tuning.count_examples(prefs[0], prefer.SFT_DIR if stage is SFT else prefer.PAIRS_DIR)
        section = self.recipe.sft if stage is SFT else self.recipe.dpo
        values = command_values(section, self.recipe.prefer.mode, world_size, examples)
        inputs = {"model": model_key, "prefs": prefs[1], "settings": values, "world_size": world_size}

        def start(out: Path, resume: bool) -> int:
            settings = stage.settings(model=model, prefs=str(prefs[0]), out=str(out / "model"), resume=resume,
                                      attn_implementation=resources.attn_implementation, **values)  # fmt: skip
            stage.check(settings, world_size)  # here, once, before any rank starts
            if not resources.launches:  # one process: no launcher to start
                stage.train(settings)
                return 0
            arguments = command_arguments(stage.command, asdict(settings))
            return launch(stage.module, arguments, resources.nproc, resources.hostfile, None)

        return self.stages.run(
            stage.name, name, inputs, lambda out: train_in_stage(f"training {name}", out, start)
        )

    def train_models(self) -> list[ModelSpec]:
        """sample -> score -> prefer -> sft -> dpo; the SFT and the preference-trained models."""
        recipe = self.recipe
        s = recipe.sample
        settings = sample.SampleSettings.drawing(s, dtype=s.dtype, engine=self.resources.engine)

        def samples_of(entry: ModelEntry) -> tuple[Path, str]:
            return self.sample(entry.name, entry.path, model_fingerprint(entry.path), entry.chat_template, "train",
                               settings, s.batch_size)  # fmt: skip

        source_samples = [samples_of(entry) for entry in recipe.sources]
        scored = self.score("sources", source_samples)
        pivot = (recipe.pivot.path, model_fingerprint(recipe.pivot.path))
        if recipe.prefer.mode == "fusechat3":
            pairs = self.prefer("fusechat3", scored)
            sft_out, sft_key = self.tune(SFT_NAME, SFT, *pivot, pairs)
        else:
            sft_out, sft_key = self.tune(SFT_NAME, SFT, *pivot, self.prefer("sft", scored))
            own = self.sample(
                SFT_NAME, str(sft_out / "model"), sft_key, None, "train", settings, s.batch_size
            )
            pairs = self.prefer(
                "wrpo", self.score("sources-and-target", [*source_samples, own]), target=SFT_NAME
            )
        name = preference_loss(recipe.dpo, recipe.prefer.mode).model_name
        dpo_out, _ = self.tune(name, DPO, str(sft_out / "model"), sft_key, pairs)
        return [ModelSpec(SFT_NAME, str(sft_out / "model"), "implicit"),
                ModelSpec(name, str(dpo_out / "model"), "implicit")]  # fmt: skip

    def rate_models(self, models: list[ModelSpec]) -> Path:
        """Every model answers the held-out prompts; the answers are scored and rated against the
        baseline; the rate stage's folder (report.json, report.md, rates.png)."""
        r = self.recipe.rate
        settings = sample.SampleSettings.drawing(
            r, dtype=self.recipe.sample.dtype, engine=self.resources.engine
        )
        answers = [self.sample(m.name, m.path, model_fingerprint(m.path), m.chat_template, "heldout", settings,
                               r.batch_size) for m in models]  # fmt: skip
        scored = self.score("answers", answers)
        settings = {"baseline": r.baseline or self.recipe.pivot.name, "scorer": self.recipe.prefer.scorer,
                    "resamples": r.resamples, "confidence": r.confidence, "seed": r.seed}  # fmt: skip
        out, _ = self.stages.run("rate", "answers", {"scored": scored[1], "settings": settings},
                                 lambda out: rate(scored[0], out, **settings))  # fmt: skip
        return out
