"""`varm-merge`: mergekit's own YAML merge with `varm` registered, plus the analysis and config helpers."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import PrettyPrintHelp
from mergekit.scripts import run_yaml

from varm_merge.method import DEFAULT_EPSILON, GROUPED_GRANULARITIES, ensure_registered
from varm_merge.weights import REPORT_GRANULARITIES, analyse

CONFIG_DIR = Path(str(resources.files("merge_configs")))
PIVOT_PLACEHOLDER = "PIVOT_MODEL"
TARGET_PLACEHOLDER = re.compile(r"\bTARGET_MODEL_(\d+)\b")
ANALYSIS_DIR = "varm_weights"


def _scalar(value: Any, default: float) -> float:
    """A number for the analysis report; filtered or gradient settings still apply in the merge itself."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def prepare_config(config_file: str, out_path: str, cache_dir: str | None = None) -> str:
    """Run the analysis pass when a `varm` config asks for layer/model granularity without statistics.

    Returns the config mergekit should run: the original, or a copy under OUT/varm_weights/ whose
    `statistics:` points at the freshly written varm_weights.json.
    """
    with open(config_file, encoding="utf-8") as file:
        data = yaml.safe_load(file)
    if not isinstance(data, dict) or data.get("merge_method") != "varm":
        return config_file
    parameters = data.get("parameters") or {}
    granularity = parameters.get("granularity")
    if granularity not in GROUPED_GRANULARITIES or parameters.get("statistics"):
        return config_file

    config = MergeConfiguration.model_validate(data)
    if config.base_model is None:
        raise click.UsageError("VaRM needs `base_model` (the pivot)")
    priors = {str(m.model): _scalar((m.parameters or {}).get("weight"), 1.0) for m in config.models or []}
    listed = [m.model for m in config.models or []] + [
        src.model for output_slice in config.slices or [] for src in output_slice.sources
    ]
    others = sorted(set(config.referenced_models()) - set(listed), key=str)
    targets = [m for m in dict.fromkeys(listed + others) if m != config.base_model]
    refs = [config.base_model, *targets]
    keys = [str(m) for m in refs]
    local = {str(ref): ref.local_path(cache_dir) for ref in refs}
    out_dir = Path(out_path) / ANALYSIS_DIR
    written = analyse(
        keys[0],
        keys[1:],
        out_dir,
        granularity=granularity,
        priors=[priors.get(k, 1.0) for k in keys[1:]],
        epsilon=_scalar(parameters.get("epsilon"), DEFAULT_EPSILON),
        local_paths=local,
    )
    data["parameters"] = {**parameters, "statistics": str(written["json"].resolve())}
    prepared = out_dir / "varm_config.yml"
    header = f"# Written by varm-merge run from {config_file}: `statistics` added by the analysis pass.\n"
    prepared.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    click.echo(f"VaRM {granularity} analysis written to {out_dir}", err=True)
    return str(prepared)


def _run(**kwargs: Any) -> None:
    ensure_registered()
    kwargs["config_file"] = prepare_config(
        kwargs["config_file"], kwargs["out_path"], cache_dir=kwargs.get("transformers_cache")
    )
    click.get_current_context().invoke(run_yaml.main, **kwargs)


# mergekit's own arguments and options, so every `mergekit-yaml` option works unchanged.
run_command = PrettyPrintHelp(
    name="run",
    params=list(run_yaml.main.params),
    callback=_run,
    help="Run mergekit's YAML merge (mergekit-yaml CONFIG_FILE OUT_PATH [OPTIONS]) with `varm` registered. "
    "For `granularity: layer|model` an analysis pass first writes OUT_PATH/varm_weights/.",
)


@click.group()
def main() -> None:
    """VaRM (Variation Ratio Merge) through mergekit."""


main.add_command(run_command)


@main.command()
@click.option(
    "--base", required=True, type=click.Path(exists=True, file_okay=False), help="Pivot model directory."
)
@click.option(
    "--model",
    "models",
    required=True,
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Fine-tuned model directory (repeat).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for JSON, CSV, PNG.")
@click.option("--granularity", type=click.Choice(REPORT_GRANULARITIES), default="matrix", show_default=True)
@click.option("--prior", "priors", multiple=True, type=float, help="Prior per --model, in order (repeat).")
@click.option("--epsilon", type=float, default=DEFAULT_EPSILON, show_default=True)
@click.option("--heatmap/--no-heatmap", default=True, show_default=True)
def weights(
    base: str,
    models: tuple[str, ...],
    out: str,
    granularity: str,
    priors: tuple[float, ...],
    epsilon: float,
    heatmap: bool,
) -> None:
    """Stream the models once and write the VaRM weights per tensor per model (JSON, CSV, heatmap)."""
    if priors and len(priors) != len(models):
        raise click.UsageError(f"{len(priors)} --prior values for {len(models)} --model values")
    written = analyse(
        base,
        list(models),
        out,
        granularity=granularity,
        priors=list(priors) or None,
        epsilon=epsilon,
        heatmap=heatmap,
    )
    report = json.loads(written["json"].read_text(encoding="utf-8"))
    for k, model in enumerate(report["models"]):
        mean = sum(t["weights"][k] for t in report["tensors"].values()) / max(1, len(report["tensors"]))
        click.echo(f"{model}: mean weight over tensors {mean:.4f}")
    for path in written.values():
        click.echo(f"wrote {path}")


def fill_placeholders(text: str, pivot: str, targets: list[str]) -> str:
    """Replace PIVOT_MODEL and TARGET_MODEL_<n> (1-based) with quoted paths; comments are kept."""
    numbers = sorted({int(n) for n in TARGET_PLACEHOLDER.findall(text)})
    if numbers != list(range(1, len(targets) + 1)):
        raise ValueError(
            f"the config has placeholders for {len(numbers)} targets; got {len(targets)} --target"
        )
    # A JSON string is a valid double-quoted YAML scalar, whatever the path holds.
    text = text.replace(PIVOT_PLACEHOLDER, json.dumps(pivot))
    filled = TARGET_PLACEHOLDER.sub(lambda m: json.dumps(targets[int(m.group(1)) - 1]), text)
    MergeConfiguration.model_validate(yaml.safe_load(filled))
    return filled


def resolve_config(name: str) -> Path:
    """A path, or the name of a shipped config (`varm`, `ties`, ...) in merge_configs/."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name}.yml"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yml")))
    raise click.BadParameter(f"{name!r} is neither a file nor a shipped config ({available})")


@main.command("config")
@click.argument("name")
@click.option("--pivot", required=True, help="Pivot (base) model path.")
@click.option("--target", "targets", required=True, multiple=True, help="Target model path (repeat).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
def config_command(name: str, pivot: str, targets: tuple[str, ...], out: str | None) -> None:
    """Fill a merge config's model placeholders: NAME is a file or a shipped config (e.g. `varm`)."""
    ensure_registered()
    text = resolve_config(name).read_text(encoding="utf-8")
    try:
        filled = fill_placeholders(text, pivot, list(targets))
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    if out:
        Path(out).write_text(filled, encoding="utf-8")
    else:
        click.echo(filled, nl=False)
