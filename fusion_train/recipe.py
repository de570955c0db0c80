"""The recipe of ``fusion-train run``: its sections, and the check of every key and value before
any stage runs (recipe.md documents the keys).

A section's keys accept what their declarations say (``fusion_train.settings``): a stage's key is
declared where its flag is, so a flag and a key accept the same values. Every requirement a stage of the recipe will check (tokenizers,
chat templates, scorers, DeepSpeed configs, schedules) is checked here too, naming the key.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import click

from fusion_train import options
from fusion_train.align import AlignSettings, settings_problem
from fusion_train.chat import BUILTIN_TEMPLATES
from fusion_train.errors import UserError, read_yaml
from fusion_train.evaluate import EvaluateSettings
from fusion_train.fuse import FuseSettings
from fusion_train.implicit import score, tuning
from fusion_train.implicit.preference_losses import SETTINGS
from fusion_train.implicit.sections import (
    DPO,
    IMPLICIT_SETTINGS,
    MODEL_NAMES,
    SFT,
    DPOStage,
    PreferStage,
    RateStage,
    SampleStage,
    ScoreStage,
    SFTStage,
    Tuning,
    check_prefer,
    command_values,
    preference_loss,
)
from fusion_train.implicit.verifiers import get_verifier
from fusion_train.inference import Batching, InferenceSettings, check_before_launch
from fusion_train.launch import world_size_of
from fusion_train.merge_methods import DEFAULT_MERGE_METHODS, MERGE_METHODS
from fusion_train.models import load_tokenizer
from fusion_train.represent import RepresentSettings
from fusion_train.settings import same_as, section, setting, value_types
from fusion_train.stages import RecipeError, Resources, recipe_error
from fusion_train.train import TrainConfig
from fusion_train.training import PRESETS, Schedule, deepspeed_config, schedule_problem


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str
    chat_template: str | None = None
    gguf_file: str | None = None
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # sources only: SOURCE_SETTINGS


# What a source may set for its own stages, over the recipe's stage settings. Other training
# settings would give its target another schedule than the shared CLM-only baseline's.
SOURCE_SETTINGS = {
    "align": ("token_align", "vocab_map"),
    "fuse": ("criterion", "ce_unit", "min_source_mass"),
    "train": ("lm_weight", "temperature"),
}


@dataclass(frozen=True)
class DataSettings:
    train: str = setting(help="Chat data to fuse on, relative to the recipe.")
    heldout: str | None = setting(None, help="A held-out file, or split `train` by heldout_fraction.")
    heldout_fraction: float | None = setting(
        None, type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), help="Share of `train` held out."
    )
    limit: int | None = setting(None, type=options.POSITIVE_INT, help="Use the first N training records.")


@dataclass(frozen=True)
class RepresentStage:
    top_k: int = same_as(RepresentSettings, "top_k")
    max_length: int = same_as(RepresentSettings, "max_length")
    batch_tokens: int = same_as(Batching, "batch_tokens")
    dtype: str = same_as(InferenceSettings, "dtype")


# A recipe's train section: these settings of `fusion-train train` (declared on TrainConfig), and
# whether to train the CLM-only baseline. Each key is part of the train stages' keys, so a setting
# joins the section only when existing runs may train again (weight_decay, max_grad_norm have not).
TRAIN_KEYS = (
    "lm_weight",
    "temperature",
    "deepspeed",
    "learning_rate",
    "epochs",
    "max_steps",
    "per_device_batch_size",
    "grad_accumulation",
    "warmup_ratio",
    "scheduler",
    "gradient_checkpointing",
    "bf16",
    "seed",
    "loss_chunk_tokens",
)
TrainStage = section(
    "TrainStage",
    __name__,
    TrainConfig,
    TRAIN_KEYS,
    "``fusion-train train``'s settings in a recipe (``TRAIN_KEYS``), and ``clm_baseline``.",
    clm_baseline=(
        bool,
        setting(True, help="Also train the pivot with CLM only, on the same data and schedule."),
    ),
)


@dataclass(frozen=True)
class MergeStage:
    methods: tuple[str, ...] = setting(DEFAULT_MERGE_METHODS, help="Merge methods, from MERGE_METHODS.")
    dtype: str = setting(
        "float32", type=click.Choice(["float32", "float16", "bfloat16"]), help="mergekit's out_dtype."
    )


@dataclass(frozen=True)
class EvaluateStage:
    max_length: int = same_as(EvaluateSettings, "max_length")
    batch_tokens: int = same_as(EvaluateSettings, "batch_tokens")
    dtype: str = same_as(InferenceSettings, "dtype")


@dataclass(frozen=True)
class Recipe:
    pivot: ModelEntry
    sources: tuple[ModelEntry, ...]
    data: DataSettings
    run_dir: str
    represent: RepresentStage = RepresentStage()
    align: AlignSettings = field(default_factory=AlignSettings)
    fuse: FuseSettings = field(default_factory=FuseSettings)
    train: TrainStage = field(default_factory=TrainStage)
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

    def stages_for(self, source: ModelEntry) -> tuple[AlignSettings, FuseSettings, TrainStage]:
        """The align, fuse and train settings of one source: the recipe's, with its own over them."""
        own = source.settings
        return (
            replace(self.align, **own.get("align", {})),
            replace(self.fuse, **own.get("fuse", {})),
            replace(self.train, **own.get("train", {})),
        )


STAGE_SETTINGS = {
    "represent": RepresentStage,
    "align": AlignSettings,
    "fuse": FuseSettings,
    "train": TrainStage,
    "merge": MergeStage,
    "evaluate": EvaluateStage,
    "resources": Resources,
}


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # names become folder names


METHODS = ("explicit", "implicit", "both")


EXPLICIT_ONLY = ("represent", "align", "fuse", "train", "merge")  # sections only method explicit uses


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
    hints, types = get_type_hints(cls), value_types(cls)
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


def build_section(cls: type, raw: Any, where: str, key: str) -> Any:
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


def _method(raw: Any, where: str) -> str:
    """The recipe's ``method``, after its top-level keys are checked against it."""
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
    unused = [
        k
        for k in raw
        if (k in EXPLICIT_ONLY and fusion == "implicit") or (k in IMPLICIT_SETTINGS and fusion == "explicit")
    ]
    if unused:
        needs = "explicit (or both)" if unused[0] in EXPLICIT_ONLY else "implicit (or both)"
        raise RecipeError(
            f"{where}: {unused[0]}: only method {needs} has this stage; drop it or set `method`"
        )
    for key in ("pivot", "sources", "data"):
        if key not in raw:
            raise RecipeError(f"{where}: missing `{key}`")
    return fusion


def _model_entry(entry: Any, key: str, base: Path, where: str) -> ModelEntry:
    """A pivot or source entry, its path and chat template made absolute."""
    m = build_section(ModelEntry, entry, where, key)
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


def _models(
    raw: dict[str, Any], base: Path, where: str, fusion: str
) -> tuple[ModelEntry, tuple[ModelEntry, ...]]:
    """The pivot and the sources: each entry checked, names unique, no source the pivot itself."""
    pivot = _model_entry(raw["pivot"], "pivot", base, where)
    if pivot.settings:
        raise RecipeError(
            f"{where}: pivot: `settings` are per source; set the pivot's stages at the top level"
        )
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        raise RecipeError(f"{where}: `sources` must be a non-empty list")
    sources = tuple(_model_entry(s, f"sources[{i}]", base, where) for i, s in enumerate(raw["sources"]))
    names = [pivot.name] + [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{where}: model name(s) used twice: {', '.join(duplicates)}; names must be unique")
    for source in sources:
        if source.path == pivot.path:
            raise RecipeError(f"{where}: source {source.name!r} is the pivot itself ({pivot.path})")
    if fusion == "implicit" and any(s.settings for s in sources):
        raise RecipeError(
            f"{where}: sources: per-source `settings` are for the explicit stages; method is implicit"
        )
    return pivot, sources


def _data(raw: Any, base: Path, where: str) -> DataSettings:
    """The data section, its files made absolute; a held-out file or share is required."""
    data = build_section(DataSettings, raw, where, "data")
    data = DataSettings(
        _local_file(base, data.train, where, "data.train", "training data"),
        _local_file(base, data.heldout, where, "data.heldout", "held-out data") if data.heldout else None,
        data.heldout_fraction,
        data.limit,
    )
    if data.heldout is None and not data.heldout_fraction:
        raise RecipeError(f"{where}: data has no `heldout` file and no `heldout_fraction`; give one of them")
    return data


def _resources(resources: Resources, base: Path, where: str) -> Resources:
    """The resources section, its hostfile made absolute, checked as every stage that runs a model
    checks it (before it launches its ranks)."""
    if resources.hostfile is not None:
        hostfile = _local_file(base, resources.hostfile, where, "resources.hostfile", "hostfile")
        resources = replace(resources, hostfile=hostfile)
    inference = resources.inference()
    try:
        if resources.launches:
            check_before_launch(inference)
        else:
            inference.check()
    except UserError as error:
        raise recipe_error(where, "resources", error, {f.name for f in fields(Resources)}) from None
    return resources


def _train_section(training: TrainStage, base: Path, where: str, fusion: str) -> TrainStage:
    """The train section, its DeepSpeed file made absolute; a schedule of max_steps that never
    trains is refused here (one of epochs once the data is there)."""
    if training.deepspeed not in PRESETS:
        deepspeed = _local_file(
            base,
            training.deepspeed,
            where,
            "train.deepspeed",
            f"neither a preset ({', '.join(PRESETS)}) nor a file:",
        )
        training = replace(training, deepspeed=deepspeed)
    if training.epochs <= 0 and training.max_steps <= 0:
        raise RecipeError(f"{where}: train.epochs: must be positive (or set train.max_steps)")
    if fusion != "implicit":
        schedule = Schedule(
            **{f.name: getattr(training, f.name) for f in fields(Schedule) if hasattr(training, f.name)}
        )
        problem = schedule_problem(schedule, None, 1, lambda key: f"train.{key}")
        if problem:
            raise RecipeError(f"{where}: {problem}")
    return training


def parse_recipe(raw: Any, base: Path, default_run_dir: Path, where: str = "recipe") -> Recipe:
    """Check the whole recipe, every key and value, before any stage runs; paths become absolute."""
    fusion = _method(raw, where)
    pivot, sources = _models(raw, base, where, fusion)
    data = _data(raw["data"], base, where)
    if isinstance(raw.get("train"), dict) and "nproc" in raw["train"]:
        raise RecipeError(
            f"{where}: train.nproc: moved to resources.nproc (it also runs represent and evaluate)"
        )
    settings = {
        name: build_section(cls, raw.get(name) or {}, where, name) for name, cls in STAGE_SETTINGS.items()
    }
    for index, source in enumerate(sources):
        own = source.settings.get("align", {})
        chosen = replace(settings["align"], **own)
        problem = settings_problem(chosen.token_align, chosen.vocab_map)
        if problem:
            raise RecipeError(f"{where}: {f'sources[{index}].settings.align' if own else 'align'}: {problem}")
    implicit = {
        name: build_section(cls, raw.get(name) or {}, where, name) for name, cls in IMPLICIT_SETTINGS.items()
    }
    settings["resources"] = resources = _resources(settings["resources"], base, where)
    made = set(MODEL_NAMES) if fusion != "explicit" else set()
    if fusion != "implicit":
        made |= {"clm-baseline", *(f"target-{s.name}" for s in sources)}
        made |= {f"merge-{method}" for method in settings["merge"].methods}
    models = [("pivot", pivot), *((f"sources[{i}]", s) for i, s in enumerate(sources))]
    for key, entry in models:  # evaluate and rate name the models in their reports
        if entry.name in made:
            raise RecipeError(
                f"{where}: {key}.name: {entry.name!r} is the name of a model the run makes; pick another"
            )
    if fusion != "explicit":
        implicit = check_implicit(implicit, base, where, models, resources)
    settings["train"] = _train_section(settings["train"], base, where, fusion)
    unknown = [method for method in settings["merge"].methods if method not in MERGE_METHODS]
    if unknown:
        raise RecipeError(
            f"{where}: merge.methods: {', '.join(map(repr, unknown))}: not a merge method; one of "
            f"{', '.join(MERGE_METHODS)}"
        )
    if not isinstance(raw.get("run_dir") or "", str):
        raise RecipeError(f"{where}: run_dir: expected a folder name, got {raw['run_dir']!r}")
    run_dir = str((base / raw["run_dir"]).resolve()) if raw.get("run_dir") else str(default_run_dir.resolve())
    return Recipe(pivot, sources, data, run_dir, method=fusion, **settings, **implicit)


def _score_section(section: ScoreStage, base: Path, where: str) -> tuple[ScoreStage, list[str]]:
    """The score section, its reward model's path made absolute, and the names of the scores it
    gives (the reward model's first, then the verifiers')."""
    if section.reward_model is None and not section.verifiers:
        raise RecipeError(
            f"{where}: score: give reward_model and/or verifiers (e.g. verifiers: [reference-overlap])"
        )
    for name in section.verifiers:
        try:
            get_verifier(name)
        except UserError as error:
            raise RecipeError(f"{where}: score.verifiers: {error}") from None
    if section.reward_model is None:
        if section.reward_label is not None:
            raise RecipeError(f"{where}: score.reward_label: needs score.reward_model")
        return section, list(section.verifiers)
    path = (base / section.reward_model).expanduser().resolve()
    if not path.is_dir():
        raise RecipeError(f"{where}: score.reward_model: model directory {path} does not exist")
    try:
        spec = score.reward_model_spec(
            path, section.reward_label, None, section.trust_remote_code, section.reward_output
        )
        load_tokenizer(path, trust_remote_code=section.trust_remote_code)
    except UserError as error:
        raise RecipeError(f"{where}: score.reward_model: {error}") from None
    return replace(section, reward_model=str(path)), [spec.name, *section.verifiers]


def _tuning_section(
    stage: Tuning, section: SFTStage, mode: str, base: Path, where: str, world_size: int
) -> SFTStage:
    """An sft or dpo section, its DeepSpeed file made absolute, checked as its command will check
    the settings it becomes (a schedule of max_steps here; one of epochs once the data is there)."""
    if section.deepspeed not in PRESETS:
        path = (base / section.deepspeed).expanduser().resolve()
        if not path.is_file():
            raise RecipeError(
                f"{where}: {stage.name}.deepspeed: neither a preset ({', '.join(PRESETS)}) nor a file: {path}"
            )
        section = replace(section, deepspeed=str(path))
    values = command_values(section, mode, world_size)
    if values["epochs"] <= 0 and section.max_steps <= 0:
        raise RecipeError(f"{where}: {stage.name}.epochs: must be positive (or set {stage.name}.max_steps)")
    problem = schedule_problem(section, None, 1, lambda key: f"{stage.name}.{key}")
    if problem:
        raise RecipeError(f"{where}: {problem}")
    try:  # the settings, and the ZeRO config against them, as the stage's command checks them
        trial = stage.settings(model="", prefs="", out="", **values)
        deepspeed_config(trial.deepspeed, trial, world_size)
    except UserError as error:
        raise recipe_error(where, stage.name, error, {f.name for f in fields(section)}) from None
    return section


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
    settings["score"], scorers = _score_section(settings["score"], base, where)
    prefer_section, dpo_section = settings["prefer"], settings["dpo"]
    check_prefer(prefer_section, settings["score"].verifiers, scorers, where)
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
    loss = preference_loss(dpo_section, prefer_section.mode)
    if loss.pairs_of not in (None, prefer_section.mode):
        raise RecipeError(
            f"{where}: dpo.loss: {loss.name} needs the pairs of prefer.mode {loss.pairs_of}; set prefer.mode: "
            f"{loss.pairs_of}"
        )
    for loss_setting, owner in SETTINGS.values():
        if getattr(dpo_section, loss_setting.name) is not None and owner is not loss:
            raise RecipeError(
                f"{where}: dpo.{loss_setting.name}: {owner.title}'s; drop it or use dpo.loss: {owner.name}"
            )
    world_size = world_size_of(resources.nproc, resources.hostfile)
    for stage in (SFT, DPO):
        settings[stage.name] = _tuning_section(
            stage, settings[stage.name], prefer_section.mode, base, where, world_size
        )
    names = [entry.name for _, entry in models]
    baseline = settings["rate"].baseline
    if baseline is not None and baseline not in names:
        raise RecipeError(
            f"{where}: rate.baseline: {baseline!r} is not a model of the recipe ({', '.join(names)})"
        )
    return settings
