"""A tiny ArmoRM-like reward model with its own code, copied into a model directory as
``modeling_gated.py`` (config.json's auto_map names it) and loaded with trust_remote_code.

Like ArmoRM's ``LlamaForRewardModelWithGating``: a Llama trunk, a regression layer giving one
reward per objective (``.rewards``, and here also ``.logits``), a gating layer weighting them, and
the reward in ``.score``: the gate-weighted sum, shape [batch] (or [batch, 1] with the config's
``score_keepdim``). The sequence is pooled at its last attended token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput

if os.environ.get("GATED_RM_MARKER"):  # a test's witness that this code ran
    with Path(os.environ["GATED_RM_MARKER"]).open("a") as marker:
        marker.write(f"imported {__name__}\n")


@dataclass
class GatedRewardOutput(ModelOutput):
    rewards: torch.FloatTensor | None = None
    gating_output: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class GatedRewardModel(LlamaPreTrainedModel):
    def __init__(self, config: object) -> None:
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: object
    ) -> GatedRewardOutput:
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = hidden[torch.arange(len(hidden)), attention_mask.sum(dim=1) - 1]
        rewards = self.regression_layer(last)
        gate = torch.softmax(self.gating(last), dim=-1)
        score = (gate * rewards).sum(dim=-1)
        if getattr(self.config, "score_keepdim", False):
            score = score[:, None]
        return GatedRewardOutput(rewards=rewards, gating_output=gate, score=score, logits=rewards)
