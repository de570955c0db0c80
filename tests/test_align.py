"""Token alignment by spans (hand-built cases, agreement with DTW on real tokenizers), the
`align` stage against an independent mapping of the stored distributions, and `fuse` on top."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from byte_reference import BYTE_LEVEL, content_place, reference_places, reference_token_bytes
from click.testing import CliRunner
from transformers import AutoTokenizer

from fusion_train import registry_assets as assets
from fusion_train import vocab
from fusion_train.align import (
    AlignmentError,
    align,
    align_by_dtw,
    align_by_spans,
    span_keys,
    supervised_positions,
    token_codes,
)
from fusion_train.chat import load_conversations, normalise_record, resolve_chat_template
from fusion_train.cli import main
from fusion_train.encoding import ChatTokenizer, encode_conversation
from fusion_train.fuse import FusionError, fuse
from fusion_train.parts import part_path, write_part
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import FORMAT as REPRESENTATION_FORMAT
from fusion_train.representation import (
    example_arrays,
    load_representation,
    position_runs,
    representation_features,
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
        "byte_start": np.array([a for _, a, _ in spans], dtype=np.int32),
        "byte_end": np.array([b for _, _, b in spans], dtype=np.int32),
    }


def test_spans_align_only_identical_unambiguous_spans() -> None:
    # Bytes of "Hello world?!" in message 1, then the end-of-turn token (empty span at the end).
    pivot = [(1, 0, 5), (1, 5, 11), (1, 11, 12), (1, 11, 12), (1, 12, 13), (1, 13, 13)]
    #        "Hello"    " world"    two tokens on one span (ambiguous)  "!"  end of turn
    source = [(1, 0, 2), (1, 2, 5), (1, 5, 11), (1, 11, 12), (1, 12, 13), (1, 13, 13)]
    #         "He"       "llo"      " world"    "?"          "!"         end of turn
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


def test_same_span_but_other_bytes_is_not_a_match() -> None:
    # Both sides cover bytes 0-5 of message 1, but one token stands for other bytes (text a
    # normaliser changed, a space SentencePiece added): never paired. Codes -1/-2: never equal.
    pivot = arrays_from_spans([(1, 0, 5), (1, 5, 6), (1, 6, 6)])
    source = arrays_from_spans([(1, 0, 5), (1, 5, 6), (1, 6, 6)])
    pivot_index, source_index = align_by_spans(
        span_keys(pivot), span_keys(source), np.array([10, 11, -1]), np.array([12, 11, -2])
    )
    assert pivot_index.tolist() == [1] and source_index.tolist() == [1]


def test_supervised_positions_of_several_runs() -> None:
    # Three assistant turns: runs at positions 5-7, 12-13 and 20 (a multi-turn conversation).
    arrays = {"run_start": np.array([5, 12, 20]), "run_length": np.array([3, 2, 1])}
    assert supervised_positions(arrays).tolist() == [5, 6, 7, 12, 13, 20]
    assert (
        supervised_positions({"run_start": np.array([], int), "run_length": np.array([], int)}).tolist() == []
    )


def test_token_codes_match_bytes_and_end_of_turn_roles(tokenizer_dirs: dict[str, Path]) -> None:
    pivot_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    source_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["mistral"])
    pivot_bytes = vocab.token_bytes(pivot_tok)
    pivot_table, source_table = token_codes(pivot_bytes, vocab.token_bytes(source_tok))
    pivot_id, source_id = pivot_tok.convert_tokens_to_ids, source_tok.convert_tokens_to_ids
    assert pivot_table[pivot_id("ĠHello")] == source_table[source_id("▁Hello")]  # b" Hello" both
    assert pivot_table[pivot_id("Hello")] != source_table[source_id("▁Hello")]
    assert pivot_table[pivot_id("<|im_end|>")] == source_table[source_id("</s>")]  # both end the turn
    assert source_table[source_id("<unk>")] == -2  # unknown text: nothing to compare
    others = [i for i, special in pivot_bytes.specials.items() if special.roles == (vocab.OTHER_SPECIAL,)]
    assert others and (pivot_table[others] == -1).all()  # specials without a matched role


ANSWERS = ["Hello world.", " Leading space, then words.", "42 is the answer.", "😀 smiles first.",
           "中文回答，然后 English.", "    indented = code()\n    return indented"]  # fmt: skip
MULTI_TURN = {"messages": [
    {"role": "user", "content": "First?"}, {"role": "assistant", "content": "Hello first."},
    {"role": "user", "content": "Second?"}, {"role": "assistant", "content": "2nd: 😀 and 中文."},
    {"role": "user", "content": "Third?"}, {"role": "assistant", "content": "    code()\n\nend"}]}  # fmt: skip
RECORDS = [normalise_record({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": a}]})
           for i, a in enumerate(ANSWERS)] + [normalise_record(MULTI_TURN)]  # fmt: skip


def _reference_supervised(tokenizer: Any, template: str, conv: Any, byte_level: bool) -> dict:
    """Per assistant message, (relative start, end, bytes) of every token overlapping its
    bytes, by the independent reading; and the message's end-of-turn special token, if any."""
    text = tokenizer.apply_chat_template(list(conv.messages), chat_template=template, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    places = reference_places(tokenizer, ids, text, byte_level)
    found, after = {}, 0
    for m, message in enumerate(conv.messages):
        base, first, last = content_place(text, message["content"], after)
        after = last
        if message["role"] == "assistant":
            rows = [p for p, x in enumerate(places) if x.end > max(x.start, first) and x.start < last]
            tokens = [(p, places[p].start - base, places[p].end - base, places[p].stands_for) for p in rows]
            closing = places[rows[-1] + 1] if rows[-1] + 1 < len(places) else None
            found[m] = (tokens, closing is not None and closing.special is not None, rows[-1] + 1)
    return found


def _arrays(example: Any) -> dict[str, np.ndarray]:
    run_message, run_start, run_length = position_runs(example.positions, example.messages)
    return {
        "input_ids": np.array(example.input_ids), "run_message": np.array(run_message),
        "run_start": np.array(run_start), "run_length": np.array(run_length),
        "byte_start": np.array(example.byte_start), "byte_end": np.array(example.byte_end),
    }  # fmt: skip


@pytest.fixture(scope="module")
def chat_tokenizers(tokenizer_dirs: dict[str, Path]) -> dict[tuple[str, str | None], tuple]:
    """(name, template) -> (tokenizer, ChatTokenizer, TokenBytes); built once, token bytes are slow."""
    dirs = {**tokenizer_dirs, "gemma3": assets.gemma3_270m_dir()}
    cache: dict = {}

    def get(name: str, template_name: str | None) -> tuple:
        if (name, template_name) not in cache:
            tokenizer = AutoTokenizer.from_pretrained(dirs[name])
            template, _ = resolve_chat_template(tokenizer, template_name)
            chat = ChatTokenizer.of(tokenizer, template)
            cache[name, template_name] = (tokenizer, chat, vocab.token_bytes(tokenizer, template))
        return cache[name, template_name]

    return get


def _expected_and_found_pairs(
    conv: Any, pivot: tuple, source: tuple, source_name: str
) -> tuple[set, set, bool]:
    """Pairs of (pivot position, source position): from the independent reading of the rendered
    bytes, and from the code under test; and whether the answers' first pivot token is paired."""
    (pivot_tok, pivot_chat, pivot_bytes), (source_tok, source_chat, source_bytes) = pivot, source
    pivot_ref = _reference_supervised(pivot_tok, pivot_chat.template, conv, BYTE_LEVEL["smollm2"])
    source_ref = _reference_supervised(source_tok, source_chat.template, conv, BYTE_LEVEL[source_name])
    expected, first_paired = set(), True
    for m, (pivot_tokens, pivot_closed, pivot_end) in pivot_ref.items():
        source_tokens, source_closed, source_end = source_ref[m]
        by_span = {(a, b, piece): p for p, a, b, piece in source_tokens}
        expected |= {(p, by_span[a, b, piece]) for p, a, b, piece in pivot_tokens if (a, b, piece) in by_span}
        if pivot_closed and source_closed:
            expected.add((pivot_end, source_end))
        first_paired &= any(p == pivot_tokens[0][0] for p, _ in expected)
    pivot_table, source_table = token_codes(pivot_bytes, source_bytes)
    p_enc = encode_conversation(pivot_chat, conv, 4096, "truncate")
    s_enc = encode_conversation(source_chat, conv, 4096, "truncate")
    p, s = _arrays(p_enc), _arrays(s_enc)
    pivot_index, source_index = align_by_spans(
        span_keys(p), span_keys(s),
        pivot_table[p["input_ids"][p_enc.positions]], source_table[s["input_ids"][s_enc.positions]],
    )  # fmt: skip
    found = {(p_enc.positions[i], s_enc.positions[j]) for i, j in zip(pivot_index, source_index, strict=True)}
    return expected, found, first_paired


SOURCES = pytest.mark.parametrize(
    ("source", "template"),
    [("mistral", None), ("qwen", None), ("gemma3", None), ("smollm2", "plain"), ("mistral", "chatml")],
    ids=["mistral-llama2", "qwen-chatml", "gemma3-plain", "smollm2-plain", "mistral-chatml"],
)


@SOURCES
def test_pairs_cover_the_same_bytes_of_the_rendered_text(
    source: str, template: str | None, chat_tokenizers
) -> None:
    """Pivot SmolLM2 (ChatML) against real tokenizers and templates that put other text before
    the answer: the expected pairs come from the rendered bytes, read independently."""
    pivot, other = chat_tokenizers("smollm2", None), chat_tokenizers(source, template)
    total, first_paired_by_answer = 0, {}
    for conv in RECORDS:
        expected, found, first_paired = _expected_and_found_pairs(conv, pivot, other, source)
        assert found == expected, conv.messages
        total += len(found)
        first_paired_by_answer[conv.messages[1]["content"]] = first_paired
    assert total >= 30
    # ChatML before the answer on both sides: first tokens that cover the same bytes pair up.
    # Any other template puts other bytes before the answer ("[/INST] ", "Assistant: "), and a
    # source token covering one of them with the answer's first word ("▁Hello") is never paired.
    # (A source that splits the space off, "▁" "4", pairs its "4" with the pivot's: same bytes.)
    if source == "qwen" or template == "chatml":
        assert first_paired_by_answer["Hello world."] and sum(first_paired_by_answer.values()) >= 3
    else:
        assert not first_paired_by_answer["Hello world."]
        p_enc = encode_conversation(pivot[1], RECORDS[0], 4096, "truncate")
        s_enc = encode_conversation(other[1], RECORDS[0], 4096, "truncate")
        assert p_enc.input_ids[p_enc.positions[0]] == pivot[0].convert_tokens_to_ids("Hello")
        assert s_enc.byte_start[0] < 0  # the source's first token also covers template text


PIECES = ["word", " ", "  ", "\t", "\n", "\n\n", "42", "3.14", "😀", "👩‍💻", "🇫🇷", "中文", "日本語", "é", "e\u0301",
          "مرحبا", "ß", "—", "…", "```", "    ", "x=1;", "(a)", "'s", "Ω", "\u200b", "🎉🎉"]  # fmt: skip


@SOURCES
def test_pairs_cover_the_same_bytes_on_random_text(
    source: str, template: str | None, chat_tokenizers
) -> None:
    """The same check on random answers built from words, whitespace runs, digits, emoji (ZWJ
    sequences and flags), CJK, combining accents, Arabic, zero-width spaces and code."""
    rng = random.Random(f"{source}-{template}")
    pivot, other = chat_tokenizers("smollm2", None), chat_tokenizers(source, template)
    total = 0
    for index in range(12):
        answers = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25))) for _ in range(2)]
        answers = [a if a.strip() else a + "ok" for a in answers]
        conv = normalise_record({"messages": [
            {"role": "user", "content": f"Q{index}?"}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "More?"}, {"role": "assistant", "content": answers[1]}]})  # fmt: skip
        expected, found, _ = _expected_and_found_pairs(conv, pivot, other, source)
        assert found == expected, answers
        total += len(found)
    assert total >= 50


def test_byte_pieces_of_one_character_pair_only_with_the_same_pieces(chat_tokenizers) -> None:
    # SmolLM2 splits " 😀" into b" \xf0\x9f\x98" and b"\x80"; Mistral has " " and "😀" whole
    # (and "▁Hi" covers the space "[/INST] " puts before the answer): only the end of turn pairs.
    conv = normalise_record(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi 😀"}]}
    )
    _, pivot_chat, pivot_bytes = chat_tokenizers("smollm2", None)
    _, mistral_chat, mistral_bytes = chat_tokenizers("mistral", None)
    p = encode_conversation(pivot_chat, conv, 4096, "truncate")
    pieces = [pivot_bytes.pieces[p.input_ids[q]] for q in p.positions]
    assert pieces[1:3] == [b" \xf0\x9f\x98", b"\x80"]
    assert list(zip(p.byte_start, p.byte_end, strict=True))[1:3] == [(2, 6), (6, 7)]
    for other_chat, other_bytes, expected in (
        (mistral_chat, mistral_bytes, [3]),
        (pivot_chat, pivot_bytes, [0, 1, 2, 3]),
    ):
        s = encode_conversation(other_chat, conv, 4096, "truncate")
        pivot_table, source_table = token_codes(pivot_bytes, other_bytes)
        pivot_index, _ = align_by_spans(span_keys(_arrays(p)), span_keys(_arrays(s)),
                                        pivot_table[np.array(p.input_ids)[p.positions]],
                                        source_table[np.array(s.input_ids)[s.positions]])  # fmt: skip
        assert pivot_index.tolist() == expected


def test_dtw_takes_many_to_one_pairs_only_where_texts_agree() -> None:
    # Pivot "Hel" "lo" " world" against source "Hello" " world": DTW pairs both pivot pieces with
    # "Hello" (many-to-one): neither stands for "Hello", so neither takes its distribution.
    # Pivot "a" "a" against source "a": both pair with it and stand for the same text: both take it.
    texts = ["Hel", "lo", " world", "Hello", "a"]
    table = np.arange(len(texts))

    def arrays(ids: list[int]) -> dict[str, np.ndarray]:
        return {"input_ids": np.array([0, *ids]), "run_message": np.array([1]),
                "run_start": np.array([1]), "run_length": np.array([len(ids)])}  # fmt: skip

    pivot_index, source_index = align_by_dtw(arrays([0, 1, 2]), arrays([3, 2]), texts, texts, table, table)
    assert list(zip(pivot_index.tolist(), source_index.tolist(), strict=True)) == [(2, 1)]
    pivot_index, source_index = align_by_dtw(arrays([4, 4]), arrays([4]), texts, texts, table, table)
    assert list(zip(pivot_index.tolist(), source_index.tolist(), strict=True)) == [(0, 0), (1, 0)]
    # One-to-one steps are taken whatever the texts (the reference method's behaviour).
    pivot_index, _ = align_by_dtw(arrays([0, 2]), arrays([3, 2]), texts, texts, table, table)
    assert pivot_index.tolist() == [0, 1]


def write_representation(
    out: Path, tokenizer_dir: Path, examples: dict[str, list[tuple[str, int, int, int]]]
) -> Path:
    """A hand-made representation on disk (as `represent` writes it, top-1 rows): per example id,
    its supervised tokens as (token, message, byte start, byte end); every row's top-1 is its own
    token, at log-probability 0. Position 0 holds a prompt token (never supervised)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    for id_, tokens in examples.items():
        ids = tokenizer.convert_tokens_to_ids([token for token, _, _, _ in tokens])
        assert tokenizer.unk_token_id not in ids
        run_message, run_start, run_length = position_runs(
            list(range(1, len(tokens) + 1)), [m for _, m, _, _ in tokens]
        )
        rows.append({
            "id": id_, "domain": "", "input_ids": [tokenizer.bos_token_id or 0, *ids],
            "run_message": run_message, "run_start": run_start, "run_length": run_length,
            "byte_start": [a for _, _, a, _ in tokens], "byte_end": [b for _, _, _, b in tokens],
            "target_logprob": [0.0] * len(tokens), "topk_ids": [[i] for i in ids],
            "topk_logprobs": [[0.0]] * len(tokens), "nll": 0.0, "num_target_tokens": len(tokens),
            "num_target_bytes": max(b for _, _, _, b in tokens), "truncated": False,
        })  # fmt: skip
    features = representation_features(1)
    write_part(
        part_path(out, 0), datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features)
    )
    manifest = {"format": REPRESENTATION_FORMAT, "model": {"path": str(tokenizer_dir), "gguf_file": None},
                "data": {"path": "hand-made", "fingerprint": "same"}, "num_examples": len(rows), "num_parts": 1,
                "settings": asdict(RepresentSettings(top_k=1))}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_report_counts_the_pairs_the_byte_rule_refused(
    tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SmolLM2's ChatML puts the answer right after "assistant\n"; Mistral's template puts
    "[/INST] " before it, and its "▁Hello" covers that space too (byte -1). Spans clipped to the
    answer (the former rule) would pair "Hello" with "▁Hello"; the byte rule refuses: the first
    token of each of the three answers, 3 pairs. " world" and the ends of turn pair under both."""
    pivot = write_representation(tmp_path / "pivot", tokenizer_dirs["smollm2"], {
        "two-turns": [("Hello", 1, 0, 5), ("Ġworld", 1, 5, 11), ("<|im_end|>", 1, 11, 11),
                      ("Hi", 3, 0, 2), ("<|im_end|>", 3, 2, 2)],
        "one-turn": [("Hello", 1, 0, 5), ("<|im_end|>", 1, 5, 5)],
    })  # fmt: skip
    source = write_representation(tmp_path / "source", tokenizer_dirs["mistral"], {
        "two-turns": [("▁Hello", 1, -1, 5), ("▁world", 1, 5, 11), ("</s>", 1, 11, 11),
                      ("▁Hi", 3, -1, 2), ("</s>", 3, 2, 2)],
        "one-turn": [("▁Hello", 1, -1, 5), ("</s>", 1, 5, 5)],
    })  # fmt: skip
    report = align(pivot, source, tmp_path / "out", progress=False)
    assert report["pivot_supervised_tokens"] == 7
    assert report["tokens_aligned"] == 4  # " world" and three ends of turn
    assert report["pairs_refused_by_byte_rule"] == 3
    out = load_representation_like(tmp_path / "out")
    assert [example_arrays(out, row)["aligned_index"].tolist() for row in range(len(out))] == [[1, 2, 4], [1]]


@pytest.fixture(scope="module")
def aligned(represented: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligned")
    for source in ("mistral", "qwen"):
        align(represented["smollm2"], represented[source], root / source, progress=False)
    return {source: root / source for source in ("mistral", "qwen")}


def _expected_pivot_ids(source_tok: Any, pivot_tok: Any, source: str) -> dict[int, int]:
    """The exact vocabulary map, read independently: source ids to the pivot id with the same
    bytes; the source's end-of-turn and bos tokens to the pivot's."""
    pivot_by_bytes = {
        piece: i for i in range(len(pivot_tok))
        if (piece := reference_token_bytes(pivot_tok, i, BYTE_LEVEL["smollm2"])) is not None
    }  # fmt: skip
    by_role = {source_tok.eos_token: pivot_tok.convert_tokens_to_ids("<|im_end|>")}
    if source_tok.bos_token:
        by_role[source_tok.bos_token] = pivot_tok.convert_tokens_to_ids(pivot_tok.bos_token)
    expected = {}
    for i in range(len(source_tok)):
        piece = reference_token_bytes(source_tok, i, BYTE_LEVEL[source])
        target = (
            pivot_by_bytes.get(piece)
            if piece is not None
            else by_role.get(source_tok.convert_ids_to_tokens(i))
        )
        if target is not None:
            expected[i] = target
    return expected


@pytest.mark.parametrize("source", ["mistral", "qwen"])
def test_aligned_distributions_are_the_sources_mapped_independently(
    source: str, represented: dict, aligned: dict, tokenizer_dirs: dict, chats: Path
) -> None:
    """Pairs from the rendered bytes (byte_reference), the map from independently read token
    bytes: the stored distributions must be the source's, moved onto exactly those tokens."""
    pivot_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    source_tok = AutoTokenizer.from_pretrained(tokenizer_dirs[source])
    pivot_template, _ = resolve_chat_template(pivot_tok, None)
    source_template, _ = resolve_chat_template(source_tok, None)
    mapping = _expected_pivot_ids(source_tok, pivot_tok, source)
    conversations = {c.id: c for c in load_conversations(chats)}
    pivot_data = load_representation(represented["smollm2"])
    source_data = load_representation(represented[source])
    out = load_representation_like(aligned[source])
    report = json.loads((aligned[source] / "report.json").read_text())
    assert report["examples_aligned"] == len(pivot_data) == len(out)
    total_aligned = 0
    for row in range(len(out)):
        a, p, s = (example_arrays(d, row) for d in (out, pivot_data, source_data))
        assert a["id"] == p["id"] == s["id"]
        conv = conversations[a["id"]]
        pivot_ref = _reference_supervised(pivot_tok, pivot_template, conv, BYTE_LEVEL["smollm2"])
        source_ref = _reference_supervised(source_tok, source_template, conv, BYTE_LEVEL[source])
        pairs = {}  # pivot position -> source position
        for m, (pivot_tokens, pivot_closed, pivot_end) in pivot_ref.items():
            source_tokens, source_closed, source_end = source_ref[m]
            by_span = {(x, y, piece): q for q, x, y, piece in source_tokens}
            pairs.update(
                {q: by_span[x, y, piece] for q, x, y, piece in pivot_tokens if (x, y, piece) in by_span}
            )
            if pivot_closed and source_closed:
                pairs[pivot_end] = source_end
        pivot_row = {int(q): i for i, q in enumerate(supervised_positions(p))}
        source_row = {int(q): j for j, q in enumerate(supervised_positions(s))}
        expected_rows = {pivot_row[q]: source_row[r] for q, r in pairs.items()}
        # Pairs whose source top-k maps to nothing are left out of the output (counted in the report).
        assert set(a["aligned_index"].tolist()) <= expected_rows.keys()
        for out_row, i in enumerate(a["aligned_index"]):
            j = expected_rows[int(i)]
            expected: dict[int, float] = {}
            for token, logprob in zip(s["topk_ids"][j], s["topk_logprobs"][j], strict=True):
                if int(token) in mapping:
                    target = mapping[int(token)]
                    expected[target] = expected.get(target, 0.0) + float(np.exp(logprob))
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
        missing = expected_rows.keys() - set(a["aligned_index"].tolist())
        assert all(not any(int(t) in mapping for t in s["topk_ids"][expected_rows[i]]) for i in missing)
        assert a["source_nll"] == s["nll"] and a["source_num_target_bytes"] == s["num_target_bytes"]
        total_aligned += len(a["aligned_index"])
    assert report["tokens_aligned"] == total_aligned
    assert 0 < report["tokens_aligned_share"] <= 1


def load_representation_like(path: Path):
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
        end_of_turn = np.flatnonzero(p["byte_start"] == p["byte_end"])
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


def test_align_and_fuse_commands(represented: dict, aligned: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source", str(represented["qwen"]),
                                  "--out", str(tmp_path / "a"), "--vocab-map", "stats"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pivot tokens aligned one-to-one" in result.output
    # stats only adds mappings for source ids without an exact byte match: the same pairs, and
    # every row the exact map gave keeps its ids; rows may only gain mass.
    stats, exact = load_representation_like(tmp_path / "a"), load_representation_like(aligned["qwen"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["vocab_map"] == "stats"
    for row in range(len(stats)):
        st, ex = example_arrays(stats, row), example_arrays(exact, row)
        assert set(ex["aligned_index"].tolist()) <= set(st["aligned_index"].tolist())
        where = {int(i): r for r, i in enumerate(st["aligned_index"])}
        for r, i in enumerate(ex["aligned_index"]):
            kept = set(st["topk_ids"][where[int(i)]].tolist())
            assert set(ex["topk_ids"][r][ex["topk_ids"][r] >= 0].tolist()) <= kept
            assert float(st["mapped_mass"][where[int(i)]]) >= float(ex["mapped_mass"][r]) - 1e-3

    result = runner.invoke(main, ["fuse", "--pivot", str(represented["smollm2"]), "--aligned", str(tmp_path / "a"),
                                  "--out", str(tmp_path / "f"), "--criterion", "token-min-ce", "--ce-unit", "token"])  # fmt: skip
    assert result.exit_code == 0, result.output
    fused = load_representation_like(tmp_path / "f")
    assert fused.features["topk_ids"].feature.length == 5
    # token-min-ce: each token's distribution comes from whichever candidate gave its gold text
    # the higher log-probability (the pivot's own where the source has no aligned row).
    pivot_data = load_representation(represented["smollm2"])
    from_source = 0
    for row in range(len(fused)):
        f, p, st = example_arrays(fused, row), example_arrays(pivot_data, row), example_arrays(stats, row)
        assert f["winner"] == -1
        expected_ids = p["topk_ids"].copy()
        for r, i in enumerate(st["aligned_index"]):
            if st["target_logprob"][r] > p["target_logprob"][i]:
                expected_ids[i] = st["topk_ids"][r]
                from_source += 1
        np.testing.assert_array_equal(f["topk_ids"], expected_ids)
    assert from_source > 0
    result = runner.invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source", str(represented["smollm2"]),
                                  "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code != 0 and "pivot model itself" in result.output


def test_representation_of_the_former_format_is_refused_before_any_output(
    represented: dict, tmp_path: Path
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(represented["qwen"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "fusion-train/representation@1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source", str(old),
                                       "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "representation@1" in result.output and "represent` again" in result.output
    assert not (tmp_path / "out").exists()
