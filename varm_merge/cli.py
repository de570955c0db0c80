"""`varm-merge`: mergekit's own YAML merge with `varm` registered, plus the analysis and config helpers.

`varm-merge run` reads local model directories only: every model path in the config is checked
and made absolute before mergekit sees it (mergekit takes a relative path such as
`runs/pivot` for a hub repository name and asks the network about it), pickle-only checkpoints
are refused unless `--allow-pickle`, and the merge is written into a temporary folder that is
renamed into place when it is complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import yaml
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import get as get_merge_method
from mergekit.merge_methods import registered_methods
from mergekit.options import PrettyPrintHelp
from mergekit.scripts import run_yaml
from pydantic import ValidationError

from fusion_train import __version__
from fusion_train.errors import Group, ReportsUserErrors, UserError, read_yaml
from fusion_train.merge_methods import MERGE_METHODS
from fusion_train.storage import atomic_directory, refuse_unrelated
from varm_merge.method import DEFAULT_EPSILON, GROUPED_GRANULARITIES, ensure_registered
from varm_merge.weights import CSV_NAME, JSON_NAME, PNG_NAME, REPORT_GRANULARITIES, analyse

PIVOT_PLACEHOLDER = "PIVOT_MODEL"
TARGET_PLACEHOLDER = re.compile(r"\bTARGET_MODEL_(\d+)\b")
ANALYSIS_DIR = "varm_weights"
MERGEKIT_CONFIG = "mergekit_config.yml"
#: Config keys whose string values are model references (``path``, ``path+lora``, ``path@rev``).
MODEL_KEYS = ("base_model", "model", "tokenizer_source", "source", "path")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class MergeInputError(UserError, ValueError):
    """A merge config, model directory or output folder that cannot be merged as given."""


def _scalar(value: Any, default: float) -> float:
    """A number for the analysis report; filtered or gradient settings still apply in the merge itself."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def refusal(error: Exception) -> str:
    """One line from a refusal by mergekit or pydantic (whose messages span several lines)."""
    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']} (got {e.get('input')!r:.80})"
            for e in error.errors()
        )
    return " ".join(str(error).split())


@contextmanager
def refused_as_input_error(what: str) -> Iterator[None]:
    """mergekit's planner and the VaRM kernel refuse bad configs and checkpoints with ValueError
    (pydantic's ValidationError is one): name ``what`` and report it as a user error."""
    try:
        yield
    except UserError:
        raise
    except ValueError as error:
        raise MergeInputError(f"{what}: {refusal(error)}") from error


def _references(config: MergeConfiguration) -> list[ModelReference]:
    """Every model the merge reads: inputs, base, and a tokenizer source given as a model."""
    refs = list(config.referenced_models())
    sources = [config.tokenizer_source, config.tokenizer.source if config.tokenizer else None]
    refs += [s for s in sources if isinstance(s, ModelReference)]
    return sorted(set(refs), key=str)


def check_model_dir(
    path: Path, allow_pickle: bool, pickle_fix: str = ", or pass --allow-pickle if you trust it"
) -> None:
    """A local model directory with safetensors weights (pickles only when the user allows them)."""
    if not path.is_dir():
        raise MergeInputError(f"{path}: not a directory; a model is a saved Hugging Face model directory.")
    names = sorted(p.name for p in path.iterdir())
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        raise MergeInputError(f"{path}: no model weights (*.safetensors); is it a saved model directory?")
    if not allow_pickle:
        raise MergeInputError(
            f"{path}: holds only pickle weights ({', '.join(pickles)}), and loading a pickle can run any "
            "code. Convert it once to safetensors with "
            f"`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)`{pickle_fix}."
        )
    click.echo(
        f"warning: {path}: loading pickle weights ({', '.join(pickles)}) as --allow-pickle asks", err=True
    )


def localise(data: Any, config_file: str, allow_pickle: bool) -> dict[str, Any]:
    """The config with every model path checked and made absolute: local directories only.

    Relative paths are read from the current directory, as mergekit does. Once absolute, nothing
    in mergekit mistakes them for hub repository names (its model card asks the hub about any
    relative path with one slash), so a merge never touches the network.
    """
    with refused_as_input_error(f"{config_file}: not a valid merge config"):
        if not isinstance(data, dict):
            raise MergeInputError(f"{config_file}: expected a YAML mapping (merge_method:, models:, ...)")
        try:
            config = MergeConfiguration.model_validate(data)
        except RuntimeError as error:  # mergekit's own validators raise these for bad values
            raise MergeInputError(f"{config_file}: not a valid merge config: {refusal(error)}") from error
    try:
        get_merge_method(config.merge_method)
    except RuntimeError:
        known = sorted(str(getattr(getattr(m, "spec", m), "name", m)) for m in registered_methods())
        raise MergeInputError(
            f"{config_file}: merge_method {config.merge_method!r} is not a merge method; one of {', '.join(known)}"
        ) from None
    absolute: dict[str, str] = {}
    for ref in _references(config):
        for part, is_model in ((ref.model, True), (ref.lora, False)):
            if part is None:
                continue
            local = Path(part.path).expanduser()
            if part.revision:
                raise MergeInputError(
                    f"{config_file}: model {str(part)!r} names a hub revision; varm-merge merges local model "
                    "directories only: download that revision first and give its folder."
                )
            if not local.exists():
                hint = "" if local.is_absolute() else f" (relative paths are read from {Path.cwd()})"
                raise MergeInputError(
                    f"{config_file}: model {str(part)!r} does not exist{hint}. varm-merge merges local model "
                    "directories only: fix the path, or download the model first and give its folder."
                )
            if is_model:
                check_model_dir(local, allow_pickle)
            absolute[part.path] = str(local.resolve())

    def rewrite(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: rewrite(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v, key) for v in value]
        if isinstance(value, str) and key in MODEL_KEYS:
            return "+".join(absolute.get(part, part) for part in value.split("+"))
        return value

    return rewrite(data)


def prepare_config(
    data: dict[str, Any], config_file: str, out_dir: Path, cache_dir: str | None = None
) -> Path:
    """Write the config mergekit runs into ``out_dir`` and return its path.

    For a `varm` config asking for layer/model granularity without statistics, the analysis pass
    runs first: its output goes to OUT/varm_weights/ and the config to run sets `statistics:`
    to the varm_weights.json there.
    """
    header = f"# Written by varm-merge run from {config_file}: model paths made absolute"
    prepared = out_dir / MERGEKIT_CONFIG
    parameters = data.get("parameters") or {}
    granularity = parameters.get("granularity")
    if (
        data.get("merge_method") == "varm"
        and granularity in GROUPED_GRANULARITIES
        and not parameters.get("statistics")
    ):
        config = MergeConfiguration.model_validate(data)
        if config.base_model is None:
            raise MergeInputError(f"{config_file}: VaRM needs `base_model` (the pivot)")
        priors = {str(m.model): _scalar((m.parameters or {}).get("weight"), 1.0) for m in config.models or []}
        listed = [m.model for m in config.models or []] + [
            src.model for output_slice in config.slices or [] for src in output_slice.sources
        ]
        others = sorted(set(config.referenced_models()) - set(listed), key=str)
        targets = [m for m in dict.fromkeys(listed + others) if m != config.base_model]
        refs = [config.base_model, *targets]
        keys = [str(m) for m in refs]
        local = {str(ref): ref.local_path(cache_dir) for ref in refs}
        for path in local.values():
            check_model_dir(
                Path(path),
                allow_pickle=False,
                pickle_fix=f"; the {granularity} analysis pass reads no pickles",
            )
        with refused_as_input_error(f"{config_file}: the VaRM analysis pass"):
            written = analyse(
                keys[0],
                keys[1:],
                out_dir / ANALYSIS_DIR,
                granularity=granularity,
                priors=[priors.get(k, 1.0) for k in keys[1:]],
                epsilon=_scalar(parameters.get("epsilon"), DEFAULT_EPSILON),
                local_paths=local,
            )
        data = {**data, "parameters": {**parameters, "statistics": str(written["json"].resolve())}}
        prepared = out_dir / ANALYSIS_DIR / "varm_config.yml"
        header += "; `statistics` added by the analysis pass"
        click.echo(f"VaRM {granularity} analysis written to {out_dir / ANALYSIS_DIR}", err=True)
    prepared.write_text(f"{header}.\n" + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return prepared


def claim_new_folder(out: Path) -> None:
    """The merge goes into a new folder (an empty one is fine): never over an earlier result."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        raise MergeInputError(
            f"{out}: already exists; merge into a new folder, or delete this one first "
            "(a merge is written whole into a new folder, never over an earlier one)."
        )


def retarget(staged: Path, out: Path) -> None:
    """Point the configs and model card written inside ``staged`` at ``out``, its final name."""
    for path in [*staged.rglob("*.yml"), *staged.rglob("*.md")]:
        text = path.read_text(encoding="utf-8")
        fixed = text.replace(str(staged.resolve()), str(out.resolve())).replace(staged.name, out.name)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")


def _run(allow_pickle: bool, **kwargs: Any) -> None:
    ensure_registered()
    config_file, out = kwargs["config_file"], Path(kwargs["out_path"])
    data = localise(read_yaml(config_file), config_file, allow_pickle)
    claim_new_folder(out)
    with atomic_directory(out) as staged:
        prepared = prepare_config(data, config_file, staged, cache_dir=kwargs.get("transformers_cache"))
        with refused_as_input_error(f"{config_file}: mergekit refused the merge"):
            click.get_current_context().invoke(
                run_yaml.main, **{**kwargs, "config_file": str(prepared), "out_path": str(staged)}
            )
        retarget(staged, out)


class RunCommand(ReportsUserErrors, PrettyPrintHelp):
    """mergekit's command class, reporting user errors as one line (also as `python -m varm_merge`)."""


# mergekit's own arguments and options, so every `mergekit-yaml` option works unchanged.
run_command = RunCommand(
    name="run",
    params=[
        *run_yaml.main.params,
        click.Option(
            ["--allow-pickle"],
            is_flag=True,
            help="Load models that hold only pickle weights (pytorch_model.bin); refused otherwise.",
        ),
    ],
    callback=_run,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run mergekit's YAML merge (mergekit-yaml CONFIG_FILE OUT_PATH [OPTIONS]) with `varm` registered. "
    "Model paths must be local directories (relative to the current directory); OUT_PATH must be new and "
    "appears only when the merge is complete. For `granularity: layer|model` an analysis pass first "
    "writes OUT_PATH/varm_weights/.",
)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="varm-merge")
def main() -> None:
    """VaRM (Variation Ratio Merge) through mergekit.

    Errors in your input are one line naming the culprit; --debug shows their traceback.
    """


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
    refuse_unrelated(Path(out), (JSON_NAME, CSV_NAME, PNG_NAME))
    for path in (base, *models):
        check_model_dir(Path(path), allow_pickle=False, pickle_fix="")
    with refused_as_input_error("varm-merge weights"):
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
    if name in MERGE_METHODS:
        return MERGE_METHODS[name].config
    raise click.BadParameter(f"{name!r} is neither a file nor a shipped config ({', '.join(MERGE_METHODS)})")


@main.command(
    "config",
    epilog="Shipped configs: "
    + "; ".join(f"{name} ({method.title})" for name, method in MERGE_METHODS.items())
    + ".",
)
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
