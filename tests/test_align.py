"""Token alignment by spans (hand-built cases, agreement with DTW on real tokenizers), the
`align` stage against an independent mapping of the stored distributions, and `fuse` on top."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from fusion_train import vocab
from fusion_train.align import (
    AlignmentError,
    align,
    align_by_dtw,
    align_by_spans,
    span_keys,
    supervised_positions,
    token_strings,
)
from fusion_train.chat import normalise_record, resolve_chat_template
from fusion_train.cli import main
from fusion_train.fuse import FusionError, fuse
from fusion_train.represent import (
    RepresentSettings,
    encode_conversation,
    example_arrays,
    load_representation,
    position_runs,
    represent,
)


def arrays_from_spans(spans: list[tuple[int, int, int]], first_position: int = 1) -> dict[str, np.ndarray]:
    """Representation-like arrays for consecutive supervised tokens with (message, start, end) spans."""
    messages = [m for m, _, _ in spans]
    run_message, run_start, run_length = position_runs(
        list(range(first_position, first_position + len(spans))), messages
    )
    return {
        "run_message": np.array(run_message),
        "run_start": np.array(run_start),
        "run_length": np.array(run_length),
        "char_start": np.array([a for _, a, _ in spans], dtype=np.int32),
        "char_end": np.array([b for _, _, b in spans], dtype=np.int32),
    }


def test_spans_align_only_identical_unambiguous_spans() -> None:
    # Text "Hello world👋!" in message 1, then the end-of-turn token (empty span at the end).
    pivot = [(1, 0, 5), (1, 5, 11), (1, 11, 12), (1, 11, 12), (1, 12, 13), (1, 13, 13)]
    #        "Hello"    " world"    byte pieces of 👋 (ambiguous)  "!"       end of turn
    source = [(1, 0, 2), (1, 2, 5), (1, 5, 11), (1, 11, 12), (1, 12, 13), (1, 13, 13)]
    #         "He"       "llo"      " world"    👋 whole      "!"         end of turn
    pivot_index, source_index = align_by_spans(
        span_keys(arrays_from_spans(pivot)), span_keys(arrays_from_spans(source))
    )
    assert list(zip(pivot_index.tolist(), source_index.tolist(), strict=True)) == [(1, 2), (4, 4), (5, 5)]
    # Keys that do not come in span order (not from a representation) give the same pairs.
    shuffle = np.array([4, 0, 5, 2, 1, 3])
    pivot_index, source_index = align_by_spans(
        span_keys(arrays_from_spans(pivot)), span_keys(arrays_from_spans(source))[shuffle]
    )
    assert list(zip(pivot_index.tolist(), shuffle[source_index].tolist(), strict=True)) == [
        (1, 2),
        (4, 4),
        (5, 5),
    ]


def test_same_span_in_another_message_is_not_a_match() -> None:
    pivot = arrays_from_spans([(1, 0, 3), (3, 0, 3)])
    source = arrays_from_spans([(3, 0, 3)], first_position=7)
    pivot_index, source_index = align_by_spans(span_keys(pivot), span_keys(source))
    assert pivot_index.tolist() == [1] and source_index.tolist() == [0]
    assert supervised_positions(source).tolist() == [7]


def encoded_pair(pivot_dir: Path, source_dir: Path, records: list[dict]) -> list[tuple]:
    pairs = []
    for name in (pivot_dir, source_dir):
        tokenizer = AutoTokenizer.from_pretrained(name)
        template, _ = resolve_chat_template(tokenizer, None)
        pairs.append(
            (
                tokenizer,
                [
                    encode_conversation(tokenizer, template, normalise_record(r), 4096, "truncate")
                    for r in records
                ],
            )
        )
    return pairs


@pytest.mark.parametrize("source", ["mistral", "qwen"])
def test_spans_agree_with_dtw_where_both_are_unambiguous(
    source: str, tokenizer_dirs: dict[str, Path]
) -> None:
    records = [
        {
            "instruction": "Explain",
            "output": "The quick brown fox jumps over the lazy dog. It is 2024-01-01 now.",
        },
        {"instruction": "Code", "output": "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))"},
        {"instruction": "Mixed", "output": "Café, naïve résumé — 你好 and emoji 😀 at the end!"},
    ]
    (pivot_tok, pivot_enc), (source_tok, source_enc) = encoded_pair(
        tokenizer_dirs["smollm2"], tokenizer_dirs[source], records
    )
    pivot_text = token_strings(vocab.token_bytes(pivot_tok))
    source_text = token_strings(vocab.token_bytes(source_tok))
    compared = 0
    for p_example, s_example in zip(pivot_enc, source_enc, strict=True):
        p, s = (
            {
                **arrays_from_spans(list(zip(e.messages, e.char_start, e.char_end, strict=True))),
                "input_ids": np.array(e.input_ids),
                "run_start": np.array(position_runs(e.positions, e.messages)[1]),
            }
            for e in (p_example, s_example)
        )
        spans = dict(zip(*align_by_spans(span_keys(p), span_keys(s)), strict=True))
        dtw_p, dtw_s = align_by_dtw(p, s, pivot_text, source_text)
        # DTW pairs that are one-to-one on both sides are its unambiguous decisions.
        p_counts = np.bincount(dtw_p, minlength=len(p["char_start"]))
        s_counts = np.bincount(dtw_s, minlength=len(s["char_start"]))
        for i, j in zip(dtw_p, dtw_s, strict=True):
            if p_counts[i] == 1 and s_counts[j] == 1 and i in spans:
                assert spans[i] == j
                compared += 1
    assert compared >= 40


@pytest.fixture(scope="module")
def aligned(represented: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligned")
    for source in ("mistral", "qwen"):
        align(represented["smollm2"], represented[source], root / source, progress=False)
    return {source: root / source for source in ("mistral", "qwen")}


@pytest.mark.parametrize("source", ["mistral", "qwen"])
def test_aligned_distributions_are_the_sources_mapped_independently(
    source: str, represented: dict, aligned: dict, tokenizer_dirs: dict
) -> None:
    pivot_data = load_representation(represented["smollm2"])
    source_data = load_representation(represented[source])
    out = load_representation_like(aligned[source])
    report = json.loads((aligned[source] / "report.json").read_text())
    mapping = vocab.build_vocab_map(
        AutoTokenizer.from_pretrained(tokenizer_dirs[source]),
        AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"]),
    ).source_to_pivot
    assert report["examples_aligned"] == len(pivot_data) == len(out)
    total_aligned = 0
    for row in range(len(out)):
        a = example_arrays(out, row)
        p = example_arrays(pivot_data, row)
        s = example_arrays(source_data, row)
        assert a["id"] == p["id"] == s["id"]
        source_rows = {key: j for j, key in enumerate(span_keys(s).tolist())}
        pivot_keys = span_keys(p)
        for out_row, pivot_row in enumerate(a["aligned_index"]):
            j = source_rows[int(pivot_keys[pivot_row])]  # the source token with the very same span
            expected: dict[int, float] = {}
            for token, logprob in zip(s["topk_ids"][j], s["topk_logprobs"][j], strict=True):
                if mapping[token] >= 0:
                    expected[int(mapping[token])] = expected.get(int(mapping[token]), 0.0) + float(
                        np.exp(logprob)
                    )
            got = {
                int(t): float(np.exp(lp))
                for t, lp in zip(a["topk_ids"][out_row], a["topk_logprobs"][out_row], strict=True)
                if t >= 0
            }
            assert got.keys() == expected.keys()
            for token, prob in expected.items():
                assert got[token] == pytest.approx(prob, rel=2e-3, abs=1e-4)
            share = sum(expected.values()) / float(np.exp(s["topk_logprobs"][j].astype(np.float64)).sum())
            assert float(a["mapped_mass"][out_row]) == pytest.approx(share, rel=2e-3, abs=1e-4)
            assert a["target_logprob"][out_row] == s["target_logprob"][j]
        assert a["source_nll"] == s["nll"] and a["source_num_target_bytes"] == s["num_target_bytes"]
        total_aligned += len(a["aligned_index"])
    assert report["tokens_aligned"] == total_aligned
    assert 0 < report["tokens_aligned_share"] <= 1


def load_representation_like(path: Path):
    import datasets

    return datasets.load_from_disk(str(path / "data"))


def test_end_of_turn_tokens_align_and_map_by_role(
    represented: dict, aligned: dict, tokenizer_dirs: dict
) -> None:
    pivot_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    source_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["mistral"])
    pivot_data = load_representation(represented["smollm2"])
    out = load_representation_like(aligned["mistral"])
    mapping = vocab.build_vocab_map(source_tok, pivot_tok).source_to_pivot
    assert mapping[source_tok.convert_tokens_to_ids("</s>")] == pivot_tok.convert_tokens_to_ids("<|im_end|>")
    for row in range(len(out)):
        p = example_arrays(pivot_data, row)
        a = example_arrays(out, row)
        end_of_turn = np.flatnonzero(p["char_start"] == p["char_end"])
        assert set(end_of_turn.tolist()) <= set(a["aligned_index"].tolist())


def test_missing_examples_are_reported_and_bad_pairs_refused(
    tiny_models: dict, represented: dict, chats: Path, tmp_path: Path
) -> None:
    represent(tiny_models["mistral"], chats, tmp_path / "fewer", RepresentSettings(top_k=5, chunk_size=3), limit=4,
              progress=False)  # fmt: skip
    with pytest.raises(AlignmentError, match="different data sets"):
        align(represented["smollm2"], tmp_path / "fewer", tmp_path / "out1", progress=False)

    with pytest.raises(AlignmentError, match="pivot model itself"):
        align(represented["smollm2"], represented["smollm2"], tmp_path / "out2", progress=False)

    represent(tiny_models["mistral"], chats, tmp_path / "short", RepresentSettings(top_k=5, chunk_size=3, max_length=64),
              progress=False)  # fmt: skip
    with pytest.raises(AlignmentError, match="different --max-length"):
        align(represented["smollm2"], tmp_path / "short", tmp_path / "out3", progress=False)

    # Same data, but the source skipped an example (too long for it): reported, not dropped silently.
    long_chats = tmp_path / "long.json"
    long_chats.write_text(
        json.dumps([{"instruction": "a", "output": "short"}, {"instruction": "b", "output": "x " * 200}])
    )
    represent(
        tiny_models["smollm2"], long_chats, tmp_path / "p", RepresentSettings(max_length=96), progress=False
    )
    represent(tiny_models["mistral"], long_chats, tmp_path / "s", RepresentSettings(max_length=96, overflow="skip"),
              progress=False)  # fmt: skip
    report = align(tmp_path / "p", tmp_path / "s", tmp_path / "out4", progress=False)
    assert report["examples_aligned"] == 1 and report["missing_in_source"]["count"] == 1


def test_fuse_min_ce_follows_the_per_byte_cross_entropies(
    represented: dict, aligned: dict, tmp_path: Path
) -> None:
    report = fuse(
        represented["smollm2"], [aligned["mistral"], aligned["qwen"]], tmp_path, "min-ce", progress=False
    )
    pivot_data = load_representation(represented["smollm2"])
    sources = [load_representation_like(aligned[s]) for s in ("mistral", "qwen")]
    fused = load_representation_like(tmp_path)
    assert len(fused) == len(pivot_data)
    for row in range(len(fused)):
        f, p = example_arrays(fused, row), example_arrays(pivot_data, row)
        per_byte = [p["nll"] / p["num_target_bytes"]] + [
            float(s[row]["source_nll"]) / s[row]["source_num_target_bytes"] for s in sources
        ]
        assert f["winner"] == int(np.argmin(per_byte))
        assert f["input_ids"].tolist() == p["input_ids"].tolist()
        assert len(f["topk_ids"]) == len(p["topk_ids"])
        from_source = np.zeros(len(p["topk_ids"]), dtype=bool)
        if f["winner"] > 0:
            a = example_arrays(sources[f["winner"] - 1], row)
            np.testing.assert_array_equal(f["topk_ids"][a["aligned_index"]], a["topk_ids"])
            from_source[a["aligned_index"]] = True
        np.testing.assert_array_equal(f["topk_ids"][~from_source], p["topk_ids"][~from_source])
    assert sum(report["sequences_won"].values()) == len(fused)

    with pytest.raises(FusionError, match="different pivot"):
        fuse(represented["mistral"], [aligned["qwen"]], tmp_path / "bad", progress=False)


def test_align_and_fuse_commands(represented: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source", str(represented["qwen"]),
                                  "--out", str(tmp_path / "a"), "--vocab-map", "stats"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pivot tokens aligned one-to-one" in result.output
    result = runner.invoke(main, ["fuse", "--pivot", str(represented["smollm2"]), "--aligned", str(tmp_path / "a"),
                                  "--out", str(tmp_path / "f"), "--criterion", "token-min-ce", "--ce-unit", "token"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_representation_like(tmp_path / "f").features["topk_ids"].feature.length == 5
    result = runner.invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source", str(represented["smollm2"]),
                                  "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code != 0 and "pivot model itself" in result.output
