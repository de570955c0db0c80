"""Settings studies: ``fusion-train sweep RECIPE.yaml --vary train.lm_weight=0.5,0.0 ...``.

Does fusion beat plain fine-tuning, and with which settings? Each ``--vary`` value is one variant
of the recipe with that one setting changed (not a grid: a grid grows too fast to run on small
machines). Every variant runs in the recipe's own run directory, so the stages a setting does
not touch are shared (a training setting re-runs only the targets; the CLM-only baseline never
re-trains for a fusion setting), and is evaluated into ``RUN/sweep/<variant>/``. The summary
puts each target's paired difference to the baseline side by side, variant by variant.
Merges are left out: they come after the question a sweep answers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
import yaml

from fusion_train.errors import Command, read_yaml
from fusion_train.pipeline import run_pipeline
from fusion_train.recipe import STAGE_SETTINGS, RecipeError, load_recipe, parse_recipe
from fusion_train.storage import atomic_write_text, write_json_atomic

BASE = "recipe as written"


def parse_variation(text: str) -> tuple[str, str, list[Any]]:
    """``stage.key=v1,v2`` -> (stage, key, [v1, v2]); values are read as YAML (numbers, booleans)."""
    found = re.fullmatch(r"(\w+)\.(\w+)=(.+)", text.strip())
    if not found:
        raise click.BadParameter(f"expected STAGE.KEY=VALUE[,VALUE...], got {text!r}", param_hint="--vary")
    stage, key, values = found.groups()
    known = {s: cls for s, cls in STAGE_SETTINGS.items() if s != "merge"}
    if stage not in known or key not in {f.name for f in fields(known[stage])}:
        choices = ", ".join(f"{s}.{f.name}" for s, cls in known.items() for f in fields(cls))
        raise click.BadParameter(
            f"{stage}.{key} is not a recipe setting; one of: {choices}", param_hint="--vary"
        )
    return stage, key, [yaml.safe_load(v) for v in values.split(",")]


def variants(raw: dict[str, Any], variations: list[tuple[str, str, list[Any]]]) -> dict[str, dict[str, Any]]:
    """The recipe as written, then one recipe per varied value; merges left out of all of them."""
    base = copy.deepcopy(raw)
    base["merge"] = {**(base.get("merge") or {}), "methods": []}
    out = {BASE: base}
    for stage, key, values in variations:
        for value in values:
            variant = copy.deepcopy(base)
            variant[stage] = {**(variant.get(stage) or {}), key: value}
            out[f"{stage}.{key}={value}"] = variant
    return out


def summarise(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per (variant, target): its bits/byte, the variant's baseline, the paired difference."""
    rows = []
    for variant, report in reports.items():
        baseline = next(m for m in report["models"] if m["role"] == "baseline")
        for model in report["models"]:
            if model["role"] == "target":
                rows.append(
                    {
                        "variant": variant,
                        "target": model["name"],
                        "bits_per_byte": model["bits_per_byte"],
                        "baseline": baseline["bits_per_byte"],
                        "minus_baseline": model["difference"],
                    }
                )
    return {"examples": reports[BASE]["examples"], "rows": rows}


def verdict(difference: dict[str, float]) -> str:
    if difference["high"] < 0:
        return "better"
    return "worse" if difference["low"] > 0 else "no clear difference"


def markdown_summary(summary: dict[str, Any]) -> str:
    lines = [
        "# Settings sweep",
        "",
        f"Each fused target against the CLM-only baseline trained on the same data with the same "
        f"schedule, on {summary['examples']} held-out examples (bits per byte, lower is better). "
        "`better` means the paired 95% interval of the difference lies below zero.",
        "",
        "| variant | target | bits/byte | baseline | minus baseline (paired 95% CI) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        diff = row["minus_baseline"]
        lines.append(
            f"| {row['variant']} | {row['target']} | {row['bits_per_byte']['value']:.4f} | "
            f"{row['baseline']['value']:.4f} | {diff['value']:+.4f} ({diff['low']:+.4f} to {diff['high']:+.4f}) | "
            f"{verdict(diff)} |"
        )
    lines += ["", "![differences to the baseline](sweep.png)", ""]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """Each target's paired difference to the baseline per variant, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    targets = sorted({r["target"] for r in rows})
    variant_names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(variant_names) * len(targets) + 1.8))
    height = 0.8 / len(targets)
    for t, target in enumerate(targets):
        picked = [r for r in rows if r["target"] == target]
        ys = [variant_names.index(r["variant"]) + (t - (len(targets) - 1) / 2) * height for r in picked]
        diffs = [r["minus_baseline"] for r in picked]
        errors = [[d["value"] - d["low"] for d in diffs], [d["high"] - d["value"] for d in diffs]]
        ax.errorbar([d["value"] for d in diffs], ys, xerr=errors, fmt="o", capsize=3, label=target)
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(variant_names)), variant_names)
    ax.invert_yaxis()
    ax.set_xlabel("bits/byte minus the CLM-only baseline (left of 0: fusion helps)")
    ax.legend(fontsize="small")
    ax.set_title(f"Fusion settings, {summary['examples']} held-out examples")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def sweep(
    recipe_path: Path, variations: list[tuple[str, str, list[Any]]], sources: tuple[str, ...] = ()
) -> Path:
    """Run every variant (finished stages are reused) and write ``RUN/sweep/``; return that folder.

    Every variant is checked before the first one runs: a bad value fails at once, not hours in."""
    recipe = load_recipe(recipe_path)  # validates the recipe as written
    raw = read_yaml(recipe_path, RecipeError)
    if sources:
        unknown = sorted(set(sources) - {s.name for s in recipe.sources})
        if unknown:
            raise RecipeError(f"{recipe_path}: no source named {', '.join(unknown)}")
        raw["sources"] = [s for s in raw["sources"] if s.get("name") in sources]
    raw["train"] = {**(raw.get("train") or {}), "clm_baseline": True}
    raw["run_dir"] = recipe.run_dir
    out = Path(recipe.run_dir) / "sweep"
    parsed = {
        name: parse_recipe(
            variant,
            base=recipe_path.parent,
            default_run_dir=Path(recipe.run_dir),
            where=f"{recipe_path} with --vary {name}",
        )
        for name, variant in variants(raw, variations).items()
    }
    reports = {}
    for name, variant_recipe in parsed.items():
        click.echo(f"== {name}")
        folder = re.sub(r"[^\w.=-]+", "_", name)
        reports[name] = run_pipeline(variant_recipe, report_dir=out / folder)
    summary = summarise(reports)
    write_json_atomic(out / "sweep.json", summary)
    plot_summary(summary, out / "sweep.png")
    atomic_write_text(out / "report.md", markdown_summary(summary))
    return out


@click.command("sweep", cls=Command)
@click.argument(
    "recipe_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="RECIPE.yaml"
)
@click.option(
    "--vary",
    "variations",
    multiple=True,
    required=True,
    metavar="STAGE.KEY=V1[,V2...]",
    help="A setting to try other values of, repeatable, e.g. train.lm_weight=0.5,0.0 or align.vocab_map=mined.",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="NAME",
    help="Only this source's target (repeatable); default: every source in the recipe.",
)
def sweep_command(recipe_path: Path, variations: tuple[str, ...], sources: tuple[str, ...]) -> None:
    """Try other values of recipe settings, one at a time, against the CLM-only baseline.

    Writes RUN/sweep/report.md (table), sweep.json and sweep.png, and each variant's full
    evaluation under RUN/sweep/<variant>/.
    """
    out = sweep(recipe_path, [parse_variation(v) for v in variations], sources)
    click.echo((out / "report.md").read_text(encoding="utf-8"))
