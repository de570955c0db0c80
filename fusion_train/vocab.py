"""Vocabulary mapping between tokenizers: which pivot token id a source token id means.

Tokens are compared as the raw bytes they stand for, not as vocabulary strings: byte-level BPE
(GPT-2, SmolLM2, Qwen) stores ``" hello"`` as ``"Ġhello"``, SentencePiece as ``"▁hello"`` and
splits unknown characters into ``<0xNN>`` pieces; undoing those conventions makes exact matches
between unrelated tokenizers far more common. Special tokens are not text and are matched by
role (end of turn, eos, bos) instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fusion_train import registry_assets
from fusion_train.models import tokenizer_hash
from fusion_train.storage import atomic_file

# Roles of special tokens, most specific first: a token that is both eos and end of turn is
# matched as end of turn.
ROLES = ("end_of_turn", "eos", "bos", "pad", "unk")
MATCHED_ROLES = ("end_of_turn", "eos", "bos")  # pad and unk are never a meaningful prediction
OTHER_SPECIAL = "other_special"
# Used only when the chat template cannot tell which token closes an assistant turn.
END_OF_TURN_NAMES = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eot|>")

METHODS = ("exact", "mined", "stats")
COUNT_KEYS = ("exact", "special", "mined", "stats", "unmapped")
# Part of every cache key: bump it when the mapping rules (map_vocabularies, mined_matches) change.
# Changes to how tokens are read need no bump: the key also holds a digest of the bytes read.
CACHE_VERSION = 1
#: Environment variable naming the vocabulary-map cache directory (tests point it at a temporary one).
CACHE_ENV = "FUSION_TRAIN_VOCAB_MAPS"

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
@cache
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the rest
    are shifted to code points 256 and up so that every byte has a visible character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


@cache
def _gpt2_decoding() -> tuple[dict[int, int], re.Pattern[str]]:
    """``_gpt2_unicode_to_byte`` in the form the C string functions take, since every token of a
    vocabulary goes through it: a ``str.translate`` table to code points equal to the byte values
    (which latin-1 then encodes as those bytes), and a pattern matching a character outside it."""
    table = _gpt2_unicode_to_byte()
    outside = re.compile("[^" + "".join(re.escape(ch) for ch in table) + "]")
    return {ord(ch): byte for ch, byte in table.items()}, outside


@dataclass(frozen=True)
class SpecialToken:
    content: str
    roles: tuple[str, ...]  # subset of ROLES in ROLES order, or (OTHER_SPECIAL,)


@dataclass(frozen=True)
class TokenBytes:
    """What every token id of one tokenizer stands for.

    ``pieces[i]`` is the raw bytes of text token ``i`` and ``None`` for special tokens (see
    ``specials``) and ids without a token. ``byte_pieces`` holds the ids of SentencePiece
    ``<0xNN>`` pieces: they duplicate ordinary tokens' bytes, and the ordinary token wins.
    ``prepends_space``: the tokenizer adds a space (the ``▁`` word marker) before text that does
    not start with one, so the bytes of an encoding start with one extra ``b" "`` which the
    tokenizer's decoder strips again.
    """

    pieces: list[bytes | None]
    specials: dict[int, SpecialToken]
    byte_pieces: frozenset[int]
    prepends_space: bool

    def __len__(self) -> int:
        return len(self.pieces)

    def id_for_role(self, role: str) -> int | None:
        """The lowest id carrying ``role``, or None."""
        return next((i for i, s in sorted(self.specials.items()) if role in s.roles), None)

    def digest(self) -> str:
        """A hash of everything read: every token's bytes, the byte pieces, the leading-space
        convention and the special tokens' roles (which depend on settings outside
        ``tokenizer.json``). Cached maps keyed by it go stale whenever the reading rules change."""
        digest = hashlib.sha256()
        for piece in self.pieces:
            digest.update(b"\xff" * 4 if piece is None else len(piece).to_bytes(4, "little") + piece)
        specials = sorted((i, s.content, s.roles) for i, s in self.specials.items())
        digest.update(json.dumps([specials, sorted(self.byte_pieces), self.prepends_space]).encode("utf-8"))
        return digest.hexdigest()[:16]


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every component (decoder, pre-tokenizer, normalizer step) in a tokenizer JSON subtree."""
    if isinstance(node, list):
        return [part for item in node for part in _walk(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if "type" in node else []
    for key in ("decoders", "pretokenizers", "normalizers"):
        found += _walk(node.get(key))
    return found


@dataclass(frozen=True)
class _Conventions:
    byte_level: bool
    replacements: tuple[tuple[str, str], ...]  # applied to the token string, e.g. ("▁", " ")
    byte_fallback: bool
    prepends_space: bool


def _conventions(backend_json: dict[str, Any]) -> _Conventions:
    """Read the string conventions from the decoder, pre-tokenizer and normalizer definitions."""
    decoder = _walk(backend_json.get("decoder"))
    pre = _walk(backend_json.get("pre_tokenizer"))
    normalizer = _walk(backend_json.get("normalizer"))
    byte_level = any(c["type"] == "ByteLevel" for c in decoder + pre)
    replacements = []
    for c in decoder:
        if c["type"] == "Metaspace":
            replacements.append((c.get("replacement", "▁"), " "))
        elif c["type"] == "Replace" and isinstance(c.get("pattern"), dict) and "String" in c["pattern"]:
            replacements.append((c["pattern"]["String"], c["content"]))
    byte_fallback = any(c["type"] == "ByteFallback" for c in decoder) or bool(
        backend_json.get("model", {}).get("byte_fallback")
    )
    prepends_space = any(
        (
            c["type"] == "Metaspace"
            and (c.get("prepend_scheme") in ("first", "always") or c.get("add_prefix_space"))
        )
        or (c["type"] == "ByteLevel" and c.get("add_prefix_space"))
        for c in pre
    ) or any(c["type"] == "Prepend" for c in normalizer)
    return _Conventions(byte_level, tuple(replacements), byte_fallback, prepends_space)


def _conventions_json(backend: Any) -> dict[str, Any]:
    """The parts of a fast tokenizer's JSON that ``_conventions`` reads, each from its own
    component: the whole JSON of a large vocabulary (its merges) takes seconds to write and parse."""
    parts = {}
    for name in ("decoder", "pre_tokenizer", "normalizer"):
        component = getattr(backend, name)
        parts[name] = None if component is None else json.loads(component.__getstate__())
    byte_fallback = getattr(backend.model, "byte_fallback", None)
    if byte_fallback is None:  # a model class that does not expose it: read its own JSON
        byte_fallback = json.loads(backend.model.__getstate__()).get("byte_fallback", False)
    return {**parts, "model": {"byte_fallback": byte_fallback}}


def _text_bytes(token: str, conv: _Conventions) -> tuple[bytes, bool]:
    """The bytes a vocabulary string stands for, and whether it is a ``<0xNN>`` byte piece."""
    if conv.byte_fallback:
        match = _BYTE_PIECE.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)]), True
    for old, new in conv.replacements:
        token = token.replace(old, new)
    if conv.byte_level:
        to_byte_values, outside_table = _gpt2_decoding()
        if outside_table.search(token) is None:
            return token.translate(to_byte_values).encode("latin-1"), False
        # As the ByteLevel decoder does: a string outside the table stands for its UTF-8 bytes.
    return token.encode("utf-8"), False


def end_of_turn_token(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The special token that closes an assistant turn in the chat template, if there is one.

    Renders a two-message conversation and reads which special token follows the assistant's
    text; without a usable template, falls back to well-known names (``END_OF_TURN_NAMES``).
    """
    specials = sorted(
        (t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special),
        key=len,
        reverse=True,
    )
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template.strip():
        marker = "Xq7 reply text"
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        except Exception:  # any template error means "cannot tell"; names are the fallback
            text = ""
        if isinstance(text, str) and marker in text:
            after = text[text.index(marker) + len(marker) :].lstrip()
            found = next((s for s in specials if after.startswith(s)), None)
            if found is not None:
                return found
    return next((name for name in END_OF_TURN_NAMES if name in specials), None)


def token_bytes(tokenizer: Any, chat_template: str | None = None) -> TokenBytes:
    """The raw bytes of every token id below ``len(tokenizer)`` and the roles of special tokens.

    The conventions (byte-level table, word marker, byte fallback) are read from the fast
    tokenizer's JSON, not guessed from its name. Added tokens that are not special are text and
    stand for their content's UTF-8 bytes (they are matched on the raw input). ``chat_template``
    overrides the tokenizer's own template when finding the end-of-turn token.
    """
    backend = tokenizer.backend_tokenizer
    conv = _conventions(_conventions_json(backend))
    size = len(tokenizer)
    pieces: list[bytes | None] = [None] * size
    byte_pieces = set()
    added = backend.get_added_tokens_decoder()
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        if index < size and index not in added:
            pieces[index], is_byte_piece = _text_bytes(token, conv)
            if is_byte_piece:
                byte_pieces.add(index)
    named = {
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    end_of_turn = end_of_turn_token(tokenizer, chat_template)
    special_ids = {i for i, t in added.items() if t.special} | {i for i in named.values() if i is not None}
    for index, token in added.items():
        if index < size and index not in special_ids:
            pieces[index] = token.content.encode("utf-8")
    specials = {}
    for index in sorted(i for i in special_ids if i < size):
        # A role token that is an ordinary vocabulary entry is still not text.
        content = tokenizer.convert_ids_to_tokens(index)
        roles = {role for role, i in named.items() if i == index}
        if content == end_of_turn:
            roles.add("end_of_turn")
        specials[index] = SpecialToken(content, tuple(r for r in ROLES if r in roles) or (OTHER_SPECIAL,))
        pieces[index] = None
    return TokenBytes(pieces, specials, frozenset(byte_pieces), conv.prepends_space)


# --------------------------------------------------------------------------- mined (edit distance)


def _padded(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as a zero-padded uint8 matrix and their lengths."""
    lengths = np.array([len(s) for s in strings], dtype=np.int64)
    flat = np.frombuffer(b"".join(strings), dtype=np.uint8)
    matrix = np.zeros((len(strings), max(int(lengths.max(initial=0)), 1)), dtype=np.uint8)
    rows = np.repeat(np.arange(len(strings)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    return matrix, lengths


def edit_distances(a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    """Levenshtein distances between row pairs of two padded byte matrices, all at once.

    Row by row of ``a``, the DP row is ``D[j] = min(D_prev[j] + 1, D_prev[j-1] + cost, D[j-1] + 1)``;
    the last term (insertions) is a running minimum, ``D[j] = j + cummin(A[k] - k)``, so each row
    is a few whole-array operations over all pairs. Pairs are processed grouped by the length of
    ``a`` so that padding to the longest string costs little.
    """
    result = np.zeros(len(a), dtype=np.int64)
    for length in np.unique(a_len):
        group = np.nonzero(a_len == length)[0]
        width = max(int(b_len[group].max()), 1)
        result[group] = _edit_distances_same_length(a[group, :length], b[group, :width], b_len[group])
    return result


def _edit_distances_same_length(a: np.ndarray, b: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    dtype = np.int16 if a.shape[1] + b.shape[1] < np.iinfo(np.int16).max else np.int32
    cols = np.arange(b.shape[1] + 1, dtype=dtype)
    row = np.broadcast_to(cols, (len(b), len(cols))).copy()
    best = np.empty_like(row)
    for i in range(a.shape[1]):
        best[:, 0] = i + 1
        np.minimum(row[:, 1:] + 1, row[:, :-1] + (a[:, i : i + 1] != b), out=best[:, 1:])
        row = cols + np.minimum.accumulate(best - cols, axis=1)
    return row[np.arange(len(b)), b_len]


def _common_prefix(a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    width = min(a.shape[1], b.shape[1])
    same = (a[:, :width] == b[:, :width]) & (np.arange(width) < np.minimum(a_len, b_len)[:, None])
    return np.cumprod(same, axis=1).sum(axis=1)


PAIR_BUDGET = 2_000_000  # (source, candidate) pairs held at once: keeps memory to a few hundred MB
JOIN_MAX_LENGTH = 32  # sources up to this many bytes are searched by the deletion join first
_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64: a deleted byte can be divided out
_BASE_INV = pow(_BASE, -1, 2**64)
_FIRST_TAG, _LENGTH_TAG = 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_NONE = np.iinfo(np.int64).max  # distance of "no candidate yet"


def _deletion_keys(matrix: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hash keys of every row with zero, one or two bytes deleted, tagged with the row's first byte.

    If ``ed(s, t) <= 2`` then deleting at most two bytes from each gives the same string (delete
    both sides of a substitution, the extra byte of an insertion), so ``s`` and ``t`` share a key.
    Polynomial hashes modulo 2**64 let each deletion be computed from prefix sums in one array
    operation; collisions only add candidates, which are scored exactly afterwards.
    """
    rows, width = matrix.shape
    powers = np.array([pow(_BASE, k, 2**64) for k in range(width)], dtype=np.uint64)
    prefix = np.zeros((rows, width + 1), dtype=np.uint64)
    prefix[:, 1:] = np.cumsum((matrix.astype(np.uint64) + np.uint64(1)) * powers, axis=1)
    # Only prefix[:, k] with k <= length is read below, so padding never enters a key.
    index = np.arange(rows)
    full = prefix[index, lengths]
    tag = matrix[:, 0].astype(np.uint64) * np.uint64(_FIRST_TAG)
    inv, inv2 = np.uint64(_BASE_INV), np.uint64(pow(_BASE_INV, 2, 2**64))
    keys, owners = [full + tag + lengths.astype(np.uint64) * np.uint64(_LENGTH_TAG)], [index]
    for i in range(width):
        r = np.nonzero(lengths > i)[0]
        one = prefix[r, i] + (full[r] - prefix[r, i + 1]) * inv
        keys.append(one + tag[r] + (lengths[r] - 1).astype(np.uint64) * np.uint64(_LENGTH_TAG))
        owners.append(r)
        for j in range(i + 1, width):
            r = np.nonzero(lengths > j)[0]
            two = prefix[r, i] + (prefix[r, j] - prefix[r, i + 1]) * inv + (full[r] - prefix[r, j + 1]) * inv2
            keys.append(two + tag[r] + (lengths[r] - 2).astype(np.uint64) * np.uint64(_LENGTH_TAG))
            owners.append(r)
    return np.concatenate(keys), np.concatenate(owners)


class _Search:
    """Pivot strings sorted by (first byte, length, index) and the sources, as padded matrices.

    Rows of the sorted pivot are compared by row number for the last tie-breaks: within one
    first byte, a lower row is a shorter string, then a lower index.
    """

    def __init__(self, sources: list[bytes], pivot: list[bytes]) -> None:
        self.order = np.array(sorted(range(len(pivot)), key=lambda i: (pivot[i][:1], len(pivot[i]), i)))
        self.piv_mat, self.piv_len = _padded([pivot[i] for i in self.order])
        self.src_mat, self.src_len = _padded(sources)
        self.best = np.full(len(sources), -1, dtype=np.int64)
        self.distance = np.full(len(sources), _NONE, dtype=np.int64)

    def score(self, ps: np.ndarray, pp: np.ndarray) -> None:
        """Score (source, pivot row) pairs; each source's pairs must all come in one call."""
        if len(ps) == 0:
            return
        a_len, b_len = self.src_len[ps], self.piv_len[pp]
        a = self.src_mat[ps, : max(int(a_len.max()), 1)]
        b = self.piv_mat[pp, : max(int(b_len.max()), 1)]
        dist = edit_distances(a, a_len, b, b_len)
        first_byte = a[:, 0] == b[:, 0]
        ranked = np.lexsort((pp, -_common_prefix(a, a_len, b, b_len), dist, ~first_byte, ps))
        winners = ranked[np.unique(ps[ranked], return_index=True)[1]]
        winners = winners[first_byte[winners]]
        self.best[ps[winners]] = pp[winners]
        self.distance[ps[winners]] = dist[winners]

    def join(self, sources: np.ndarray) -> None:
        """Score every pivot string within distance 2 of ``sources`` (rows of at most
        JOIN_MAX_LENGTH bytes), found through shared deletion keys."""
        indexed = np.nonzero(self.piv_len <= JOIN_MAX_LENGTH + 2)[0]
        piv_keys, piv_rows = _deletion_keys(
            self.piv_mat[indexed, : JOIN_MAX_LENGTH + 2], self.piv_len[indexed]
        )
        by_key = np.argsort(piv_keys)
        piv_keys, piv_rows = piv_keys[by_key], indexed[piv_rows[by_key]]
        src_keys, src_rows = _deletion_keys(self.src_mat[sources, :JOIN_MAX_LENGTH], self.src_len[sources])
        by_source = np.argsort(src_rows, kind="stable")
        src_keys, src_rows = src_keys[by_source], sources[src_rows[by_source]]
        lo = np.searchsorted(piv_keys, src_keys, "left")
        hi = np.searchsorted(piv_keys, src_keys, "right")
        # Chunks end where a source ends, so that each source is scored in one call.
        ends = np.append(np.nonzero(np.diff(src_rows))[0] + 1, len(src_rows))
        start = 0
        for stop in _chunk_ends(ends, np.cumsum(hi - lo)):
            counts = hi[start:stop] - lo[start:stop]
            pp = piv_rows[
                np.arange(counts.sum()) + np.repeat(lo[start:stop] - (np.cumsum(counts) - counts), counts)
            ]
            pairs = np.unique(np.repeat(src_rows[start:stop], counts) * len(self.order) + pp)
            self.score(pairs // len(self.order), pairs % len(self.order))
            start = stop

    def longest_prefix(self, sources: np.ndarray) -> None:
        """For ``sources``, the longest pivot string that is a proper prefix of the source."""
        row_of = {self.piv_mat[r, : self.piv_len[r]].tobytes(): r for r in range(len(self.order))}
        for n in sources:
            s = self.src_mat[n, : self.src_len[n]].tobytes()
            k = next((k for k in range(len(s) - 1, 0, -1) if s[:k] in row_of), 0)
            if k:
                self.best[n], self.distance[n] = row_of[s[:k]], len(s) - k


def _chunk_ends(ends: np.ndarray, cumulative: np.ndarray) -> list[int]:
    """Chunk boundaries chosen among ``ends`` so that each chunk holds about PAIR_BUDGET of the
    work counted by ``cumulative`` (a running total per item); a chunk has at least one part."""
    stops: list[int] = []
    base, previous = 0, 0
    for end, work in zip(ends.tolist(), cumulative[ends - 1].tolist(), strict=True):
        if previous and work - base > PAIR_BUDGET:
            stops.append(previous)
            base = int(cumulative[previous - 1])
        previous = end
    return [*stops, previous]


def mined_matches(sources: list[bytes], pivot: list[bytes]) -> np.ndarray:
    """For each source string, the index into ``pivot`` (distinct strings) of its match, or -1.

    Rule: the pivot string at minimum byte-level Levenshtein distance among those that **start
    with the same byte** (a token's first byte says whether it starts a word or a line or
    continues one; a prediction should keep that), searched up to distance 2. Ties go to the
    longest common prefix with the source, then the shorter pivot string, then the lower index.
    Sources with nothing that close (or longer than JOIN_MAX_LENGTH bytes) take the longest pivot
    string that is a prefix of them instead: at larger distances edit distance picks unrelated
    words (" landowner" -> " manpower"), while a prefix predicts the same text, only shorter.
    -1 for an empty source or when no pivot string starts with its first byte.

    Search: every pivot string within distance 2 of a source shares a deletion key with it
    (:func:`_deletion_keys`), so joining sorted keys finds all of them, in time about linear in
    the two vocabularies; those candidates are scored exactly, vectorised over pairs.
    """
    result = np.full(len(sources), -1, dtype=np.int64)
    nonempty = np.array([n for n, s in enumerate(sources) if s], dtype=np.int64)
    if len(nonempty) == 0 or not pivot:
        return result
    search = _Search([sources[n] for n in nonempty], pivot)
    search.join(np.nonzero(search.src_len <= JOIN_MAX_LENGTH)[0])
    search.best[search.distance > 2] = -1  # shared keys also pair some strings 3 or 4 edits apart
    search.longest_prefix(np.nonzero(search.best < 0)[0])
    found = search.best >= 0
    result[nonempty[found]] = search.order[search.best[found]]
    return result


# --------------------------------------------------------------------------- the map


@dataclass(frozen=True)
class MappedTopK:
    """Top-k distributions moved into pivot ids.

    ``ids``/``probs`` keep the input's [n, k] shape: entries that landed on one pivot id are
    added into one slot, rows are sorted by probability (descending), and empty slots (merged
    duplicates, unmapped tokens) hold id -1 and probability 0 at the end. ``mass`` is each row's
    input probability that mapped to a pivot id (in the input's units, not a share of the row).
    """

    ids: np.ndarray
    probs: np.ndarray
    mass: np.ndarray


@dataclass(frozen=True)
class VocabMap:
    """Which pivot id each source id means (-1: none; its probability is dropped).

    ``counts`` says how each source id was matched: ``exact`` (same bytes), ``special`` (by
    role or identical special-token content), ``mined`` / ``stats`` (the fallback), ``unmapped``.
    """

    source_to_pivot: np.ndarray  # int32, one entry per source id below len(source tokenizer)
    method: str
    counts: dict[str, int]

    def mapped_share(self) -> float:
        """Share of source ids that map to some pivot id."""
        return 1.0 - self.counts["unmapped"] / max(len(self.source_to_pivot), 1)

    def apply(self, ids: np.ndarray, probs: np.ndarray, renormalise: bool = False) -> MappedTopK:
        """Map [n, k] source top-k ids and probabilities to pivot ids.

        Ids outside the map (negative, or padding rows beyond the source tokenizer) and unmapped
        ids are dropped with their probability; ``renormalise`` rescales each row to sum to one
        (rows with no mapped mass stay zero).
        """
        ids = np.asarray(ids, dtype=np.int64)
        probs = np.asarray(probs)
        probs = probs.astype(np.result_type(probs.dtype, np.float32))
        if ids.shape != probs.shape or ids.ndim != 2:
            raise ValueError(
                f"ids {ids.shape} and probs {probs.shape} must be [n, k] arrays of the same shape"
            )
        size = len(self.source_to_pivot)
        known = (ids >= 0) & (ids < size)
        mapped = np.where(known, self.source_to_pivot[np.clip(ids, 0, max(size - 1, 0))], -1)
        kept = np.where(mapped >= 0, probs, 0)
        mass = kept.sum(axis=1)
        out_ids, out_probs = merge_rows(mapped, kept)
        if renormalise:
            out_probs = out_probs / np.where(mass > 0, mass, 1)[:, None]
        return MappedTopK(out_ids, out_probs, mass)


def merge_rows(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of [n, k] ids (-1: none) and probabilities, add up the probabilities that landed on
    one id into one slot, and sort each row by probability, descending; empty slots (merged
    duplicates, ids -1) hold id -1 and probability 0 at the end. Several source tokens can mean
    one pivot token: their probabilities belong together."""
    # Equal ids become neighbours once each row is sorted; each run adds into one slot.
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    starts = np.ones(sorted_ids.shape, dtype=bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = np.cumsum(starts, axis=1) - 1
    rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
    merged_probs = np.zeros_like(probs)
    np.add.at(merged_probs, (rows, run), sorted_probs)
    merged_ids = np.full(ids.shape, -1, dtype=np.int64)
    merged_ids[rows[starts], run[starts]] = sorted_ids[starts]
    merged_probs[merged_ids < 0] = 0
    rank = np.argsort(np.where(merged_ids >= 0, -merged_probs, np.inf), axis=1, kind="stable")
    return np.take_along_axis(merged_ids, rank, axis=1), np.take_along_axis(merged_probs, rank, axis=1)


def canonical_ids(token_bytes: TokenBytes) -> dict[bytes, int]:
    """One id per distinct text token's bytes: where several ids stand for the same bytes
    (SentencePiece: ``"A"`` and ``<0x41>``), the ordinary token wins, then the lower id (the id
    the tokenizer itself emits for that text)."""
    canonical: dict[bytes, int] = {}
    for index in sorted(range(len(token_bytes)), key=lambda i: (i in token_bytes.byte_pieces, i)):
        piece = token_bytes.pieces[index]
        if piece is not None:
            canonical.setdefault(piece, index)
    return canonical


Cooccurrence = tuple[np.ndarray, np.ndarray, np.ndarray]  # (source ids, pivot ids, counts), one row per pair


def _check_cooccurrence(cooccurrence: Cooccurrence, source_size: int, pivot_size: int) -> Cooccurrence:
    src, piv, count = (np.asarray(a).reshape(-1) for a in cooccurrence)
    if not (len(src) == len(piv) == len(count)):
        raise ValueError(f"co-occurrence arrays differ in length: {len(src)}, {len(piv)}, {len(count)}")
    if len(src) and (src.min() < 0 or src.max() >= source_size or piv.min() < 0 or piv.max() >= pivot_size):
        raise ValueError(
            f"co-occurrence ids out of range (source ids < {source_size}, pivot ids < {pivot_size}); "
            "were the counts made with these tokenizers?"
        )
    if len(count) and count.min() < 0:
        raise ValueError("co-occurrence counts must not be negative")
    return src.astype(np.int64), piv.astype(np.int64), count.astype(np.float64)


def _most_cooccurring(cooccurrence: Cooccurrence, pivot_size: int) -> dict[int, int]:
    """Per source id, the pivot id with the largest total count (ties: the lower pivot id)."""
    src, piv, count = cooccurrence
    pairs, inverse = np.unique(src * pivot_size + piv, return_inverse=True)
    totals = np.bincount(inverse.reshape(-1), weights=count, minlength=len(pairs))
    pair_src, pair_piv = pairs // pivot_size, pairs % pivot_size
    ranked = np.lexsort((pair_piv, -totals, pair_src))
    first = ranked[np.unique(pair_src[ranked], return_index=True)[1]]
    first = first[totals[first] > 0]
    return dict(zip(pair_src[first].tolist(), pair_piv[first].tolist(), strict=True))


def map_vocabularies(
    source: TokenBytes, pivot: TokenBytes, method: str = "exact", cooccurrence: Cooccurrence | None = None
) -> VocabMap:
    """The source-to-pivot map for two vocabularies (no cache; see :func:`build_vocab_map`).

    1. Text tokens with the same bytes map exactly. Where the pivot has several ids for the same
       bytes (SentencePiece: ``"A"`` and ``<0x41>``), the ordinary token wins, then the lower id.
    2. Special tokens map by role, in the order end_of_turn, eos, bos (a source token that is both
       eos and end of turn goes to the pivot's end-of-turn token), else to a pivot special token
       with identical content (``<|im_start|>`` in two ChatML tokenizers), else nowhere.
    3. Text tokens without an exact match: ``exact`` leaves them unmapped; ``mined`` takes the
       nearest pivot token by :func:`mined_matches`; ``stats`` the pivot token they co-occur with
       most in ``cooccurrence`` (left unmapped where there are no counts).
    """
    if method not in METHODS:
        raise ValueError(f"unknown vocabulary-map method {method!r}; choose one of {', '.join(METHODS)}")
    if (method == "stats") != (cooccurrence is not None):
        raise ValueError("co-occurrence counts are needed for method 'stats', and only for it")
    counts = dict.fromkeys(COUNT_KEYS, 0)
    result = np.full(len(source), -1, dtype=np.int32)
    canonical = canonical_ids(pivot)
    unmatched = []
    for index, piece in enumerate(source.pieces):
        if piece is None:
            continue
        target = canonical.get(piece)
        if target is None:
            unmatched.append(index)
        else:
            result[index] = target
            counts["exact"] += 1
    pivot_by_content = {s.content: i for i, s in pivot.specials.items()}
    for index, special in source.specials.items():
        roles = [pivot.id_for_role(r) for r in special.roles if r in MATCHED_ROLES]
        target = next((i for i in roles if i is not None), pivot_by_content.get(special.content))
        if target is not None:
            result[index] = target
            counts["special"] += 1
    if method == "mined" and unmatched:
        strings = list(canonical)
        found = mined_matches([source.pieces[i] for i in unmatched], strings)
        hits = found >= 0
        result[np.array(unmatched)[hits]] = [canonical[strings[f]] for f in found[hits]]
        counts["mined"] = int(hits.sum())
    elif method == "stats" and unmatched:
        best = _most_cooccurring(_check_cooccurrence(cooccurrence, len(source), len(pivot)), len(pivot))
        for index in unmatched:
            if index in best:
                result[index] = best[index]
                counts["stats"] += 1
    counts["unmapped"] = int((result < 0).sum())
    return VocabMap(result, method, counts)


def _cooccurrence_digest(cooccurrence: Cooccurrence | None) -> str:
    if cooccurrence is None:
        return "none"
    digest = hashlib.sha256()
    for array in cooccurrence:
        digest.update(np.ascontiguousarray(np.asarray(array).reshape(-1), dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def vocab_map_path(
    cache: Path, source: Any, pivot: Any, source_bytes: TokenBytes, pivot_bytes: TokenBytes, method: str,
    cooccurrence: Cooccurrence | None = None,
) -> Path:  # fmt: skip
    """Cache file of one map: both tokenizers' hashes and the method in the name; the mapping
    rules' version (CACHE_VERSION), the bytes and roles read from each tokenizer (see
    ``TokenBytes.digest``) and the counts in a digest."""
    settings = [
        CACHE_VERSION,
        source_bytes.digest(),
        pivot_bytes.digest(),
        _cooccurrence_digest(cooccurrence),
    ]
    digest = hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()[:12]
    return cache / f"{tokenizer_hash(source)}-{tokenizer_hash(pivot)}-{method}-{digest}.npz"


def default_cache_dir() -> Path:
    """``$FUSION_TRAIN_VOCAB_MAPS``, else ``vocab-maps`` under the asset cache (``registry_assets.cache_dir()``)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else registry_assets.cache_dir() / "vocab-maps"


def build_vocab_map(
    source_tok: Any,
    pivot_tok: Any,
    method: str = "exact",
    cooccurrence: Cooccurrence | None = None,
    cache_dir: Path | None = None,
    source_template: str | None = None,
    pivot_template: str | None = None,
) -> VocabMap:
    """The source-to-pivot map of two tokenizers, computed once per pair and cached on disk.

    ``cache_dir`` defaults to :func:`default_cache_dir`; the templates
    override each tokenizer's own chat template when finding its end-of-turn token.
    """
    source_bytes = token_bytes(source_tok, source_template)
    pivot_bytes = token_bytes(pivot_tok, pivot_template)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = vocab_map_path(cache, source_tok, pivot_tok, source_bytes, pivot_bytes, method, cooccurrence)
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            table, stored = saved["source_to_pivot"], saved["counts"]
        if len(table) == len(source_bytes) and len(stored) == len(COUNT_KEYS):
            return VocabMap(
                table.astype(np.int32), method, dict(zip(COUNT_KEYS, stored.tolist(), strict=True))
            )
    vocab_map = map_vocabularies(source_bytes, pivot_bytes, method, cooccurrence)
    counts = np.array([vocab_map.counts[k] for k in COUNT_KEYS], dtype=np.int64)
    with atomic_file(path, "wb") as handle:  # whole or absent, readable as the umask allows
        np.savez(handle, source_to_pivot=vocab_map.source_to_pivot, counts=counts)
    return vocab_map
