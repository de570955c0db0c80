"""Which pivot token id a source token id means: the vocabulary map, built from both
tokenizers' token bytes (exact matches, special tokens by role, then a fallback: ``mined`` edit
distance or ``stats`` co-occurrence), and cached on disk by content."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion_train import registry_assets
from fusion_train.models import tokenizer_hash
from fusion_train.storage import atomic_file
from fusion_train.vocab.edit_distance import mined_matches
from fusion_train.vocab.pieces import MATCHED_ROLES, TokenBytes, token_bytes

VOCAB_MAPS = ("exact", "mined", "stats")
COUNT_KEYS = ("exact", "special", "mined", "stats", "unmapped")
# Part of every cache key: bump it when the mapping rules (map_vocabularies, mined_matches) change.
# Changes to how tokens are read need no bump: the key also holds a digest of the bytes read.
CACHE_VERSION = 1
#: Environment variable naming the vocabulary-map cache directory (tests point it at a temporary one).
CACHE_ENV = "FUSION_TRAIN_VOCAB_MAPS"


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
    kind: str
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
    source: TokenBytes, pivot: TokenBytes, kind: str = "exact", cooccurrence: Cooccurrence | None = None
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
    if kind not in VOCAB_MAPS:
        raise ValueError(f"unknown vocabulary map {kind!r}; choose one of {', '.join(VOCAB_MAPS)}")
    if (kind == "stats") != (cooccurrence is not None):
        raise ValueError("co-occurrence counts are needed for the stats map, and only for it")
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
    if kind == "mined" and unmatched:
        strings = list(canonical)
        found = mined_matches([source.pieces[i] for i in unmatched], strings)
        hits = found >= 0
        result[np.array(unmatched)[hits]] = [canonical[strings[f]] for f in found[hits]]
        counts["mined"] = int(hits.sum())
    elif kind == "stats" and unmatched:
        best = _most_cooccurring(_check_cooccurrence(cooccurrence, len(source), len(pivot)), len(pivot))
        for index in unmatched:
            if index in best:
                result[index] = best[index]
                counts["stats"] += 1
    counts["unmapped"] = int((result < 0).sum())
    return VocabMap(result, kind, counts)


def _cooccurrence_digest(cooccurrence: Cooccurrence | None) -> str:
    if cooccurrence is None:
        return "none"
    digest = hashlib.sha256()
    for array in cooccurrence:
        digest.update(np.ascontiguousarray(np.asarray(array).reshape(-1), dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def vocab_map_path(
    cache: Path,
    source: Any,
    pivot: Any,
    source_bytes: TokenBytes,
    pivot_bytes: TokenBytes,
    kind: str,
    cooccurrence: Cooccurrence | None = None,
) -> Path:
    """Cache file of one map: both tokenizers' hashes and the kind in the name; the mapping
    rules' version (CACHE_VERSION), the bytes and roles read from each tokenizer (see
    ``TokenBytes.digest``) and the counts in a digest."""
    settings = [
        CACHE_VERSION,
        source_bytes.digest(),
        pivot_bytes.digest(),
        _cooccurrence_digest(cooccurrence),
    ]
    digest = hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()[:12]
    return cache / f"{tokenizer_hash(source)}-{tokenizer_hash(pivot)}-{kind}-{digest}.npz"


def default_cache_dir() -> Path:
    """``$FUSION_TRAIN_VOCAB_MAPS``, else ``vocab-maps`` under the asset cache (``registry_assets.cache_dir()``)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else registry_assets.cache_dir() / "vocab-maps"


def build_vocab_map(
    source_tok: Any,
    pivot_tok: Any,
    kind: str = "exact",
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
    path = vocab_map_path(cache, source_tok, pivot_tok, source_bytes, pivot_bytes, kind, cooccurrence)
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            table, stored = saved["source_to_pivot"], saved["counts"]
        if len(table) == len(source_bytes) and len(stored) == len(COUNT_KEYS):
            return VocabMap(table.astype(np.int32), kind, dict(zip(COUNT_KEYS, stored.tolist(), strict=True)))
    vocab_map = map_vocabularies(source_bytes, pivot_bytes, kind, cooccurrence)
    counts = np.array([vocab_map.counts[k] for k in COUNT_KEYS], dtype=np.int64)
    with atomic_file(path, "wb") as handle:  # whole or absent, readable as the umask allows
        np.savez(handle, source_to_pivot=vocab_map.source_to_pivot, counts=counts)
    return vocab_map
