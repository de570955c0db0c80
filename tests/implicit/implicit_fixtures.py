"""Tiny models with SmolLM2's real tokenizer for the implicit-fusion stages, built so that what
they generate or score can be predicted by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification


def tiny_config(tokenizer: object, **extra: object) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_stopper(tokenizer_dir: Path, out: Path, stop_probability: float) -> Path:
    """A model that ends its turn with ``stop_probability`` at every step (at temperature 1, top-p 1)
    and otherwise says any other token with equal probability, whatever the context.

    The attention and MLP outputs are zero and every token embeds to the same vector, so the final
    hidden state is the same everywhere; the LM head gives the end-of-turn token logit L and every
    other token 0, with exp(L) / (exp(L) + V - 1) = stop_probability.
    """
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(tokenizer)
    model = LlamaForCausalLM(config)
    vocab = config.vocab_size
    logit = math.log(stop_probability * (vocab - 1) / (1 - stop_probability))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        # The final norm maps the all-ones state to (nearly) all ones: 1 / sqrt(1 + eps).
        normed = 1.0 / math.sqrt(1.0 + config.rms_norm_eps)
        model.lm_head.weight[tokenizer.eos_token_id] = logit / (config.hidden_size * normed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_scripted(tokenizer_dir: Path, out: Path, follows: dict[str, str]) -> Path:
    """A model that says token ``follows[t]`` after token ``t`` (given as token strings), with
    probability 1 to float precision, and any token with equal probability after any other token.

    As in :func:`build_stopper` the layers add nothing, so the final hidden state is the normed
    embedding of the current token: token t's embedding is the unit vector e_j (j its place in
    ``follows``), which the final norm scales to about sqrt(hidden) e_j, and the LM head's row of
    ``follows[t]`` is 50 e_j: a logit of about 200 against 0 for every other token. Other tokens
    embed to zero, which gives every token the logit 0."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(tokenizer)
    vocabulary = tokenizer.get_vocab()
    assert len(follows) <= config.hidden_size and all(t in vocabulary for t in [*follows, *follows.values()])
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for j, (token, following) in enumerate(follows.items()):
            model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids(token), j] = 1.0
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(following), j] = 50.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_reward_model(
    tokenizer_dir: Path, out: Path, labels: list[str] | None = None, seed: int = 0
) -> Path:
    """A random sequence-classification model (one output, or one per label name)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra: dict[str, object] = {"num_labels": 1}
    if labels:
        extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    torch.manual_seed(seed)
    LlamaForSequenceClassification(tiny_config(tokenizer, **extra)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def build_gated_reward_model(
    tokenizer_dir: Path, out: Path, labels: list[str], seed: int = 0, declared: bool = True, **extra: object
) -> Path:
    """An ArmoRM-like reward model with its own code (``gated_reward_modeling.py``, copied in as
    ``modeling_gated.py`` and named by auto_map): ``.score`` is the reward, ``.logits`` one column
    per label. ``declared=False`` drops the forward's return annotation."""
    import importlib

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    modeling = importlib.import_module("gated_reward_modeling")
    config = tiny_config(
        tokenizer,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
        auto_map={"AutoModelForSequenceClassification": "modeling_gated.GatedRewardModel"},
        **extra,
    )
    torch.manual_seed(seed)
    modeling.GatedRewardModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = Path(modeling.__file__).read_text(encoding="utf-8")
    if not declared:
        source = source.replace(") -> GatedRewardOutput:", "):")
    (out / "modeling_gated.py").write_text(source, encoding="utf-8")
    return out
