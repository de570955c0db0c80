"""Benchmark `fusion-train represent` on a real small model against a plain forward pass.

    .venv/bin/python bench/represent.py [--records 200] [--max-length 512] [--top-k 10]
        [--model smollm2|gemma3] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16]
        [--engine hf|vllm]

Model: SmolLM2-135M-Instruct or Gemma-3-270m (from the package index, converted once). Data:
the first N records of alpaca-eval 0.6.6's example outputs. Both sides run on the same device
in the same dtype (`fusion_train.inference`). Figures:
- supervised tokens per second of `represent` (encoding, scoring, writing: the parts' own
  timers) against a plain batched forward pass (`model(ids).logits`) over the same batches in
  the same run (goal: ratio >= 0.85);
- bytes on disk per supervised token against 1.15 x (6k + 12) (goal: at or below), and the
  reference layout (every sequence padded to 2048, int64 ids, float32 values) for scale;
- on a GPU, the peak GPU memory of each side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fusion_train.chat import load_conversations, resolve_chat_template
from fusion_train.encoding import ChatTokenizer, encode_conversation
from fusion_train.inference import InferenceSettings, Scorer, batches_by_length
from fusion_train.models import load_tokenizer
from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, gemma3_270m_dir, smollm2_instruct_dir
from fusion_train.represent import RepresentSettings, represent


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def plain_forward_seconds(
    model_dir: Path, data: Path, settings: RepresentSettings, batch_tokens: int, inference: InferenceSettings
) -> float:
    """Time `model(ids).logits` over exactly the batches `represent` builds (per chunk, by length)."""
    tokenizer = load_tokenizer(model_dir)
    scorer = Scorer.load(model_dir, inference)
    model, device = scorer.model, scorer.device
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
        batches.append((ids.to(device), mask.to(device)))
    model(batches[0][0][:1, :16])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask).logits.float()
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gpu_gib() -> float | None:
    """The peak GPU memory allocated since the last call, in GiB (and resets it); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def peak_gpu_memory() -> str:
    """``peak_gpu_gib`` for the printed figures; empty without a GPU."""
    peak = peak_gpu_gib()
    return "" if peak is None else f", peak GPU memory {peak:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--engine", choices=["hf", "vllm"], default="hf", help="represent's engine (vllm: a GPU)"
    )
    args = parser.parse_args()

    model_dir = smollm2_instruct_dir() if args.model == "smollm2" else gemma3_270m_dir()
    inference = InferenceSettings(device=args.device, dtype=args.dtype)
    records = json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[: args.records]
    settings = RepresentSettings(top_k=args.top_k, max_length=args.max_length, chunk_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(records))
        baseline = plain_forward_seconds(model_dir, data, settings, args.batch_tokens, inference)
        plain_memory = peak_gpu_memory()
        engine = replace(inference, engine=args.engine)
        summary = represent(model_dir, data, Path(tmp) / "out", settings, inference=engine,
                            batch_tokens=args.batch_tokens)  # fmt: skip
        ours_memory = peak_gpu_memory()
        disk = directory_bytes(Path(tmp) / "out" / "parts")

    tokens = summary.supervised_tokens
    ours, plain = tokens / summary.seconds, tokens / baseline
    per_token = disk / tokens
    goal = 1.15 * (6 * args.top_k + 12)
    reference = summary.represented * 2048 * (8 + args.top_k * (8 + 4)) / tokens
    placement = summary.placement
    print(
        f"{args.model}: records {summary.represented}, supervised tokens {tokens}, top-k {args.top_k}, "
        f"device {placement['device']}, dtype {placement['dtype']}, threads {torch.get_num_threads()}"
    )
    print(
        f"represent {args.engine:4} {ours:10.0f} supervised tokens/s ({summary.seconds:.1f} s, encode + score + write){ours_memory}"
    )
    print(
        f"plain forward  {plain:10.0f} supervised tokens/s ({baseline:.1f} s, model(ids).logits, same batches){plain_memory}"
    )
    print(f"ratio          {ours / plain:10.2f}  (goal >= 0.85)")
    print(
        f"disk           {per_token:10.1f} bytes per supervised token (goal <= {goal:.1f} = 1.15 x (6k + 12))"
    )
    print(f"reference      {reference:10.1f} bytes per supervised token (padded to 2048, int64 ids, float32)")


if __name__ == "__main__":
    main()
