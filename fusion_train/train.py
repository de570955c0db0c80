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

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import torch
from click.core import ParameterSource
from transformers import Trainer, TrainingArguments

from fusion_train.calls import StageCall
from fusion_train.errors import Command, TrainInputError
from fusion_train.fused import FusedData, load_fused
from fusion_train.launch import launch_options, parameters_held, world_size_of
from fusion_train.losses import CHUNK_TOKENS, fused_weights, head_loss_sums
from fusion_train.models import (
    attention_implementation,
    check_model_directory,
    load_model,
    load_tokenizer,
    tokenizer_hash,
)
from fusion_train.options import FRACTION, POSITIVE_FLOAT, POSITIVE_INT
from fusion_train.settings import options_from, setting
from fusion_train.storage import (
    claim_output,
)
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

RUN_FORMAT = "fusion-train/train-run@1"


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
            rows,
            head.weight,
            head.bias,
            labels,
            tokenizer_size,
            topk_ids,
            fused,
            clm_weight=lm_weight,
            fusion_weight=1.0 - lm_weight,
            softcap=softcap,
            chunk_tokens=chunk_tokens,
        )
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


def _train(
    config: TrainConfig,
    prepared: Prepared,
    world_size: int,
    started: float,
    callbacks: Sequence[Any],
    track: Callable[[Trainer], Trainer],
) -> dict[str, Any] | None:
    """``train`` after the checks, in a process that has a rank's variables."""
    tokenizer, fused = prepared.tokenizer, prepared.fused
    # TrainingArguments come first: with ZeRO-3 they make from_pretrained partition at load time.
    args = trainer_arguments(
        TrainingArguments,
        config,
        work_dir(config.out),
        prepared.ds_config,
        remove_unused_columns=False,  # the fused columns are not model.forward arguments
        label_names=["labels"],
    )
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
    launching = {name: options.pop(name) for name in ("nproc", "hostfile", "master_port", "local_rank")}
    config = TrainConfig(**options)

    def check() -> None:
        prepare(config, world_size_of(launching["nproc"], launching["hostfile"]))

    StageCall(train, {"config": config}, Path(config.out), report_trained).from_command(launching, check)


if __name__ == "__main__":
    train_command(prog_name="fusion-train train")
