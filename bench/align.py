"""Benchmark token alignment on real tokenizer pairs and real chat responses.

    .venv/bin/python bench/align.py [--records 300] [--dtw-records 30] [--mass-records 40]

Pivot: SmolLM2-135M-Instruct's tokenizer; sources: Mistral (SentencePiece), Qwen (tiktoken BPE)
and Gemma-3 (262k SentencePiece-style). Data: alpaca-eval 0.6.6's example outputs.
Figures:
- share of pivot supervised tokens aligned one-to-one by byte spans (goal >= 90%), the pairs the
  former rule (spans clipped to the answer, bytes not compared) made that cover other bytes, and
  how many answers' first tokens are paired;
- pivot tokens per second of span alignment against the reference DTW in the same run, on the
  responses as they are and on 4x longer ones (goal: >= 500x, and spans linear in length);
- ``--token-align bytes`` against ``spans``: the share of pivot tokens with a source distribution
  where the source's stored top-k holds its own gold token (synthetic top-k: the gold token and
  nine others; goal >= 99%), by case (same span, same start, inside a source token) and for the
  answers' first tokens, and the per-example work of the align stage (placing and moving the
  distributions) in pivot tokens per second, on all responses as they are and 4x longer (goal:
  within 2x of spans), and the time to build the byte-continuation tables (once per pair, cached);
- share of top-k probability mass that maps to pivot ids for real Gemma-3 distributions aligned
  onto SmolLM2 (goal >= 95%), through the full represent -> align stages, spans and bytes, and
  what the converted distributions give the pivot's gold tokens, by case and by the source mass
  they rest on (what ``fuse --min-source-mass`` is chosen from).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from fusion_train import continuations, vocab
from fusion_train.align import (
    Aligner,
    align,
    align_by_dtw,
    align_by_spans,
    gold_ids,
    span_keys,
    supervised_positions,
    token_codes,
    token_strings,
)
from fusion_train.chat import normalise_record, resolve_chat_template
from fusion_train.encoding import ChatTokenizer, EncodedExample, encode_conversation
from fusion_train.registry_assets import (
    ALPACA_EVAL_OUTPUTS,
    fetch,
    gemma3_270m_dir,
    real_tokenizer_dir,
    smollm2_instruct_dir,
)
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import example_arrays, load_representation, position_runs

TOP_K = 10


def arrays(example: EncodedExample) -> dict[str, np.ndarray]:
    run_message, run_start, run_length = position_runs(example.positions, example.messages)
    return {
        "run_message": np.array(run_message),
        "run_start": np.array(run_start),
        "run_length": np.array(run_length),
        "byte_start": np.array(example.byte_start),
        "byte_end": np.array(example.byte_end),
        "input_ids": np.array(example.input_ids),
    }


def encode_all(tokenizer_dir: Path, records: list[dict]) -> tuple[list[dict], vocab.TokenBytes]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template, _ = resolve_chat_template(tokenizer, None)
    chat = ChatTokenizer.of(tokenizer, template)
    encoded = [encode_conversation(chat, normalise_record(r), 100_000, "truncate") for r in records]
    return [arrays(e) for e in encoded], vocab.token_bytes(tokenizer, template)


def with_gold_topk(examples: list[dict], vocab_size: int, seed: int = 0) -> list[dict]:
    """The examples with a synthetic stored top-k per supervised token that holds the token itself
    (probability 0.5) and nine other ids (0.05 each): what coverage and speed need, no model."""
    rng = np.random.default_rng(seed)
    out = []
    for example in examples:
        gold = example["input_ids"][supervised_positions(example)]
        ids = np.concatenate([gold[:, None], rng.integers(0, vocab_size, (len(gold), TOP_K - 1))], axis=1)
        logprobs = np.log(np.array([0.5] + [0.05] * (TOP_K - 1)))
        out.append({**example, "topk_ids": ids, "topk_logprobs": np.broadcast_to(logprobs, ids.shape),
                    "target_logprob": np.full(len(gold), np.log(0.5))})  # fmt: skip
    return out


def span_pairs(p: dict, s: dict, pivot_table: np.ndarray, source_table: np.ndarray) -> np.ndarray:
    """What the align stage does per example: byte spans plus the tokens' bytes."""
    pivot_codes = pivot_table[p["input_ids"][supervised_positions(p)]]
    source_codes = source_table[s["input_ids"][supervised_positions(s)]]
    return align_by_spans(span_keys(p), span_keys(s), pivot_codes, source_codes)[0]


def compare_speed(pivot, source, pivot_bytes, source_bytes, count: int) -> tuple[float, float]:
    """Pivot tokens per second for spans and for DTW over the first ``count`` examples."""
    pivot_table, source_table = token_codes(pivot_bytes, source_bytes)
    pivot_text, source_text = token_strings(pivot_bytes), token_strings(source_bytes)
    tokens = sum(len(p["byte_start"]) for p in pivot[:count])
    started = time.perf_counter()
    for _ in range(20):  # spans are fast: repeat for a measurable time
        for p, s in zip(pivot[:count], source[:count], strict=True):
            span_pairs(p, s, pivot_table, source_table)
    spans = (time.perf_counter() - started) / 20
    started = time.perf_counter()
    for p, s in zip(pivot[:count], source[:count], strict=True):
        align_by_dtw(p, s, pivot_text, source_text, pivot_table, source_table)
    dtw = time.perf_counter() - started
    return tokens / spans, tokens / dtw


def coverage(
    pivot: list[dict], source: list[dict], aligners: dict[str, Aligner], mapping: vocab.VocabMap
) -> dict:
    """Pivot tokens with a source distribution per method, and bytes' cases."""
    found = {name: 0 for name in aligners} | dict.fromkeys(("same", "start", "longer", "inside", "first"), 0)
    for p, s in zip(pivot, source, strict=True):
        for name, aligner in aligners.items():
            rows, places = aligner.rows(p, s, mapping)
            found[name] += len(rows.pivot_index)
            if places is None:
                continue
            written = np.isin(places.pivot_index, rows.pivot_index)
            start = written & ~places.same_span & (places.offset == 0)
            found["same"] += int((written & places.same_span).sum())
            found["start"] += int(start.sum())
            found["inside"] += int((written & (places.offset > 0)).sum())
            # a pivot token that ends past the source token it starts with: several source tokens
            found["longer"] += int(
                (p["byte_end"][places.pivot_index] > s["byte_end"][places.source_index])[start].sum()
            )
            found["first"] += int(0 in rows.pivot_index.tolist())
    return found


def per_example_rates(
    pivot: list[dict], source: list[dict], aligners: dict[str, Aligner], mapping: vocab.VocabMap
) -> dict[str, float]:
    """Pivot tokens per second of the align stage's per-example work (placing and moving the
    distributions; reading and writing left out) for each method: passes alternate between the
    methods, so that load from other jobs hits both alike, and the best of five counts."""
    tokens = sum(len(p["byte_start"]) for p in pivot)
    best = dict.fromkeys(aligners, np.inf)
    for _ in range(5):
        for name, aligner in aligners.items():
            started = time.perf_counter()
            for p, s in zip(pivot, source, strict=True):
                aligner.rows(p, s, mapping)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: tokens / seconds for name, seconds in best.items()}


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
        for i, r in enumerate(outputs[: max(args.dtw_records, args.records // 4)])
    ]  # DTW times the first --dtw-records of them, bytes against spans all
    pivot_dir = smollm2_instruct_dir()
    sources = {
        "mistral": real_tokenizer_dir("mistral"),
        "qwen": real_tokenizer_dir("qwen"),
        "gemma3": gemma3_270m_dir(),
    }
    pivot, pivot_bytes = encode_all(pivot_dir, records)
    pivot_long, _ = encode_all(pivot_dir, longer)
    print(f"pivot SmolLM2 tokenizer, {len(records)} alpaca-eval responses")
    print(
        f"{'source':8} {'1:1 share':>9} {'refused':>8} {'1st token':>9} {'spans tok/s':>12} {'dtw tok/s':>10} "
        f"{'speed-up':>9} {'4x: spans':>10} {'4x: dtw':>9} {'4x speed-up':>11}"
    )
    byte_lines = []
    for name, source_dir in sources.items():
        source, source_bytes = encode_all(source_dir, records)
        source_long, _ = encode_all(source_dir, longer)
        pivot_table, source_table = token_codes(pivot_bytes, source_bytes)
        total = sum(len(p["byte_start"]) for p in pivot)
        pairs = [span_pairs(p, s, pivot_table, source_table) for p, s in zip(pivot, source, strict=True)]
        # The former rule: spans clipped to the answer's bytes, tokens' bytes not compared.
        former = [
            align_by_spans(span_keys(p, clip=True), span_keys(s, clip=True))[0]
            for p, s in zip(pivot, source, strict=True)
        ]
        refused = sum(len(np.setdiff1d(f, n)) for f, n in zip(former, pairs, strict=True))
        first_paired = sum(0 in n for n in pairs)
        spans, dtw = compare_speed(pivot, source, pivot_bytes, source_bytes, args.dtw_records)
        spans_long, dtw_long = compare_speed(
            pivot_long, source_long, pivot_bytes, source_bytes, args.dtw_records
        )
        print(
            f"{name:8} {sum(map(len, pairs)) / total:9.1%} {refused:8d} {first_paired:4d}/{len(pivot):<4d} "
            f"{spans:12.0f} {dtw:10.0f} {spans / dtw:8.0f}x "
            f"{spans_long:10.0f} {dtw_long:9.0f} {spans_long / dtw_long:10.0f}x"
        )
        mapping = vocab.map_vocabularies(source_bytes, pivot_bytes)
        started = time.perf_counter()
        tables = continuations.build_continuations(source_bytes, pivot_bytes, mapping.source_to_pivot)
        build = time.perf_counter() - started
        aligners = {m: Aligner.of(m, pivot_bytes, source_bytes, tables) for m in ("spans", "bytes")}
        source, source_long = (with_gold_topk(x, len(source_bytes)) for x in (source, source_long))
        found = coverage(pivot, source, aligners, mapping)
        rates = {length: per_example_rates(p, s, aligners, mapping)
                 for length, p, s in (("1x", pivot, source), ("4x", pivot_long, source_long))}  # fmt: skip
        byte_lines.append(
            f"{name:8} {found['spans'] / total:6.1%} {found['bytes'] / total:6.1%} {found['same'] / total:6.1%} "
            f"{found['start'] / total:6.1%} ({found['longer'] / total:5.1%}) {found['inside'] / total:6.1%} "
            f"{found['first']:4d}/{len(pivot):<4d} {rates['1x']['spans']:10.0f} {rates['1x']['bytes']:10.0f} "
            f"{rates['1x']['spans'] / rates['1x']['bytes']:6.2f}x {rates['4x']['spans']:10.0f} "
            f"{rates['4x']['bytes']:10.0f} {rates['4x']['spans'] / rates['4x']['bytes']:6.2f}x {build:7.1f} s"
        )
    print(
        "\n--token-align bytes against spans (synthetic top-k holding the gold token); per-example work, "
        f"tok/s:\n{'source':8} {'spans':>6} {'bytes':>6} {'same':>6} {'start (longer)':>14} {'inside':>6} "
        f"{'1st token':>9} {'spans':>10} {'bytes':>10} {'slower':>7} {'4x: spans':>10} {'4x: bytes':>10} "
        f"{'slower':>7} {'tables':>9}"
    )
    print("\n".join(byte_lines))

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps(records[: args.mass_records]))
        settings = RepresentSettings(top_k=10, max_length=1024)
        represent(pivot_dir, data, Path(tmp) / "pivot", settings, progress=False)
        represent(gemma3_270m_dir(), data, Path(tmp) / "gemma", settings, progress=False)
        for token_align, vocab_map in (("spans", "exact"), ("spans", "mined"), ("bytes", "exact")):
            out = Path(tmp) / f"{token_align}-{vocab_map}"
            report = align(
                Path(tmp) / "pivot", Path(tmp) / "gemma", out, token_align, vocab_map, progress=False
            )
            print(
                f"gemma3 -> SmolLM2 real distributions, {report['examples_aligned']} examples, --token-align "
                f"{token_align} --vocab-map {vocab_map}: pivot tokens with a source distribution "
                f"{report['tokens_aligned_share']:.1%}, mapped top-k mass {report['mapped_topk_mass_share']:.1%}, "
                f"align stage {report['seconds']:.1f} s"
                + (f"; {report['bytes']}" if "bytes" in report else "")
            )
        print_gold_by_case(Path(tmp) / "pivot", Path(tmp) / "gemma", pivot_dir, gemma3_270m_dir())


MASS_BINS = (0.5, 0.2, 0.1, 0.0)  # lower edges of the source mass of rows read inside a source token


def print_gold_by_case(pivot_dir: Path, source_dir: Path, pivot_model: Path, source_model: Path) -> None:
    """What the converted distributions give the pivot's gold tokens, by case and, inside a source
    token, by the source mass they rest on: the gold token's probability after renormalising over
    the stored entries (what the fusion loss sees), against the pivot's own distribution there."""
    pivot_data, source_data = load_representation(pivot_dir), load_representation(source_dir)
    loaded = []
    for model in (pivot_model, source_model):
        tokenizer = AutoTokenizer.from_pretrained(model)
        loaded.append(vocab.token_bytes(tokenizer, resolve_chat_template(tokenizer, None)[0]))
    pivot_bytes, source_bytes = loaded
    mapping = vocab.map_vocabularies(source_bytes, pivot_bytes)
    tables = continuations.build_continuations(source_bytes, pivot_bytes, mapping.source_to_pivot)
    aligner = Aligner.of("bytes", pivot_bytes, source_bytes, tables)
    found: dict[str, list[tuple[float, float]]] = {}
    for row in range(len(pivot_data)):
        p, s = example_arrays(pivot_data, row), example_arrays(source_data, row)
        assert p["id"] == s["id"]
        rows, places = aligner.rows(p, s, mapping)
        written = np.isin(places.pivot_index, rows.pivot_index)
        offsets, same = places.offset[written], places.same_span[written]
        longer = p["byte_end"][rows.pivot_index] > s["byte_end"][places.source_index[written]]
        gold = gold_ids(p)[rows.pivot_index]
        theirs = renormalised_gold(rows.ids, np.log(np.maximum(rows.probs, 1e-45)), gold)
        ours = renormalised_gold(p["topk_ids"][rows.pivot_index], p["topk_logprobs"][rows.pivot_index], gold)
        for i in range(len(gold)):
            if same[i]:
                case = "same span"
            elif offsets[i] == 0:
                case = "same start, pivot token longer" if longer[i] else "same start, pivot token not longer"
            else:
                edge = next(e for e in MASS_BINS if rows.source_mass[i] >= e)
                case = f"inside, source mass >= {edge}"
            found.setdefault(case, []).append((theirs[i], ours[i]))
    print(f"{'case':38} {'rows':>6} {'gold prob: source':>18} {'pivot':>6} {'source higher':>14}")
    for case in sorted(found):
        theirs, ours = np.array(found[case]).T
        print(
            f"{case:38} {len(theirs):6d} {theirs.mean():18.3f} {ours.mean():6.3f} {(theirs > ours).mean():14.1%}"
        )


def renormalised_gold(ids: np.ndarray, logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per row, the gold id's probability in the top-k distribution renormalised over its entries."""
    probs = np.where(ids >= 0, np.exp(logprobs.astype(np.float64)), 0.0)
    return (probs * (ids == gold[:, None])).sum(axis=1) / np.maximum(probs.sum(axis=1), 1e-30)


if __name__ == "__main__":
    main()
