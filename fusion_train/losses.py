"""The training losses at supervised positions: causal-LM cross-entropy and the sparse fusion loss.

Both read the logits of the N supervised positions only (``[N, V]``: the positions that predict a
supervised token), never ``[batch, length, vocab]``. Log-probabilities are ``logits - logsumexp``
gathered at the few ids each loss needs; no log-softmax over the vocabulary is materialised and no
dense target exists, so the memory beyond the logits is O(N * k). Autograd keeps the logits and
``[N]`` normalisers; the only vocabulary-sized tensor of the backward pass is the logits' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossSums:
    """Losses summed over positions, so callers can normalise over accumulation steps and ranks."""

    clm: torch.Tensor
    fusion: torch.Tensor | None  # None when the fusion term was not asked for


def fused_weights(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``P_fused`` [N, k]: softmax of the stored log-probabilities / T over the valid (id >= 0) entries.

    Rows without a valid entry get all-zero weights, so they add nothing to the loss.
    """
    scores = (topk_logprobs.float() / temperature).masked_fill(topk_ids < 0, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def supervised_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tokenizer_size: int,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> LossSums:
    """CLM and fusion losses of ``logits`` [N, V] at N supervised positions, summed.

    - CLM: ``-log p(label)`` with the softmax over every output row, exactly transformers' causal-LM
      loss, so the CLM-only baseline is the plain one.
    - Fusion: ``-sum_j P_fused(j) log q(j)`` over the k stored ids ``topk_ids`` [N, k] (``-1`` pads),
      with q the softmax over the tokenizer's ids only: rows at or beyond ``tokenizer_size``
      (padded vocabularies) are never targets, as they were left out of the stored distributions.
    """
    logits = logits.float()
    lse_all = torch.logsumexp(logits, dim=-1)
    clm = (lse_all - logits.gather(1, labels.unsqueeze(1)).squeeze(1)).sum()
    if topk_ids is None or topk_logprobs is None:
        return LossSums(clm, None)
    # Slicing only when the vocabulary is padded: a slice's backward allocates a second [N, V] gradient.
    lse = (
        lse_all if tokenizer_size >= logits.shape[1] else torch.logsumexp(logits[:, :tokenizer_size], dim=-1)
    )
    weights = fused_weights(topk_ids, topk_logprobs, temperature)
    log_q = logits.gather(1, topk_ids.clamp(min=0)) - lse.unsqueeze(1)  # padding slots have weight 0
    return LossSums(clm, -(weights * log_q).sum())
