"""Benchmark `fusion-train represent` on a real small model against a plain forward pass.

    .venv/bin/python bench/represent.py [--records 200] [--max-length 512] [--top-k 10]

Model: SmolLM2-135M-Instruct (from the package index, converted once). Data: the first N
records of alpaca-eval 0.6.6's example outputs. Figures:
- supervised tokens per second of `represent` (encoding, scoring, writing: the parts' own
  timers) against a plain batched forward pass (`model(ids).logits`) over the same batches in
  the same run (goal: ratio >= 0.85);
- bytes on disk per supervised token against 1.15 x (6k + 12) (goal: at or below), and the
  reference layout (every sequence padded to 2048, int64 ids, float32 values) for scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fusion_train.chat import load_conversations, resolve_chat_template
from fusion_train.models import load_model, load_tokenizer
from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, smollm2_instruct_dir
from fusion_train.represent import (
    ChatTokenizer,
    RepresentSettings,
    batches_by_length,
    encode_conversation,
    represent,
)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def plain_forward_seconds(
    model_dir: Path, data: Path, settings: RepresentSettings, batch_tokens: int
) -> float:
    """Time `model(ids).logits` over exactly the batches `represent` builds (per chunk, by length)."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    template, _ = resolve_chat_template(tokenizer, None)
    chat = ChatTokenizer.of(tokenizer, template)
    encoded = [
        e
        for conv in load_conversations(data)
        if not isinstance(e := encode_conversation(chat, conv, settings.max_length, "truncate"), str)
    ]
    chunks = [encoded[i : i + settings.chunk_size] for i in range(0, len(encoded), settings.chunk_size)]
    batches = []
    for batch in (b for chunk in chunks for b in batches_by_length(chunk, batch_tokens)):
        longest = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for row, example in enumerate(batch):
            ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
            mask[row, : len(example.input_ids)] = 1
        batches.append((ids, mask))
    model(batches[0][0][:1, :16])  # warm-up
    started = time.perf_counter()
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask).logits.float()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()

    model_dir = smollm2_instruct_dir()
    records = json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[: args.records]
    settings = RepresentSettings(top_k=args.top_k, max_length=args.max_length, chunk_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(records))
        baseline = plain_forward_seconds(model_dir, data, settings, args.batch_tokens)
        summary = represent(model_dir, data, Path(tmp) / "out", settings, batch_tokens=args.batch_tokens)
        disk = directory_bytes(Path(tmp) / "out" / "parts")

    tokens = summary.supervised_tokens
    ours, plain = tokens / summary.seconds, tokens / baseline
    per_token = disk / tokens
    goal = 1.15 * (6 * args.top_k + 12)
    reference = summary.represented * 2048 * (8 + args.top_k * (8 + 4)) / tokens
    print(
        f"records {summary.represented}, supervised tokens {tokens}, top-k {args.top_k}, threads {torch.get_num_threads()}"
    )
    print(
        f"represent      {ours:10.0f} supervised tokens/s ({summary.seconds:.1f} s, encode + score + write)"
    )
    print(
        f"plain forward  {plain:10.0f} supervised tokens/s ({baseline:.1f} s, model(ids).logits, same batches)"
    )
    print(f"ratio          {ours / plain:10.2f}  (goal >= 0.85)")
    print(
        f"disk           {per_token:10.1f} bytes per supervised token (goal <= {goal:.1f} = 1.15 x (6k + 12))"
    )
    print(f"reference      {reference:10.1f} bytes per supervised token (padded to 2048, int64 ids, float32)")


if __name__ == "__main__":
    main()
