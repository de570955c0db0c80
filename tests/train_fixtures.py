"""Fused-target directories for the training tests, and a dense reference of the training loss.

``build_fused`` writes the documented ``fusion-train fuse`` output (manifest.json + data/) from a
real tokenizer and hand-made top-k targets. ``dense_reference_losses`` is the loss the way the
reference code computes it: a dense [batch, length, vocab] target per sequence, a full
log-softmax, shifted labels. It shares nothing with ``fusion_train.losses``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer

from fusion_train.fused import fused_features
from fusion_train.models import tokenizer_hash

DIALOGUES = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello in Spanish.", "Hola! That is hello in Spanish."),
    ("What colour is the sky?", "On a clear day the sky is blue."),
    ("Count to three.", "One, two, three."),
    ("Give me a fruit.", "An apple is a fruit."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Which planet is red?", "Mars is the red planet."),
]


def _targets(gold: int, rng: np.random.Generator, top_k: int, vocab: int, pad: int) -> tuple[list, list]:
    """A sharp top-k distribution led by the gold token; the last ``pad`` slots are padding."""
    valid = top_k - pad
    others = rng.choice(np.setdiff1d(np.arange(3, min(vocab, 400)), [gold]), valid - 1, replace=False)
    ids = [gold, *others.tolist()] + [-1] * pad
    scores = np.sort(rng.normal(0.0, 1.0, valid))[::-1] + np.arange(valid, 0, -1)
    logprobs = scores - np.log(np.exp(scores).sum()) - 0.05  # a little mass outside the top k
    return ids, logprobs.tolist() + [-math.inf] * pad


def fused_rows(model_dir: Path, examples: int = 8, top_k: int = 4, seed: int = 0) -> list[dict]:
    """Rows of the fused format: prompt unsupervised, answers supervised (two runs in odd examples)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(examples):
        prompt, answer = DIALOGUES[index % len(DIALOGUES)]
        ids = tokenizer(f"User: {prompt}\nAssistant:")["input_ids"]
        starts, lengths = [], []
        turns = [answer] if index % 2 == 0 else [answer, "Anything else?"]
        for turn_index, turn in enumerate(turns):
            if turn_index:
                ids += tokenizer("\nUser: more\nAssistant:", add_special_tokens=False)["input_ids"]
            piece = [*tokenizer(" " + turn, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            starts.append(len(ids))
            lengths.append(len(piece))
            ids += piece
        topk_ids, topk_logprobs = [], []
        for start, length in zip(starts, lengths, strict=True):
            for position in range(start, start + length):
                pad = int(rng.integers(0, 2)) if top_k > 2 else 0
                row_ids, row_logprobs = _targets(ids[position], rng, top_k, len(tokenizer), pad)
                topk_ids.append(row_ids)
                topk_logprobs.append(row_logprobs)
        rows.append(
            {
                "id": f"ex{index}",
                "domain": "test",
                "input_ids": ids,
                "run_message": list(range(1, 2 * len(starts), 2)),
                "run_start": starts,
                "run_length": lengths,
                "topk_ids": topk_ids,
                "topk_logprobs": topk_logprobs,
                "winner": index % 2,
            }
        )
    return rows


def build_fused(
    model_dir: Path, out: Path, rows: list[dict] | None = None, top_k: int = 4, **manifest_overrides
) -> Path:
    """A ``fusion-train fuse`` output directory for the pivot at ``model_dir``."""
    from transformers import AutoConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = fused_rows(model_dir, top_k=top_k) if rows is None else rows
    out.mkdir(parents=True)
    pivot = {
        "path": str(model_dir),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "tokenizer_size": len(tokenizer),
        "vocab_size": AutoConfig.from_pretrained(model_dir).vocab_size,
    }
    manifest = {"format": "fusion-train/fused@1", "pivot": pivot, "top_k": top_k, "criterion": "min-ce"}
    manifest.update({"sources": [{"path": "source-a"}], **manifest_overrides})
    (out / "manifest.json").write_text(json.dumps(manifest))
    columns = {name: [row[name] for row in rows] for name in fused_features(top_k)}
    datasets.Dataset.from_dict(columns, features=fused_features(top_k)).save_to_disk(str(out / "data"))
    return out


def batch_from_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded input ids, attention mask and dense-reference inputs, built directly from the rows."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def dense_reference_losses(
    logits: torch.Tensor, rows: list[dict], tokenizer_size: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CLM and fusion losses from full [batch, length, vocab] logits, the reference way.

    Builds a dense target distribution per sequence (zeros except at the k fused ids), a full
    log-softmax over the tokenizer's rows for the fusion term, and the usual shifted cross-entropy
    over every row for the CLM term.
    """
    batch, length, vocab = logits.shape
    labels = torch.full((batch, length), -100, device=logits.device)
    dense_target = torch.zeros(batch, length, vocab, dtype=torch.float64, device=logits.device)
    for b, row in enumerate(rows):
        positions = [
            p for s, n in zip(row["run_start"], row["run_length"], strict=True) for p in range(s, s + n)
        ]
        for j, p in enumerate(positions):
            labels[b, p] = row["input_ids"][p]
            valid = [
                (i, lp) for i, lp in zip(row["topk_ids"][j], row["topk_logprobs"][j], strict=True) if i >= 0
            ]
            scaled = (
                torch.tensor([float(np.float16(lp)) for _, lp in valid], dtype=torch.float64) / temperature
            )
            probs = torch.softmax(scaled, dim=0)
            for (i, _), prob in zip(valid, probs, strict=True):
                dense_target[b, p - 1, i] += prob  # position p - 1 predicts token p
    shift_logits = logits[:, :-1].double()
    shift_labels = labels[:, 1:]
    clm = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, vocab), shift_labels.reshape(-1), ignore_index=-100
    )
    log_q = torch.log_softmax(logits[..., :tokenizer_size].double(), dim=-1)
    per_position = -(dense_target[..., :tokenizer_size] * log_q).sum(-1)
    supervised = torch.zeros(batch, length, dtype=torch.bool, device=logits.device)
    supervised[:, :-1] = shift_labels != -100
    fusion = per_position[supervised].mean()
    return clm, fusion


def dense_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: list[list[int]],
    topk_logprobs: list[list[float]],
    tokenizer_size: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CLM and fusion losses of logits [N, V], one row at a time, in float64.

    A row whose targets are all padding has no fused distribution: it adds nothing to the fusion
    sum (no normaliser, no log q). Written from the formula, sharing nothing with the loss code.
    """
    log_p = torch.log_softmax(logits.double(), dim=-1)
    log_q = torch.log_softmax(logits[:, :tokenizer_size].double(), dim=-1)
    clm = -log_p[torch.arange(len(labels)), labels].sum()
    fusion = logits.new_zeros((), dtype=torch.float64)
    for row, (ids, logprobs) in enumerate(zip(topk_ids, topk_logprobs, strict=True)):
        valid = [(i, lp) for i, lp in zip(ids, logprobs, strict=True) if i >= 0]
        if not valid:
            continue
        weights = torch.softmax(torch.tensor([lp for _, lp in valid], dtype=torch.float64) / temperature, 0)
        for (i, _), weight in zip(valid, weights, strict=True):
            fusion = fusion - weight * log_q[row, i]
    return clm, fusion


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def assert_left_no_rank_behind(monkeypatch, saved: dict[str, str]) -> None:
    """After a stage ran in this process (a world of one): the environment is as before it, with
    none of a launched rank's variables, so the launcher still starts (its start is replaced here:
    nothing runs)."""
    import os

    from fusion_train import launch

    assert not set(RANK_VARIABLES) & set(os.environ), [k for k in RANK_VARIABLES if k in os.environ]
    assert dict(os.environ) == saved
    started = []
    with monkeypatch.context() as patch:  # the ranks' start as it was for what follows
        patch.setattr(launch, "launch_on_this_machine", lambda module, *_: started.append(module) or 0)
        assert launch.launch("fusion_train.train", [], 2, None, None) == 0
    assert started == ["fusion_train.train"]
