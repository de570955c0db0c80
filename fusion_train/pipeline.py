"""The whole method from one recipe: ``fusion-train run RECIPE.yaml``.

The data split, then the explicit stages (``fusion_train.explicit``: represent -> align -> fuse ->
train for every source, a CLM-only baseline, the merges) and/or the implicit ones
(``fusion_train.implicit.pipeline``), then every model evaluated on held-out data and the report.

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
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from fusion_train.chat import load_conversations
from fusion_train.errors import Command
from fusion_train.evaluate import ModelSpec, evaluate
from fusion_train.explicit import ExplicitRun
from fusion_train.implicit.pipeline import ImplicitRun
from fusion_train.implicit.sample import prompts_of
from fusion_train.merge_methods import MergeAnalysis
from fusion_train.recipe import Recipe, load_recipe
from fusion_train.stages import (
    RecipeError,
    StageLog,
    Stages,
    disk_full_explained,
    file_fingerprint,
    run_in_ranks,
)
from fusion_train.storage import atomic_write_text, read_json, write_json_atomic


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
        explicit, analyses = ExplicitRun(recipe, stages, train_file, data_key).models()
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
