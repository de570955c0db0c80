"""The trainers of the preference losses TRL's DPOTrainer does not compute as the papers do: WRPO,
and length-normalised DPO with the rewards it compares logged. ``preference_losses`` names them.

WRPO (Weighted-Reward Preference Optimization, arXiv 2412.03187) adds a third response to each DPO
pair: ``chosen_source`` (y_ws), the best response of the source models, next to the target's own
best (``chosen``, y_wt) and worst (``rejected``, y_l):

    L = -log sigmoid(beta * (alpha * r(y_ws) + (1 - alpha) * r(y_wt) - r(y_l))),
    r(y) = log pi(y | x) - log pi_ref(y | x),

with alpha rising linearly from 0 to ``alpha_max`` over training, so the target first learns
from its own responses and is drawn towards the sources' gradually. TRL's collator and loss know
two responses only; the subclass here tokenizes, pads and scores the third one in the same
forward pass. The pairs come from ``fusion-train prefer --mode wrpo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

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
    outputs = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        labels=labels,
        use_cache=False,
        fused_lm_head=True,
    )
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
        self.log_means(
            {
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": chosen > rejected,
                "summed_rewards/chosen": summed[0],
                "summed_rewards/rejected": summed[1],
                "summed_rewards/margins": summed[0] - summed[1],
                "summed_rewards/accuracies": summed[0] > summed[1],
            }
        )
        return -F.logsigmoid(chosen - rejected).mean()


class WRPOTrainer(OwnLossTrainer):
    """DPOTrainer whose data also holds ``chosen_source`` and whose loss is WRPO's (``beta`` from
    the DPOConfig, ``alpha_max`` here). Logs each response's reward (``rewards/chosen`` is y_wt's,
    ``rewards/chosen_source`` y_ws's), y_wt's margin over y_l, and as WRPO's reference code does,
    the weighted chosen reward ``alpha r(y_ws) + (1 - alpha) r(y_wt)`` the loss compares with
    r(y_l): ``rewards/weighted_chosen``, ``rewards/weighted_margins``, ``rewards/weighted_accuracies``."""

    def __init__(self, *args: Any, alpha_max: float, **kwargs: Any) -> None:
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
            return {
                "prompt_ids": prompt[:shared],
                "chosen_ids": moved + example["chosen_ids"],
                "rejected_ids": moved + example["rejected_ids"],
                "chosen_source_ids": ids[shared:],
            }

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
        self.log_means(
            {
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/chosen_source": source,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": chosen > rejected,
                "rewards/weighted_chosen": weighted,
                "rewards/weighted_margins": weighted - rejected,
                "rewards/weighted_accuracies": weighted > rejected,
            }
        )
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["wrpo/alpha"].append(alpha)
        return loss
