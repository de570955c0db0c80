"""What ``fusion-train sft`` and ``fusion-train dpo`` share: fine-tuning on TRL's trainers with
the same DeepSpeed presets, launcher, checkpoints and atomic publishing as ``fusion-train train``.

A stage (``sft.py``, ``dpo.py``) names the data it reads from a ``fusion-train prefer`` output
(``sft/`` or ``pairs/``) and the TRL config and trainer it builds; the rest is here, once:

- :class:`TuneSettings`, the settings both share (``train``'s, ``training.TrainerSettings``, with the
  stage's inputs and ``max_length``), each declared once with its flag (``fusion_train.settings``);
- :func:`prepare`, every check before a process group or a model exists (the data, the tokenizer's
  chat template, the ZeRO config against the flags, checkpoints and ``--resume``), and the run's
  manifest in ``OUT.work/``, which a resumed run must match;
- :func:`trl_arguments`, the TRL config (a ``TrainingArguments``) made as ``train`` makes its own
  (``training.trainer_arguments``: the ZeRO config, bf16 where ``train`` has it, TRL's own default
  would turn it on everywhere, CPUs included, checkpoints);
- :func:`run`, training, resuming and publishing the model with a JSON summary
  (``training.publish``: a plain HF directory, renamed into place when complete);
- :func:`command`, a stage's click command body: ``--nproc``/``--hostfile`` check the inputs once,
  then run the stage in every launched rank (``fusion_train.calls``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import click
import datasets

from fusion_train import options
from fusion_train.calls import StageCall
from fusion_train.errors import UserError
from fusion_train.implicit import preferences
from fusion_train.launch import parameters_held, world_size_of
from fusion_train.models import (
    attention_implementation,
    check_model_directory,
    load_model,
    load_tokenizer,
    tokenizer_hash,
)
from fusion_train.settings import setting
from fusion_train.storage import MANIFEST, claim_output, read_json
from fusion_train.training import (
    OUT_HELP,
    LogLastStep,
    StepLearningRates,
    TrainerSettings,
    deepspeed_config,
    loss_record,
    publish,
    report_trained,
    resume_point,
    schedule_problem,
    trainer_arguments,
    trainer_in_this_process,
    work_dir,
)

log = logging.getLogger(__name__)

RUN_FORMAT = "fusion-train/tune-run@1"
WARMUP_RATIO = 0.1  # sft and dpo (train: 0.03)
MAX_LENGTH = 2048  # tokens of prompt and response
GLOBAL_BATCH = 128  # the papers' (SFT and preference training), for which their learning rates are
MIN_STEPS = 8  # optimizer steps per epoch that a data set smaller than MIN_STEPS x GLOBAL_BATCH still gets
SUMMARY_FORMAT = "fusion-train/tune-summary@1"
# the end of sft's and dpo's --learning-rate help
PAPERS_BATCH_HELP = (
    "The papers' rates are for a global batch of 128 (processes x --per-device-batch-size x "
    "--grad-accumulation)."
)


class TuneInputError(UserError, ValueError):
    """An input that would make SFT or preference training fail or train the wrong thing."""


@dataclass(frozen=True)
class TuneSettings(TrainerSettings):
    """One SFT or preference-training run (recorded in the run manifest and the summary): the
    settings every training stage has (``training.TrainerSettings``), its inputs and ``max_length``."""

    input_error: ClassVar[type[UserError]] = TuneInputError

    model: str = setting(
        type=click.Path(exists=True, file_okay=False),
        help="The model to fine-tune (a HF directory with a chat template).",
    )
    prefs: str = setting(
        type=click.Path(exists=True, file_okay=False),
        help="Output directory of `fusion-train prefer` (its sft/ and pairs/).",
    )
    out: str = setting(type=click.Path(file_okay=False), help=OUT_HELP)
    max_length: int = setting(
        MAX_LENGTH,
        type=options.MAX_LENGTH,
        help="Longest tokenized prompt + response; longer ones are cut at the end.",
    )
    warmup_ratio: float = field(default=WARMUP_RATIO, kw_only=True)
    per_device_batch_size: int = setting(1, help="Examples per process per micro-step.", kw_only=True)
    grad_accumulation: int = setting(
        1,
        help="Micro-steps per optimizer step. The papers train with a global batch (processes x "
        "--per-device-batch-size x this) of 128, for which their learning rates are; a recipe reaches it "
        "by default.",
        kw_only=True,
    )


def papers_grad_accumulation(per_device_batch_size: int, world_size: int, examples: int | None = None) -> int:
    """The micro-steps per optimizer step that make the global batch GLOBAL_BATCH (rounded up to a
    whole number of micro-batches), or ``examples // MIN_STEPS`` when that is smaller, so a small
    data set still takes several steps (None: as many examples as it takes)."""
    target = GLOBAL_BATCH if examples is None else max(1, min(GLOBAL_BATCH, examples // MIN_STEPS))
    return -(-target // (per_device_batch_size * world_size))


# --------------------------------------------------------------------------- checks


@dataclass
class Prepared:
    """Everything checked before training."""

    tokenizer: Any
    data: datasets.Dataset  # the stage's columns only
    prefs_manifest: dict[str, Any] | None
    ds_config: dict[str, Any]
    resume_from: str | None


def require_chat_template(tokenizer: Any, model: str | Path) -> None:
    """TRL renders the conversations in the tokenizer's own chat template (never a built-in one)."""
    if tokenizer.chat_template is None:
        raise TuneInputError(
            f"{model}: the tokenizer has no chat template; TRL renders the conversations with it. "
            "Add one to tokenizer_config.json (or chat_template.jinja)."
        )


def load_split(prefs: str | Path, split: str, columns: Sequence[str], hint: str = "") -> datasets.Dataset:
    """``prefs/split`` (``sft`` or ``pairs``), reduced to ``columns``; a missing directory, missing
    columns or no rows are one-line input errors."""
    path = Path(prefs) / split
    if not (path / "state.json").is_file():
        manifest_path = Path(prefs) / MANIFEST
        made = read_json(manifest_path) if manifest_path.is_file() else {}
        if made.get("format") == preferences.FORMAT and split == preferences.PAIRS_DIR:
            raise TuneInputError(
                f"{prefs}: the output of `fusion-train prefer --mode {made['settings']['mode']}`, the SFT set "
                "alone (no pairs/); preference training needs the output of `fusion-train prefer --mode "
                "fusechat3` or `--mode wrpo`."
            )
        raise TuneInputError(
            f"{prefs}: no {split}/ data set in it; pass the output directory of `fusion-train prefer`."
        )
    # In memory: TRL's tokenization (dataset.map) would otherwise write cache files into the input.
    data = datasets.load_from_disk(str(path), keep_in_memory=True)
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise TuneInputError(
            f"{path}: no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}{hint}."
        )
    if len(data) == 0:
        raise TuneInputError(f"{path}: the data set is empty; nothing to train on.")
    return data.select_columns(list(columns))


def prepare(
    settings: TuneSettings,
    load: Callable[[TuneSettings], datasets.Dataset],
    stage: str,
    world_size: int,
    rank: int = 0,
) -> Prepared:
    """Check every input; the main rank records the run's manifest in the work directory."""
    out, work = Path(settings.out), work_dir(settings.out)
    if out.exists():
        raise TuneInputError(f"{out} already exists; pass another --out or delete it.")
    check_model_directory(settings.model)
    data = load(settings)
    tokenizer = load_tokenizer(settings.model)
    require_chat_template(tokenizer, settings.model)
    problem = schedule_problem(settings, len(data), world_size)
    if problem:
        raise TuneInputError(problem)
    ds_config = deepspeed_config(settings.deepspeed, settings, world_size)
    resume_from = resume_point(work, settings.resume)
    manifest_path = Path(settings.prefs) / MANIFEST
    prefs_manifest = read_json(manifest_path) if manifest_path.is_file() else None
    if rank == 0:
        claim_output(
            work,
            {
                "format": RUN_FORMAT,
                "stage": stage,
                "model": {
                    "path": str(Path(settings.model).resolve()),
                    "tokenizer_hash": tokenizer_hash(tokenizer),
                },
                "prefs": {"path": str(Path(settings.prefs).resolve()), "manifest": prefs_manifest},
                "settings": settings.run_settings(),
            },
        )
    return Prepared(tokenizer, data, prefs_manifest, ds_config, resume_from)


# --------------------------------------------------------------------------- training


def trl_arguments(config_class: type, settings: TuneSettings, prepared: Prepared, **extra: Any) -> Any:
    """A TRL config (``SFTConfig``, ``DPOConfig``) for this run (``training.trainer_arguments``, plus
    ``max_length`` and ``extra``). Made before the model loads: with ZeRO-3 it makes
    ``from_pretrained`` partition the weights at load time."""
    return trainer_arguments(
        config_class,
        settings,
        work_dir(settings.out),
        prepared.ds_config,
        max_length=settings.max_length,
        **extra,
    )


def load_policy(settings: TuneSettings, args: Any) -> Any:
    """The model to train (also the reference model of DPO), with the attention kernel ``train`` picks."""
    import torch

    attention = attention_implementation(
        settings.attn_implementation, args.device, torch.bfloat16 if args.bf16 else torch.float32
    )
    model = load_model(settings.model, attn_implementation=attention)
    model.config.use_cache = False
    return model


def run(
    settings: TuneSettings,
    stage: str,
    load: Callable[[TuneSettings], datasets.Dataset],
    make_trainer: Callable[[Prepared, list[Any]], Any],
    log_keys: Sequence[str] = ("step", "loss", "grad_norm", "learning_rate"),
) -> dict[str, Any] | None:
    """Train with the trainer ``make_trainer`` builds (with the callbacks it is given, first) and
    publish the model at ``settings.out``; the summary on the main rank (None on the others). Runs
    in every rank of a launched job, or alone as a world of one (the variables of a rank there for
    the run only, as in ``train``)."""
    started = time.time()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    prepared = prepare(settings, load, stage, world_size, rank)
    datasets.disable_progress_bars()
    with trainer_in_this_process() as track:
        return _run(
            settings,
            stage,
            prepared,
            lambda callbacks: track(make_trainer(prepared, callbacks)),
            log_keys,
            world_size,
            started,
        )


def _run(
    settings: TuneSettings,
    stage: str,
    prepared: Prepared,
    make_trainer: Callable[[list[Any]], Any],
    log_keys: Sequence[str],
    world_size: int,
    started: float,
) -> dict[str, Any] | None:
    """``run`` after the checks, in a process that has a rank's variables; ``make_trainer`` takes
    the callbacks to add."""
    rates = StepLearningRates()
    trainer = make_trainer([rates, LogLastStep()])
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    parameters = parameters_held(trainer.model)

    def summary() -> dict[str, Any]:
        history = trainer.state.log_history
        return {
            "format": SUMMARY_FORMAT,
            "stage": stage,
            "model": {
                "path": str(Path(settings.model).resolve()),
                "tokenizer_hash": tokenizer_hash(prepared.tokenizer),
            },
            "data": {
                "path": str(Path(settings.prefs).resolve()),
                "examples": len(prepared.data),
                "prefer": (prepared.prefs_manifest or {}).get("settings"),
            },
            "settings": asdict(settings),
            "deepspeed": prepared.ds_config,
            "world_size": world_size,
            "bf16": trainer.args.bf16,
            "parameters": parameters,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from": Path(prepared.resume_from).name if prepared.resume_from else None,
            "loss": {"start": loss_record(history, 0, log_keys), "end": loss_record(history, -1, log_keys)},
            "learning_rate": rates.summary(settings.learning_rate),
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "wall_time_s": time.time() - started,
        }

    return publish(trainer, settings.out, summary)


# --------------------------------------------------------------------------- commands


def settings_of(settings_class: type, params: dict[str, Any]) -> Any:
    """The settings a command's parsed options give (launcher options left out); flags that do not
    go together are a usage error."""
    names = {f.name for f in fields(settings_class)}
    try:
        return settings_class(**{k: v for k, v in params.items() if k in names})
    except TuneInputError as error:
        raise click.UsageError(str(error)) from error


def command(
    params: dict[str, Any],
    settings: TuneSettings,
    check: Callable[[TuneSettings, int], Any],
    train: Callable[[TuneSettings], dict[str, Any] | None],
) -> None:
    """A stage command's body: train here (in this process, or as one rank of a job started
    otherwise), or check once and train in every rank under ``--nproc``/``--hostfile``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def check_once() -> None:
        check(settings, world_size_of(params.get("nproc"), params.get("hostfile")))

    StageCall(train, {"settings": settings}, Path(settings.out), report_trained).from_command(
        params, check_once
    )
