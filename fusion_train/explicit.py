"""The explicit stages of a recipe (``method: explicit``, or ``both``): represent -> align ->
fuse -> train for every (pivot, source) pair, the CLM-only baseline, then the targets merged with
VaRM and the baselines (FuseChat, METHOD.md).

Each step is a stage of ``fusion_train.stages``: keyed by its settings and the keys of what it
reads, skipped when done, resumed inside itself (represent by parts, train from its last
checkpoint) when a run was killed. Model-running stages run in the recipe's ranks
(``fusion_train.calls``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import yaml

from fusion_train.align import AlignSettings, align
from fusion_train.calls import StageCall
from fusion_train.evaluate import ModelSpec
from fusion_train.fuse import FuseSettings, fuse
from fusion_train.launch import world_size_of
from fusion_train.merge_methods import MERGE_METHODS, MergeAnalysis
from fusion_train.models import model_fingerprint
from fusion_train.recipe import ModelEntry, Recipe, TrainStage
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import FORMAT as REPRESENTATION_FORMAT
from fusion_train.stages import StageError, Stages, file_fingerprint, run_in_ranks, train_in_stage
from fusion_train.train import TrainConfig, prepare, train


def align_inputs(pivot_key: str, source_key: str, settings: AlignSettings) -> dict[str, Any]:
    """What the align stage's key holds."""
    return {"pivot": pivot_key, "source": source_key, "settings": asdict(settings)}


def fuse_inputs(
    pivot_key: str, aligned_key: str, settings: FuseSettings, aligned_by: AlignSettings
) -> dict[str, Any]:
    """What the fuse stage's key holds. ``min_source_mass`` changes only the fusion of a source
    aligned by bytes (the others use the whole stored mass on every row): it joins the key only
    then, so the stages of every other run keep their keys."""
    values = asdict(settings)
    if aligned_by.token_align != "bytes":
        del values["min_source_mass"]
    return {"pivot": pivot_key, "aligned": [aligned_key], "settings": values}


class ExplicitRun:
    """The explicit stages of one recipe run, over the run's training records."""

    def __init__(self, recipe: Recipe, stages: Stages, train_file: Path, data_key: str) -> None:
        self.recipe, self.stages, self.train_file, self.data_key = recipe, stages, train_file, data_key
        self.resources = recipe.resources

    def represent(self, entry: ModelEntry) -> tuple[Path, str]:
        """One model's representation of the training records."""
        section, inference = self.recipe.represent, self.resources.inference(self.recipe.represent.dtype)
        # The format joins the key: a representation of an older format is never reused; the
        # dtype the weights run in (auto: by machine) changes the figures, the rest of resources not.
        inputs = {
            "model": model_fingerprint(entry.path),
            "data": self.data_key,
            "settings": asdict(section),
            "chat_template": entry.chat_template,
            "format": REPRESENTATION_FORMAT,
            "dtype": str(inference.resolved_dtype()),
        }
        settings = RepresentSettings(
            section.top_k, section.max_length, "truncate", entry.chat_template, chunk_size=256
        )

        def work(out: Path) -> None:
            arguments = {
                "model_path": entry.path,
                "data_path": self.train_file,
                "out_dir": out,
                "settings": settings,
                "inference": inference,
                "gguf_file": entry.gguf_file,
                "batch_tokens": section.batch_tokens,
            }
            run_in_ranks(f"represent {entry.name}", represent, arguments, self.resources, out)

        return self.stages.run("represent", entry.name, inputs, work)

    def fused_data(self, source: ModelEntry, pivot: tuple[Path, str]) -> tuple[Path, str]:
        """A source represented, aligned to the pivot's representation and fused with it."""
        align_settings, fuse_settings, _ = self.recipe.stages_for(source)
        (pivot_repr, pivot_key), (source_repr, source_key) = pivot, self.represent(source)
        aligned, aligned_key = self.stages.run(
            "align",
            source.name,
            align_inputs(pivot_key, source_key, align_settings),
            lambda out: align(
                pivot_repr, source_repr, out, align_settings.token_align, align_settings.vocab_map
            ),
        )
        return self.stages.run(
            "fuse",
            source.name,
            fuse_inputs(pivot_key, aligned_key, fuse_settings, align_settings),
            lambda out: fuse(
                pivot_repr,
                [aligned],
                out,
                fuse_settings.criterion,
                fuse_settings.ce_unit,
                min_source_mass=fuse_settings.min_source_mass,
            ),
        )

    def train(
        self, name: str, fused: Path, data_key: str, t: TrainStage, no_fusion: bool
    ) -> tuple[Path, str]:
        """The pivot trained on ``fused``. ``data_key``: the fused data's key, or for the baseline
        (which reads only the pivot's tokens from it) the pivot representation's key, so fusion
        settings never retrain it."""
        resources = self.resources
        settings = asdict(t)
        if no_fusion:
            settings = {k: v for k, v in settings.items() if k not in ("lm_weight", "temperature")}
        # "fused" holds data_key under its first name, so targets of existing runs keep their keys
        inputs = {
            "pivot": model_fingerprint(self.recipe.pivot.path),
            "fused": data_key,
            "settings": settings,
            "no_fusion": no_fusion,
            "world_size": world_size_of(resources.nproc, resources.hostfile),
        }

        def start(out: Path, resume: bool) -> int:
            section = {k: v for k, v in asdict(t).items() if k != "clm_baseline"}  # the rest: TrainConfig's
            config = TrainConfig(
                model=self.recipe.pivot.path,
                fused=str(fused),
                out=str(out / "model"),
                **{**section, "lm_weight": 1.0 if no_fusion else t.lm_weight},
                resume=resume,
                attn_implementation=resources.attn_implementation,
            )
            if resources.launches:  # the inputs checked here, once, before any rank starts
                prepare(config, world_size_of(resources.nproc, resources.hostfile))
            return StageCall(train, {"config": config}, out).in_ranks(resources.nproc, resources.hostfile)

        return self.stages.run(
            "train", name, inputs, lambda out: train_in_stage(f"training {name}", out, start)
        )

    def models(self) -> tuple[list[ModelSpec], list[tuple[MergeAnalysis, Path]]]:
        """Every source's target, the CLM-only baseline and the merges; the analyses the merges
        asked for, with their folders."""
        pivot = self.represent(self.recipe.pivot)
        targets: dict[str, tuple[Path, str]] = {}
        first_fused: Path | None = None
        for source in self.recipe.sources:
            fused, fused_key = self.fused_data(source, pivot)
            first_fused = first_fused or fused
            _, _, settings = self.recipe.stages_for(source)
            out, key = self.train(f"target-{source.name}", fused, fused_key, settings, no_fusion=False)
            targets[source.name] = (out / "model", key)
        baseline = None
        if self.recipe.train.clm_baseline and first_fused:  # the fused data carries the pivot's tokens
            out, _ = self.train("clm-baseline", first_fused, pivot[1], self.recipe.train, no_fusion=True)
            baseline = out / "model"
        merges, analyses = merge_targets(self.recipe, self.stages, targets)
        models = [ModelSpec(f"target-{name}", str(path), "target") for name, (path, _) in targets.items()]
        models += [ModelSpec("clm-baseline", str(baseline), "baseline")] if baseline else []
        models += [ModelSpec(f"merge-{method}", str(path), "merge") for method, path in merges.items()]
        return models, analyses


def merge_config(method: str, pivot: str, targets: list[str], dtype: str) -> dict[str, Any]:
    """A shipped ``merge_configs/`` file for any number of targets: the per-model settings of
    the shipped entries are reused for every target, placeholders become paths."""
    from varm_merge.cli import PIVOT_PLACEHOLDER, TARGET_PLACEHOLDER

    config = yaml.safe_load(MERGE_METHODS[method].config.read_text(encoding="utf-8"))

    def path_of(value: Any) -> Any:
        if value == PIVOT_PLACEHOLDER:
            return pivot
        found = TARGET_PLACEHOLDER.fullmatch(str(value))
        return targets[int(found.group(1)) - 1] if found else value

    shipped = config["models"]
    config["models"] = [{**shipped[min(i, len(shipped) - 1)], "model": t} for i, t in enumerate(targets)]
    if "base_model" in config:
        config["base_model"] = path_of(config["base_model"])
    config["dtype"] = dtype
    return config


def merge_targets(
    recipe: Recipe, stages: Stages, targets: dict[str, tuple[Path, str]]
) -> tuple[dict[str, Path], list[tuple[MergeAnalysis, Path]]]:
    """Merge the targets with every method listed, through mergekit (``python -m varm_merge``);
    return the merged models, and the analyses the methods that merged declare, with their folders."""
    merged: dict[str, Path] = {}
    paths = [str(path) for path, _ in targets.values()]
    target_keys = [key for _, key in targets.values()]
    for method in recipe.merge.methods:
        declared = MERGE_METHODS[method]
        if declared.targets is not None and len(paths) != declared.targets:
            click.echo(
                f"- merge/{method}: skipped, it merges exactly {declared.targets} targets ({len(paths)} here)"
            )
            continue
        inputs = {
            "pivot": model_fingerprint(recipe.pivot.path),
            "targets": target_keys,
            "dtype": recipe.merge.dtype,
            "config": file_fingerprint(str(declared.config)),
        }

        def work(out: Path, method: str = method) -> None:
            out.mkdir(parents=True, exist_ok=True)
            config = merge_config(method, recipe.pivot.path, paths, recipe.merge.dtype)
            (out / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
            staged = out / "model.tmp"
            shutil.rmtree(staged, ignore_errors=True)
            command = [sys.executable, "-m", "varm_merge", str(out / "config.yml"), str(staged)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise StageError(f"merge {method} failed:\n{result.stderr[-3000:]}")
            staged.rename(out / "model")

        out, _ = stages.run("merge", method, inputs, work)
        merged[method] = out / "model"
    analyses = []
    for analysis in (MERGE_METHODS[method].analysis for method in merged):
        if analysis:
            out, _ = stages.run(
                "merge",
                analysis.stage,
                {"pivot": model_fingerprint(recipe.pivot.path), "targets": target_keys},
                lambda out, run=analysis.run: run(recipe.pivot.path, paths, out),
            )
            analyses.append((analysis, out))
    return merged, analyses
