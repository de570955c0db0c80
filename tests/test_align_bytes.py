"""`--token-align bytes`: hand-worked cases, the chain rule on real tokenizer pairs, identity with
`spans` for one tokenizer, the byte-continuation tables against a plain search, and the stage
against a plain reading of the stored distributions; `fuse --min-source-mass`; recipe keys.

Expectations come from the tokens' bytes as ``byte_reference`` reads them and from plain Python
over byte strings, never from ``fusion_train.continuations`` or ``align_by_bytes``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from byte_reference import BYTE_LEVEL, reference_places, reference_token_bytes
from conftest import build_tiny_model
from numeric import assert_close_at_scale, assert_stored_close
from transformers import AutoTokenizer

from fusion_train import continuations, vocab
from fusion_train import registry_assets as assets
from fusion_train.align import AlignedRows, Aligner, align, gold_ids
from fusion_train.chat import resolve_chat_template
from fusion_train.demo import demo_recipe
from fusion_train.explicit import align_inputs, fuse_inputs
from fusion_train.fuse import fuse
from fusion_train.recipe import AlignSettings, FuseSettings, parse_recipe
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import example_arrays, load_representation
from fusion_train.stages import RecipeError, stage_key
from fusion_train.sweep import parse_variation

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs: dict[str, Path]) -> Any:
    """name -> (tokenizer, TokenBytes with its template's end of turn); loaded once per module."""
    dirs = {**tokenizer_dirs, "gemma3": assets.gemma3_270m_dir()}
    cache: dict[str, tuple[Any, vocab.TokenBytes]] = {}

    def get(name: str) -> tuple[Any, vocab.TokenBytes]:
        if name not in cache:
            tokenizer = AutoTokenizer.from_pretrained(dirs[name])
            template, _ = resolve_chat_template(tokenizer, None)
            cache[name] = (tokenizer, vocab.token_bytes(tokenizer, template))
        return cache[name]

    return get


def bytes_aligner(tokenizers: Any, pivot: str, source: str) -> tuple[Aligner, vocab.VocabMap]:
    (_, pivot_bytes), (_, source_bytes) = tokenizers(pivot), tokenizers(source)
    mapping = vocab.map_vocabularies(source_bytes, pivot_bytes)
    tables = continuations.build_continuations(source_bytes, pivot_bytes, mapping.source_to_pivot)
    return Aligner.of("bytes", pivot_bytes, source_bytes, tables), mapping


def hand_arrays(
    tokenizer: Any, name: str, tokens: list[str], topk: list[dict[str, float]] | None = None
) -> dict[str, np.ndarray]:
    """Representation arrays of one answer (message 1) whose tokens lie end to end from byte 0,
    each covering the bytes it stands for (special tokens cover none); ``topk`` per token: the
    stored distribution as {token: probability}, padded with id -1."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token in tokens
    widths = [len(reference_token_bytes(tokenizer, i, BYTE_LEVEL[name]) or b"") for i in ids]
    ends = np.cumsum(widths)
    rows = topk or [{token: 1.0} for token in tokens]
    width = max(len(row) for row in rows)
    topk_ids = np.full((len(rows), width), -1, dtype=np.int64)
    topk_logprobs = np.full((len(rows), width), -np.inf, dtype=np.float32)
    for r, row in enumerate(rows):
        topk_ids[r, : len(row)] = tokenizer.convert_tokens_to_ids(list(row))
        topk_logprobs[r, : len(row)] = np.log(list(row.values()))
    return {
        "input_ids": np.array([0, *ids]), "run_message": np.array([1]), "run_start": np.array([1]),
        "run_length": np.array([len(ids)]), "byte_start": ends - widths, "byte_end": ends,
        "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
        "target_logprob": np.array([math.log(row.get(t, 1e-3)) for t, row in zip(tokens, rows, strict=True)],
                                   dtype=np.float32),
    }  # fmt: skip


def as_dict(rows: AlignedRows, row: int, tokenizer: Any) -> dict[str, float]:
    """One aligned row as {pivot token: probability}."""
    return {
        tokenizer.convert_ids_to_tokens(int(i)): float(p)
        for i, p in zip(rows.ids[row], rows.probs[row], strict=True)
        if i >= 0
    }


def assert_distribution(got: dict[str, float], expected: dict[str, float]) -> None:
    """Same tokens; probabilities equal up to float32 rounding at the row's scale."""
    assert got.keys() == expected.keys()
    assert_close_at_scale([got[t] for t in expected], list(expected.values()), dtype="float32", scale=1.0)


# --------------------------------------------------------------------------- hand-worked cases


def test_two_pivot_tokens_against_one_source_token(tokenizers: Any) -> None:
    """ " emoji": the pivot (SmolLM2) writes "Ġem" "oji", the source (Qwen) "Ġemoji". The source's
    stored distribution at " emoji": " emoji" .5, " emotion" .2, " em" .1, " hello" .1 (.1 not
    stored). "Ġem" starts where "Ġemoji" starts: each stored token goes to the longest pivot token
    its bytes begin with: " emoji" -> "Ġem" (SmolLM2 has no " emo..."), " emotion" -> "Ġemotion",
    " em" -> "Ġem", " hello" -> "Ġhello". "oji" starts 3 bytes into "Ġemoji": " em" is emitted;
    the stored tokens that begin with it and go on are " emoji" (.5) and " emotion" (.2): kept .7,
    their rest "oji" -> "oji", "otion" -> "otion", renormalised by .7."""
    aligner, mapping = bytes_aligner(tokenizers, "smollm2", "qwen")
    (pivot_tok, _), (source_tok, _) = tokenizers("smollm2"), tokenizers("qwen")
    p = hand_arrays(pivot_tok, "smollm2", ["Ġem", "oji", "<|im_end|>"])
    s = hand_arrays(source_tok, "qwen", ["Ġemoji", "<|im_end|>"], [
        {"Ġemoji": 0.5, "Ġemotion": 0.2, "Ġem": 0.1, "Ġhello": 0.1}, {"<|im_end|>": 0.9, "Ġ": 0.1}])  # fmt: skip
    rows, places = aligner.rows(p, s, mapping)
    assert places is not None
    assert places.pivot_index.tolist() == [0, 1, 2] and places.source_index.tolist() == [0, 0, 1]
    assert places.offset.tolist() == [0, 3, 0] and places.same_span.tolist() == [False, False, True]
    assert rows.pivot_index.tolist() == [0, 1, 2]
    assert_distribution(as_dict(rows, 0, pivot_tok), {"Ġem": 0.6, "Ġemotion": 0.2, "Ġhello": 0.1})
    assert_distribution(as_dict(rows, 1, pivot_tok), {"oji": 0.5 / 0.7, "otion": 0.2 / 0.7})
    assert_distribution(as_dict(rows, 2, pivot_tok), {"<|im_end|>": 0.9, "Ġ": 0.1})  # end of turn, by role
    assert_close_at_scale(rows.source_mass, [1.0, 0.7 / 0.9, 1.0], dtype="float32")
    assert_close_at_scale(rows.mapped_mass, [1.0, 1.0, 1.0], dtype="float32")
    # The source gave " emoji" .5. The pivot's two tokens get .6 x 5/7: " em" (.1) went to "Ġem"
    # but does not go on to "oji", and " emotion" (.2) goes on past " em" but was given to
    # "Ġemotion": converted = log .5 + log(1 + (.1 - .2) / .7), the decomposition in docs/formats.md.
    assert_close_at_scale(
        rows.target_logprob, [math.log(0.6), math.log(5 / 7), math.log(0.9)], dtype="float32"
    )
    converted = float(rows.target_logprob[:2].sum())
    assert_close_at_scale(converted, math.log(0.5) + math.log(1 + (0.1 - 0.2) / 0.7), dtype="float32")


def test_one_pivot_token_against_two_source_tokens(tokenizers: Any) -> None:
    """ " hello": the pivot writes "Ġhello", the source (Mistral) "▁hell" "o". The source's view at
    " hell" is one step: " hell" .6, " help" .3, " " .1 go to "Ġhell", "Ġhelp", "Ġ". No stored
    token's bytes begin with " hello", so the pivot's own token gets nothing: a pivot token longer
    than the source's tokens is not given the source's two-step probability (.6 x .9)."""
    aligner, mapping = bytes_aligner(tokenizers, "smollm2", "mistral")
    (pivot_tok, _), (source_tok, _) = tokenizers("smollm2"), tokenizers("mistral")
    p = hand_arrays(pivot_tok, "smollm2", ["Ġhello"])
    s = hand_arrays(source_tok, "mistral", ["▁hell", "o"], [{"▁hell": 0.6, "▁help": 0.3, "▁": 0.1},
                                                           {"o": 0.9, "▁": 0.1}])  # fmt: skip
    rows, places = aligner.rows(p, s, mapping)
    assert places is not None and places.offset.tolist() == [0] and not places.same_span.any()
    assert_distribution(as_dict(rows, 0, pivot_tok), {"Ġhell": 0.6, "Ġhelp": 0.3, "Ġ": 0.1})
    assert rows.target_logprob.tolist() == [-np.inf]
    assert rows.source_mass.tolist() == [1.0]


EMOJI_PIVOT = ["ĠðŁĺ", "Ģ"]  # SmolLM2's " 😀": b" \xf0\x9f\x98", b"\x80"
EMOJI_SOURCE = ["▁", "😀"]  # Mistral's


def test_byte_piece_of_a_split_emoji(tokenizers: Any) -> None:
    """The pivot's second byte piece of " 😀", b"\\x80", starts 3 bytes into Mistral's "😀": the
    source's distribution there, given b"\\xf0\\x9f\\x98" emitted, keeps "😀" (.5) and "😁" (.25,
    b"\\xf0\\x9f\\x98\\x81"), not the one-byte "<0xF0>" (it ends inside the emitted bytes) nor "▁";
    their last bytes go to the pivot's byte tokens "Ģ" and "ģ". The first piece starts with "▁":
    the source's tokens there are shorter than it, so it gets their pivot tokens, not itself."""
    aligner, mapping = bytes_aligner(tokenizers, "smollm2", "mistral")
    (pivot_tok, _), (source_tok, _) = tokenizers("smollm2"), tokenizers("mistral")
    p = hand_arrays(pivot_tok, "smollm2", EMOJI_PIVOT)
    s = hand_arrays(source_tok, "mistral", EMOJI_SOURCE, [
        {"▁": 0.8, "▁hell": 0.2}, {"😀": 0.5, "😁": 0.25, "<0xF0>": 0.15, "▁": 0.1}])  # fmt: skip
    assert p["byte_end"].tolist() == [4, 5] and s["byte_end"].tolist() == [1, 5]
    rows, places = aligner.rows(p, s, mapping)
    assert places is not None and places.offset.tolist() == [0, 3] and places.source_index.tolist() == [0, 1]
    assert_distribution(as_dict(rows, 0, pivot_tok), {"Ġ": 0.8, "Ġhell": 0.2})
    assert_distribution(as_dict(rows, 1, pivot_tok), {"Ģ": 0.5 / 0.75, "ģ": 0.25 / 0.75})
    assert_close_at_scale(rows.source_mass, [1.0, 0.75], dtype="float32")
    assert rows.target_logprob[0] == -np.inf
    assert_close_at_scale(rows.target_logprob[1], math.log(2 / 3), dtype="float32")


def test_a_prefix_no_stored_token_continues(tokenizers: Any) -> None:
    """The same emoji, but no stored token at "😀" goes on from b"\\xf0\\x9f\\x98" (top-k
    truncation): the pivot's b"\\x80" gets no distribution (the pivot's own stays), counted."""
    aligner, mapping = bytes_aligner(tokenizers, "smollm2", "mistral")
    (pivot_tok, _), (source_tok, _) = tokenizers("smollm2"), tokenizers("mistral")
    p = hand_arrays(pivot_tok, "smollm2", EMOJI_PIVOT)
    s = hand_arrays(source_tok, "mistral", EMOJI_SOURCE, [{"▁": 1.0}, {"<0xF0>": 0.6, "▁": 0.4}])
    rows, places = aligner.rows(p, s, mapping)
    assert places is not None and places.pivot_index.tolist() == [0, 1]
    assert rows.pivot_index.tolist() == [0] and rows.nothing_kept == 1 and rows.source_rows == 2


# --------------------------------------------------------------------------- the chain rule

CHAIN_TEXTS = [
    "The quick brown fox jumps over 13 lazy dogs, twice: on 2024-12-02 and 1999-01-31.",
    "def tokenize(text):\n    return [t.strip() for t in text.split(',') if t]  # 42 ids\n",
    "中文回答，然后日本語のテキスト。한국어도 있습니다.",
    "Emoji 😀🎉 and flags 🇫🇷, a ZWJ 👩\u200d💻 too; naïve café, unbelievable distillation!",
]


def _greedy_split(data: bytes, pivot_pieces: set[bytes], longest: int) -> list[bytes]:
    """``data`` cut into the longest pivot tokens, left to right (plain slicing)."""
    out = []
    while data:
        piece = next(data[:n] for n in range(min(len(data), longest), 0, -1) if data[:n] in pivot_pieces)
        out.append(piece)
        data = data[len(piece) :]
    return out


def _longest(data: bytes, pivot_pieces: set[bytes], longest: int) -> bytes:
    return next((data[:n] for n in range(min(len(data), longest), 0, -1) if data[:n] in pivot_pieces), b"")


def _harmless(
    t: bytes, emitted: list[bytes], pieces: list[bytes], pivot_pieces: set[bytes], longest: int
) -> bool:
    """Whether stored token ``t`` leaves the chain rule over a source token exact (condition (E) of
    docs/formats.md): at every pivot piece ``j`` but the last, ``t`` goes to that piece exactly
    when it goes on past it; at the last it does not go to the piece (it does not extend the gold)."""

    def kept(j: int) -> bool:
        return len(t) > len(emitted[j]) and t.startswith(emitted[j])

    def goes_to(j: int) -> bool:
        return kept(j) and _longest(t[len(emitted[j]) :], pivot_pieces, longest) == pieces[j]

    last = len(pieces) - 1
    return all(goes_to(j) == kept(j + 1) for j in range(last)) and not goes_to(last)


@pytest.fixture(scope="module")
def chain_tables(tokenizers: Any) -> Any:
    """source -> (its vocabulary as ``byte_reference`` reads it, the bytes aligner from it onto
    smollm2 and their vocabulary map): built once per source, not once per text."""

    @functools.cache
    def get(source: str) -> tuple[list[tuple[int, bytes | None]], Aligner, vocab.VocabMap]:
        source_tok, _ = tokenizers(source)
        source_vocab = [
            (i, reference_token_bytes(source_tok, i, BYTE_LEVEL[source])) for i in range(len(source_tok))
        ]
        return source_vocab, *bytes_aligner(tokenizers, "smollm2", source)

    return get


def _chain_case(
    tokenizers: Any, chain_tables: Any, source: str, text: str, seed: int, drop_gold: float
) -> list[tuple[str, list[float], bool, list[float | None]]]:
    """Both tokenizations of ``text`` and a known full distribution over the source vocabulary at
    every source token: the gold token with probability g, distractors that start with another
    byte, and (inside source tokens the pivot splits) distractors that share some of the gold's
    bytes without breaking (E); 10% of the mass lies outside the stored top-k. With probability
    ``drop_gold`` the gold itself is not stored. Returns per minimal shared-boundary stretch
    (kind, source gold log-probabilities, gold stored everywhere, converted log-probabilities of the
    pivot's tokens or None where a pivot token got no distribution)."""
    rng = random.Random(f"{source}-{seed}")
    (pivot_tok, pivot_bytes), (source_tok, _) = tokenizers("smollm2"), tokenizers(source)
    pivot_ids = pivot_tok(text, add_special_tokens=False)["input_ids"]
    source_ids = source_tok(text, add_special_tokens=False)["input_ids"]
    pivot_places = reference_places(pivot_tok, pivot_ids, text, BYTE_LEVEL["smollm2"])
    source_places = reference_places(source_tok, source_ids, text, BYTE_LEVEL[source])
    data = text.encode("utf-8")
    pivot_pieces = {piece for piece in pivot_bytes.pieces if piece}
    longest = max(map(len, pivot_pieces))
    source_vocab, aligner, mapping = chain_tables(source)
    by_first: dict[int, list[tuple[int, bytes]]] = {}
    for i, piece in source_vocab:
        if piece:
            by_first.setdefault(piece[0], []).append((i, piece))

    topk, gold_logprob, stored_gold = [], [], []
    for place, token in zip(source_places, source_ids, strict=True):
        gold = rng.uniform(0.2, 0.8)
        q = data[place.start : place.end]
        inside = [x for x in pivot_places if place.start <= x.start and x.end <= place.end]
        others = [(i, b) for i, b in rng.sample(source_vocab, 400) if b and b[:1] != q[:1]][:4]
        if q and inside and b"".join(x.stands_for or b"" for x in inside) == q:
            pieces = [x.stands_for for x in inside]
            emitted = [b"".join(pieces[:j]) for j in range(len(pieces))]
            near = rng.sample(by_first[q[0]], min(300, len(by_first[q[0]])))
            others += [
                (i, b) for i, b in near if i != token and _harmless(b, emitted, pieces, pivot_pieces, longest)
            ][:5]
        shares = np.array([rng.uniform(0.5, 1.5) for _ in others])
        probs = [gold, *(0.9 * (1 - gold) * shares / shares.sum()).tolist()]
        entries = list(zip([token, *(i for i, _ in others)], probs, strict=True))
        keep_gold = rng.random() >= drop_gold
        topk.append(entries if keep_gold else entries[1:])
        gold_logprob.append(math.log(gold))
        stored_gold.append(keep_gold)

    def arrays(ids: list[int], places: list, rows: list | None) -> dict[str, np.ndarray]:
        width = max((len(r) for r in rows), default=1) if rows else 1
        topk_ids = np.full((len(ids), width), -1, dtype=np.int64)
        topk_logprobs = np.full((len(ids), width), -np.inf, dtype=np.float32)
        for r, row in enumerate(rows or []):
            topk_ids[r, : len(row)] = [i for i, _ in row]
            topk_logprobs[r, : len(row)] = np.log([p for _, p in row])
        # A token that covers fewer bytes than it stands for (SentencePiece's space at the start)
        # keeps the span the reference reads; the alignment then leaves it out.
        return {"input_ids": np.array([0, *ids]), "run_message": np.array([1]), "run_start": np.array([1]),
                "run_length": np.array([len(ids)]), "byte_start": np.array([x.start for x in places]),
                "byte_end": np.array([x.end for x in places]), "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
                "target_logprob": np.array(gold_logprob if rows else [0.0] * len(ids), dtype=np.float32)}  # fmt: skip

    rows, _ = aligner.rows(
        arrays(pivot_ids, pivot_places, None), arrays(source_ids, source_places, topk), mapping
    )
    converted = dict(zip(rows.pivot_index.tolist(), rows.target_logprob.tolist(), strict=True))

    def edges(places: list) -> set[int]:
        return {x.start for x in places} | {x.end for x in places}

    shared = sorted(edges(pivot_places) & edges(source_places))
    stretches = []
    for low, high in itertools.pairwise(shared):
        pivot_in = [
            r for r, x in enumerate(pivot_places) if low <= x.start and x.end <= high and x.end > x.start
        ]
        source_in = [
            r for r, x in enumerate(source_places) if low <= x.start and x.end <= high and x.end > x.start
        ]
        if not pivot_in or not source_in:
            continue
        own = all(x.stands_for is not None and len(x.stands_for) == x.end - x.start
                  for x in [pivot_places[r] for r in pivot_in] + [source_places[r] for r in source_in])  # fmt: skip
        if len(source_in) == 1:
            q = data[low:high]
            greedy = _greedy_split(q, pivot_pieces, longest) == [pivot_places[r].stands_for for r in pivot_in]
            kind = "refines" if own and greedy else "refines, not greedy" if own else "other bytes"
            kind = "same span" if kind == "refines" and len(pivot_in) == 1 else kind
        else:
            kind = "coarser" if len(pivot_in) == 1 and own else "crossing"
        stretches.append((
            kind, [gold_logprob[r] for r in source_in], all(stored_gold[r] for r in source_in),
            [converted.get(r) for r in pivot_in],
        ))  # fmt: skip
    return stretches


@pytest.mark.parametrize("source", ["qwen", "mistral", "gemma3"])
def test_chain_rule_over_shared_boundaries_on_real_tokenizer_pairs(
    tokenizers: Any, chain_tables: Any, source: str
) -> None:
    """Over a stretch whose first and last byte offsets are boundaries of both tokenizations, where
    the pivot splits one source token q into the longest pivot tokens left to right: the converted
    log-probabilities of the pivot's tokens add up to the source's log-probability of q, exactly,
    when every stored token satisfies (E) and q is stored (a pivot token covering the same bytes as
    q takes q's own log-probability, stored or not). Top-k truncation can only lower it:
    a stretch whose gold token is not stored converts to -inf or leaves a pivot token without a
    distribution, never to more. Where one pivot token covers several source tokens, it gets only
    the stored mass of source tokens that begin with its bytes: none here, so -inf."""
    counts: dict[str, int] = {}
    for seed, text in enumerate(CHAIN_TEXTS):
        for drop_gold in (0.0, 0.3):
            for kind, gold, stored, converted in _chain_case(
                tokenizers, chain_tables, source, text, seed, drop_gold
            ):
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "same span" or (kind == "refines" and stored):
                    assert None not in converted, (text, gold, converted)
                    expected = sum(gold)
                    assert_close_at_scale(
                        sum(converted), expected, dtype="float32", scale=max(1.0, abs(expected))
                    )
                elif kind == "refines":  # the gold was truncated away
                    assert None in converted or sum(converted) == -np.inf
                elif kind == "coarser":
                    assert converted[0] is None or converted[0] == -np.inf
    assert counts["refines"] >= 20 and counts["same span"] >= 80, counts
    assert counts["refines"] >= 4 * counts.get("refines, not greedy", 0), counts


# --------------------------------------------------------------------------- one tokenizer


def test_same_tokenizer_on_both_sides_gives_the_spans_output(
    tiny_models: dict[str, Path],
    represented: dict[str, Path],
    chats: Path,
    tmp_path: Path,
    tokenizer_dirs: dict,
) -> None:
    """A second model on SmolLM2's tokenizer: every pivot token pairs with the source token covering
    the same bytes, and bytes adds nothing; both outputs are identical, column by column."""
    other = build_tiny_model(tokenizer_dirs["smollm2"], tmp_path / "other", seed=11)
    represent(other, chats, tmp_path / "other-repr", RepresentSettings(top_k=5, chunk_size=3), progress=False)
    reports = {
        method: align(
            represented["smollm2"], tmp_path / "other-repr", tmp_path / method, method, progress=False
        )
        for method in ("spans", "bytes")
    }
    spans, found = (datasets.load_from_disk(str(tmp_path / m / "data")).to_dict() for m in ("spans", "bytes"))
    assert found == spans
    assert reports["bytes"]["tokens_aligned"] == reports["spans"]["tokens_aligned"]
    assert reports["bytes"]["bytes"]["shared_start"] == reports["bytes"]["bytes"]["inside"] == 0
    assert all(all(m == 1.0 for m in row) for row in found["source_mass"])


# --------------------------------------------------------------------------- the tables


@pytest.mark.parametrize("source", ["mistral", "gemma3"])
def test_tables_agree_with_a_plain_longest_prefix_search(tokenizers: Any, source: str) -> None:
    """For sampled source tokens and every byte offset in them: the longest pivot token their
    remaining bytes begin with (a dictionary of the pivot's bytes, read by byte_reference, sliced
    from the longest), and whether two tokens' first bytes agree."""
    (pivot_tok, pivot_bytes), (source_tok, source_bytes) = tokenizers("smollm2"), tokenizers(source)
    mapping = vocab.map_vocabularies(source_bytes, pivot_bytes)
    tables = continuations.build_continuations(source_bytes, pivot_bytes, mapping.source_to_pivot)
    pivot_ids: dict[bytes, int] = {}
    for i in range(len(pivot_tok)):
        piece = reference_token_bytes(pivot_tok, i, BYTE_LEVEL["smollm2"])
        if piece:
            pivot_ids.setdefault(piece, i)
    longest = max(map(len, pivot_ids))
    rng = random.Random(source)
    sample = rng.sample(range(len(source_tok)), 1500)
    # Gemma's "<unusedN>" are added special tokens, which the reference cannot tell from text.
    pieces = {
        i: reference_token_bytes(source_tok, i, BYTE_LEVEL[source])
        for i in sample
        if i not in source_bytes.specials
    }
    for i, piece in pieces.items():
        if not piece:
            assert tables.lengths[i] == 0
            continue
        assert tables.lengths[i] == len(piece)
        for o in range(len(piece)):
            rest = piece[o:]
            expected = next(
                (pivot_ids[rest[:n]] for n in range(min(len(rest), longest), 0, -1) if rest[:n] in pivot_ids),
                -1,
            )
            assert tables.first_pivot[tables.starts[i] + o] == expected, (piece, o)
    texts = [(i, p) for i, p in pieces.items() if p][:150]
    for i, a in texts:
        for j, b in texts:
            for o in range(1, min(len(a), len(b)) + 1):
                same = tables.prefix[tables.starts[i] + o - 1] == tables.prefix[tables.starts[j] + o - 1]
                assert same == (a[:o] == b[:o])


def test_tables_are_cached_by_content(
    tokenizers: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (pivot_tok, pivot_bytes), (source_tok, source_bytes) = tokenizers("smollm2"), tokenizers("mistral")
    specials = vocab.map_vocabularies(source_bytes, pivot_bytes).source_to_pivot
    first = continuations.load_continuations(
        source_tok, pivot_tok, source_bytes, pivot_bytes, specials, tmp_path
    )
    (written,) = tmp_path.iterdir()
    assert "-continuations-" in written.name

    def fail(*args: object) -> None:
        raise AssertionError("the cached tables should have been used")

    monkeypatch.setattr(continuations, "build_continuations", fail)
    second = continuations.load_continuations(
        source_tok, pivot_tok, source_bytes, pivot_bytes, specials, tmp_path
    )
    for name in ("starts", "lengths", "first_pivot", "prefix", "head"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    monkeypatch.undo()
    other = [*pivot_bytes.pieces]
    other[100] = b"changed"
    changed = vocab.TokenBytes(
        other, pivot_bytes.specials, pivot_bytes.byte_pieces, pivot_bytes.prepends_space
    )
    continuations.load_continuations(source_tok, pivot_tok, source_bytes, changed, specials, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # other pivot bytes: another file


# --------------------------------------------------------------------------- the stage


def _plain_view(
    p: dict, s: dict, row: int, pivot_ids: dict[bytes, int], longest: int, source_piece: Any, pivot_piece: Any,
    special_map: dict[int, int],
) -> tuple[dict[int, float], float, float] | None:  # fmt: skip
    """What a pivot token should receive, read plainly: the source token covering its first byte
    (spans and bytes from the representation), the stored tokens that go on from the bytes already
    emitted, each given to the longest pivot token its remaining bytes begin with. None: nothing."""
    start, end = int(p["byte_start"][row]), int(p["byte_end"][row])
    message = np.repeat(p["run_message"], p["run_length"])[row]
    s_messages = np.repeat(s["run_message"], s["run_length"])
    s_gold = gold_ids(s)
    if start == end:  # end of turn: the source's end of turn, by role
        matches = [
            j
            for j in range(len(s_gold))
            if s_messages[j] == message and s["byte_start"][j] == s["byte_end"][j]
        ]
        if not matches or source_piece(s_gold[matches[0]]) is not None:
            return None
        j, offset = matches[0], 0
    else:
        gold_bytes = pivot_piece(gold_ids(p)[row])
        if gold_bytes is None or len(gold_bytes) != end - start:
            return None
        covering = [j for j in range(len(s_gold)) if s_messages[j] == message
                    and s["byte_start"][j] <= start < s["byte_end"][j] and s["byte_end"][j] > s["byte_start"][j]]  # fmt: skip
        if len(covering) != 1:
            return None
        j = covering[0]
        q = source_piece(s_gold[j])
        if q is None or len(q) != s["byte_end"][j] - s["byte_start"][j]:
            return None
        offset = start - int(s["byte_start"][j])
        emitted = q[:offset]
    probs = np.exp(s["topk_logprobs"][j].astype(np.float64))
    view: dict[int, float] = {}
    kept = 0.0
    for token, prob in zip(s["topk_ids"][j].tolist(), probs.tolist(), strict=True):
        piece = source_piece(token)
        if offset == 0 and piece is None:
            kept += prob
            target = special_map.get(token, -1)
        elif offset == 0 or (piece is not None and len(piece) > offset and piece.startswith(emitted)):
            kept += prob
            rest = piece[offset:]
            target = next(
                (pivot_ids[rest[:n]] for n in range(min(len(rest), longest), 0, -1) if rest[:n] in pivot_ids),
                -1,
            )
        else:
            continue
        if target >= 0:
            view[target] = view.get(target, 0.0) + prob
    if not view:
        return None
    scale = kept if offset else 1.0
    return {t: v / scale for t, v in view.items()}, kept / float(probs.sum()), sum(view.values()) / kept


@pytest.mark.parametrize("source", ["mistral", "qwen"])
def test_stage_against_a_plain_reading_of_the_stored_distributions(
    source: str, represented: dict, tokenizer_dirs: dict, tmp_path: Path
) -> None:
    """`align --token-align bytes` on real tokenizers and tiny models' top-k: every row against the
    plain reading above (tokens' bytes by byte_reference, special tokens by role), stored values
    within one float16 step; every pivot token the plain reading finds is written."""
    report = align(represented["smollm2"], represented[source], tmp_path / "out", "bytes", progress=False)
    spans = align(represented["smollm2"], represented[source], tmp_path / "spans", "spans", progress=False)
    pivot_tok = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    source_tok = AutoTokenizer.from_pretrained(tokenizer_dirs[source])

    # Added special tokens (Qwen's "<|extra_N|>") are not text; the reference cannot tell them apart.
    specials = vocab.token_bytes(source_tok, resolve_chat_template(source_tok, None)[0]).specials

    def source_piece(i: int) -> bytes | None:
        return None if int(i) in specials else reference_token_bytes(source_tok, int(i), BYTE_LEVEL[source])

    def pivot_piece(i: int) -> bytes | None:
        return reference_token_bytes(pivot_tok, int(i), BYTE_LEVEL["smollm2"])

    pivot_ids: dict[bytes, int] = {}
    for i in range(len(pivot_tok)):
        if piece := pivot_piece(i):
            pivot_ids.setdefault(piece, i)
    longest = max(map(len, pivot_ids))
    special_map = {source_tok.eos_token_id: pivot_tok.convert_tokens_to_ids("<|im_end|>")}
    if source_tok.bos_token_id is not None:
        special_map[source_tok.bos_token_id] = pivot_tok.bos_token_id
    pivot_data, source_data = (
        load_representation(represented["smollm2"]),
        load_representation(represented[source]),
    )
    out = datasets.load_from_disk(str(tmp_path / "out" / "data"))
    written = 0
    for row in range(len(out)):
        a, p, s = (example_arrays(d, row) for d in (out, pivot_data, source_data))
        expected = {}
        for r in range(len(p["byte_start"])):
            found = _plain_view(p, s, r, pivot_ids, longest, source_piece, pivot_piece, special_map)
            if found is not None:
                expected[r] = found
        assert a["aligned_index"].tolist() == sorted(expected)
        for index, r in enumerate(a["aligned_index"].tolist()):
            view, source_mass, mapped = expected[r]
            got = {
                int(t): lp
                for t, lp in zip(a["topk_ids"][index], a["topk_logprobs"][index], strict=True)
                if t >= 0
            }
            assert got.keys() == view.keys()
            assert_stored_close([got[t] for t in view], np.log(list(view.values())), stored="float16",
                                computed="float32", ulps=64)  # fmt: skip
            assert_stored_close([a["source_mass"][index], a["mapped_mass"][index]], [source_mass, mapped],
                                stored="float16", computed="float32", ulps=64)  # fmt: skip
        written += len(a["aligned_index"])
    assert report["tokens_aligned"] == written >= spans["tokens_aligned"]
    found = report["bytes"]
    assert found["same_span"] + found["shared_start"] + found["inside"] == written
    assert sum(found[f"first_{k}"] for k in ("same_span", "shared_start", "inside", "uncovered")) == sum(
        len(set(example_arrays(pivot_data, r)["run_message"].tolist())) for r in range(len(pivot_data))
    )


def test_align_bytes_refuses_another_vocab_map(represented: dict, tmp_path: Path) -> None:
    from fusion_train.align import AlignmentError

    with pytest.raises(AlignmentError, match="vocab_map mined does not apply to token_align bytes"):
        align(represented["smollm2"], represented["qwen"], tmp_path / "out", "bytes", "mined", progress=False)


# --------------------------------------------------------------------------- fuse and train


def test_fuse_keeps_the_pivot_where_the_source_mass_is_low_and_train_reads_the_result(
    represented: dict, tiny_models: dict, tmp_path: Path
) -> None:
    """Rows of a bytes alignment resting on less than --min-source-mass of the source's stored
    mass keep the pivot's own distribution (token-min-ce: the source never supplies them); the
    fused data train on."""
    from fusion_train.train import TrainConfig, train

    align(represented["smollm2"], represented["mistral"], tmp_path / "a", "bytes", progress=False)
    align(represented["smollm2"], represented["mistral"], tmp_path / "s", "spans", progress=False)
    aligned = datasets.load_from_disk(str(tmp_path / "a" / "data"))
    masses = np.concatenate([np.asarray(m, dtype=np.float32) for m in aligned["source_mass"]])
    threshold = float(np.quantile(masses[masses < 1], 0.5)) if (masses < 1).any() else 0.5
    below = int((masses < threshold).sum())
    assert below > 0
    report = fuse(represented["smollm2"], [tmp_path / "a"], tmp_path / "f", "token-min-ce", progress=False,
                  min_source_mass=threshold)  # fmt: skip
    assert report["rows_below_min_source_mass"] == {"mistral": below}
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["min_source_mass"] == threshold
    pivot_data = load_representation(represented["smollm2"])
    fused = datasets.load_from_disk(str(tmp_path / "f" / "data"))
    for row in range(len(fused)):
        f, p, a = (example_arrays(d, row) for d in (fused, pivot_data, aligned))
        low = a["aligned_index"][a["source_mass"].astype(np.float32) < threshold]
        np.testing.assert_array_equal(f["topk_ids"][low], p["topk_ids"][low])
    fuse(represented["smollm2"], [tmp_path / "s"], tmp_path / "fs", progress=False, min_source_mass=threshold)
    assert "min_source_mass" not in json.loads((tmp_path / "fs" / "manifest.json").read_text())

    config = TrainConfig(model=str(tiny_models["smollm2"]), fused=str(tmp_path / "f"), out=str(tmp_path / "t"),
                         max_steps=1, warmup_ratio=0.0, logging_steps=1, bf16=False)  # fmt: skip
    summary = train(config)
    assert summary is not None and summary["steps"] == 1


# --------------------------------------------------------------------------- recipes


# The keys of the demo recipes' align and fuse stages before --token-align bytes existed, for
# placeholder upstream keys: runs made then must keep finding their folders.
DEMO_ALIGN_KEY, DEMO_FUSE_KEY = "2c93a7172c80", "d97436857fdb"


@pytest.mark.parametrize("quick", [True, False])
def test_demo_recipes_keep_their_keys_and_bytes_changes_them(
    quick: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fusion_train.demo as demo

    monkeypatch.setattr(demo, "demo_models", lambda out: {"data": {}})  # no model is fetched or built
    recipe = demo_recipe(tmp_path, quick)
    align_settings, fuse_settings = AlignSettings(**recipe["align"]), FuseSettings(**recipe["fuse"])
    assert stage_key("align", align_inputs("P", "S", align_settings)) == DEMO_ALIGN_KEY
    assert stage_key("fuse", fuse_inputs("P", "A", fuse_settings, align_settings)) == DEMO_FUSE_KEY
    assert stage_key("fuse", fuse_inputs("P", "A", FuseSettings(**recipe["fuse"], min_source_mass=0.9),
                                         align_settings)) == DEMO_FUSE_KEY  # fmt: skip
    by_bytes = AlignSettings("bytes", "exact")
    assert stage_key("align", align_inputs("P", "S", by_bytes)) != DEMO_ALIGN_KEY
    assert (
        fuse_inputs("P", "A", fuse_settings, by_bytes)["settings"]["min_source_mass"]
        == fuse_settings.min_source_mass
    )
    assert stage_key("fuse", fuse_inputs("P", "A", FuseSettings(min_source_mass=0.9), by_bytes)) != stage_key(
        "fuse", fuse_inputs("P", "A", FuseSettings(), by_bytes)
    )


def test_recipes_and_sweeps_take_bytes(tmp_path: Path) -> None:
    for name in ("pivot", "source"):
        (tmp_path / name).mkdir()
    (tmp_path / "chats.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    base = {"pivot": {"name": "p", "path": "pivot"}, "sources": [{"name": "s", "path": "source"}],
            "data": {"train": "chats.jsonl", "heldout_fraction": 0.5}}  # fmt: skip

    def parse(raw: dict) -> Any:
        return parse_recipe(raw, base=tmp_path, default_run_dir=tmp_path / "run")

    recipe = parse({**base, "align": {"token_align": "bytes"}, "fuse": {"min_source_mass": 0.25}})
    assert recipe.align.token_align == "bytes" and recipe.fuse.min_source_mass == 0.25
    own = parse({**base, "sources": [{"name": "s", "path": "source", "settings": {
        "align": {"token_align": "bytes"}, "fuse": {"min_source_mass": 0.5}}}]})  # fmt: skip
    align_settings, fuse_settings, _ = own.stages_for(own.sources[0])
    assert align_settings.token_align == "bytes" and fuse_settings.min_source_mass == 0.5
    with pytest.raises(RecipeError, match="align: vocab_map mined does not apply to token_align bytes"):
        parse({**base, "align": {"token_align": "bytes", "vocab_map": "mined"}})
    with pytest.raises(RecipeError, match=r"sources\[0\].settings.align: vocab_map stats does not apply"):
        parse({**base, "align": {"vocab_map": "stats"},
               "sources": [{"name": "s", "path": "source", "settings": {"align": {"token_align": "bytes"}}}]})  # fmt: skip
    with pytest.raises(RecipeError, match=r"fuse\.min_source_mass: 1\.5 is not in the range"):
        parse({**base, "fuse": {"min_source_mass": 1.5}})
    assert parse_variation("align.token_align=bytes") == ("align", "token_align", ["bytes"])
    assert parse_variation("fuse.min_source_mass=0.1,0.3") == ("fuse", "min_source_mass", [0.1, 0.3])


def test_align_command_and_outputs_written_before_source_mass(represented: dict, tmp_path: Path) -> None:
    """`fusion-train align --token-align bytes` reports its cases; an aligned output written before
    the source_mass column existed fuses as if every row used the whole stored mass."""
    import shutil

    from click.testing import CliRunner

    from fusion_train.cli import main

    result = CliRunner().invoke(main, ["align", "--pivot", str(represented["smollm2"]), "--source",
                                       str(represented["qwen"]), "--out", str(tmp_path / "a"), "--token-align", "bytes"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "pivot tokens with a source distribution" in result.output
        and "inside a source token" in result.output
    )
    align(represented["smollm2"], represented["qwen"], tmp_path / "s", progress=False)
    shutil.copytree(tmp_path / "s", tmp_path / "old", ignore=shutil.ignore_patterns("data"))
    old = datasets.load_from_disk(str(tmp_path / "s" / "data")).remove_columns("source_mass")
    old.save_to_disk(str(tmp_path / "old" / "data"))
    for name in ("s", "old"):
        fuse(
            represented["smollm2"],
            [tmp_path / name],
            tmp_path / f"f-{name}",
            progress=False,
            min_source_mass=1.0,
        )
    fused = [datasets.load_from_disk(str(tmp_path / f"f-{name}" / "data")).to_dict() for name in ("s", "old")]
    assert fused[0] == fused[1]
