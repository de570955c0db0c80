"""Vocabulary maps: byte strings of real vocabularies, hand-built tokenizers with known answers,
the mined rule against a brute-force search, the top-k application, and the on-disk cache."""

from __future__ import annotations

import dataclasses
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
from numeric import assert_close_at_scale
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fusion_train import registry_assets, vocab
from fusion_train.dtw import edit_distance
from fusion_train.models import tokenizer_hash
from fusion_train.vocab import build_vocab_map, map_vocabularies, mined_matches, token_bytes
from fusion_train.vocab import edit_distance as vocab_edit_distance
from fusion_train.vocab import maps as vocab_maps

VARIED_TEXT = (
    "Hello world!\n\tIndented\ttabs  and   spaces\n\n"
    "def f(x):\n    return x**2  # 😀🎉 emoji\n"
    "中文字符 日本語のテキスト 한국어 — “quotes” café naïve\r\n  trailing  "
)
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def real(tokenizer_dirs: dict[str, Path]) -> dict[str, tuple[object, vocab.TokenBytes]]:
    loaded = {}
    for name, path in tokenizer_dirs.items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        loaded[name] = (tokenizer, token_bytes(tokenizer))
    return loaded


def _encoded_bytes(table: vocab.TokenBytes, text: str) -> bytes:
    """What the token bytes of an encoding of ``text`` add up to: the text, plus the one space a
    SentencePiece tokenizer puts before text that does not start with one."""
    raw = text.encode("utf-8")
    return b" " + raw if table.prepends_space and not raw.startswith(b" ") else raw


# --------------------------------------------------------------------------- real vocabularies


@pytest.mark.parametrize("name", ["smollm2", "mistral", "qwen"])
@pytest.mark.parametrize("text", [VARIED_TEXT, " " + VARIED_TEXT, "x", "\n\n", "😀"])
def test_encoding_bytes_add_up_to_the_text(real: dict, name: str, text: str) -> None:
    tokenizer, table = real[name]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(table.pieces[i] for i in ids) == _encoded_bytes(table, text)


def test_conventions_read_from_the_tokenizer(real: dict) -> None:
    smollm2, smollm2_bytes = real["smollm2"]
    mistral, mistral_bytes = real["mistral"]
    assert smollm2_bytes.pieces[smollm2.convert_tokens_to_ids("Ċ")] == b"\n"  # GPT-2 table
    assert smollm2_bytes.pieces[smollm2.convert_tokens_to_ids("Ġthe")] == b" the"
    assert mistral_bytes.pieces[mistral.convert_tokens_to_ids("<0x0A>")] == b"\n"  # byte piece
    assert mistral_bytes.pieces[mistral.convert_tokens_to_ids("▁the")] == b" the"  # word marker
    assert len(mistral_bytes.byte_pieces) == 256 and not smollm2_bytes.byte_pieces
    assert mistral_bytes.prepends_space and not smollm2_bytes.prepends_space


@pytest.mark.parametrize("name", ["smollm2", "mistral", "qwen"])
def test_token_bytes_round_trip(real: dict, name: str) -> None:
    """Each sampled token's bytes decode as the tokenizer decodes it, and re-encode to it."""
    tokenizer, table = real[name]
    checked = reproduced = 0
    for index in range(0, len(table), 53):
        piece = table.pieces[index]
        if piece is None or index in table.byte_pieces:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character: no text of its own
            continue
        if table.prepends_space:
            if not text.startswith(" "):
                continue  # cannot be the first token of an encoding
            text = text[1:] if text[1:] and not text[1:].startswith(" ") else text
        assert tokenizer.decode([index]) == text
        checked += 1
        reproduced += tokenizer(text, add_special_tokens=False)["input_ids"] == [index]
    print(f"{name}: {reproduced}/{checked} sampled tokens re-encode to themselves")
    # BPE keeps a few tokens its merges never produce alone; nearly all must round-trip.
    assert checked > 100 and reproduced >= 0.95 * checked


def test_special_roles_of_real_tokenizers(real: dict) -> None:
    def roles(name: str, content: str) -> tuple[str, ...]:
        tokenizer, table = real[name]
        return table.specials[tokenizer.convert_tokens_to_ids(content)].roles

    assert roles("smollm2", "<|im_end|>")[0] == "end_of_turn" and "eos" in roles("smollm2", "<|im_end|>")
    assert roles("qwen", "<|im_end|>")[0] == "end_of_turn"
    assert roles("mistral", "</s>") == ("end_of_turn", "eos")  # closes [/INST] answers
    assert roles("mistral", "<s>") == ("bos",)
    assert roles("qwen", "<|extra_3|>") == ("other_special",)


@pytest.mark.parametrize(
    ("source", "pivot"), [("smollm2", "qwen"), ("mistral", "smollm2"), ("mistral", "qwen")]
)
def test_exact_map_between_real_tokenizers(real: dict, source: str, pivot: str) -> None:
    source_tok, source_bytes = real[source]
    pivot_tok, pivot_bytes = real[pivot]
    vocab_map = map_vocabularies(source_bytes, pivot_bytes, "exact")
    counts = vocab_map.counts
    print(f"{source} -> {pivot}: {counts}, mapped {vocab_map.mapped_share():.1%}")
    assert sum(counts.values()) == len(source_bytes)
    # Independently: an exactly mapped text token decodes to the same text in both tokenizers.
    mapped = np.nonzero(vocab_map.source_to_pivot >= 0)[0]
    for index in random.Random(0).sample(mapped.tolist(), 200):
        if index in source_bytes.specials:
            continue
        target = int(vocab_map.source_to_pivot[index])
        assert source_bytes.pieces[index] == pivot_bytes.pieces[target]
        text_s = source_tok.convert_tokens_to_string(source_tok.convert_ids_to_tokens([index]))
        text_p = pivot_tok.convert_tokens_to_string(pivot_tok.convert_ids_to_tokens([target]))
        if "\ufffd" not in text_s:
            assert text_s.lstrip(" ") == text_p.lstrip(" ")
    assert counts["exact"] > 0.5 * len(source_bytes)  # most text tokens exist in the other vocabulary
    end_s = source_tok.convert_tokens_to_ids("<|im_end|>" if source == "smollm2" else "</s>")
    end_p = pivot_tok.convert_tokens_to_ids("<|im_end|>")
    assert vocab_map.source_to_pivot[end_s] == end_p


def test_mined_map_between_real_tokenizers(real: dict) -> None:
    _, source_bytes = real["mistral"]
    _, pivot_bytes = real["smollm2"]
    vocab_map = map_vocabularies(source_bytes, pivot_bytes, "mined")
    exact = map_vocabularies(source_bytes, pivot_bytes, "exact")
    print(f"mistral -> smollm2 mined: {vocab_map.counts}")
    assert vocab_map.counts["exact"] == exact.counts["exact"]
    assert vocab_map.counts["mined"] == exact.counts["unmapped"] - vocab_map.counts["unmapped"]
    fallback = np.nonzero((exact.source_to_pivot < 0) & (vocab_map.source_to_pivot >= 0))[0]
    pivot_strings = [p for p in pivot_bytes.pieces if p is not None]
    for index in random.Random(1).sample(fallback.tolist(), 3):
        piece = source_bytes.pieces[index]
        chosen = pivot_bytes.pieces[vocab_map.source_to_pivot[index]]
        assert chosen == pivot_strings[_expected_mined(piece, pivot_strings)]


# --------------------------------------------------------------------------- Metaspace decoders

METASPACE_CORPUS = [
    VARIED_TEXT,
    "the quick brown fox jumps over the lazy dog, the quick brown fox again",
    "hello world, hello there; return the value of the function",
]


def _metaspace_tokenizer(replacement: str, prepend_scheme: str, split: bool) -> PreTrainedTokenizerFast:
    """A Unigram model trained here, with a Metaspace pre-tokenizer and decoder, as several real
    SentencePiece conversions have (T5-style, Llama's non-legacy conversion): the word marker
    is undone by the decoder itself, with no Replace step to read it from."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement, prepend_scheme=prepend_scheme, split=split)
    backend.decoder = decoders.Metaspace(replacement, prepend_scheme=prepend_scheme, split=split)
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(METASPACE_CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(
    ("replacement", "prepend_scheme", "split"),
    [("▁", "always", False), ("▁", "first", True), ("▁", "never", True), ("▂", "always", False)],
)
def test_metaspace_decoder_token_bytes(replacement: str, prepend_scheme: str, split: bool) -> None:
    """Each token's bytes are what the tokenizers library's own Metaspace decoder makes of it (as
    a non-first token, so no leading space is stripped), and encodings add up to the text."""
    tokenizer = _metaspace_tokenizer(replacement, prepend_scheme, split)
    table = token_bytes(tokenizer)
    decoder = tokenizer.backend_tokenizer.decoder
    marked = 0
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in table.specials:
            assert table.pieces[index] is None
            continue
        assert table.pieces[index] == decoder.decode(["x", token])[1:].encode("utf-8"), token
        marked += replacement in token and len(token) > 1
    assert marked >= 5  # the marker occurs inside longer pieces, not only on its own
    assert table.prepends_space == (prepend_scheme != "never")
    for text in [*METASPACE_CORPUS, "hello world", "x"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        joined = b"".join(table.pieces[i] for i in ids)
        assert joined == (b" " if table.prepends_space else b"") + text.encode("utf-8")
        # The library's decoder drops every marker of the first token (not only a leading one),
        # so the whole encoding is decoded after a sentinel token.
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert joined == decoder.decode(["x", *tokens])[1:].encode("utf-8")


# --------------------------------------------------------------------------- hand-built tokenizers


def _byte_level_source() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 conventions) with ChatML specials: <|im_end|> ends a turn and is eos."""
    words = ["Ġhello", "hello", "Ġworld", "Ġworlds", "Ċ", "A", "Ġzebra", "Ġhel", "Ã©", "Ġqqq"]
    ids = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *words])}
    backend = Tokenizer(models.BPE(vocab=ids, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
    )


def _sentencepiece_pivot() -> PreTrainedTokenizerFast:
    """SentencePiece conventions: ▁ word marker, <0xNN> byte pieces, </s> ends an answer."""
    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x0A>",
        "<0x41>",
        "A",
        "▁hello",
        "▁world",
        "hello",
        "▁hel",
        "é",
        "▁zebr",
    ]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=[], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=LLAMA2
    )


@pytest.fixture(scope="module")
def tiny() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    return _byte_level_source(), _sentencepiece_pivot()


def test_tiny_token_bytes_and_roles(tiny: tuple) -> None:
    source, pivot = tiny
    source_bytes, pivot_bytes = token_bytes(source), token_bytes(pivot)
    assert source_bytes.pieces[3:] == [b" hello", b"hello", b" world", b" worlds", b"\n", b"A", b" zebra",
                                       b" hel", "é".encode(), b" qqq"]  # fmt: skip
    assert pivot_bytes.pieces[3:] == [b"\n", b"A", b"A", b" hello", b" world", b"hello", b" hel", "é".encode(),
                                      b" zebr"]  # fmt: skip
    assert pivot_bytes.byte_pieces == {3, 4}
    assert source_bytes.specials[2].roles == ("end_of_turn", "eos")
    assert source_bytes.specials[0].roles == ("pad",)
    assert source_bytes.specials[1].roles == ("other_special",)
    assert pivot_bytes.specials[2].roles == ("end_of_turn", "eos")
    assert pivot_bytes.id_for_role("bos") == 1 and source_bytes.id_for_role("bos") is None


# Worked out by hand from the two vocabularies above (source id -> pivot id).
TINY_EXACT = {2: 2, 3: 6, 4: 8, 5: 7, 7: 3, 8: 5, 10: 9, 11: 10}  # "A" beats <0x41>; <|im_end|> -> </s>


def test_tiny_exact_map(tiny: tuple) -> None:
    vocab_map = map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "exact")
    expected = np.full(len(tiny[0]), -1)
    expected[list(TINY_EXACT)] = list(TINY_EXACT.values())
    np.testing.assert_array_equal(vocab_map.source_to_pivot, expected)
    assert vocab_map.counts == {"exact": 7, "special": 1, "mined": 0, "stats": 0, "unmapped": 5}


def test_tiny_mined_map(tiny: tuple) -> None:
    vocab_map = map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "mined")
    # " worlds" -> " world" (one deletion), " zebra" -> " zebr"; " qqq" is 3+ edits from every
    # space-initial pivot token and has no longer prefix in the pivot than " " -- which the pivot
    # lacks as a token, so it stays unmapped. Specials never go through the fallback.
    assert vocab_map.source_to_pivot[6] == 7 and vocab_map.source_to_pivot[9] == 11
    assert vocab_map.source_to_pivot[12] == -1
    assert vocab_map.source_to_pivot[0] == -1 and vocab_map.source_to_pivot[1] == -1
    assert vocab_map.counts["mined"] == 2 and vocab_map.counts["exact"] == 7


def test_tiny_stats_map(tiny: tuple) -> None:
    # Source 6 (" worlds") is seen with pivot 7 twice (2 + 2) and pivot 6 once (3): 7 wins.
    # Source 9 (" zebra") ties between pivot 11 and 8: the lower id wins. Source 12 has no counts.
    # Counts for exactly matched source 3 do not override the exact match.
    counts = (np.array([6, 6, 6, 9, 9, 3]), np.array([7, 6, 7, 11, 8, 8]), np.array([2, 3, 2, 5, 5, 9]))
    vocab_map = map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "stats", counts)
    assert vocab_map.source_to_pivot[6] == 7 and vocab_map.source_to_pivot[9] == 8
    assert vocab_map.source_to_pivot[12] == -1 and vocab_map.source_to_pivot[3] == 6
    assert vocab_map.counts["stats"] == 2
    with pytest.raises(ValueError, match="out of range"):
        map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "stats", (np.array([6]), np.array([99]),
                                                                               np.array([1])))  # fmt: skip
    with pytest.raises(ValueError, match="co-occurrence"):
        map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "stats")


def test_apply_adds_duplicates_and_reports_dropped_mass(tiny: tuple) -> None:
    vocab_map = map_vocabularies(token_bytes(tiny[0]), token_bytes(tiny[1]), "mined")
    # Row 0: " world" (5) and " worlds" (6) both land on pivot 7; <|im_start|> (1) is unmapped.
    # Row 1: an id beyond the tokenizer (a padded row) and -1 padding are dropped.
    ids = np.array([[5, 6, 1, 9], [3, 40, -1, 12]])
    probs = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.1, 0.1]], dtype=np.float32)
    out = vocab_map.apply(ids, probs)
    np.testing.assert_array_equal(out.ids, [[7, 11, -1, -1], [6, -1, -1, -1]])
    assert_close_at_scale(out.probs, [[0.7, 0.1, 0, 0], [0.5, 0, 0, 0]], dtype="float32")
    assert_close_at_scale(out.mass, [0.8, 0.5], dtype="float32")
    renormalised = vocab_map.apply(ids, probs, renormalise=True)
    assert_close_at_scale(renormalised.probs.sum(axis=1), [1.0, 1.0], dtype="float32")


def test_apply_matches_a_per_token_loop() -> None:
    rng = np.random.default_rng(3)
    table = rng.integers(-1, 6, size=20).astype(np.int32)  # many duplicates and unmapped ids
    vocab_map = vocab.VocabMap(table, "exact", dict.fromkeys(vocab.COUNT_KEYS, 0))
    ids = rng.integers(-1, 23, size=(50, 7))
    probs = rng.random((50, 7))
    out = vocab_map.apply(ids, probs)
    for row in range(len(ids)):
        expected: dict[int, float] = {}
        for i, p in zip(ids[row], probs[row], strict=True):
            target = table[i] if 0 <= i < len(table) else -1
            if target >= 0:
                expected[int(target)] = expected.get(int(target), 0.0) + float(p)
        got = {int(i): float(p) for i, p in zip(out.ids[row], out.probs[row], strict=True) if i >= 0}
        assert got.keys() == expected.keys()
        assert all(np.isclose(got[k], expected[k]) for k in expected)
        assert np.isclose(out.mass[row], sum(expected.values()))
        assert list(out.probs[row]) == sorted(out.probs[row], reverse=True)
        assert all(p == 0 for i, p in zip(out.ids[row], out.probs[row], strict=True) if i < 0)


# --------------------------------------------------------------------------- the mined rule


def _common_prefix(a: bytes, b: bytes) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _rule_cost(source: bytes, target: bytes) -> tuple[int, int, int]:
    return (
        edit_distance(source.decode("latin-1"), target.decode("latin-1")),
        -_common_prefix(source, target),
        len(target),
    )


def _expected_mined(source: bytes, pivot: list[bytes]) -> int:
    """The documented rule, by brute force: nearest same-first-byte string if within 2 edits,
    else the longest proper prefix of the source in the pivot."""
    same = [(_rule_cost(source, p), i) for i, p in enumerate(pivot) if source and p[:1] == source[:1]]
    if same and min(same)[0][0] <= 2 and len(source) <= vocab_edit_distance.JOIN_MAX_LENGTH:
        return min(same)[1]
    prefixes = [(-len(p), i) for i, p in enumerate(pivot) if len(p) < len(source) and source.startswith(p)]
    return min(prefixes)[1] if prefixes else -1


def test_mined_constructed_cases() -> None:
    pivot = [b" world", b" worldwide", b" wor", b"world", b"\xe4\xb8", b"\xe4\xb8\xad", b"ab", b"ac", b" w"]
    sources = [b" worlds", b"worlds", b"\xe4\xb8\xad\xe6", b"ad", b" wxyzvut", b"zzz", b""]
    # " worlds": " world" is 1 edit away. "worlds" must keep its first byte: "world" (not " world").
    # "中"+byte: "中" (1 deletion). "ad": "ab" and "ac" tie at 1 edit with equal prefixes and
    # lengths: the lower index. " wxyzvut" is 5+ edits from everything: its longest prefix " w".
    # "zzz": no pivot string starts with "z". Empty: nothing.
    assert mined_matches(sources, pivot).tolist() == [0, 3, 5, 6, 8, -1, -1]


def test_mined_tie_breaks_on_shared_prefix_then_length() -> None:
    # " hellx" is one substitution from " hallx" (shares " h") and from " hello" (shares " hell").
    assert mined_matches([b" hellx"], [b" hallx", b" hello"]).tolist() == [1]
    # "abxd" is one edit from "abyd" and from "abd", both sharing "ab": the shorter one wins.
    assert mined_matches([b"abxd"], [b"abyd", b"abd"]).tolist() == [1]


def test_mined_matches_brute_force_on_random_strings() -> None:
    rng = random.Random(11)
    for _ in range(3):
        pivot = sorted({bytes(rng.choice(b"abcd ") for _ in range(rng.randint(1, 7))) for _ in range(300)})
        sources = [bytes(rng.choice(b"abcde ") for _ in range(rng.randint(0, 9))) for _ in range(150)]
        found = mined_matches(sources, pivot).tolist()
        assert found == [_expected_mined(s, pivot) for s in sources]


def test_edit_distances_vectorised_agree_with_scalar() -> None:
    rng = random.Random(5)
    a = [bytes(rng.choice(b"xyz") for _ in range(rng.randint(0, 8))) for _ in range(200)]
    b = [bytes(rng.choice(b"xyz") for _ in range(rng.randint(0, 8))) for _ in range(200)]
    (am, al), (bm, bl) = vocab_edit_distance._padded(a), vocab_edit_distance._padded(b)
    expected = [edit_distance(x.decode(), y.decode()) for x, y in zip(a, b, strict=True)]
    assert vocab_edit_distance.edit_distances(am, al, bm, bl).tolist() == expected


# --------------------------------------------------------------------------- cache


def test_cache_is_keyed_by_hashes_and_hit_the_second_time(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, pivot = tiny
    first = build_vocab_map(source, pivot, "mined", cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith(f"{tokenizer_hash(source)}-{tokenizer_hash(pivot)}-mined-")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached map should have been used")

    monkeypatch.setattr(vocab, "map_vocabularies", fail)
    second = build_vocab_map(source, pivot, "mined", cache_dir=tmp_path)
    np.testing.assert_array_equal(second.source_to_pivot, first.source_to_pivot)
    assert second.counts == first.counts and second.source_to_pivot.dtype == np.int32
    monkeypatch.undo()

    # Another map, other counts, or the pair the other way round: other files.
    build_vocab_map(source, pivot, "exact", cache_dir=tmp_path)
    for count in (1, 2):
        build_vocab_map(source, pivot, "stats", (np.array([6]), np.array([7]), np.array([count])), tmp_path)
    build_vocab_map(pivot, source, "exact", cache_dir=tmp_path)
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 5 and not [n for n in names if n.endswith(".tmp")]
    with np.load(tmp_path / files[0], allow_pickle=False) as saved:
        assert set(saved.files) == {"source_to_pivot", "counts"}


def test_cached_map_is_readable_by_others_under_umask_022(tiny: tuple, tmp_path: Path) -> None:
    """The cache may be shared (FUSION_TRAIN_VOCAB_MAPS on shared storage): its files get 0644
    under umask 022, not tempfile's 0600, and no temporary file is left beside them."""
    previous = os.umask(0o022)
    try:
        build_vocab_map(*tiny, cache_dir=tmp_path / "maps")
    finally:
        os.umask(previous)
    (written,) = (tmp_path / "maps").iterdir()
    assert written.suffix == ".npz"
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "maps").stat().st_mode) == 0o755


def test_cache_key_changes_with_the_rules_version_and_the_bytes_read(
    tiny: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached map is reused only under the same mapping rules (CACHE_VERSION) and the same token
    bytes: a change to how tokens are read gives another file instead of a stale map."""
    source, pivot = tiny
    source_bytes, pivot_bytes = token_bytes(source), token_bytes(pivot)

    def path(source_table: vocab.TokenBytes = source_bytes) -> Path:
        return vocab.vocab_map_path(Path("cache"), source, pivot, source_table, pivot_bytes, "exact")

    first = path()
    assert path() == first
    monkeypatch.setattr(vocab_maps, "CACHE_VERSION", vocab_maps.CACHE_VERSION + 1)
    assert path() != first
    monkeypatch.undo()
    assert path() == first
    pieces = list(source_bytes.pieces)
    pieces[5] = b"\xe2\x96\x81" + pieces[5]  # as if a word marker had been left in
    assert path(dataclasses.replace(source_bytes, pieces=pieces)) != first
    assert path(dataclasses.replace(source_bytes, prepends_space=True)) != first


def test_tests_never_write_to_the_users_vocab_map_cache(tiny: tuple, vocab_map_cache: Path) -> None:
    """conftest points the default cache at a temporary directory; the asset cache stays put."""
    real_cache = Path.home() / ".cache" / "fusion-train" / "vocab-maps"
    before = sorted(real_cache.iterdir()) if real_cache.exists() else []
    assert vocab.default_cache_dir() == vocab_map_cache
    assert registry_assets.cache_dir() != vocab_map_cache.parent
    build_vocab_map(*tiny)
    assert len(list(vocab_map_cache.glob("*.npz"))) == 1
    assert (sorted(real_cache.iterdir()) if real_cache.exists() else []) == before


def test_added_tokens_are_text_and_added_special_tokens_are_not(tokenizer_dirs: dict, tmp_path: Path) -> None:
    """Vocabularies grown with add_tokens: a plain added token maps by its bytes, an added special
    token without a counterpart in the pivot maps nowhere."""
    source = AutoTokenizer.from_pretrained(tokenizer_dirs["mistral"])
    pivot = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    source.add_tokens(["fusionword"])
    source.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    pivot.add_tokens(["fusionword"])
    word, tool = source.convert_tokens_to_ids("fusionword"), source.convert_tokens_to_ids("<|tool|>")
    pieces = vocab.token_bytes(source).pieces
    assert pieces[word] == b"fusionword" and pieces[tool] is None
    mapping = vocab.build_vocab_map(source, pivot, cache_dir=tmp_path).source_to_pivot
    assert len(mapping) == len(source)
    assert mapping[word] == pivot.convert_tokens_to_ids("fusionword")
    assert mapping[tool] == -1
