"""The training losses at supervised positions: causal-LM cross-entropy and the sparse fusion loss.

Both read the logits of the N supervised positions only (``[N, V]``: the positions that predict a
supervised token), never ``[batch, length, vocab]``, and no dense target exists: the fused
distribution stays k ids and k weights per position. Log-probabilities are ``logits - logsumexp``
at those ids. Plain autograd would still cost several ``[N, V]`` tensors (a log-softmax, and one
dense gradient per gather), so the two losses are one autograd function with an analytic backward:

    d loss / d logits = a * softmax(logits) + b * softmax_real(logits) - (one-hot targets, weighted)

written chunk by chunk into a single ``[N, V]`` gradient. Peak memory is the logits, their
gradient and one chunk of float32 work space; the rest is O(N * k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 2**24  # float32 work space per chunk of rows: 64 MiB


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


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _SupervisedLosses(torch.autograd.Function):
    """(CLM sum, fusion sum) of logits [N, V]; see ``supervised_loss_sums``."""

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, weights, tokenizer_size):  # type: ignore[override]
        rows, vocab = logits.shape
        padded = tokenizer_size < vocab
        lse_all = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse_real = torch.empty_like(lse_all) if padded else lse_all
        for chunk in _row_chunks(rows, vocab):
            x = logits[chunk].float()
            lse_all[chunk] = torch.logsumexp(x, dim=-1)
            if padded:
                lse_real[chunk] = torch.logsumexp(x[:, :tokenizer_size], dim=-1)
        gold = logits.gather(1, labels.unsqueeze(1)).squeeze(1).float()
        picked = logits.gather(1, topk_ids.clamp(min=0)).float()  # padding slots have weight 0
        clm = (lse_all - gold).sum()
        fusion = (weights.sum(1) * lse_real - (weights * picked).sum(1)).sum()
        ctx.save_for_backward(logits, labels, topk_ids, weights, lse_all, lse_real)
        ctx.tokenizer_size = tokenizer_size
        return clm, fusion

    @staticmethod
    def backward(ctx, grad_clm, grad_fusion):  # type: ignore[override]
        logits, labels, topk_ids, weights, lse_all, lse_real = ctx.saved_tensors
        size = ctx.tokenizer_size
        real_weight = grad_fusion * weights.sum(1, keepdim=True)  # per row: 1, or 0 without targets
        padded, fusion = size < logits.shape[1], weights.shape[1] > 0
        grad = torch.empty_like(logits)
        for chunk in _row_chunks(*logits.shape):
            x = logits[chunk].float()
            if padded:  # two softmaxes: over every row (CLM) and over the tokenizer's ids (fusion)
                g = torch.exp(x - lse_all[chunk, None]).mul_(grad_clm)
                if fusion:
                    g[:, :size] += torch.exp(x[:, :size] - lse_real[chunk, None]).mul_(real_weight[chunk])
            else:  # one softmax serves both terms
                g = torch.exp(x - lse_all[chunk, None]).mul_(grad_clm + real_weight[chunk])
            grad[chunk] = g
        grad.scatter_add_(1, labels.unsqueeze(1), (-grad_clm).expand(len(labels), 1).to(grad.dtype))
        grad.scatter_add_(1, topk_ids.clamp(min=0), (-grad_fusion * weights).to(grad.dtype))
        return grad, None, None, None, None


def supervised_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tokenizer_size: int,
    topk_ids: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> LossSums:
    """CLM and fusion losses of ``logits`` [N, V] at N supervised positions, summed (float32).

    - CLM: ``-log p(label)`` with the softmax over every output row, exactly transformers' causal-LM
      loss, so the CLM-only baseline is the plain one.
    - Fusion: ``-sum_j P_fused(j) log q(j)`` over the k stored ids ``topk_ids`` [N, k] (``-1`` pads),
      with q the softmax over the tokenizer's ids only: rows at or beyond ``tokenizer_size``
      (padded vocabularies) are never targets, as they were left out of the stored distributions.
    """
    fusion = topk_ids is not None and topk_logprobs is not None
    if fusion:
        weights = fused_weights(topk_ids, topk_logprobs, temperature)
    else:
        topk_ids = labels.new_zeros(len(labels), 0)
        weights = torch.zeros(len(labels), 0, device=logits.device)
    clm, fusion_sum = _SupervisedLosses.apply(logits, labels, topk_ids, weights, tokenizer_size)
    return LossSums(clm, fusion_sum if fusion else None)
