"""The fusion and CLM losses on whole logits ``[N, V]``: the reference the chunked LM head
(``fusion_train.losses.head_loss_sums``) is tested against, and the previous training path that
bench/train.py measures it against. Not used in training: it holds the logits, their gradient
and one chunk of work space at once."""

from __future__ import annotations

import torch

from fusion_train.losses import LossSums, fused_weights

CHUNK_ELEMENTS = 2**24  # float32 logits per chunk of rows in supervised_loss_sums: 64 MiB


def row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, start + step) for start in range(0, rows, step)]


class SupervisedLosses(torch.autograd.Function):
    """(CLM sum, fusion sum) of logits [N, V]; see ``supervised_loss_sums``."""

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, weights, tokenizer_size):  # type: ignore[override]
        rows, vocab = logits.shape
        padded = tokenizer_size < vocab
        lse_all = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse_real = torch.empty_like(lse_all) if padded else lse_all
        for chunk in row_chunks(rows, vocab):
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
        for chunk in row_chunks(*logits.shape):
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
    clm, fusion_sum = SupervisedLosses.apply(logits, labels, topk_ids, weights, tokenizer_size)
    return LossSums(clm, fusion_sum if fusion else None)


def logits_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    tokenizer_size: int,
    topk_ids: torch.Tensor | None = None,
    fused: torch.Tensor | None = None,
    *,
    clm_weight: float = 1.0,
    fusion_weight: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``losses.head_loss_sums`` the previous way: the whole [N, V] logits (``F.linear``, the cap as
    Gemma-2 applies it), then :class:`SupervisedLosses`, and
    autograd through all of it (``chunk_tokens`` is ignored). The reference of the chunked head's
    tests, and what ``train_driver.py`` trains with to compare."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits.float() / softcap) * softcap
    if topk_ids is None or fused is None:
        topk_ids = labels.new_zeros(len(labels), 0)
        fused = torch.zeros(len(labels), 0, device=hidden.device)
    clm, fusion = SupervisedLosses.apply(logits, labels, topk_ids, fused, tokenizer_size)
    return clm_weight * clm + fusion_weight * fusion, clm.detach(), fusion.detach()
