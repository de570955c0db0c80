"""The whole method from one recipe: ``fusion-train run RECIPE.yaml``.

represent -> align -> fuse -> train for every (pivot, source) pair, a CLM-only baseline, then
the targets merged with VaRM and the baselines, then every model evaluated on held-out data.

Every stage's output lives under the run directory in a folder named by the stage and a key:
a hash of the stage's settings and of the keys of what it reads. A stage whose folder is
complete is skipped, so re-running a finished recipe does nothing, adding a source runs only
that source's stages and the merges, and changing a setting re-runs only what depends on it.
A killed run resumes: finished stages are kept, and represent/train resume inside the stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import yaml

from fusion_train.align import align
from fusion_train.calls import call_in_ranks
from fusion_train.chat import load_conversations
from fusion_train.errors import Command
from fusion_train.evaluate import ModelSpec, evaluate
from fusion_train.fuse import fuse
from fusion_train.implicit.pipeline import ImplicitRun
from fusion_train.implicit.sample import prompts_of
from fusion_train.launch import world_size_of
from fusion_train.merge_methods import MERGE_METHODS, MergeAnalysis
from fusion_train.models import model_fingerprint
from fusion_train.recipe import AlignSettings, FuseSettings, ModelEntry, Recipe, TrainStage, load_recipe
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import FORMAT as REPRESENTATION_FORMAT
from fusion_train.stages import (
    RecipeError,
    StageError,
    StageLog,
    Stages,
    disk_full_explained,
    file_fingerprint,
    run_in_ranks,
    train_in_stage,
)
from fusion_train.storage import atomic_write_text, read_json, write_json_atomic
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


def split_data(recipe: Recipe, stages: Stages) -> tuple[Path, Path, str]:
    """Training and held-out files, as JSONL of normalised records (split by id hash if asked)."""
    data = recipe.data
    inputs = {
        "train": file_fingerprint(data.train),
        "heldout": file_fingerprint(data.heldout) if data.heldout else None,
        "fraction": data.heldout_fraction,
        "limit": data.limit,
    }

    def work(out: Path) -> None:
        records = load_conversations(data.train)
        heldout = load_conversations(data.heldout) if data.heldout else []
        if recipe.implicit:  # every record is a prompt to sample: refused here, before any stage runs a model
            prompts_of(records, data.train)
            prompts_of(heldout, data.heldout or data.train)
        if not data.heldout:
            cut = int(data.heldout_fraction * 10_000)
            in_heldout = [int(hashlib.sha256(c.id.encode()).hexdigest(), 16) % 10_000 < cut for c in records]
            heldout = [c for c, h in zip(records, in_heldout, strict=True) if h]
            records = [c for c, h in zip(records, in_heldout, strict=True) if not h]
        records = records[: data.limit] if data.limit else records
        if not records or not heldout:
            raise RecipeError(
                f"{data.train}: the split leaves {len(records)} training and {len(heldout)} held-out records"
            )
        for name, convs in (("train.jsonl", records), ("heldout.jsonl", heldout)):
            lines = [
                json.dumps({"id": c.id, "messages": list(c.messages), "domain": c.domain}, ensure_ascii=False)
                for c in convs
            ]
            atomic_write_text(out / name, "\n".join(lines) + "\n")

    out, key = stages.run("data", "split", inputs, work)
    return out / "train.jsonl", out / "heldout.jsonl", key


def run_pipeline(
    recipe: Recipe, echo: Callable[[str], None] = click.echo, report_dir: Path | None = None
) -> dict[str, Any]:
    """Run every stage the recipe needs; return the evaluation report.

    The report goes to ``report_dir`` (default: the run directory); scored models are cached in
    the run directory either way, so variants of a recipe (``fusion-train sweep``) share them."""
    run_dir = Path(recipe.run_dir)
    report_dir = report_dir or run_dir
    log = StageLog()
    stages = Stages(run_dir, log, echo)
    train_file, heldout_file, data_key = split_data(recipe, stages)
    models = [ModelSpec(recipe.pivot.name, recipe.pivot.path, "pivot", recipe.pivot.chat_template)]
    models += [ModelSpec(s.name, s.path, "source", s.chat_template) for s in recipe.sources]
    analyses: list[tuple[MergeAnalysis, Path]] = []
    compare_to = recipe.pivot.name
    if recipe.explicit:
        explicit, analyses = explicit_models(recipe, stages, train_file, data_key)
        models += explicit
        compare_to = "clm-baseline" if any(m.role == "baseline" for m in explicit) else compare_to
    implicit = ImplicitRun(recipe, stages, train_file, heldout_file, data_key) if recipe.implicit else None
    if implicit:
        models += implicit.train_models()

    echo("> evaluate ...")
    started = time.perf_counter()
    evaluate_dir, e, resources = report_dir / "evaluate", recipe.evaluate, recipe.resources
    with disk_full_explained("evaluate", evaluate_dir):
        arguments = {
            "models": models,
            "data_path": heldout_file,
            "out_dir": evaluate_dir,
            "max_length": e.max_length,
            "batch_tokens": e.batch_tokens,
            "cache_dir": run_dir / "evaluate" / "losses",
            "compare_to": compare_to,
            "inference": resources.inference(e.dtype),
        }
        run_in_ranks("evaluate", evaluate, arguments, resources, evaluate_dir)
        report = read_json(evaluate_dir / "report.json")
        log.seconds["evaluate"] = time.perf_counter() - started
    rated = implicit.rate_models(models) if implicit else None
    with disk_full_explained("report", report_dir):
        write_comparison(report, report_dir, analyses, rated)
        write_json_atomic(report_dir / "pipeline.json", asdict(log))
    echo(f"report: {report_dir / 'report.md'}")
    return report


def explicit_models(
    recipe: Recipe, stages: Stages, train_file: Path, data_key: str
) -> tuple[list[ModelSpec], list[tuple[MergeAnalysis, Path]]]:
    """represent -> align -> fuse -> train for every source, the CLM-only baseline, the merges;
    the trained and merged models, and the analyses the merges asked for, with their folders."""
    resources = recipe.resources
    represent_inference = resources.inference(recipe.represent.dtype)

    def represent_stage(entry: ModelEntry) -> tuple[Path, str]:
        # The format joins the key: a representation of an older format is never reused; the
        # dtype the weights run in (auto: by machine) changes the figures, the rest of resources not.
        inputs = {
            "model": model_fingerprint(entry.path),
            "data": data_key,
            "settings": asdict(recipe.represent),
            "chat_template": entry.chat_template,
            "format": REPRESENTATION_FORMAT,
            "dtype": str(represent_inference.resolved_dtype()),
        }
        r = recipe.represent
        settings = RepresentSettings(r.top_k, r.max_length, "truncate", entry.chat_template, chunk_size=256)

        def work(out: Path) -> None:
            arguments = {
                "model_path": entry.path,
                "data_path": train_file,
                "out_dir": out,
                "settings": settings,
                "inference": represent_inference,
                "gguf_file": entry.gguf_file,
                "batch_tokens": r.batch_tokens,
            }
            run_in_ranks(f"represent {entry.name}", represent, arguments, resources, out)

        return stages.run("represent", entry.name, inputs, work)

    def train_stage(
        name: str, fused: Path, data_key: str, t: TrainStage, no_fusion: bool
    ) -> tuple[Path, str]:
        """``data_key``: the fused data's key, or for the baseline (which reads only the pivot's
        tokens from it) the pivot representation's key, so fusion settings never retrain it."""
        settings = asdict(t)
        if no_fusion:
            settings = {k: v for k, v in settings.items() if k not in ("lm_weight", "temperature")}
        # "fused" holds data_key under its first name, so targets of existing runs keep their keys
        inputs = {
            "pivot": model_fingerprint(recipe.pivot.path),
            "fused": data_key,
            "settings": settings,
            "no_fusion": no_fusion,
            "world_size": world_size_of(resources.nproc, resources.hostfile),
        }

        def start(out: Path, resume: bool) -> int:
            section = {k: v for k, v in asdict(t).items() if k != "clm_baseline"}  # the rest: TrainConfig's
            config = TrainConfig(
                model=recipe.pivot.path,
                fused=str(fused),
                out=str(out / "model"),
                **{**section, "lm_weight": 1.0 if no_fusion else t.lm_weight},
                resume=resume,
                attn_implementation=resources.attn_implementation,
            )
            if resources.launches:  # the inputs checked here, once, before any rank starts
                prepare(config, world_size_of(resources.nproc, resources.hostfile))
            return call_in_ranks(train, {"config": config}, resources.nproc, resources.hostfile, out)

        return stages.run("train", name, inputs, lambda out: train_in_stage(f"training {name}", out, start))

    pivot_repr, pivot_key = represent_stage(recipe.pivot)
    targets: dict[str, tuple[Path, str]] = {}
    first_fused: Path | None = None
    for source in recipe.sources:
        align_settings, fuse_settings, train_settings = recipe.stages_for(source)
        source_repr, source_key = represent_stage(source)
        aligned, aligned_key = stages.run(
            "align",
            source.name,
            align_inputs(pivot_key, source_key, align_settings),
            lambda out, s=source_repr, a=align_settings: align(
                pivot_repr, s, out, a.token_align, a.vocab_map
            ),
        )
        fused, fused_key = stages.run(
            "fuse",
            source.name,
            fuse_inputs(pivot_key, aligned_key, fuse_settings, align_settings),
            lambda out, a=aligned, f=fuse_settings: fuse(
                pivot_repr, [a], out, f.criterion, f.ce_unit, min_source_mass=f.min_source_mass
            ),
        )
        first_fused = first_fused or fused
        out, key = train_stage(f"target-{source.name}", fused, fused_key, train_settings, no_fusion=False)
        targets[source.name] = (out / "model", key)
    baseline = None
    if recipe.train.clm_baseline and first_fused:  # the fused data carries the pivot's tokens: same data
        out, _ = train_stage("clm-baseline", first_fused, pivot_key, recipe.train, no_fusion=True)
        baseline = out / "model"

    merges, analyses = merge_targets(recipe, stages, targets)
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


def write_comparison(
    report: dict[str, Any],
    report_dir: Path,
    analyses: list[tuple[MergeAnalysis, Path]],
    rated: Path | None = None,
) -> None:
    """``report.md`` at the report's top: the evaluation table, merges ranked, the figures of the
    merges' analyses (``analyses``: each with its stage's folder), and (``rated``: a rate stage's
    folder) the models' answers to held-out prompts rated."""
    from fusion_train.evaluate import markdown_report

    shutil.copy(report_dir / "evaluate" / "report.png", report_dir / "report.png")
    lines = ["# Fusion run report", "", markdown_report(report), "![bits per byte](report.png)", ""]
    merge_rows = sorted(
        (r for r in report["models"] if r["role"] == "merge"), key=lambda r: r["bits_per_byte"]["value"]
    )
    if merge_rows:
        lines += ["## Merge methods, best first", ""]
        lines += [
            f"{i}. {r['name']}: {r['bits_per_byte']['value']:.4f} bits/byte"
            for i, r in enumerate(merge_rows, 1)
        ]
        lines.append("")
    for analysis, folder in analyses:
        shutil.copy(folder / analysis.figure, report_dir / analysis.figure)
        lines += [f"## {analysis.title}", "", f"![{analysis.title}]({analysis.figure})", ""]
    if rated:
        shutil.copy(rated / "rates.png", report_dir / "rates.png")
        lines += [
            "## Answers to the held-out prompts",
            "",
            (rated / "report.md").read_text(encoding="utf-8"),
            "![scores and win rates](rates.png)",
            "",
        ]
    atomic_write_text(report_dir / "report.md", "\n".join(lines))


@click.command("run", cls=Command)
@click.argument("recipe_path", type=click.Path(exists=True, dir_okay=False), metavar="RECIPE.yaml")
def run_command(recipe_path: str) -> None:
    """Run the whole fusion from a recipe (see docs/recipe.md); finished stages are reused.

    The whole recipe is checked before any stage runs."""
    run_pipeline(load_recipe(recipe_path))
