"""Benchmark token alignment on real tokenizer pairs and real chat responses.

    .venv/bin/python bench/align.py [--records 300] [--dtw-records 30] [--mass-records 40]

Pivot: SmolLM2-135M-Instruct's tokenizer; sources: Mistral (SentencePiece), Qwen (tiktoken BPE)
and Gemma-3 (262k SentencePiece-style). Data: alpaca-eval 0.6.6's example outputs.
Figures:
- share of pivot supervised tokens aligned one-to-one by spans (goal >= 90%);
- pivot tokens per second of span alignment against the reference DTW in the same run, on the
  responses as they are and on 4x longer ones (goal: >= 500x, and spans linear in length);
- share of top-k probability mass that maps to pivot ids for real Gemma-3 distributions aligned
  onto SmolLM2 (goal >= 95%), through the full represent -> align stages.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from fusion_train import vocab
from fusion_train.align import align, align_by_dtw, align_by_spans, span_keys, token_strings
from fusion_train.chat import normalise_record, resolve_chat_template
from fusion_train.registry_assets import (
    ALPACA_EVAL_OUTPUTS,
    fetch,
    gemma3_270m_dir,
    real_tokenizer_dir,
    smollm2_instruct_dir,
)
from fusion_train.represent import RepresentSettings, encode_conversation, position_runs, represent


def arrays(example) -> dict[str, np.ndarray]:
    run_message, run_start, run_length = position_runs(example.positions, example.messages)
    return {
        "run_message": np.array(run_message),
        "run_start": np.array(run_start),
        "run_length": np.array(run_length),
        "char_start": np.array(example.char_start),
        "char_end": np.array(example.char_end),
        "input_ids": np.array(example.input_ids),
    }


def encode_all(tokenizer_dir: Path, records: list[dict]) -> tuple[list[dict], list[str]]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template, _ = resolve_chat_template(tokenizer, None)
    encoded = [
        encode_conversation(tokenizer, template, normalise_record(r), 100_000, "truncate") for r in records
    ]
    return [arrays(e) for e in encoded], token_strings(vocab.token_bytes(tokenizer, template))


def compare_speed(pivot, source, pivot_text, source_text, count: int) -> tuple[float, float, int]:
    """Seconds per pivot token for spans and for DTW over the first ``count`` examples."""
    tokens = sum(len(p["char_start"]) for p in pivot[:count])
    started = time.perf_counter()
    for _ in range(20):  # spans are fast: repeat for a measurable time
        for p, s in zip(pivot[:count], source[:count], strict=True):
            align_by_spans(span_keys(p), span_keys(s))
    spans = (time.perf_counter() - started) / 20
    started = time.perf_counter()
    for p, s in zip(pivot[:count], source[:count], strict=True):
        align_by_dtw(p, s, pivot_text, source_text)
    dtw = time.perf_counter() - started
    return tokens / spans, tokens / dtw, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--dtw-records", type=int, default=30)
    parser.add_argument("--mass-records", type=int, default=40)
    args = parser.parse_args()

    outputs = json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())
    records = outputs[: args.records]
    longer = [  # the same kind of text, 4x longer: four responses joined
        {
            "instruction": r["instruction"],
            "output": "\n\n".join(o["output"] for o in outputs[4 * i : 4 * i + 4]),
        }
        for i, r in enumerate(outputs[: args.dtw_records])
    ]
    pivot_dir = smollm2_instruct_dir()
    sources = {
        "mistral": real_tokenizer_dir("mistral"),
        "qwen": real_tokenizer_dir("qwen"),
        "gemma3": gemma3_270m_dir(),
    }
    pivot, pivot_text = encode_all(pivot_dir, records)
    pivot_long, _ = encode_all(pivot_dir, longer)
    print(f"pivot SmolLM2 tokenizer, {len(records)} alpaca-eval responses")
    print(
        f"{'source':8} {'1:1 share':>9} {'spans tok/s':>12} {'dtw tok/s':>10} {'speed-up':>9} {'4x: spans':>10} {'4x: dtw':>9} {'4x speed-up':>11}"
    )
    for name, source_dir in sources.items():
        source, source_text = encode_all(source_dir, records)
        source_long, _ = encode_all(source_dir, longer)
        total = sum(len(p["char_start"]) for p in pivot)
        aligned = sum(
            len(align_by_spans(span_keys(p), span_keys(s))[0]) for p, s in zip(pivot, source, strict=True)
        )
        spans, dtw, _ = compare_speed(pivot, source, pivot_text, source_text, args.dtw_records)
        spans_long, dtw_long, _ = compare_speed(
            pivot_long, source_long, pivot_text, source_text, args.dtw_records
        )
        print(
            f"{name:8} {aligned / total:9.1%} {spans:12.0f} {dtw:10.0f} {spans / dtw:8.0f}x "
            f"{spans_long:10.0f} {dtw_long:9.0f} {spans_long / dtw_long:10.0f}x"
        )

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(records[: args.mass_records]))
        settings = RepresentSettings(top_k=10, max_length=1024)
        represent(pivot_dir, data, Path(tmp) / "pivot", settings, progress=False)
        represent(gemma3_270m_dir(), data, Path(tmp) / "gemma", settings, progress=False)
        for method in ("exact", "mined"):
            report = align(
                Path(tmp) / "pivot", Path(tmp) / "gemma", Path(tmp) / method, vocab_map=method, progress=False
            )
            print(
                f"gemma3 -> SmolLM2 real distributions, {report['examples_aligned']} examples, --vocab-map {method}: "
                f"1:1 {report['tokens_aligned_share']:.1%}, mapped top-k mass {report['mapped_topk_mass_share']:.1%}, "
                f"align stage {report['seconds']:.1f} s"
            )


if __name__ == "__main__":
    main()
