"""The training losses at supervised positions: causal-LM cross-entropy and the sparse fusion loss.

Training uses ``head_loss_sums``: from the final hidden states at the N supervised positions
(``[N, H]``) and the LM head (``[V, H]`` weight, optional bias) straight to the two loss sums, one
autograd function that computes the logits a chunk of rows at a time, in forward and again in
backward, where it accumulates the gradients of the hidden states and of the head. The ``[N, V]``
logits never exist; the extra memory is one chunk of logits and its work space
(``CHUNK_ELEMENTS`` float32 logits per chunk, at least ``CHUNK_MIN_ROWS`` rows), and O(N * k)
besides. No dense target exists either:
the fused distribution stays k ids and k weights per position. Log-probabilities are
``logits - logsumexp`` at those ids, and the gradient of the logits is analytic:

    d loss / d logits = a * softmax(logits) + b * softmax_real(logits) - (one-hot targets, weighted)

``supervised_loss_sums`` is the same pair of losses on given logits ``[N, V]`` (the logits, their
gradient and one chunk of work space): the reference the chunked head is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 2**24  # float32 logits per chunk of rows: 64 MiB (rows = CHUNK_ELEMENTS // V)
# ... but never fewer rows than this in the chunked head: with fewer, each chunk's matrix products
# re-read the whole [V, H] head for few rows and the step slows down (measured on CPU at V =
# 262,144: 64-row chunks 1.7x the logits path's step time, 256-row chunks 1.1x); 256 rows of a
# 262,144-row vocabulary are 256 MiB of float32 logits.
CHUNK_MIN_ROWS = 256


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


# --------------------------------------------------------------------------- chunked LM head


def head_chunk_rows(vocab: int, elements: int | None = None, min_rows: int | None = None) -> int:
    """Rows per chunk of the chunked head: ``elements`` (default ``CHUNK_ELEMENTS``) float32 logits,
    but at least ``min_rows`` (default ``CHUNK_MIN_ROWS``)."""
    budget = (CHUNK_ELEMENTS if elements is None else elements) // max(vocab, 1)
    return max(1, budget, CHUNK_MIN_ROWS if min_rows is None else min_rows)


def _chunk_logits(hidden, weight, bias, softcap):
    """Float32 logits of one chunk of rows: ``cap * tanh(z / cap)`` when soft-capped, else ``z``.

    ``z`` is computed in the inputs' dtype, as ``nn.Linear`` would; the cap in float32.
    """
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def _gathered(weight: torch.Tensor) -> bool:
    """Under ZeRO-3 outside its hooks a parameter may be partitioned: gather it (True if we did)."""
    status = getattr(weight, "ds_status", None)
    if status is not None and getattr(status, "name", None) == "NOT_AVAILABLE":
        weight.all_gather()
        return True
    return False


class _ChunkedHeadLosses(torch.autograd.Function):
    """(CLM sum, fusion sum) of ``hidden @ weight.T (+ bias)``, a chunk of rows at a time; see
    ``head_loss_sums``. Backward recomputes each chunk's logits: at most one chunk is ever held."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, weights, tokenizer_size, softcap, rows):  # type: ignore[override]
        n, vocab = hidden.shape[0], weight.shape[0]
        padded = tokenizer_size < vocab
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_real = torch.empty_like(lse_all) if padded else lse_all
        gold = torch.empty_like(lse_all)
        picked = torch.empty(weights.shape, dtype=torch.float32, device=hidden.device)
        with torch.no_grad():
            for start in range(0, n, rows):
                chunk = slice(start, start + rows)
                x = _chunk_logits(hidden[chunk], weight, bias, softcap)
                lse_all[chunk] = torch.logsumexp(x, dim=-1)
                if padded:
                    lse_real[chunk] = torch.logsumexp(x[:, :tokenizer_size], dim=-1)
                gold[chunk] = x.gather(1, labels[chunk].unsqueeze(1)).squeeze(1)
                picked[chunk] = x.gather(1, topk_ids[chunk].clamp(min=0))  # padding slots have weight 0
                del x
        clm = (lse_all - gold).sum()
        fusion = (weights.sum(1) * lse_real - (weights * picked).sum(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, topk_ids, weights, lse_all, lse_real)
        ctx.tokenizer_size, ctx.softcap, ctx.rows = tokenizer_size, softcap, rows
        return clm, fusion

    @staticmethod
    def backward(ctx, grad_clm, grad_fusion):  # type: ignore[override]
        hidden, weight, bias, labels, topk_ids, weights, lse_all, lse_real = ctx.saved_tensors
        size, softcap, rows = ctx.tokenizer_size, ctx.softcap, ctx.rows
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        padded, fusion = size < vocab, weights.shape[1] > 0
        real_weight = grad_fusion * weights.sum(1, keepdim=True)  # per row: 1, or 0 without targets
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # the weight's gradient is accumulated over chunks in the weight's dtype (one rounding per chunk)
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
        gathered = _gathered(weight)
        try:
            for start in range(0, n, rows):
                chunk = slice(start, start + rows)
                x = _chunk_logits(hidden[chunk], weight, bias, softcap)
                # d logits / d z of the soft cap, 1 - tanh^2, before x turns into the softmax
                slope = None if softcap is None else 1.0 - (x / softcap).square_()
                if padded and fusion:  # two softmaxes: every row (CLM), the tokenizer's ids (fusion)
                    real = (x[:, :size] - lse_real[chunk, None]).exp_().mul_(real_weight[chunk])
                    g = x.sub_(lse_all[chunk, None]).exp_().mul_(grad_clm)
                    g[:, :size] += real
                    del real
                else:  # one softmax serves both terms
                    g = x.sub_(lse_all[chunk, None]).exp_()
                    g.mul_(grad_clm + real_weight[chunk] if fusion else grad_clm)
                g.scatter_add_(1, labels[chunk].unsqueeze(1), (-grad_clm).expand(g.shape[0], 1))
                g.scatter_add_(1, topk_ids[chunk].clamp(min=0), -grad_fusion * weights[chunk])
                if slope is not None:
                    g.mul_(slope)
                    del slope
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                g = g.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[chunk] = g @ weight
                if grad_weight is not None:
                    grad_weight.addmm_(g.t(), hidden[chunk])
                del g, x
        finally:
            if gathered:
                weight.partition()
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def head_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    tokenizer_size: int,
    topk_ids: torch.Tensor | None = None,
    fused: torch.Tensor | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLM and fusion sums of the LM head's logits at N supervised positions, without the logits.

    ``hidden`` [N, H] are the final hidden states at the positions that predict a supervised token,
    ``weight`` [V, H] (and ``bias`` [V]) the head; the logits ``hidden @ weight.T + bias`` (then
    ``softcap * tanh(logits / softcap)`` where the model soft-caps, as Gemma-2) exist one chunk of
    ``chunk_rows`` rows at a time (default ``head_chunk_rows``: ``CHUNK_ELEMENTS`` float32 logits
    per chunk, at least ``CHUNK_MIN_ROWS`` rows), in
    forward and again in backward, which accumulates the gradients of ``hidden``, ``weight`` and
    ``bias``. Values and gradients are those of ``supervised_loss_sums`` on the logits: the CLM
    softmax over every row, the fusion softmax over the tokenizer's ids only, with ``fused`` [N, k]
    the weights of ``fused_weights`` at ``topk_ids`` (rows of zeros add nothing). Without
    ``topk_ids`` the fusion sum is 0.
    """
    if topk_ids is None or fused is None:
        topk_ids = labels.new_zeros(len(labels), 0)
        fused = torch.zeros(len(labels), 0, device=hidden.device)
    rows = chunk_rows or head_chunk_rows(weight.shape[0])
    if softcap is not None and not softcap > 0:
        raise ValueError(f"soft-capping needs a positive cap, not {softcap!r}")
    return _ChunkedHeadLosses.apply(
        hidden, weight, bias, labels, topk_ids, fused.float(), tokenizer_size, softcap, max(1, int(rows))
    )
