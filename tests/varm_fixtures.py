"""Tiny Llama checkpoints for the VaRM tests, and an independent by-hand VaRM.

The by-hand code here is deliberately written from the formula (numpy, float64) and shares
nothing with `varm_merge`, so the tests compare two separate implementations.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 48


def tiny_config(vocab_size: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose vocabulary matches the model's rows exactly."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(path)


def save_model(path: Path, state: dict[str, torch.Tensor], config: LlamaConfig) -> Path:
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path, config.vocab_size)
    return path


def make_base(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Norm weights start at exactly 1; give them some spread so relative checks are meaningful.
    for tensor in state.values():
        if tensor.ndim == 1:
            tensor.add_(0.1 * torch.randn_like(tensor))
    save_model(path, state, tiny_config())
    return state


def make_target(
    path: Path, base: dict[str, torch.Tensor], seed: int, zero: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Base plus noise at a different random scale per matrix (10^-3 .. 10^-1).

    Scales differ by matrix and by target, so every tensor has a clear winner; names in `zero`
    are left identical to the base.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in base.items():
        if name in zero:
            state[name] = tensor.clone()
            continue
        scale = 10 ** (-3 + 2 * torch.rand((), generator=gen).item())
        state[name] = tensor + scale * torch.randn(tensor.shape, generator=gen)
    save_model(path, state, tiny_config())
    return state


def load_numpy(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(file).items()})
    return out


def _normalise(scores: np.ndarray, priors: np.ndarray, epsilon: float = 0.0) -> np.ndarray:
    """p_k s_k / sum_j p_j s_j, or p / sum(p) where sum_j p_j s_j <= epsilon * sum(p) (README)."""
    p = priors.reshape((-1,) + (1,) * (scores.ndim - 1))
    prior_scores = scores * p
    total = prior_scores.sum(axis=0)
    fallback = total <= epsilon * priors.sum()
    uniform = np.broadcast_to(p / priors.sum(), prior_scores.shape)
    return np.where(fallback, uniform, prior_scores / np.where(fallback, 1.0, total))


def by_hand_matrix_weights(base: np.ndarray, targets: list[np.ndarray], priors: np.ndarray) -> np.ndarray:
    scores = np.array([np.mean((t - base) ** 2) for t in targets])
    return _normalise(scores, priors)


def group_name(name: str, granularity: str) -> str:
    """The README's grouping: one group per ``layers.N.``, or the whole model; else the tensor alone."""
    if granularity == "model":
        return "all"
    if granularity == "layer":
        match = re.search(r"layers\.(\d+)\.", name)
        return f"layer {match.group(1)}" if match else name
    return name


def by_hand_scores(
    base: dict[str, np.ndarray], targets: list[dict[str, np.ndarray]], granularity: str
) -> dict[str, np.ndarray]:
    """Per tensor, its group's score per target: the group's sum of squared deltas / its size."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name in sorted(base):
        g = group_name(name, granularity)
        sq = np.array([np.sum((t[name] - base[name]) ** 2) for t in targets])
        sums[g] = sums.get(g, 0) + sq
        counts[g] = counts.get(g, 0) + base[name].size
    return {
        name: sums[group_name(name, granularity)] / counts[group_name(name, granularity)] for name in base
    }


def by_hand_merge(
    base: dict[str, np.ndarray],
    targets: list[dict[str, np.ndarray]],
    granularity: str,
    priors: list[float] | None = None,
    epsilon: float = 0.0,
) -> dict[str, np.ndarray]:
    """theta_0 + sum_k w_k * (theta_k - theta_0), with w from the mean squared deltas of each group."""
    p = np.ones(len(targets)) if priors is None else np.asarray(priors, dtype=np.float64)
    scores = by_hand_scores(base, targets, granularity)
    merged = {}
    for name in sorted(base):
        deltas = np.stack([t[name] - base[name] for t in targets])
        if granularity == "element":
            w = _normalise(deltas**2, p, epsilon)
        else:
            w = _normalise(scores[name], p, epsilon).reshape((-1,) + (1,) * base[name].ndim)
        merged[name] = base[name] + np.sum(w * deltas, axis=0)
    return merged


def make_wide_target(
    path: Path, base: dict[str, torch.Tensor], seed: int, extra: int
) -> dict[str, torch.Tensor]:
    """A target whose tokenizer and vocabulary rows grew by `extra` tokens (appended at the end)."""
    gen = torch.Generator().manual_seed(seed)
    state = {name: t + 0.01 * torch.randn(t.shape, generator=gen) for name, t in base.items()}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.randn((extra, state[name].shape[1]), generator=gen)
        state[name] = torch.cat([state[name], rows])
    save_model(path, state, tiny_config(VOCAB + extra))
    return state


def make_tied_family(root: Path, targets: int = 2) -> list[Path]:
    """A pivot and targets with tied embeddings (as SmolLM2): the checkpoints hold no lm_head."""
    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(10)
    base = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    base.pop("lm_head.weight")
    paths = []
    for k in range(targets + 1):
        gen = torch.Generator().manual_seed(100 + k)
        scales = {
            name: 0.0 if k == 0 else 10 ** (-3 + 2 * torch.rand((), generator=gen).item()) for name in base
        }
        state = {name: t + scales[name] * torch.randn(t.shape, generator=gen) for name, t in base.items()}
        model = LlamaForCausalLM(config)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        paths.append(root / ("base" if k == 0 else f"t{k}"))
        model.save_pretrained(paths[-1], safe_serialization=True)
        save_tokenizer(paths[-1], config.vocab_size)
    return paths
