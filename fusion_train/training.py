"""What every training stage (train, sft, dpo) shares around transformers' ``Trainer``: the
schedule and trainer settings, DeepSpeed's config, bf16, ``TrainingArguments``, the checks and
logs of the learning-rate schedule, checkpoints and resuming, publishing the model, and a
Trainer's life in this process (nothing of it kept after the training)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import click
import torch
from transformers import SchedulerType, Trainer, TrainerCallback, TrainingArguments

from fusion_train import options
from fusion_train.errors import TrainInputError, UserError
from fusion_train.launch import end_process_group_at_exit, on_cpu_host, skip_shm_comm_op, world_of_one
from fusion_train.models import release_memory
from fusion_train.options import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT
from fusion_train.settings import setting
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY
from fusion_train.storage import finite_or_null, non_finite_keys, open_to_umask, read_json, write_json_atomic

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "deepspeed_configs"
PRESETS = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3-offload": "zero3_offload.json"}
# Settings that do not change what is trained (the attention kernel: only in float rounding): a
# resumed run may change them.
NOT_IN_RUN_MANIFEST = (
    "out",
    "resume",
    "report_to",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "attn_implementation",
)
OUT_HELP = "The trained model directory (published when done; checkpoints go to OUT.work/)."  # every stage's


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


def work_dir(out: str | Path) -> Path:
    """Where checkpoints and logs live while training: next to the output, so it can be renamed into place."""
    out = Path(out)
    return out.with_name(out.name + ".work")


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
    arguments_class: type[TrainingArguments],
    settings: TrainerSettings,
    output_dir: Path,
    ds_config: dict[str, Any],
    **extra: Any,
) -> Any:
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
        return {
            "peak": peak,
            "first": rates[0] if rates else None,
            "last": rates[-1] if rates else None,
            "highest": max(rates, default=None),
            "steps_at_zero": rates.count(0.0),
        }


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


def report_trained(out: Path, summary: dict[str, Any] | None) -> None:
    """What a training command prints at the end (the main rank's summary)."""
    if summary is not None:
        end = summary["loss"]["end"] or {}
        click.echo(f"{out}: {summary['steps']} steps, final loss {end.get('loss')}.")


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
        log.info(
            "%s: trained %d steps; checkpoints and logs stay in %s",
            out,
            result["steps"],
            trainer.args.output_dir,
        )
    trainer.accelerator.wait_for_everyone()
    return result
