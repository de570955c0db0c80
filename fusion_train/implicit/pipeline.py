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

from dataclasses import asdict, replace
from pathlib import Path

from fusion_train.calls import StageCall
from fusion_train.evaluate import ModelSpec
from fusion_train.implicit import prefer, preferences, sample, score
from fusion_train.implicit.rate import RateSettings, rate
from fusion_train.implicit.sections import (
    DPO,
    SFT,
    SFT_NAME,
    Tuning,
    command_values,
    preference_loss,
)
from fusion_train.launch import world_size_of
from fusion_train.models import model_fingerprint
from fusion_train.recipe import ModelEntry, Recipe
from fusion_train.stages import Resources, Stages, run_in_ranks, train_in_stage


class ImplicitRun:
    """The implicit stages of one recipe run, over the run's training and held-out prompts."""

    def __init__(
        self, recipe: Recipe, stages: Stages, train_file: Path, heldout_file: Path, data_key: str
    ) -> None:
        self.recipe, self.stages = recipe, stages
        self.train_file, self.heldout_file, self.data_key = train_file, heldout_file, data_key
        self.resources: Resources = recipe.resources

    def sample(
        self,
        name: str,
        model: str,
        model_key: str,
        chat_template: str | None,
        prompts: str,
        settings: sample.SampleSettings,
        batch_size: int,
    ) -> tuple[Path, str]:
        """One model's answers to the training (``prompts="train"``) or held-out prompts."""
        data = self.train_file if prompts == "train" else self.heldout_file
        inputs = {
            "model": model_key,
            "data": self.data_key,
            "prompts": prompts,
            "settings": settings.record(),
            "chat_template": chat_template,
            "batch_size": batch_size,
            "format": sample.FORMAT,
        }

        # the template is in the key on its own (keys of earlier runs stay), and in what samples
        settings = replace(settings, chat_template=chat_template)

        def work(out: Path) -> None:
            arguments = {
                "model_path": model,
                "data_path": data,
                "out_dir": out,
                "settings": settings,
                "source_name": name,
                "batch_size": batch_size,
                "tensor_parallel_size": self.resources.tensor_parallel_size,
            }
            run_in_ranks(f"sample {name}", sample.sample, arguments, self.resources, out)

        stage = "sample" if prompts == "train" else "answer"
        return self.stages.run(stage, name, inputs, work)

    def score(self, name: str, samples: list[tuple[Path, str]]) -> tuple[Path, str]:
        section = self.recipe.score
        reward = (
            score.reward_model_spec(
                section.reward_model,
                section.reward_label,
                None,
                section.trust_remote_code,
                section.reward_output,
            )
            if section.reward_model
            else None
        )
        inputs = {
            "samples": [key for _, key in samples],
            "settings": asdict(section),
            "format": score.FORMAT,
            "reward_model": model_fingerprint(section.reward_model) if section.reward_model else None,
        }

        def work(out: Path) -> None:
            arguments = {
                "samples_dirs": [str(path) for path, _ in samples],
                "out_dir": out,
                "reward_model": reward,
                "verifiers": section.verifiers,
                "batch_size": section.batch_size,
                "dtype": section.dtype,
                "trust_remote_code": section.trust_remote_code,
            }
            run_in_ranks(f"score {name}", score.score, arguments, self.resources, out)

        return self.stages.run("score", name, inputs, work)

    def prefer(self, mode: str, scored: tuple[Path, str], target: str | None = None) -> tuple[Path, str]:
        settings = self.recipe.prefer.settings(mode, target)
        return self.stages.run(
            "prefer",
            mode,
            {"scored": scored[1], "settings": settings},
            lambda out: prefer.prefer(scored[0], out, **settings),
        )

    def tune(
        self, name: str, stage: Tuning, model: str, model_key: str, prefs: tuple[Path, str]
    ) -> tuple[Path, str]:
        """SFT or preference training of ``model`` on ``prefs``, in the recipe's ranks."""
        resources = self.resources
        world_size = world_size_of(resources.nproc, resources.hostfile)
        split = preferences.SFT_DIR if stage is SFT else preferences.PAIRS_DIR
        examples = preferences.count_examples(prefs[0], split)
        section = self.recipe.sft if stage is SFT else self.recipe.dpo
        values = command_values(section, self.recipe.prefer.mode, world_size, examples)
        inputs = {"model": model_key, "prefs": prefs[1], "settings": values, "world_size": world_size}

        def start(out: Path, resume: bool) -> int:
            settings = stage.settings(
                model=model,
                prefs=str(prefs[0]),
                out=str(out / "model"),
                resume=resume,
                attn_implementation=resources.attn_implementation,
                **values,
            )
            stage.check(settings, world_size)  # here, once, before any rank starts
            call = StageCall(stage.train, {"settings": settings}, out)
            return call.in_ranks(resources.nproc, resources.hostfile)

        return self.stages.run(
            stage.name, name, inputs, lambda out: train_in_stage(f"training {name}", out, start)
        )

    def train_models(self) -> list[ModelSpec]:
        """sample -> score -> prefer -> sft -> dpo; the SFT and the preference-trained models."""
        recipe = self.recipe
        s = recipe.sample
        settings = sample.SampleSettings.drawing(s, dtype=s.dtype, engine=self.resources.engine)

        def samples_of(entry: ModelEntry) -> tuple[Path, str]:
            return self.sample(
                entry.name,
                entry.path,
                model_fingerprint(entry.path),
                entry.chat_template,
                "train",
                settings,
                s.batch_size,
            )

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
        return [
            ModelSpec(SFT_NAME, str(sft_out / "model"), "implicit"),
            ModelSpec(name, str(dpo_out / "model"), "implicit"),
        ]

    def rate_models(self, models: list[ModelSpec]) -> Path:
        """Every model answers the held-out prompts; the answers are scored and rated against the
        baseline; the rate stage's folder (report.json, report.md, rates.png)."""
        r = self.recipe.rate
        settings = sample.SampleSettings.drawing(
            r, dtype=self.recipe.sample.dtype, engine=self.resources.engine
        )
        answers = [
            self.sample(
                m.name, m.path, model_fingerprint(m.path), m.chat_template, "heldout", settings, r.batch_size
            )
            for m in models
        ]
        scored = self.score("answers", answers)
        rating = RateSettings(
            baseline=r.baseline or self.recipe.pivot.name,
            scorer=self.recipe.prefer.scorer,
            resamples=r.resamples,
            confidence=r.confidence,
            seed=r.seed,
        )
        out, _ = self.stages.run(
            "rate",
            "answers",
            {"scored": scored[1], "settings": asdict(rating)},
            lambda out: rate(scored[0], out, rating),
        )
        return out
