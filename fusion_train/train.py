"""Stage 4: pairwise fusion training of a target model on DeepSpeed ZeRO (``fusion-train train``).

The pivot is fine-tuned on the fused data of one source with
``lm_weight * CLM + (1 - lm_weight) * fusion`` (METHOD.md, "Train target k"). The recipe, top to
bottom: check every input (before any process group or model exists), build transformers'
``TrainingArguments`` with a ZeRO config, load the pivot, train with ``FusionTrainer`` (it only
replaces the loss) and ``FusionCollator``, then publish a Hugging Face model directory atomically.
Schedules, accumulation, checkpointing, logging and resuming are transformers' and DeepSpeed's.

``--nproc``/``--hostfile`` re-run this module under the ``deepspeed`` launcher; running it under
``deepspeed --module fusion_train.train`` or ``torchrun -m fusion_train.train`` directly works too.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import click
import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from click.core import ParameterSource
from transformers import SchedulerType, Trainer, TrainerCallback, TrainingArguments

from fusion_train import options
from fusion_train.errors import Command, UserError
from fusion_train.launch import (
    command_arguments,
    end_process_group_at_exit,
    launch,
    launch_options,
    on_cpu_host,
    parameters_held,
    skip_shm_comm_op,
    wants_launch,
    world_of_one,
    world_size_of,
)
from fusion_train.losses import CHUNK_TOKENS, fused_weights, head_loss_sums
from fusion_train.models import (
    attention_implementation,
    check_model_directory,
    load_model,
    load_tokenizer,
    release_memory,
    tokenizer_hash,
)
from fusion_train.options import FRACTION, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT
from fusion_train.settings import options_from, setting
from fusion_train.storage import (
    MANIFEST,
    claim_output,
    finite_or_null,
    non_finite_keys,
    open_to_umask,
    read_json,
    write_json_atomic,
)
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY

log = logging.getLogger(__name__)

FUSED_FORMAT = "fusion-train/fused@1"
RUN_FORMAT = "fusion-train/train-run@1"
CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
PRESETS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3-offload": "zero3_offload.json"}
FUSED_COLUMNS = ("input_ids", "run_start", "run_length", "topk_ids", "topk_logprobs")
MODULE = "fusion_train.train"  # what the launcher runs in every process
# Settings that do not change what is trained (the attention kernel: only in float rounding): a
# resumed run may change them.
OUT_HELP = "The trained model directory (published when done; checkpoints go to OUT.work/)."  # every stage's
NOT_IN_RUN_MANIFEST = ("out", "resume", "report_to", "logging_steps", "save_steps", "save_total_limit",
                       "attn_implementation")  # fmt: skip


class TrainInputError(UserError, ValueError):
    """An input that would make training fail or silently train the wrong thing."""


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """What changes how a training stage trains: ZeRO config, schedule, batch, precision, seed.
    A recipe's ``sft`` and ``dpo`` sections hold these too."""

    deepspeed: str = setting(
        "zero2", help=f"ZeRO preset ({', '.join(PRESETS)}) or a DeepSpeed JSON config file."
    )
    learning_rate: float = setting(5e-6, type=POSITIVE_FLOAT, aliases=["--lr"], help="Peak learning rate.")
    epochs: float = setting(3.0, type=NON_NEGATIVE_FLOAT, help="Passes over the data.")
    max_steps: int = setting(-1, type=click.IntRange(min=-1), help="Optimizer steps; > 0 overrides --epochs.")
    per_device_batch_size: int = setting(1, type=POSITIVE_INT, help="Sequences per process per micro-step.")
    grad_accumulation: int = setting(1, type=POSITIVE_INT, help="Micro-steps per optimizer step.")
    warmup_ratio: float = setting(
        0.03, type=click.FloatRange(0.0, 1.0, max_open=True), help="Share of the steps with a linear warmup."
    )
    scheduler: str = setting(
        "cosine",
        type=click.Choice([s.value for s in SchedulerType]),
        help="transformers learning-rate schedule.",
    )
    weight_decay: float = setting(0.0, type=NON_NEGATIVE_FLOAT)
    max_grad_norm: float = setting(1.0, type=NON_NEGATIVE_FLOAT, help="Gradient clipping.")
    gradient_checkpointing: bool = False
    bf16: bool | None = setting(
        None,
        help="bf16 mixed precision. Default: on GPUs that support it; on CPU-only machines only when asked.",
    )
    seed: int = 42


@dataclass(frozen=True, kw_only=True)
class TrainerSettings(Schedule):
    """The settings every training stage (``train``, ``sft``, ``dpo``) hands to transformers'
    Trainer: the schedule, logging and checkpoints; checked on construction. A stage's class adds
    its inputs and its own settings (keyword-only here, so a stage's required fields can come
    first)."""

    input_error: ClassVar[type[UserError]] = TrainInputError  # what a bad setting raises (a stage's own)

    attn_implementation: str = setting("auto", type=options.ATTENTION_KERNELS, help=options.ATTENTION_HELP)
    report_to: str = setting("none", help="none, tensorboard, wandb, ... (transformers integrations).")
    logging_steps: int = setting(10, type=POSITIVE_INT)
    save_steps: int = setting(
        500, type=POSITIVE_INT, help="Checkpoint every N optimizer steps (in OUT.work/)."
    )
    save_total_limit: int = setting(2, type=click.IntRange(min=0), help="Checkpoints kept (0: all).")
    resume: bool = setting(
        False, help="Continue from the last checkpoint in OUT.work/ (from the start if it has none yet)."
    )

    def checks(self) -> dict[str, bool]:
        """Message -> whether it holds; a stage adds its own (``{**super().checks(), ...}``)."""
        return {
            "--warmup-ratio must be in [0, 1)": 0.0 <= self.warmup_ratio < 1.0,
            "--per-device-batch-size, --grad-accumulation, --logging-steps and --save-steps must be >= 1": min(
                self.per_device_batch_size, self.grad_accumulation, self.logging_steps, self.save_steps
            )
            >= 1,
            "--epochs must be positive (or set --max-steps)": self.epochs > 0 or self.max_steps > 0,
        }

    def __post_init__(self) -> None:
        for message, ok in self.checks().items():
            if not ok:
                raise self.input_error(message)

    def run_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (the run manifest's)."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_RUN_MANIFEST}


@dataclass(frozen=True)
class TrainConfig(TrainerSettings):
    """One training run (recorded in the run manifest and ``training_summary.json``)."""

    model: str = setting(type=click.Path(exists=True, file_okay=False), help="The pivot model directory.")
    fused: str = setting(
        type=click.Path(exists=True, file_okay=False),
        help="Fused targets of one source (`fusion-train fuse` output) made for this pivot.",
    )
    out: str = setting(type=click.Path(file_okay=False), help=OUT_HELP)
    lm_weight: float = setting(0.9, type=FRACTION, help="lambda in lambda * CLM + (1 - lambda) * fusion.")
    temperature: float = setting(1.0, type=POSITIVE_FLOAT, help="T in softmax(stored log-probabilities / T).")
    # rows of logits at a time in the LM head's loss
    loss_chunk_tokens: int = setting(
        CHUNK_TOKENS,
        type=POSITIVE_INT,
        help="Supervised tokens whose logits the LM head's loss computes at a time: each chunk holds "
        "4 bytes x tokens x vocabulary rows of float32 logits (twice that with bf16 or soft-capping), "
        "e.g. 256 MiB at 256 tokens of a 262,144-row vocabulary; fewer tokens need less memory but re-read "
        "the head more often, so the step gets slower.",
    )

    def checks(self) -> dict[str, bool]:
        return {
            "--lm-weight must be in [0, 1]": 0.0 <= self.lm_weight <= 1.0,
            "--temperature must be positive": self.temperature > 0,
            "--loss-chunk-tokens must be >= 1": self.loss_chunk_tokens >= 1,
            **super().checks(),
        }


def work_dir(out: str | Path) -> Path:
    """Where checkpoints and logs live while training: next to the output, so it can be renamed into place."""
    out = Path(out)
    return out.with_name(out.name + ".work")


# --------------------------------------------------------------------------- fused data


@dataclass
class FusedData:
    """Fused targets that passed every check, with examples without supervised tokens left out."""

    manifest: dict[str, Any]
    data: datasets.Dataset
    stats: dict[str, Any] = field(default_factory=dict)


def _fail_at(data: datasets.Dataset, index: int, problem: str) -> TrainInputError:
    return TrainInputError(f"fused example {index} (id {data[index]['id']!r}): {problem}")


def load_fused(path: str | Path, tokenizer: Any) -> FusedData:
    """Read and check fused targets for the pivot whose tokenizer is ``tokenizer``.

    Checked in one vectorised pass over the Arrow columns: the pivot's tokenizer, token and target
    ids inside the tokenizer's ids, supervised runs inside their sequence and in order, one target
    row per supervised token, and log-probabilities without NaN or +inf (and without -inf on a
    valid id: -inf marks padding only).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / "data" / "state.json").is_file():
        raise TrainInputError(f"{path}: no {MANIFEST} and data/; pass the output of `fusion-train fuse`.")
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FUSED_FORMAT:
        raise TrainInputError(f"{path}: format {manifest.get('format')!r} is not {FUSED_FORMAT!r}.")
    pivot = manifest.get("pivot") or {}
    own_hash = tokenizer_hash(tokenizer)
    if pivot.get("tokenizer_hash") != own_hash:
        raise TrainInputError(
            f"{path} was fused for the pivot tokenizer {pivot.get('tokenizer_hash')} ({pivot.get('path')}), "
            f"but --model has tokenizer {own_hash}. Train the pivot the data was fused for, or rerun "
            "`fusion-train fuse` with this model as the pivot."
        )
    if not read_json(path / "data" / "state.json").get("_data_files"):  # datasets cannot load 0 shards
        raise TrainInputError(f"{path}: the data set is empty; nothing to train on.")
    data = datasets.load_from_disk(str(path / "data"))
    missing = [c for c in ("id", *FUSED_COLUMNS) if c not in data.column_names]
    if missing:
        raise TrainInputError(f"{path}: columns {missing} are missing (see docs/formats.md, fused targets).")
    if len(data) == 0:
        raise TrainInputError(f"{path}: the data set is empty; nothing to train on.")

    vocab = len(tokenizer)
    supervised = np.zeros(len(data), dtype=np.int64)
    rows_without_target = 0
    offset = 0
    for batch in data.data.table.select(list(FUSED_COLUMNS)).to_batches(max_chunksize=4096):
        n = batch.num_rows
        input_ids = batch.column("input_ids")
        lengths = pc.list_value_length(input_ids).to_numpy(zero_copy_only=False)
        tokens = input_ids.flatten().to_numpy(zero_copy_only=False)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            token_example = np.repeat(np.arange(n), lengths)
            bad = token_example[(tokens < 0) | (tokens >= vocab)][0]
            raise _fail_at(data, offset + bad, f"input_ids outside the tokenizer's ids [0, {vocab})")

        runs_per_example = pc.list_value_length(batch.column("run_start")).to_numpy(zero_copy_only=False)
        starts = batch.column("run_start").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        counts = batch.column("run_length").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        run_example = np.repeat(np.arange(n), runs_per_example)
        ends = starts + counts
        bad_run = (starts < 1) | (counts < 0) | (ends > lengths[run_example])
        later = run_example[1:] == run_example[:-1]
        bad_run[1:] |= later & (starts[1:] < ends[:-1])
        if bad_run.any():
            raise _fail_at(
                data,
                offset + run_example[bad_run][0],
                "supervised runs must lie in 1 .. len(input_ids) - 1 and be in position order",
            )
        supervised[offset : offset + n] = np.bincount(run_example, weights=counts, minlength=n)

        topk_ids = batch.column("topk_ids")
        rows = pc.list_value_length(topk_ids).to_numpy(zero_copy_only=False)
        mismatch = np.flatnonzero(rows != supervised[offset : offset + n])
        if mismatch.size:
            i = mismatch[0]
            raise _fail_at(
                data, offset + i, f"{rows[i]} target rows for {supervised[offset + i]} supervised tokens"
            )
        flat_rows = topk_ids.flatten()
        k = flat_rows.type.list_size if pa.types.is_fixed_size_list(flat_rows.type) else None
        ids = flat_rows.flatten().to_numpy(zero_copy_only=False)
        logprobs = batch.column("topk_logprobs").flatten().flatten().to_numpy(zero_copy_only=False)
        if k is None or ids.size != logprobs.size:
            raise TrainInputError(f"{path}: topk_ids/topk_logprobs are not k-wide rows of equal shape.")
        valid = ids >= 0
        bad_entry = (ids < -1) | (ids >= vocab) | np.isnan(logprobs) | np.isposinf(logprobs)
        bad_entry |= valid & np.isneginf(logprobs)
        if bad_entry.any():
            entry = int(np.flatnonzero(bad_entry)[0])
            row_example = np.repeat(np.arange(n), rows)
            problem = (
                f"target id {ids[entry]} outside the tokenizer's ids [0, {vocab}) (-1 pads)"
                if ids[entry] < -1 or ids[entry] >= vocab
                else f"log-probability {logprobs[entry]} for id {ids[entry]} (NaN, +inf, or -inf on a valid id)"
            )
            raise _fail_at(data, offset + row_example[entry // k], problem)
        rows_without_target += int((~valid.reshape(-1, k)).all(axis=1).sum())
        offset += n

    keep = np.flatnonzero(supervised > 0)
    if keep.size == 0:
        raise TrainInputError(f"{path}: no example has supervised tokens; nothing to train on.")
    dropped = np.flatnonzero(supervised == 0)
    stats = {
        "examples": int(keep.size),
        "supervised_tokens": int(supervised.sum()),
        "rows_without_target": rows_without_target,  # add nothing to the fusion loss
        "dropped_without_supervised_tokens": int(dropped.size),
        "dropped_ids": data.select(dropped[:20])["id"] if dropped.size else [],
    }
    if dropped.size:
        log.warning("%s: %d examples have no supervised tokens and are left out.", path, dropped.size)
    kept = data.select(keep) if dropped.size else data  # an index mapping, nothing written next to the input
    return FusedData(manifest, kept.with_format("numpy", columns=list(FUSED_COLUMNS)), stats)


# --------------------------------------------------------------------------- DeepSpeed configuration


def deepspeed_config(spec: str, config: TrainerSettings, world_size: int) -> dict[str, Any]:
    """The ZeRO config for ``spec`` (a preset or a JSON file), refused if it contradicts the command line.

    Mismatches are judged by transformers' own rule (a non-"auto" value must equal the argument),
    here before any process starts, rather than at ``trainer.train()`` on every rank.
    """
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = CONFIG_DIR / PRESETS[spec] if spec in PRESETS else Path(spec)
    if not path.is_file():
        raise TrainInputError(f"--deepspeed {spec}: not a preset ({', '.join(PRESETS)}) nor a JSON file.")
    try:
        ds_config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrainInputError(f"--deepspeed {path}: not valid JSON ({error}).") from error
    problems = []
    if "scheduler" in ds_config:
        problems.append("- ds scheduler is set: the schedule comes from --scheduler and --warmup-ratio")
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        problems.append(
            "- ds zero_optimization.stage3_gather_16bit_weights_on_model_save must be true: "
            "the output is a model directory with full tensors"
        )
    defaults = TrainingArguments.__dataclass_fields__
    arguments = SimpleNamespace(
        world_size=world_size,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        max_grad_norm=config.max_grad_norm,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        bf16=resolve_bf16(config.bf16),
        **{name: defaults[name].default for name in ("adam_beta1", "adam_beta2", "adam_epsilon")},
        fp16=False,
        fp16_full_eval=False,
        bf16_full_eval=False,
        save_on_each_node=False,
    )
    checker = HfTrainerDeepSpeedConfig(copy.deepcopy(ds_config))
    checker.trainer_config_process(arguments)
    problems += checker.mismatches
    del checker  # it registers itself globally (ZeRO-3 model loading looks for it) until collected
    if problems:
        raise TrainInputError(f"--deepspeed {path} contradicts the command line:\n" + "\n".join(problems))
    # Checked above with the real world size; DeepSpeed derives it from micro batch x accumulation x
    # world size, while TrainingArguments would fill it before it knows the world size (as 1).
    ds_config.pop("train_batch_size", None)
    return ds_config


def bf16_support() -> tuple[bool, bool]:
    """(whether bf16 training can run here, whether it is the default).

    On GPUs bf16 is the default where the GPU supports it. On a host without accelerators it runs
    only when asked: CPUs without bf16 matrix units are slower in bf16 than in float32, but the run
    takes the same path as on a GPU (DeepSpeed's bf16 mixed precision, bf16 weights saved).
    """
    from transformers.utils import is_torch_bf16_available_on_device, is_torch_bf16_gpu_available

    if on_cpu_host():
        return is_torch_bf16_available_on_device("cpu"), False
    supported = is_torch_bf16_gpu_available()
    return supported, supported


def resolve_bf16(bf16: bool | None) -> bool:
    """``--bf16/--no-bf16``, or the default here. Asking for bf16 where it cannot run is an input
    error here, before launching, rather than transformers' refusal later inside every rank."""
    supported, default = bf16_support()
    if bf16 and not supported:
        raise TrainInputError(
            "--bf16: this machine cannot train in bf16 (no GPU or CPU support); leave it out"
        )
    return default if bf16 is None else bf16


@contextmanager
def trainer_in_this_process() -> Iterator[Callable[[Trainer], Trainer]]:
    """For the time of a training run (train, sft, dpo) in this process: a rank's variables
    (``launch.world_of_one``). Yields ``track``: the run passes its Trainer through it. On the way
    out, what the Trainer leaves behind goes: its DeepSpeed engines (:func:`release_trainer`),
    accelerate's AcceleratorState, whose DeepSpeed plugin would keep ZeRO-3 switched on for every
    later ``from_pretrained`` of the process, transformers' DeepSpeed config, and the memory of
    the model and optimizer, so the stages after it in the same process start from what the
    process held before. The process group the Trainer starts stays for the next training of the
    process, and is ended at exit (:func:`launch.end_process_group_at_exit`)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainers: list[Trainer] = []

    def track(trainer: Trainer) -> Trainer:
        trainers.append(trainer)
        return trainer

    end_process_group_at_exit()
    with world_of_one():
        try:
            yield track
        finally:
            for trainer in trainers:
                release_trainer(trainer)
            trainers.clear()
            AcceleratorState._reset_state(reset_partial_state=True)
            unset_hf_deepspeed_config()
            release_memory()


def release_trainer(trainer: Trainer) -> None:
    """Let the garbage collector have a finished Trainer's model, optimizer and engines.

    A DeepSpeed engine hooks itself into the model's parameters and modules (autograd hooks are
    held on the C++ side, where the collector cannot follow the cycle), so engine, optimizer and
    model would live as long as the process unless the engine is destroyed: accelerate's
    ``free_memory`` destroys the training engine, and a frozen reference model that TRL wrapped in
    an engine of its own (DPO under ZeRO-3) is destroyed here."""
    from deepspeed import DeepSpeedEngine

    trainer.accelerator.free_memory()
    reference = getattr(trainer, "ref_model", None)
    if isinstance(reference, DeepSpeedEngine):
        reference.destroy()
    for name in ("model", "model_wrapped", "ref_model", "optimizer", "lr_scheduler", "deepspeed"):
        if hasattr(trainer, name):
            setattr(trainer, name, None)


def trainer_arguments(
    arguments_class: type[TrainingArguments], settings: TrainerSettings, output_dir: Path,
    ds_config: dict[str, Any], **extra: Any,
) -> Any:  # fmt: skip
    """``TrainingArguments`` (or a subclass: TRL's ``SFTConfig``, ``DPOConfig``) for ``settings``,
    with the ZeRO config ``ds_config``, and ``extra`` (a stage's own arguments).

    Made before the model loads: they start the process group (with ZeRO-3 they make
    ``from_pretrained`` partition the weights at load time); DeepSpeed's CPU communication op is
    kept from compiling first. bf16 is always explicit: TRL's configs default it to True, also on
    CPUs (and then run the reference model of DPO under bf16 autocast).
    """
    skip_shm_comm_op()
    return arguments_class(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.grad_accumulation,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a share of the total steps
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=resolve_bf16(settings.bf16),
        activation_checkpointing=settings.gradient_checkpointing,  # TRL's default is on
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=copy.deepcopy(ds_config),
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit or None,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        seed=settings.seed,
        use_cpu=on_cpu_host(),  # CPU processes: gloo, no pinned memory, bf16 only when asked
        **extra,
    )


# --------------------------------------------------------------------------- the learning-rate schedule


def option_flag(name: str) -> str:
    """A setting's command-line flag (``max_steps`` -> ``--max-steps``)."""
    return "--" + name.replace("_", "-")


def optimizer_steps(settings: Schedule, examples: int, world_size: int) -> int:
    """The optimizer steps the Trainer runs (``Trainer.set_initial_training_values``): ``max_steps``,
    else ``epochs`` passes over ``examples`` in batches of ``per_device_batch_size`` (the last one
    short) dealt to ``world_size`` ranks, every rank as many (accelerate's even batches), and
    ``grad_accumulation`` batches per step (the last step of an epoch takes what is left)."""
    if settings.max_steps > 0:
        return settings.max_steps
    batches = math.ceil(math.ceil(examples / settings.per_device_batch_size) / world_size)
    return math.ceil(settings.epochs * max(math.ceil(batches / settings.grad_accumulation), 1))


def learning_rates(settings: Schedule, steps: int, peak: float = 1.0) -> Iterator[float]:
    """The learning rate of each of ``steps`` optimizer steps with peak ``peak``: transformers'
    scheduler ``settings.scheduler`` made as the Trainer makes it (``get_scheduler``, with
    ``TrainingArguments.get_warmup_steps``' ceil(steps x warmup_ratio) warmup steps) on a
    one-parameter optimizer, read before each step and stepped after it, as the Trainer does.
    (Schedules that wait for metrics, such as reduce_lr_on_plateau, start at the peak.)"""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    warmup = math.ceil(steps * settings.warmup_ratio)
    scheduler = get_scheduler(
        settings.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps
    )
    for _ in range(steps):
        yield optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()


def schedule_problem(
    settings: Schedule, examples: int | None, world_size: int, flag: Callable[[str], str] = option_flag
) -> str | None:
    """What is wrong with a schedule under which no optimizer step has a learning rate above zero
    (a single step within a warmup from 0): the model would come out as it went in, and the run
    look like one where training had no effect. None when some step trains. ``examples``: the
    training examples (None: not known yet, as in a recipe; then only ``max_steps`` is judged).
    ``flag``: how a setting is named (a flag, or a recipe key)."""
    if settings.max_steps > 0:
        steps, how = settings.max_steps, f"{flag('max_steps')} {settings.max_steps}"
    elif examples is None:
        return None
    else:
        steps = optimizer_steps(settings, examples, world_size)
        how = f"{flag('epochs')} {settings.epochs:g} over {examples} examples ({steps} optimizer step"
        how += "s)" if steps != 1 else ")"
    try:
        if any(rate > 0 for rate in learning_rates(settings, steps)):
            return None
    except (ValueError, TypeError) as error:  # a schedule that needs arguments no setting gives
        return (
            f"{flag('scheduler')} {settings.scheduler}: transformers cannot make this schedule here ({error}); "
            "choose another."
        )
    ratio = flag("warmup_ratio")
    return (
        f"{how} with {ratio} {settings.warmup_ratio:g}: every optimizer step runs at learning rate 0 "
        f"({settings.scheduler} schedule), so the model would not change; use more steps or {ratio} 0."
    )


class LogLastStep(TrainerCallback):
    """Logs the last optimizer step whatever ``logging_steps`` is, so that a summary's ``end``
    loss is the run's last: a run shorter than ``logging_steps`` logged its first step only."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True


class StepLearningRates(TrainerCallback):
    """The learning rate each optimizer step runs at, read from the optimizer just before the step,
    and written into the Trainer's logs in place of its own ``learning_rate``: under DeepSpeed the
    Trainer reads the scheduler after DeepSpeed's engine has stepped it, so it logs the next step's
    rate (a run of one step at rate 0 logged the peak). Give it to the trainer when it is made,
    so it comes before the callbacks that print the logs."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}  # optimizer step (from 1) -> its learning rate

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self.rates[state.global_step + 1] = float(optimizer.param_groups[0]["lr"])

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        rate = self.rates.get(state.global_step)
        if logs is not None and "learning_rate" in logs and rate is not None:
            logs["learning_rate"] = rate
            state.log_history[-1]["learning_rate"] = rate  # the Trainer stored a copy before calling us

    def summary(self, peak: float) -> dict[str, Any]:
        """The rates this process's steps ran at (a resumed run's from where it resumed), for the
        training summary: the first and last step's, the highest, and how many steps ran at 0."""
        steps = sorted(self.rates)
        rates = [self.rates[s] for s in steps]
        return {"peak": peak, "first": rates[0] if rates else None, "last": rates[-1] if rates else None,
                "highest": max(rates, default=None), "steps_at_zero": rates.count(0.0)}  # fmt: skip


# --------------------------------------------------------------------------- batches and loss


@dataclass
class FusionCollator:
    """Right-pads a batch; labels mark the supervised tokens, fused targets follow them in row-major order.

    ``topk_logprobs`` travel as the int32 bits of their float32 values: the Trainer casts floating
    inputs to DeepSpeed's bf16, which would round the stored float16 log-probabilities.
    """

    pad_id: int

    def __call__(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
            for start, count in zip(row["run_start"].tolist(), row["run_length"].tolist(), strict=True):
                labels[i, start : start + count] = ids[start : start + count]
        topk_logprobs = np.concatenate([row["topk_logprobs"] for row in rows]).astype(np.float32)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "topk_ids": torch.as_tensor(np.concatenate([row["topk_ids"] for row in rows]), dtype=torch.long),
            "topk_logprob_bits": torch.from_numpy(topk_logprobs).view(torch.int32),
        }


# Config entries of models that rescale the LM head's output after the head module: the chunked
# loss cannot see them (final_logit_softcapping, Gemma-2's, is applied inside the loss instead).
LOGIT_RESCALING = ("logit_scale", "logits_scaling")


@contextmanager
def head_losses_at(
    model: torch.nn.Module,
    positions: torch.Tensor,
    labels: torch.Tensor,
    tokenizer_size: int,
    topk_ids: torch.Tensor | None,
    fused: torch.Tensor | None,
    lm_weight: float,
    chunk_tokens: int = CHUNK_TOKENS,
) -> Iterator[SimpleNamespace]:
    """Make the model's LM head return ``(loss, clm, fusion)`` sums instead of logits.

    While the block runs, the output-embedding module's ``forward`` takes the hidden states at
    ``positions`` (flat batch x length indices: the N positions that predict a supervised token)
    and returns ``losses.head_loss_sums`` of them (``loss = lm_weight * clm + (1 - lm_weight) *
    fusion``, its gradients computed right there), so the model's output carries the sums in
    place of its logits and no ``[N, V]`` logits ever exist. The module is still *called*, so
    DeepSpeed's hooks around it run: under ZeRO-3 the head's weight is gathered for the call, and
    in backward the gradient computed with it reaches the partitioned parameter.
    A model's ``final_logit_softcapping`` moves into the loss for the duration. Yields a record
    whose ``returned`` says whether the head has returned (then an error means the model worked
    on its head's output: see ``FusionTrainer.compute_loss``).
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) and not (
        isinstance(weight, torch.Tensor) and weight.dim() == 2
    ):  # pragma: no cover - every causal LM transformers ships has a linear head
        raise TrainInputError(f"the model's LM head ({type(head).__name__}) is not a linear layer.")
    config = model.config
    rescaled = [name for name in LOGIT_RESCALING if getattr(config, name, None) not in (None, 1, 1.0)]
    if rescaled:
        raise TrainInputError(
            f"the model rescales its logits after the LM head ({', '.join(rescaled)} in its config); "
            "the fused loss supports plain heads and final_logit_softcapping only."
        )
    softcap = getattr(config, "final_logit_softcapping", None)
    state = SimpleNamespace(returned=False)

    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        rows = hidden_states.flatten(0, -2)[positions]
        sums = head_loss_sums(
            rows, head.weight, head.bias, labels, tokenizer_size, topk_ids, fused, clm_weight=lm_weight,
            fusion_weight=1.0 - lm_weight, softcap=softcap, chunk_tokens=chunk_tokens,
        )  # fmt: skip
        state.returned = True
        return sums

    previous = head.__dict__.get("forward")
    head.forward = forward
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield state
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
        if softcap is not None:
            config.final_logit_softcapping = softcap


class FusionTrainer(Trainer):
    """transformers' Trainer with the loss ``lm_weight * CLM + (1 - lm_weight) * fusion``.

    The model's LM head returns the loss sums in place of logits (``head_losses_at``: the chunked
    head of ``losses.head_loss_sums``, ``loss_chunk_tokens`` rows of logits at a time), so no
    ``[N, V]`` logits exist.
    The loss is a sum over supervised tokens divided by ``num_items_in_batch``, the Trainer's
    count of supervised tokens over the accumulation steps (and ranks), so it does not depend
    on how a global batch is split. CLM and fusion parts are logged next to the loss.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        lm_weight: float,
        temperature: float,
        tokenizer_size: int,
        loss_chunk_tokens: int = CHUNK_TOKENS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lm_weight = lm_weight
        self.loss_chunk_tokens = loss_chunk_tokens
        self.temperature = temperature
        self.tokenizer_size = tokenizer_size
        self.model_accepts_loss_kwargs = True  # makes the Trainer count num_items_in_batch
        self._window = torch.zeros(3, dtype=torch.float64)  # CLM sum, fusion sum, tokens since last log

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        labels = inputs["labels"]
        targets = labels[:, 1:]
        predicting = torch.zeros_like(labels, dtype=torch.bool)
        predicting[:, :-1] = targets != -100
        gold = targets[targets != -100]
        fusion = self.lm_weight < 1.0
        topk_ids = inputs["topk_ids"] if fusion else None
        fused = (
            fused_weights(topk_ids, inputs["topk_logprob_bits"].view(torch.float32), self.temperature)
            if fusion
            else None
        )
        unwrapped = self.accelerator.unwrap_model(model)
        positions = predicting.flatten().nonzero()[:, 0]
        with head_losses_at(
            unwrapped,
            positions,
            gold,
            self.tokenizer_size,
            topk_ids,
            fused,
            self.lm_weight,
            self.loss_chunk_tokens,
        ) as head:
            try:
                outputs = model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
                )
            except (TypeError, AttributeError) as error:
                if not head.returned:
                    raise
                raise TrainInputError(
                    f"{type(unwrapped).__name__} works on its LM head's logits after the head ({error}); "
                    "the fused loss supports models that return the head's output as their logits "
                    "(and Gemma-2's final_logit_softcapping)."
                ) from error
        sums = outputs.logits  # the head returned (weighted loss sum, CLM sum, fusion sum)
        if not (isinstance(sums, tuple) and len(sums) == 3):
            raise TrainInputError(
                f"{type(unwrapped).__name__} changed its LM head's output; the fused loss cannot train it."
            )
        loss, clm_sum, fusion_sum = sums
        tokens = len(gold)
        step = torch.stack([clm_sum, fusion_sum, clm_sum.new_tensor(tokens)])
        self._window = self._window.to(step.device) + step.double()  # no host sync per micro-step
        if num_items_in_batch is None:  # outside the training loop: a plain mean
            loss = loss / tokens
        else:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:  # the count is global; gradients get averaged
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every rank is here, so the reduction is matched
            window = self.accelerator.reduce(self._window.to(self.args.device), reduction="sum").cpu()
            self._window = torch.zeros_like(self._window)
            logs["clm_loss"] = float(window[0] / window[2])
            if self.lm_weight < 1.0:
                logs["fusion_loss"] = float(window[1] / window[2])
        super().log(logs, start_time)


# --------------------------------------------------------------------------- the stage


@dataclass
class Prepared:
    """Everything checked before training: what the run reads and how it is configured."""

    tokenizer: Any
    fused: FusedData
    ds_config: dict[str, Any]
    resume_from: str | None


def checkpoints(work: Path) -> tuple[Path | None, list[Path]]:
    """(the last complete checkpoint in ``work``, the incomplete ones), each in step order.

    The Trainer writes a checkpoint's ``trainer_state.json`` last (under DeepSpeed after every
    rank's shards), so a checkpoint without a readable one was being written when the run was
    killed: resuming from it would crash, and transformers' ``get_last_checkpoint`` picks it.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for path in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if work.is_dir() else ():
        step = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    complete, incomplete = [], []
    for _, path in sorted(found):
        try:
            read_json(path / TRAINER_STATE_NAME)
            complete.append(path)
        except (OSError, ValueError):  # missing, or cut short (a JSONDecodeError is a ValueError)
            incomplete.append(path)
    return (complete[-1] if complete else None), incomplete


def resume_point(work: Path, resume: bool) -> str | None:
    """The checkpoint a run continues from (None: from the start); checkpoints of an earlier run
    without ``--resume`` are an input error, not silently overwritten nor silently resumed."""
    last, incomplete = checkpoints(work)
    if not resume and (last or incomplete):
        raise TrainInputError(
            f"{work} holds checkpoints of an earlier run ({(last or incomplete[-1]).name}); pass --resume to "
            "continue it, or delete the directory to start over."
        )
    if incomplete:
        log.warning(
            "--resume: ignoring %s (killed while being written); resuming from %s.",
            ", ".join(p.name for p in incomplete),
            last.name if last else "the beginning",
        )
    elif resume and last is None:  # killed before its first checkpoint: nothing to skip
        log.warning("--resume: no checkpoint in %s yet; training starts from the beginning.", work)
    return str(last) if last else None


def prepare(config: TrainConfig, world_size: int, rank: int = 0) -> Prepared:
    """Check every input; the main rank records the run's manifest in the work directory."""
    out, work = Path(config.out), work_dir(config.out)
    if out.exists():
        raise TrainInputError(f"{out} already exists; pass another --out or delete it.")
    check_model_directory(config.model)
    tokenizer = load_tokenizer(config.model)
    fused = load_fused(config.fused, tokenizer)
    problem = schedule_problem(config, len(fused.data), world_size)
    if problem:
        raise TrainInputError(problem)
    ds_config = deepspeed_config(config.deepspeed, config, world_size)
    resume_from = resume_point(work, config.resume)
    if rank == 0:
        run_manifest = {
            "format": RUN_FORMAT,
            "pivot": {"path": str(Path(config.model).resolve()), "tokenizer_hash": tokenizer_hash(tokenizer)},
            "fused": {"path": str(Path(config.fused).resolve()), "manifest": fused.manifest},
            "settings": config.run_settings(),
        }
        claim_output(work, run_manifest)
    return Prepared(tokenizer, fused, ds_config, resume_from)


LOSS_KEYS = ("step", "loss", "clm_loss", "fusion_loss", "grad_norm", "learning_rate")


def loss_record(
    history: list[dict[str, Any]], which: int, keys: Sequence[str] = LOSS_KEYS
) -> dict[str, Any] | None:
    """``keys`` of the ``which``-th training log of a Trainer's log history (None before any)."""
    entries = [e for e in history if "loss" in e]
    if not entries:
        return None
    entry = entries[which]
    return {k: entry[k] for k in keys if k in entry}


def publish(
    trainer: Trainer, out: str | Path, summary: Callable[[], dict[str, Any]]
) -> dict[str, Any] | None:
    """Save the trained model as a plain HF directory at ``out``, atomically, with ``summary()``
    (called on the main rank only) as ``training_summary.json``; return the summary there.

    Every rank takes part (under ZeRO-3 the full tensors are gathered from all of them). The model
    is written to a staging directory in the work directory, opened to the umask (safetensors
    writes its files 0600) and renamed into place, so ``out`` exists only once it is complete.
    """
    staging = Path(trainer.args.output_dir) / "final"
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    result = None
    if trainer.is_world_process_zero():
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the summary records the settings
        result = summary()
        infinite = non_finite_keys(result)
        if infinite:  # an fp16 step's grad_norm is inf where the loss scaler skipped it; a diverged loss NaN
            log.warning("%s: non-finite numbers written as null: %s", SUMMARY, ", ".join(infinite))
            result = finite_or_null(result)
        write_json_atomic(staging / SUMMARY, result)
        open_to_umask(staging)
        os.replace(staging, out)
        log.info("%s: trained %d steps; checkpoints and logs stay in %s", out, result["steps"],
                 trainer.args.output_dir)  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    return result


def train(config: TrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any] | None:
    """Train one target model and publish it at ``config.out``; return the summary on the main rank.

    Runs in every process of a launched job (or alone, as a world of one: the variables of a rank
    are there for the run only, :func:`trainer_in_this_process`). ``callbacks`` are transformers
    ``TrainerCallback``s, for library users and tests.
    """
    started = time.time()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    prepared = prepare(config, world_size, rank)
    with trainer_in_this_process() as track:
        return _train(config, prepared, world_size, started, callbacks, track)


def _train(config: TrainConfig, prepared: Prepared, world_size: int, started: float,
           callbacks: Sequence[Any], track: Callable[[Trainer], Trainer]) -> dict[str, Any] | None:  # fmt: skip
    """``train`` after the checks, in a process that has a rank's variables."""
    tokenizer, fused = prepared.tokenizer, prepared.fused
    # TrainingArguments come first: with ZeRO-3 they make from_pretrained partition at load time.
    args = trainer_arguments(
        TrainingArguments, config, work_dir(config.out), prepared.ds_config,
        remove_unused_columns=False,  # the fused columns are not model.forward arguments
        label_names=["labels"],
    )  # fmt: skip
    attention = attention_implementation(
        config.attn_implementation, args.device, torch.bfloat16 if args.bf16 else torch.float32
    )
    model = load_model(config.model, attn_implementation=attention)
    model.config.use_cache = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rates = StepLearningRates()
    trainer = track(
        FusionTrainer(
            model=model,
            args=args,
            train_dataset=fused.data,
            data_collator=FusionCollator(pad_id if pad_id is not None else 0),
            processing_class=tokenizer,
            callbacks=[rates, LogLastStep(), *callbacks],
            lm_weight=config.lm_weight,
            temperature=config.temperature,
            tokenizer_size=len(tokenizer),
            loss_chunk_tokens=config.loss_chunk_tokens,
        )
    )
    result = trainer.train(resume_from_checkpoint=prepared.resume_from)
    parameters = parameters_held(trainer.model)

    def summary() -> dict[str, Any]:
        history = trainer.state.log_history
        return {
            "format": "fusion-train/training-summary@1",
            "pivot": {"path": str(Path(config.model).resolve()), "tokenizer_hash": tokenizer_hash(tokenizer)},
            "data": {
                "path": str(Path(config.fused).resolve()),
                "pivot": fused.manifest.get("pivot"),
                **{k: fused.manifest.get(k) for k in ("top_k", "criterion", "sources")},
                **fused.stats,
            },
            "config": asdict(config),
            "deepspeed": prepared.ds_config,
            "world_size": world_size,
            "bf16": args.bf16,
            "parameters": parameters,
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "resumed_from": Path(prepared.resume_from).name if prepared.resume_from else None,
            "loss": {"start": loss_record(history, 0), "end": loss_record(history, -1)},
            "learning_rate": rates.summary(config.learning_rate),
            "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "wall_time_s": time.time() - started,
        }

    return publish(trainer, config.out, summary)


# --------------------------------------------------------------------------- launching


def to_arguments(config: TrainConfig) -> list[str]:
    """``config`` as command-line options of ``fusion-train train`` (what launched processes receive)."""
    return command_arguments(train_command, asdict(config))


def launch_training(
    config: TrainConfig, nproc: int | None, hostfile: str | None, master_port: int | None
) -> int:
    """Check the inputs here, then run the training in ``nproc`` processes (per node) under
    ``deepspeed``; the launcher's exit status."""
    prepare(config, world_size_of(nproc, hostfile))
    return launch(MODULE, to_arguments(config), nproc, hostfile, master_port)


# --------------------------------------------------------------------------- command


@click.command("train", cls=Command)
@options_from(TrainConfig)
@click.option("--no-fusion", is_flag=True, help="The CLM-only baseline: same as --lm-weight 1.0.")
@launch_options
def train_command(no_fusion: bool, **options: Any) -> None:
    """Train a target model: the pivot fine-tuned on one source's fused targets, on DeepSpeed ZeRO."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if no_fusion:
        given = click.get_current_context().get_parameter_source("lm_weight") is not ParameterSource.DEFAULT
        if given and options["lm_weight"] != 1.0:  # the default (0.9) too, when given explicitly
            raise TrainInputError(
                f"--no-fusion means --lm-weight 1.0, but --lm-weight {options['lm_weight']:g} was given; "
                "drop one of them."
            )
        options["lm_weight"] = 1.0
    relaunching = wants_launch(options)
    nproc, hostfile, master_port = (options.pop(name) for name in ("nproc", "hostfile", "master_port"))
    options.pop("local_rank")
    config = TrainConfig(**options)
    if relaunching:
        code = launch_training(config, nproc, hostfile, master_port)
        if code != 0:
            raise click.ClickException(f"the deepspeed launcher exited with status {code}.")
        return
    summary = train(config)
    if summary is not None:
        end = summary["loss"]["end"] or {}
        click.echo(f"{config.out}: {summary['steps']} steps, final loss {end.get('loss')}.")


if __name__ == "__main__":
    train_command(prog_name="fusion-train train")
