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
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import click
import yaml

from fusion_train import options
from fusion_train.align import align, align_command, settings_problem
from fusion_train.chat import BUILTIN_TEMPLATES, load_conversations
from fusion_train.errors import Command, UserError, read_yaml
from fusion_train.evaluate import MODULE as EVALUATE_MODULE
from fusion_train.evaluate import ModelSpec, evaluate, evaluate_command
from fusion_train.fuse import MIN_SOURCE_MASS, fuse, fuse_command
from fusion_train.fusion_criteria import DEFAULT_CRITERION
from fusion_train.implicit.recipe import (
    IMPLICIT_COMMANDS,
    IMPLICIT_DECLARED_BY,
    IMPLICIT_ONLY_TYPES,
    IMPLICIT_SETTINGS,
    MODEL_NAMES,
    DPOStage,
    ImplicitRun,
    PreferStage,
    RateStage,
    SampleStage,
    ScoreStage,
    SFTStage,
    check_implicit,
)
from fusion_train.implicit.sample import prompts_of
from fusion_train.inference import check_before_launch
from fusion_train.launch import world_size_of
from fusion_train.losses import CHUNK_TOKENS
from fusion_train.merge_methods import DEFAULT_MERGE_METHODS, MERGE_METHODS, MergeAnalysis
from fusion_train.models import model_fingerprint
from fusion_train.represent import FORMAT as REPRESENTATION_FORMAT
from fusion_train.represent import MODULE as REPRESENT_MODULE
from fusion_train.represent import RepresentSettings, represent, represent_command
from fusion_train.settings import value_types
from fusion_train.stages import (
    RecipeError,
    Resources,
    StageError,
    StageLog,
    Stages,
    disk_full_explained,
    file_fingerprint,
    launch_stage,
    recipe_error,
    train_in_stage,
)
from fusion_train.storage import atomic_write_text, read_json, write_json_atomic
from fusion_train.train import (
    PRESETS,
    Schedule,
    TrainConfig,
    launch_training,
    schedule_problem,
    train,
)

# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str
    chat_template: str | None = None
    gguf_file: str | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # sources only: SOURCE_SETTINGS


# What a source may set for its own stages, over the recipe's stage settings. Other training
# settings would give its target another schedule than the shared CLM-only baseline's.
SOURCE_SETTINGS = {"align": ("token_align", "vocab_map"), "fuse": ("criterion", "ce_unit", "min_source_mass"),
                   "train": ("lm_weight", "temperature")}  # fmt: skip


@dataclass(frozen=True)
class DataSettings:
    train: str
    heldout: str | None = None  # a held-out file, or split `train` by heldout_fraction
    heldout_fraction: float | None = None
    limit: int | None = None  # use the first N training records


@dataclass(frozen=True)
class RepresentStage:
    top_k: int = 10
    max_length: int = 2048
    batch_tokens: int = 4096
    dtype: str = "auto"


@dataclass(frozen=True)
class AlignStage:
    token_align: str = "spans"
    vocab_map: str = "exact"


@dataclass(frozen=True)
class FuseStage:
    criterion: str = DEFAULT_CRITERION
    ce_unit: str = "byte"
    min_source_mass: float = MIN_SOURCE_MASS  # changes only sources aligned by bytes (see fuse_inputs)


def align_inputs(pivot_key: str, source_key: str, settings: AlignStage) -> dict[str, Any]:
    """What the align stage's key holds."""
    return {"pivot": pivot_key, "source": source_key, "settings": asdict(settings)}


def fuse_inputs(
    pivot_key: str, aligned_key: str, settings: FuseStage, aligned_by: AlignStage
) -> dict[str, Any]:
    """What the fuse stage's key holds. ``min_source_mass`` changes only the fusion of a source
    aligned by bytes (the others use the whole stored mass on every row): it joins the key only
    then, so the stages of every other run keep their keys."""
    values = asdict(settings)
    if aligned_by.token_align != "bytes":
        del values["min_source_mass"]
    return {"pivot": pivot_key, "aligned": [aligned_key], "settings": values}


@dataclass(frozen=True)
class TrainStage:
    """``fusion-train train``'s settings in a recipe. Not derived from ``train.Schedule`` (as the
    implicit sft/dpo sections are): every key here is part of the train stages' keys, and the
    weight_decay and max_grad_norm a derived section would add would retrain existing runs."""

    clm_baseline: bool = True  # also train the pivot with CLM only, on the same data and schedule
    lm_weight: float = 0.9
    temperature: float = 1.0
    deepspeed: str = "zero2"
    learning_rate: float = 5e-6
    epochs: float = 3.0
    max_steps: int = -1
    per_device_batch_size: int = 1
    grad_accumulation: int = 1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    seed: int = 42
    loss_chunk_tokens: int = CHUNK_TOKENS


@dataclass(frozen=True)
class MergeStage:
    methods: tuple[str, ...] = DEFAULT_MERGE_METHODS
    dtype: str = "float32"


@dataclass(frozen=True)
class EvaluateStage:
    max_length: int = 2048
    batch_tokens: int = 4096
    dtype: str = "auto"


@dataclass(frozen=True)
class Recipe:
    pivot: ModelEntry
    sources: tuple[ModelEntry, ...]
    data: DataSettings
    run_dir: str
    represent: RepresentStage = RepresentStage()
    align: AlignStage = AlignStage()
    fuse: FuseStage = FuseStage()
    train: TrainStage = TrainStage()
    merge: MergeStage = MergeStage()
    evaluate: EvaluateStage = EvaluateStage()
    resources: Resources = field(default_factory=Resources)
    method: str = "explicit"  # explicit | implicit | both
    sample: SampleStage = field(default_factory=SampleStage)
    score: ScoreStage = field(default_factory=ScoreStage)
    prefer: PreferStage = field(default_factory=PreferStage)
    sft: SFTStage = field(default_factory=SFTStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    rate: RateStage = field(default_factory=RateStage)

    @property
    def explicit(self) -> bool:
        return self.method in ("explicit", "both")

    @property
    def implicit(self) -> bool:
        return self.method in ("implicit", "both")

    def stages_for(self, source: ModelEntry) -> tuple[AlignStage, FuseStage, TrainStage]:
        """The align, fuse and train settings of one source: the recipe's, with its own over them."""
        own = source.settings
        return (replace(self.align, **own.get("align", {})), replace(self.fuse, **own.get("fuse", {})),
                replace(self.train, **own.get("train", {})))  # fmt: skip


STAGE_SETTINGS = {"represent": RepresentStage, "align": AlignStage, "fuse": FuseStage, "train": TrainStage,
                  "merge": MergeStage, "evaluate": EvaluateStage, "resources": Resources}  # fmt: skip
# A stage's keys accept what the same flags of its command accept (one set of ranges and choices);
# a training section's what the fields of its stage's settings declare (``fusion_train.settings``),
# which its command's flags are made from.
STAGE_COMMANDS = {RepresentStage: represent_command, AlignStage: align_command, FuseStage: fuse_command,
                  EvaluateStage: evaluate_command, Resources: represent_command}  # fmt: skip
DECLARED_BY: dict[type, type] = {TrainStage: TrainConfig, **IMPLICIT_DECLARED_BY}
RECIPE_ONLY_TYPES: dict[type, dict[str, click.ParamType]] = {
    DataSettings: {"limit": options.POSITIVE_INT,
                   "heldout_fraction": click.FloatRange(0.0, 1.0, min_open=True, max_open=True)},
    MergeStage: {"dtype": click.Choice(["float32", "float16", "bfloat16"])},
}  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # names become folder names


METHODS = ("explicit", "implicit", "both")
EXPLICIT_ONLY = ("represent", "align", "fuse", "train", "merge")  # sections only method explicit uses


def _value_types(cls: type) -> dict[str, click.ParamType]:
    command = {**STAGE_COMMANDS, **IMPLICIT_COMMANDS}.get(cls)
    flags = {p.name: p.type for p in command.params if p.name} if command else {}
    declared = value_types(DECLARED_BY[cls]) if cls in DECLARED_BY else {}
    return {**flags, **declared, **RECIPE_ONLY_TYPES.get(cls, {}), **IMPLICIT_ONLY_TYPES.get(cls, {})}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML read it) has the annotated type; an int is no bool, a float may be an int."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return any(_fits(value, arg) for arg in get_args(hint))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, get_args(hint)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is NoneType:
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "text", NoneType: "null"}
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    if get_origin(hint) is dict:
        return "a mapping"
    if get_origin(hint) is tuple:
        return f"a list of {_describe(get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_values(cls: type, values: dict[str, Any], where: str, key: str) -> None:
    """Refuse a value of the wrong type or out of range, naming the recipe key (``train.lm_weight``)."""
    hints, types = get_type_hints(cls), _value_types(cls)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            hint = ""
            if (
                isinstance(value, str)
                and _fits(1.0, hints[name])
                and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value)
            ):
                hint = (
                    f" (YAML reads {value} as text; write it with a decimal point, e.g. {float(value):.1e})"
                )
            raise RecipeError(
                f"{where}: {key}.{name}: expected {_describe(hints[name])}, got {value!r}{hint}"
            )
        if name in types and value is not None:
            try:
                types[name].convert(value, None, None)
            except click.BadParameter as error:
                raise RecipeError(f"{where}: {key}.{name}: {error.message}") from None


def _build(cls: type, raw: Any, where: str, key: str) -> Any:
    """A dataclass from the mapping at ``key``, refusing unknown keys and bad values by name."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {key}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(
            f"{where}: {key}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    check_values(cls, raw, where, key)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise RecipeError(f"{where}: {key}: {exc}") from exc


def _source_settings(raw: Any, where: str, key: str) -> dict[str, dict[str, Any]]:
    """A source's own settings, checked against SOURCE_SETTINGS and the stages' value types."""
    at = f"{where}: {key}"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{at}: settings: expected a mapping such as {{train: {{lm_weight: 0.5}}}}")
    for stage, values in raw.items():
        allowed = SOURCE_SETTINGS.get(stage)
        if allowed is None:
            raise RecipeError(
                f"{at}: settings.{stage}: not a per-source stage; one of {', '.join(SOURCE_SETTINGS)}"
            )
        if not isinstance(values, dict):
            raise RecipeError(f"{at}: settings.{stage}: expected a mapping")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise RecipeError(
                f"{at}: settings.{stage}: {', '.join(unknown)} cannot be set per source (only "
                f"{', '.join(allowed)}); set it under the top-level `{stage}` for every source"
            )
        check_values(STAGE_SETTINGS[stage], values, where, f"{key}.settings.{stage}")
    return raw


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; relative paths are relative to the recipe file."""
    path = Path(path)
    return parse_recipe(
        read_yaml(path, RecipeError),
        base=path.parent,
        default_run_dir=path.parent / "runs" / path.stem,
        where=str(path),
    )


def _local_file(base: Path, value: str, where: str, key: str, what: str) -> str:
    """An existing file or directory named relative to the recipe, as an absolute path."""
    local = (base / Path(value).expanduser()).resolve()
    if not local.exists():
        raise RecipeError(f"{where}: {key}: {what} {local} does not exist")
    return str(local)


def parse_recipe(raw: Any, base: Path, default_run_dir: Path, where: str = "recipe") -> Recipe:
    """Check the whole recipe, every key and value, before any stage runs; paths become absolute."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    unknown = sorted(
        set(raw) - {"pivot", "sources", "data", "run_dir", "method", *STAGE_SETTINGS, *IMPLICIT_SETTINGS}
    )
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}")
    fusion = raw.get("method", "explicit")
    if fusion not in METHODS:
        raise RecipeError(f"{where}: method: {fusion!r}: use one of {', '.join(METHODS)}")
    unused = [k for k in raw if (k in EXPLICIT_ONLY and fusion == "implicit")
              or (k in IMPLICIT_SETTINGS and fusion == "explicit")]  # fmt: skip
    if unused:
        needs = "explicit (or both)" if unused[0] in EXPLICIT_ONLY else "implicit (or both)"
        raise RecipeError(
            f"{where}: {unused[0]}: only method {needs} has this stage; drop it or set `method`"
        )
    for key in ("pivot", "sources", "data"):
        if key not in raw:
            raise RecipeError(f"{where}: missing `{key}`")

    def model(entry: Any, key: str) -> ModelEntry:
        m = _build(ModelEntry, entry, where, key)
        if not NAME.fullmatch(m.name):
            raise RecipeError(
                f"{where}: {key}.name: {m.name!r} names folders: use letters, digits, '.', '_' and '-'"
            )
        local = (base / m.path).resolve()
        if not local.is_dir():
            raise RecipeError(f"{where}: {key}.path: model directory {local} does not exist")
        if m.gguf_file is not None and not (local / m.gguf_file).is_file():
            raise RecipeError(f"{where}: {key}.gguf_file: {local / m.gguf_file} does not exist")
        template = m.chat_template
        if template is not None and template not in BUILTIN_TEMPLATES:
            if not (base / template).is_file():
                raise RecipeError(
                    f"{where}: {key}.chat_template: {template!r} is neither a built-in template "
                    f"({', '.join(BUILTIN_TEMPLATES)}) nor a file next to the recipe"
                )
            template = str((base / template).resolve())
        return replace(
            m, path=str(local), chat_template=template, settings=_source_settings(m.settings, where, key)
        )

    pivot = model(raw["pivot"], "pivot")
    if pivot.settings:
        raise RecipeError(
            f"{where}: pivot: `settings` are per source; set the pivot's stages at the top level"
        )
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        raise RecipeError(f"{where}: `sources` must be a non-empty list")
    sources = tuple(model(s, f"sources[{i}]") for i, s in enumerate(raw["sources"]))
    names = [pivot.name] + [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{where}: model name(s) used twice: {', '.join(duplicates)}; names must be unique")
    for source in sources:
        if source.path == pivot.path:
            raise RecipeError(f"{where}: source {source.name!r} is the pivot itself ({pivot.path})")
    data = _build(DataSettings, raw["data"], where, "data")
    data = DataSettings(
        _local_file(base, data.train, where, "data.train", "training data"),
        _local_file(base, data.heldout, where, "data.heldout", "held-out data") if data.heldout else None,
        data.heldout_fraction,
        data.limit,
    )
    if data.heldout is None and not data.heldout_fraction:
        raise RecipeError(f"{where}: data has no `heldout` file and no `heldout_fraction`; give one of them")
    if isinstance(raw.get("train"), dict) and "nproc" in raw["train"]:
        raise RecipeError(
            f"{where}: train.nproc: moved to resources.nproc (it also runs represent and evaluate)"
        )
    if fusion == "implicit" and any(s.settings for s in sources):
        raise RecipeError(
            f"{where}: sources: per-source `settings` are for the explicit stages; method is implicit"
        )
    settings = {name: _build(cls, raw.get(name) or {}, where, name) for name, cls in STAGE_SETTINGS.items()}
    for index, source in enumerate(sources):
        own = source.settings.get("align", {})
        chosen = replace(settings["align"], **own)
        problem = settings_problem(chosen.token_align, chosen.vocab_map)
        if problem:
            raise RecipeError(f"{where}: {f'sources[{index}].settings.align' if own else 'align'}: {problem}")
    implicit = {
        name: _build(cls, raw.get(name) or {}, where, name) for name, cls in IMPLICIT_SETTINGS.items()
    }
    resources = settings["resources"]
    if resources.hostfile is not None:
        hostfile = _local_file(base, resources.hostfile, where, "resources.hostfile", "hostfile")
        settings["resources"] = resources = replace(resources, hostfile=hostfile)
    inference = resources.inference()
    try:  # what every stage that runs a model checks (before it launches its ranks)
        if resources.launches:
            check_before_launch(inference)
        else:
            inference.check()
    except UserError as error:
        raise recipe_error(where, "resources", error, {f.name for f in fields(Resources)}) from None
    made = set(MODEL_NAMES) if fusion != "explicit" else set()
    if fusion != "implicit":
        made |= {"clm-baseline", *(f"target-{n}" for n in names[1:])}
        made |= {f"merge-{method}" for method in settings["merge"].methods}
    models = [("pivot", pivot), *((f"sources[{i}]", s) for i, s in enumerate(sources))]
    for key, entry in models:  # evaluate and rate name the models in their reports
        if entry.name in made:
            raise RecipeError(
                f"{where}: {key}.name: {entry.name!r} is the name of a model the run makes; pick another"
            )
    if fusion != "explicit":
        implicit = check_implicit(implicit, base, where, models, resources)
    training = settings["train"]
    if training.deepspeed not in PRESETS:
        deepspeed = _local_file(base, training.deepspeed, where, "train.deepspeed",
                                f"neither a preset ({', '.join(PRESETS)}) nor a file:")  # fmt: skip
        settings["train"] = replace(training, deepspeed=deepspeed)
    if training.epochs <= 0 and training.max_steps <= 0:
        raise RecipeError(f"{where}: train.epochs: must be positive (or set train.max_steps)")
    if fusion != "implicit":  # a schedule of max_steps is judged here; one of epochs once the data is there
        schedule = Schedule(
            **{f.name: getattr(training, f.name) for f in fields(Schedule) if hasattr(training, f.name)}
        )
        problem = schedule_problem(schedule, None, 1, lambda key: f"train.{key}")
        if problem:
            raise RecipeError(f"{where}: {problem}")
    unknown = [method for method in settings["merge"].methods if method not in MERGE_METHODS]
    if unknown:
        raise RecipeError(f"{where}: merge.methods: {', '.join(map(repr, unknown))}: not a merge method; one of "
                          f"{', '.join(MERGE_METHODS)}")  # fmt: skip
    if not isinstance(raw.get("run_dir") or "", str):
        raise RecipeError(f"{where}: run_dir: expected a folder name, got {raw['run_dir']!r}")
    run_dir = str((base / raw["run_dir"]).resolve()) if raw.get("run_dir") else str(default_run_dir.resolve())
    return Recipe(pivot, sources, data, run_dir, method=fusion, **settings, **implicit)


# --------------------------------------------------------------------------- stages


def split_data(recipe: Recipe, stages: Stages) -> tuple[Path, Path, str]:
    """Training and held-out files, as JSONL of normalised records (split by id hash if asked)."""
    data = recipe.data
    inputs = {"train": file_fingerprint(data.train), "heldout": file_fingerprint(data.heldout) if data.heldout else None,
              "fraction": data.heldout_fraction, "limit": data.limit}  # fmt: skip

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
        if resources.launches:
            arguments = {"data_path": heldout_file, "models": [f"{m.name}={m.path}:{m.role}" for m in models],
                         "chat_templates": [f"{m.name}={m.chat_template}" for m in models if m.chat_template],
                         "compare_to": compare_to, "out_dir": evaluate_dir, "max_length": e.max_length,
                         "batch_tokens": e.batch_tokens, "cache_dir": run_dir / "evaluate" / "losses",
                         **asdict(resources.inference(e.dtype))}  # fmt: skip
            launch_stage("evaluate", EVALUATE_MODULE, evaluate_command, arguments, resources, evaluate_dir)
            report = read_json(evaluate_dir / "report.json")
        else:
            report = evaluate(models, heldout_file, evaluate_dir, max_length=e.max_length, batch_tokens=e.batch_tokens,
                              cache_dir=run_dir / "evaluate" / "losses", compare_to=compare_to,
                              inference=resources.inference(e.dtype))  # fmt: skip
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
        inputs = {"model": model_fingerprint(entry.path), "data": data_key, "settings": asdict(recipe.represent),
                  "chat_template": entry.chat_template, "format": REPRESENTATION_FORMAT,
                  "dtype": str(represent_inference.resolved_dtype())}  # fmt: skip
        r = recipe.represent
        settings = RepresentSettings(r.top_k, r.max_length, "truncate", entry.chat_template, chunk_size=256)

        def work(out: Path) -> None:
            if not resources.launches:
                represent(entry.path, train_file, out, settings, inference=represent_inference,
                          gguf_file=entry.gguf_file, batch_tokens=r.batch_tokens)  # fmt: skip
                return
            arguments = {"model_path": entry.path, "data_path": train_file, "out_dir": out, "gguf_file": entry.gguf_file,
                         "batch_tokens": r.batch_tokens, **asdict(settings), **asdict(represent_inference)}  # fmt: skip
            launch_stage(
                f"represent {entry.name}", REPRESENT_MODULE, represent_command, arguments, resources, out
            )

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
        inputs = {"pivot": model_fingerprint(recipe.pivot.path), "fused": data_key, "settings": settings,
                  "no_fusion": no_fusion, "world_size": world_size_of(resources.nproc, resources.hostfile)}  # fmt: skip

        def start(out: Path, resume: bool) -> int:
            section = {
                k: v for k, v in asdict(t).items() if k != "clm_baseline"
            }  # the rest are TrainConfig's
            config = TrainConfig(
                model=recipe.pivot.path, fused=str(fused), out=str(out / "model"),
                **{**section, "lm_weight": 1.0 if no_fusion else t.lm_weight}, resume=resume,
                attn_implementation=resources.attn_implementation,
            )  # fmt: skip
            if not resources.launches:  # one process: no launcher to start
                train(config)
                return 0
            return launch_training(config, resources.nproc, resources.hostfile, None)

        return stages.run("train", name, inputs, lambda out: train_in_stage(f"training {name}", out, start))

    pivot_repr, pivot_key = represent_stage(recipe.pivot)
    targets: dict[str, tuple[Path, str]] = {}
    first_fused: Path | None = None
    for source in recipe.sources:
        align_settings, fuse_settings, train_settings = recipe.stages_for(source)
        source_repr, source_key = represent_stage(source)
        aligned, aligned_key = stages.run(
            "align", source.name, align_inputs(pivot_key, source_key, align_settings),
            lambda out, s=source_repr, a=align_settings: align(pivot_repr, s, out, a.token_align, a.vocab_map),
        )  # fmt: skip
        fused, fused_key = stages.run(
            "fuse", source.name, fuse_inputs(pivot_key, aligned_key, fuse_settings, align_settings),
            lambda out, a=aligned, f=fuse_settings: fuse(pivot_repr, [a], out, f.criterion, f.ce_unit,
                                                         min_source_mass=f.min_source_mass),
        )  # fmt: skip
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
        inputs = {"pivot": model_fingerprint(recipe.pivot.path), "targets": target_keys, "dtype": recipe.merge.dtype,
                  "config": file_fingerprint(str(declared.config))}  # fmt: skip

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
                "merge", analysis.stage, {"pivot": model_fingerprint(recipe.pivot.path), "targets": target_keys},
                lambda out, run=analysis.run: run(recipe.pivot.path, paths, out),
            )  # fmt: skip
            analyses.append((analysis, out))
    return merged, analyses


def write_comparison(report: dict[str, Any], report_dir: Path, analyses: list[tuple[MergeAnalysis, Path]],
                     rated: Path | None = None) -> None:  # fmt: skip
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
        lines += ["## Answers to the held-out prompts", "", (rated / "report.md").read_text(encoding="utf-8"),
                  "![scores and win rates](rates.png)", ""]  # fmt: skip
    atomic_write_text(report_dir / "report.md", "\n".join(lines))


@click.command("run", cls=Command)
@click.argument("recipe_path", type=click.Path(exists=True, dir_okay=False), metavar="RECIPE.yaml")
def run_command(recipe_path: str) -> None:
    """Run the whole fusion from a recipe (see docs/recipe.md); finished stages are reused.

    The whole recipe is checked before any stage runs."""
    run_pipeline(load_recipe(recipe_path))
