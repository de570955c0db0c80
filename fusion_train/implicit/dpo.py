"""WRPO (Weighted-Reward Preference Optimization, arXiv 2412.03187) on TRL's DPOTrainer.

WRPO adds a third response to each DPO pair: ``chosen_source`` (y_ws), the best response of the
source models, next to the target's own best (``chosen``, y_wt) and worst (``rejected``, y_l):

    L = -log sigmoid(beta * (alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l))),
    r(y) = log pi(y | x) - log pi_ref(y | x),

with alpha rising linearly from 0 to ``alpha_max`` over training, so the target first learns
from its own responses and is drawn towards the sources' gradually. TRL's collator and loss know
two responses only; the subclass here tokenizes, pads and scores the third one in the same
forward pass. The pairs come from ``fusion-train prefer --mode wrpo``.

``fusion-train dpo --loss sigmoid|sigmoid_norm|wrpo`` (implicit stage 5) trains on
``fusion-train prefer``'s ``pairs/``: ``sigmoid`` is DPO (TRL's), ``sigmoid_norm`` TRL's
length-normalised DPO (the rewards are mean, not summed, log-ratios per token; FuseChat-3.0's
choice for Llama), computed here so that the rewards logged are those it compares, ``wrpo`` the
subclass here. Defaults follow the papers (see ``LOSS_DEFAULTS``). Launcher, ZeRO
presets, bf16, checkpoints and publishing are ``train``'s (``fusion_train/implicit/tuning.py``);
``--nproc``/``--hostfile`` re-run this module under the ``deepspeed`` launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
import datasets
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from fusion_train.errors import Command
from fusion_train.implicit import tuning
from fusion_train.implicit.prefer import PAIRS_DIR

GROUPS = ("chosen", "rejected", "chosen_source")  # the order of the three thirds of a batch


def alpha_at(step: int, total_steps: int, alpha_max: float) -> float:
    """The weight of y_ws after ``step`` of ``total_steps`` optimiser steps: 0 at the start, rising
    linearly to ``alpha_max`` at the end."""
    return alpha_max * min(1.0, step / total_steps) if total_steps > 0 else 0.0


def wrpo_loss(
    policy: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Per-pair WRPO loss from summed log-probabilities of (y_wt, y_l, y_ws) under the policy and
    the reference model. With alpha = 0 it is DPO's sigmoid loss on (y_wt, y_l)."""
    chosen, rejected, source = (p - r for p, r in zip(policy, reference, strict=True))
    return -F.logsigmoid(beta * (alpha * source + (1 - alpha) * chosen - rejected))


@dataclass
class WRPOCollator(DataCollatorForPreference):
    """Pads prompt + chosen, prompt + rejected and prompt + chosen_source into one batch of three
    thirds, in that order (TRL's collator makes the first two halves)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for group in GROUPS:
            for example in examples:
                prompt, completion = example["prompt_ids"], example[f"{group}_ids"]
                ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
                if self.max_length is not None:
                    cut = (
                        slice(None, self.max_length)
                        if self.truncation_mode == "keep_start"
                        else slice(-self.max_length, None)
                    )
                    ids, mask = ids[cut], mask[cut]
                sequences.append(torch.tensor(ids))
                masks.append(torch.tensor(mask, dtype=torch.long))
        padding = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        return {
            "input_ids": pad(sequences, padding_value=self.pad_token_id, **padding),
            "attention_mask": pad([torch.ones_like(m) for m in masks], padding_value=0, **padding),
            "completion_mask": pad(masks, padding_value=0, **padding),
        }


def sequence_logps(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], parts: int
) -> tuple[torch.Tensor, ...]:
    """Summed log-probabilities of the completion tokens of each of a batch's ``parts`` (chosen,
    rejected, and WRPO's chosen_source, one after the other): TRL's fused LM head scores only the
    labelled positions, and gives 0 elsewhere."""
    mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)  # fmt: skip
    per_token = outputs.log_probs[:, -(mask.size(1) - 1) :]
    return per_token.sum(dim=1).chunk(parts, dim=0)


class OwnLossTrainer(DPOTrainer):
    """A DPOTrainer whose loss is computed here, from the summed log-probabilities of each response
    under the policy and the reference model (run alongside: precomputed reference values would
    cover TRL's two responses only), so that the rewards it logs are the ones its loss compares."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if config is not None and (config.precompute_ref_log_probs or config.ld_alpha is not None):
            raise ValueError(
                f"{type(self).__name__} runs the reference model itself: unset precompute_ref_log_probs and ld_alpha."
            )
        super().__init__(*args, **kwargs)

    def policy_and_reference(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], parts: int
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        with torch.no_grad():
            reference = sequence_logps(self.ref_model, inputs, parts)
        return sequence_logps(model, inputs, parts), reference

    def log_means(self, metrics: dict[str, torch.Tensor]) -> None:
        """Each metric's mean over the batches of every rank."""
        mode = "train" if self.model.training else "eval"
        for name, values in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather(values.detach().float()).mean().item())


class LengthNormalisedDPOTrainer(OwnLossTrainer):
    """TRL's ``sigmoid_norm`` loss, ``-log sigmoid(beta (r(y_w) / n_w - r(y_l) / n_l))`` with n a
    response's tokens, logging the length-normalised rewards ``beta r(y) / n``, their margins and
    accuracies: what the loss compares. TRL 1.16 logs ``rewards/*`` of this loss from the summed
    log-ratios, which can rank a pair the other way; those are kept as ``summed_rewards/*``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if config is not None and list(config.loss_type) != ["sigmoid_norm"]:
            raise ValueError(
                f"{type(self).__name__} computes the sigmoid_norm loss; loss_type was {config.loss_type}."
            )
        super().__init__(*args, **kwargs)

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool
    ) -> Any:
        if return_outputs:
            raise ValueError("this trainer does not return model outputs; unset prediction_loss_only=False")
        policy, reference = self.policy_and_reference(model, inputs, 2)
        tokens = inputs["completion_mask"].sum(dim=1).clamp(min=1).chunk(2, dim=0)  # as TRL counts them
        summed = [self.beta * (p - r) for p, r in zip(policy, reference, strict=True)]
        chosen, rejected = (reward / n for reward, n in zip(summed, tokens, strict=True))
        self.log_means({
            "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": chosen > rejected, "summed_rewards/chosen": summed[0],
            "summed_rewards/rejected": summed[1], "summed_rewards/margins": summed[0] - summed[1],
            "summed_rewards/accuracies": summed[0] > summed[1],
        })  # fmt: skip
        return -F.logsigmoid(chosen - rejected).mean()


class WRPOTrainer(OwnLossTrainer):
    """DPOTrainer whose data also holds ``chosen_source`` and whose loss is WRPO's (``beta`` from
    the DPOConfig, ``alpha_max`` here). Logs each response's reward (``rewards/chosen`` is y_wt's,
    ``rewards/chosen_source`` y_ws's), y_wt's margin over y_l, and as WRPO's reference code does,
    the weighted chosen reward ``alpha r(y_ws) + (1 - alpha) r(y_wt)`` the loss compares with
    r(y_l): ``rewards/weighted_chosen``, ``rewards/weighted_margins``, ``rewards/weighted_accuracies``."""

    def __init__(self, *args: Any, alpha_max: float = 0.1, **kwargs: Any) -> None:
        self.alpha_max = alpha_max
        super().__init__(*args, **kwargs)
        collator = self.data_collator
        self.data_collator = WRPOCollator(
            pad_token_id=collator.pad_token_id,
            max_length=collator.max_length,
            truncation_mode=collator.truncation_mode,
            pad_to_multiple_of=collator.pad_to_multiple_of,
        )

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        """TRL's tokenization, plus ``chosen_source_ids``: the tokens after the same prompt."""
        first = next(iter(dataset))
        if "chosen_source" not in first or not is_conversational(first):
            raise ValueError(
                f"the {dataset_name} dataset needs conversational prompt, chosen, rejected and chosen_source columns; "
                "make it with `fusion-train prefer --mode wrpo`"
            )
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def tokenize_source(example: dict[str, Any]) -> dict[str, Any]:
            """TRL's rule for chosen and rejected, over all three: the completions start where the
            tokenized prompt and a tokenized prompt + completion first differ. Where the source's
            answer merges with the prompt's last tokens (an answer opening with a blank line
            after a template's newline), those prompt tokens join every completion of the row."""
            ids = _tokenize(processing_class, example["prompt"] + example["chosen_source"])["input_ids"]
            prompt = example["prompt_ids"]
            shared = common_prefix_length(prompt, ids)
            moved = prompt[shared:]
            return {"prompt_ids": prompt[:shared], "chosen_ids": moved + example["chosen_ids"],
                    "rejected_ids": moved + example["rejected_ids"], "chosen_source_ids": ids[shared:]}  # fmt: skip

        return dataset.map(tokenize_source)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "chosen_source_ids" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "chosen_source_ids"]

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool
    ) -> Any:
        if return_outputs:
            raise ValueError("WRPO does not return model outputs; unset prediction_loss_only=False")
        policy, reference = self.policy_and_reference(model, inputs, len(GROUPS))
        alpha = alpha_at(self.state.global_step, self.state.max_steps, self.alpha_max)
        loss = wrpo_loss(policy, reference, self.beta, alpha).mean()
        chosen, rejected, source = (self.beta * (p - r) for p, r in zip(policy, reference, strict=True))
        weighted = alpha * source + (1 - alpha) * chosen
        self.log_means({
            "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/chosen_source": source,
            "rewards/margins": chosen - rejected, "rewards/accuracies": chosen > rejected,
            "rewards/weighted_chosen": weighted, "rewards/weighted_margins": weighted - rejected,
            "rewards/weighted_accuracies": weighted > rejected,
        })  # fmt: skip
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["wrpo/alpha"].append(alpha)
        return loss


# --------------------------------------------------------------------------- the stage

MODULE = "fusion_train.implicit.dpo"  # what the launcher runs in every process
STAGE = "dpo"
LOSSES = ("sigmoid", "sigmoid_norm", "wrpo")
# (beta, learning rate) per loss, from the papers, whose learning rates are for a global batch of
# 128: FuseChat-3.0 trains Llama-3.1-8B with length-normalised DPO at beta 10, lr 8e-7, and
# Qwen-2.5-7B and Gemma-2-9B with DPO at beta 0.01, lr 3e-7 and 5e-7 (Qwen's is sigmoid's default);
# WRPO: beta 0.01, lr 3e-7, alpha_max 0.1.
LOSS_DEFAULTS = {"sigmoid": (0.01, 3e-7), "sigmoid_norm": (10.0, 8e-7), "wrpo": (0.01, 3e-7)}
# sigmoid: TRL's own (its rewards are the summed log-ratios the loss compares); the others log theirs.
TRAINERS = {"sigmoid": DPOTrainer, "sigmoid_norm": LengthNormalisedDPOTrainer, "wrpo": WRPOTrainer}
ALPHA_MAX = 0.1


@dataclass(frozen=True)
class DPOSettings(tuning.TuneSettings):
    """A preference-training run; ``beta`` and ``learning_rate`` default by loss (``LOSS_DEFAULTS``)."""

    loss: str = "sigmoid_norm"
    beta: float | None = None
    alpha_max: float | None = None  # wrpo only; ALPHA_MAX when not given
    learning_rate: float | None = field(default=None, kw_only=True)  # type: ignore[assignment]
    epochs: float = field(default=1.0, kw_only=True)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise tuning.TuneInputError(f"--loss {self.loss!r}: use one of {', '.join(LOSSES)}.")
        if self.alpha_max is not None and self.loss != "wrpo":
            raise tuning.TuneInputError("--alpha-max is WRPO's; drop it or use --loss wrpo.")
        if self.alpha_max is not None and not 0.0 <= self.alpha_max <= 1.0:
            raise tuning.TuneInputError("--alpha-max must be in [0, 1].")
        if self.beta is not None and self.beta <= 0:
            raise tuning.TuneInputError("--beta must be positive.")
        beta, learning_rate = LOSS_DEFAULTS[self.loss]
        object.__setattr__(self, "beta", beta if self.beta is None else self.beta)
        object.__setattr__(
            self, "learning_rate", learning_rate if self.learning_rate is None else self.learning_rate
        )
        if self.loss == "wrpo" and self.alpha_max is None:
            object.__setattr__(self, "alpha_max", ALPHA_MAX)
        super().__post_init__()


def load_pairs(settings: tuning.TuneSettings) -> datasets.Dataset:
    assert isinstance(settings, DPOSettings)
    if settings.loss == "wrpo":
        return tuning.load_split(settings.prefs, PAIRS_DIR, ("prompt", "chosen", "rejected", "chosen_source"),
                                 hint=": --loss wrpo needs pairs of `fusion-train prefer --mode wrpo`")  # fmt: skip
    return tuning.load_split(settings.prefs, PAIRS_DIR, ("prompt", "chosen", "rejected"))


def check(settings: tuning.TuneSettings, world_size: int) -> tuning.Prepared:
    """Every check ``dpo`` makes before training (the launching process makes them once)."""
    return tuning.prepare(settings, load_pairs, STAGE, world_size)


def dpo(settings: DPOSettings) -> dict[str, Any] | None:
    """Preference-train ``settings.model`` on ``prefs/pairs`` (the reference model: the same model,
    frozen) and publish it at ``settings.out``; return the summary on the main rank."""

    def make_trainer(prepared: tuning.Prepared, callbacks: list[Any]) -> Any:
        wrpo = settings.loss == "wrpo"
        args = tuning.trl_arguments(DPOConfig, settings, prepared, beta=settings.beta,
                                    loss_type=["sigmoid" if wrpo else settings.loss])  # fmt: skip
        policy, reference = tuning.load_policy(settings, args), tuning.load_policy(settings, args)
        kwargs: dict[str, Any] = {"alpha_max": settings.alpha_max} if wrpo else {}
        return TRAINERS[settings.loss](
            model=policy, ref_model=reference, args=args, train_dataset=prepared.data,
            processing_class=prepared.tokenizer, callbacks=callbacks, **kwargs,
        )  # fmt: skip

    keys = ("step", "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "summed_rewards/margins", "summed_rewards/accuracies", "rewards/chosen_source",
            "rewards/weighted_chosen", "rewards/weighted_margins", "rewards/weighted_accuracies",
            "wrpo/alpha")  # fmt: skip
    return tuning.run(settings, STAGE, load_pairs, make_trainer, log_keys=keys)


@click.command("dpo", cls=Command)
@click.option("--loss", type=click.Choice(LOSSES), default="sigmoid_norm",
              help="sigmoid: DPO; sigmoid_norm: length-normalised DPO (FuseChat-3.0); wrpo: WRPO (needs pairs "
              "of `fusion-train prefer --mode wrpo`).")  # fmt: skip
@click.option("--beta", type=tuning.POSITIVE_FLOAT, default=None,
              help="beta of the loss. Default by --loss, the papers': sigmoid 0.01 (FuseChat-3.0, Qwen-2.5 and "
              "Gemma-2), sigmoid_norm 10 (FuseChat-3.0, Llama-3.1), wrpo 0.01 (WRPO).")  # fmt: skip
@click.option("--alpha-max", type=click.FloatRange(0.0, 1.0), default=None,
              help=f"WRPO: the weight of the source's response at the end of training (default {ALPHA_MAX}, WRPO's).")  # fmt: skip
@tuning.tune_options(
    None,
    1.0,
    "Peak learning rate. Default by --loss, the papers': sigmoid 3e-7 (FuseChat-3.0, Qwen-2.5; "
    "it gives Gemma-2 5e-7), sigmoid_norm 8e-7 (FuseChat-3.0, Llama-3.1), wrpo 3e-7 (WRPO). The papers' "
    "rates are for a global batch of 128 (processes x --per-device-batch-size x --grad-accumulation).",
)
def dpo_command(**params: Any) -> None:
    """Preference-train a model on `fusion-train prefer`'s pairs (DPO, length-normalised DPO or
    WRPO), on TRL's DPOTrainer and DeepSpeed ZeRO."""
    settings = tuning.settings_of(DPOSettings, params)
    tuning.command(MODULE, dpo_command, params, settings, check, dpo)


if __name__ == "__main__":
    dpo_command(prog_name="fusion-train dpo")
