"""The training losses at supervised positions: causal-LM cross-entropy and the sparse fusion loss.

Training uses ``head_loss_sums``: from the final hidden states at the N supervised positions
(``[N, H]``) and the LM head (``[V, H]`` weight, optional bias) straight to the loss, one autograd
function that computes the logits a chunk of rows at a time and, while it holds a chunk, that
chunk's share of the gradients of the hidden states and of the head (backward only scales them).
The ``[N, V]`` logits never exist; the extra memory is one chunk of logits and its work space
(``--loss-chunk-tokens`` rows), the float32 gradients of the hidden states and the head, and
O(N * k) besides. No dense target exists either: the fused distribution stays k ids and k weights
per position. Log-probabilities are ``logits - logsumexp`` at those ids, and the gradient of the
logits is analytic:

    d loss / d logits = a * softmax(logits) + b * softmax_real(logits) - (one-hot targets, weighted)

tests/logits_losses.py holds the same pair of losses on whole logits ``[N, V]``: the reference the
chunked head is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows (supervised tokens) per chunk of the chunked head, the default of --loss-chunk-tokens. Each
# chunk holds 4 bytes x rows x V of float32 logits (256 MiB at 256 rows of a 262,144-row
# vocabulary); each chunk's matrix products re-read the whole [V, H] head and update its float32
# gradient, so fewer rows slow the step. Measured on CPU (2026-11-29, N = 2,048, V = 262,144,
# H = 576), step time over the loss on whole logits: 128 rows 0.92x, 256 rows 0.81x, 512 rows
# 0.78x, 1,024 rows 0.71x. 256 keeps a chunk below a quarter of a 2,048-token micro-batch's logits.
CHUNK_TOKENS = 256


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


# --------------------------------------------------------------------------- chunked LM head


def _accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``out`` float32; bf16 factors are multiplied in bf16 (one [V, H]
    product per chunk: PyTorch has no bf16 x bf16 -> float32 product on CPU)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def _chunk_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    fused: torch.Tensor,
    tokenizer_size: int,
    softcap: float | None,
    loss_weights: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CLM sum, fusion sum) of one chunk of rows, and with ``loss_weights`` (clm_weight,
    fusion_weight) the float32 gradient of ``clm_weight * CLM + fusion_weight * fusion`` with
    respect to the chunk's pre-cap logits ``z``. Computed in place: the chunk's logits become
    that gradient, so one chunk of logits exists (two with soft-capping)."""
    x = torch.nn.functional.linear(hidden, weight, bias).float()  # z in the inputs' dtype, as nn.Linear
    tanh = None
    if softcap is not None:
        tanh = x.div_(softcap).tanh_()
        x = tanh * softcap
    ids = topk_ids.clamp(min=0)  # padding slots have weight 0
    gold, picked = x.gather(1, labels[:, None]).squeeze(1), x.gather(1, ids)
    split = tokenizer_size < x.shape[1] and fused.shape[1] > 0  # the fusion softmax covers fewer rows
    top = x.amax(1, keepdim=True)
    e = x.sub_(top).exp_()  # exp(logits - max)
    total_all = e.sum(1)
    total_real = e[:, :tokenizer_size].sum(1) if split else total_all
    targets = fused.sum(1)  # per row: 1, or 0 for a row without a valid target
    clm = (top.squeeze(1) + total_all.log() - gold).sum()
    fusion = (targets * (top.squeeze(1) + total_real.log()) - (fused * picked).sum(1)).sum()
    if loss_weights is None:
        return clm, fusion, None
    # d loss / d logits = clm_weight * (softmax - one-hot label)
    #                     + fusion_weight * (targets * softmax over the tokenizer's ids - P_fused at the ids)
    clm_weight, fusion_weight = loss_weights
    to_all = clm_weight / total_all
    to_real = fusion_weight * targets / total_real
    if split:
        e[:, :tokenizer_size].mul_((to_all + to_real)[:, None])
        e[:, tokenizer_size:].mul_(to_all[:, None])
    else:
        e.mul_((to_all + to_real)[:, None])
    e.scatter_add_(1, labels[:, None], e.new_full((len(labels), 1), -clm_weight))
    e.scatter_add_(1, ids, -fusion_weight * fused)
    if tanh is not None:  # d (cap * tanh(z / cap)) / dz = 1 - tanh^2
        e.mul_(tanh.square_().neg_().add_(1.0))
    return clm, fusion, e


class _ChunkedHeadLoss(torch.autograd.Function):
    """``clm_weight * CLM + fusion_weight * fusion`` of ``hidden @ weight.T (+ bias)``, with the CLM
    and fusion sums beside it (not differentiable); see ``head_loss_sums``.

    Forward computes each chunk's logits once and, while it holds them, the chunk's share of the
    loss's gradients with respect to the hidden states, the weight and the bias (as Liger Kernel's
    fused linear cross-entropy does); backward only multiplies them by the loss's incoming
    gradient. That is exact for any caller that scales the loss (a mean over tokens, gradient
    accumulation, a loss scale: d(s * loss) = s * d loss). Only the loss is differentiable, so a
    gradient through just one of the two sums, which the stored gradients cannot give, is refused by
    autograd; weigh the sums when calling instead (``clm_weight=0`` for the fusion term alone).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden,
        weight,
        bias,
        labels,
        topk_ids,
        fused,
        tokenizer_size,
        clm_weight,
        fusion_weight,
        softcap,
        chunk_tokens,
        track,
    ):
        need_hidden, need_weight, need_bias = (track and need for need in ctx.needs_input_grad[:3])
        f32 = {"dtype": torch.float32, "device": hidden.device}
        # float32 gradients, held from forward to backward: [N, H], [V, H] and [V]
        grad_hidden = torch.empty(hidden.shape, **f32) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, **f32) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], **f32) if need_bias else None
        loss_weights = (clm_weight, fusion_weight) if need_hidden or need_weight or need_bias else None
        clm, fusion = torch.zeros((), **f32), torch.zeros((), **f32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows]
            chunk_clm, chunk_fusion, g = _chunk_head(
                h,
                weight,
                bias,
                labels[rows],
                topk_ids[rows],
                fused[rows],
                tokenizer_size,
                softcap,
                loss_weights,
            )
            clm += chunk_clm
            fusion += chunk_fusion
            if g is None:
                continue
            if grad_bias is not None:
                grad_bias += g.sum(0)
            g = g.to(hidden.dtype)  # the products in the inputs' dtype, as nn.Linear's backward
            if grad_hidden is not None:
                grad_hidden[rows] = g @ weight
            if grad_weight is not None:
                _accumulate_product(grad_weight, g.t(), h)
            del g  # before the next chunk's logits exist
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = clm_weight * clm + fusion_weight * fusion
        ctx.mark_non_differentiable(clm, fusion)
        return loss, clm, fusion

    @staticmethod
    def backward(ctx, grad_loss, grad_clm, grad_fusion):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("the chunked head's loss can be differentiated only once (no retain_graph)")
        grads, ctx.grads = ctx.grads, None  # scaled in place and handed over
        scaled = [
            None if g is None else g.mul_(grad_loss).to(t) for g, t in zip(grads, ctx.dtypes, strict=True)
        ]
        return (*scaled, *[None] * 9)


def head_loss_sums(
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
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, clm, fusion)`` of the LM head's logits at N supervised positions, without the logits.

    ``hidden`` [N, H] are the final hidden states at the positions that predict a supervised token,
    ``weight`` [V, H] (and ``bias`` [V]) the head. ``clm`` and ``fusion`` are the sums of
    the cross-entropies on the logits ``hidden @ weight.T + bias`` (then
    ``softcap * tanh(logits / softcap)`` where the model soft-caps, as Gemma-2): the CLM softmax
    over every row, the fusion softmax over the tokenizer's ids only, with ``fused`` [N, k] the
    weights of ``fused_weights`` at ``topk_ids`` (rows of zeros add nothing; without ``topk_ids``
    the fusion sum is 0). ``loss = clm_weight * clm + fusion_weight * fusion`` is the one
    differentiable output: its gradients are computed in forward, see ``_ChunkedHeadLoss``.

    Memory: the logits exist ``chunk_tokens`` rows at a time (4 bytes x ``chunk_tokens`` x V per
    float32 chunk, up to twice that with soft-capping or bf16 inputs); the float32 gradients of
    ``hidden`` [N, H], ``weight`` [V, H] (and ``bias``) are held from forward to backward.
    """
    if topk_ids is None or fused is None:
        topk_ids = labels.new_zeros(len(labels), 0)
        fused = torch.zeros(len(labels), 0, device=hidden.device)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"soft-capping needs a positive cap, not {softcap!r}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens!r}")
    return _ChunkedHeadLoss.apply(
        hidden,
        weight,
        bias,
        labels,
        topk_ids,
        fused.float(),
        tokenizer_size,
        float(clm_weight),
        float(fusion_weight),
        softcap,
        int(chunk_tokens),
        torch.is_grad_enabled(),
    )
