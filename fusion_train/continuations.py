"""Which pivot token a source token's bytes begin with, read from any byte of the source token on.

``--token-align bytes`` (``fusion_train.align``) reads a source's next-token distribution as a
distribution over continuations of the text: token ``t`` means "the next bytes are ``bytes(t)``".
The pivot would emit first, for those bytes, the longest pivot token that is a prefix of them.
Where the pivot token starts ``o`` bytes into a source token, only source tokens whose first ``o``
bytes are the text's count, and the pivot token that their remaining bytes begin with.

For one (source, pivot) pair this module answers both questions for every source token and every
byte offset in it at once, as flat arrays (one entry per byte of every source token), so that the
alignment of an example is a few array look-ups per stored top-k entry:

- ``first_pivot[starts[t] + o]``: the longest pivot token that is a prefix of ``bytes(t)[o:]``,
  found by walking a byte trie of the pivot vocabulary (one walk per entry, all entries in step);
- ``prefix[starts[t] + o - 1]``: a number for ``bytes(t)[:o]`` (a node of the byte trie of the
  source vocabulary), equal for two tokens exactly when their first ``o`` bytes are equal.

Building them takes seconds for a 262k vocabulary; they are cached on disk beside the vocabulary
maps (``fusion_train.vocab.default_cache_dir``), keyed by both tokenizers' bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusion_train import vocab
from fusion_train.storage import atomic_file

# Part of every cache key (through the method name): bump it when the tables' rules change.
VERSION = 1


@dataclass(frozen=True)
class Trie:
    """A byte trie as sorted edges: the child of ``node`` by byte ``b`` is
    ``children[i]`` where ``edges[i] == node * 256 + b``; the root is node 0."""

    edges: np.ndarray  # int64, sorted
    children: np.ndarray  # int64
    size: int  # number of nodes, root included


def piece_lengths(token_bytes: vocab.TokenBytes) -> np.ndarray:
    """Per token id, how many bytes it stands for (0: a special token or an id without a token)."""
    return np.array([len(piece) if piece is not None else 0 for piece in token_bytes.pieces], dtype=np.int64)


def strings_as_flat(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte strings as one flat uint8 array, each string's first index, and its length."""
    lengths = np.array([len(s) for s in strings], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(strings) else lengths
    return np.frombuffer(b"".join(strings), dtype=np.uint8), starts, lengths


def build_trie(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[Trie, np.ndarray]:
    """The byte trie of the strings, and per byte of ``flat`` the node reached after it (so equal
    prefixes of any two strings end at equal nodes). Built one depth at a time over all strings."""
    nodes = np.zeros(len(flat), dtype=np.int64)
    at = np.zeros(len(starts), dtype=np.int64)  # the node each string has reached
    edges, children, size = [], [], 1
    for depth in range(int(lengths.max(initial=0))):
        rows = np.flatnonzero(lengths > depth)
        where = starts[rows] + depth
        keys = at[rows] * 256 + flat[where]
        unique, inverse = np.unique(keys, return_inverse=True)
        at[rows] = size + inverse
        nodes[where] = at[rows]
        edges.append(unique)
        children.append(size + np.arange(len(unique)))
        size += len(unique)
    edges_all = np.concatenate(edges) if edges else np.zeros(0, dtype=np.int64)
    children_all = np.concatenate(children) if children else np.zeros(0, dtype=np.int64)
    order = np.argsort(edges_all)  # keys of different depths never collide: parents differ
    return Trie(edges_all[order], children_all[order], size), nodes


def longest_prefix(
    trie: Trie, terminal: np.ndarray, flat: np.ndarray, begin: np.ndarray, length: np.ndarray
) -> np.ndarray:
    """For each string ``flat[begin : begin + length]``, the ``terminal`` value (-1: none) of the
    deepest trie node on its path that has one: the longest vocabulary entry that is its prefix.
    Every string walks the trie one byte per step, all of them in step."""
    best = np.full(len(begin), -1, dtype=np.int64)
    node = np.zeros(len(begin), dtype=np.int64)
    alive = np.arange(len(begin))
    depth = 0
    while len(alive) and len(trie.edges):
        alive = alive[length[alive] > depth]
        keys = node[alive] * 256 + flat[begin[alive] + depth]
        found = np.minimum(np.searchsorted(trie.edges, keys), len(trie.edges) - 1)
        step = trie.edges[found] == keys
        alive, found = alive[step], found[step]
        node[alive] = trie.children[found]
        value = terminal[node[alive]]
        best[alive[value >= 0]] = value[value >= 0]
        depth += 1
    return best


@dataclass(frozen=True)
class Continuations:
    """The tables of one (source, pivot) pair; see the module's docstring.

    Entries of source token ``t`` are ``starts[t] .. starts[t] + lengths[t] - 1``, one per byte
    offset; special tokens and ids without a token have ``lengths[t] == 0``. ``head[t]`` is the
    pivot id a whole source token begins with: ``first_pivot`` at offset 0 for text, the pivot
    token of the same role (as the vocabulary map says) for special tokens; -1 for none.
    """

    starts: np.ndarray  # int64 [source ids]
    lengths: np.ndarray  # int64 [source ids]
    first_pivot: np.ndarray  # int32 [entries]
    prefix: np.ndarray  # int32 [entries]
    head: np.ndarray  # int64 [source ids]

    @classmethod
    def of(
        cls, source: vocab.TokenBytes, specials: np.ndarray, first_pivot: np.ndarray, prefix: np.ndarray
    ) -> Continuations:
        """The tables around the two per-entry arrays (the part worth caching); ``specials``: the
        vocabulary map's pivot id per source id, read for special tokens only."""
        lengths = piece_lengths(source)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        is_special = np.array([piece is None for piece in source.pieces], dtype=bool)
        head = np.where(is_special, specials, -1).astype(np.int64)
        head[lengths > 0] = first_pivot[starts[lengths > 0]]
        return cls(starts, lengths, first_pivot.astype(np.int32), prefix.astype(np.int32), head)

    def condition(
        self, ids: np.ndarray, probs: np.ndarray, gold: np.ndarray, offsets: np.ndarray
    ) -> Conditioned:
        """Source top-k rows (``ids``, ``probs``: [n, k]) of the distribution at the start of the
        source token ``gold[i]``, read ``offsets[i]`` bytes into that token (0: at its start).

        Offset 0: every stored token is kept; a text token goes to the longest pivot token its
        bytes begin with, a special token to its pivot role (end of turn, eos, bos).
        Offset ``o`` > 0: the first ``o`` bytes of the gold token are already emitted; only text
        tokens that are longer and begin with those bytes are kept, each going to the longest
        pivot token its remaining bytes begin with. Ids outside the source vocabulary are dropped.
        """
        valid = (ids >= 0) & (ids < len(self.starts))
        token = np.where(valid, ids, 0)
        pivot = np.where(valid, self.head[token], -1)
        kept = valid
        inside = np.flatnonzero(offsets > 0)  # the few rows read from inside a token: the long way
        if len(inside):
            t, o = token[inside], offsets[inside][:, None]
            longer = valid[inside] & (self.lengths[t] > o)
            entry = np.where(longer, self.starts[t] + o, 1)  # entries before a longer token's end
            emitted = self.prefix[self.starts[gold[inside]] + offsets[inside] - 1][:, None]
            kept = valid.copy()
            kept[inside] = longer & (self.prefix[entry - 1] == emitted)
            pivot[inside] = np.where(kept[inside], self.first_pivot[entry], -1)
        landed = np.where(pivot >= 0, probs, 0)
        merged_ids, merged_probs = vocab.merge_rows(pivot, landed)
        return Conditioned(merged_ids, merged_probs, np.where(kept, probs, 0).sum(axis=1), landed.sum(axis=1))


def build_continuations(
    source: vocab.TokenBytes, pivot: vocab.TokenBytes, specials: np.ndarray
) -> Continuations:
    """The tables, computed (no cache; see :func:`load_continuations`). Pivot tokens with the same
    bytes count once, as the id :func:`fusion_train.vocab.canonical_ids` gives."""
    canonical = vocab.canonical_ids(pivot)
    pivot_flat, pivot_starts, pivot_lengths = strings_as_flat(list(canonical))
    trie, pivot_nodes = build_trie(pivot_flat, pivot_starts, pivot_lengths)
    terminal = np.full(trie.size, -1, dtype=np.int64)
    nonempty = pivot_lengths > 0
    terminal[pivot_nodes[pivot_starts[nonempty] + pivot_lengths[nonempty] - 1]] = np.fromiter(
        canonical.values(), dtype=np.int64, count=len(canonical)
    )[nonempty]
    flat, starts, lengths = strings_as_flat([piece or b"" for piece in source.pieces])
    _, prefix = build_trie(flat, starts, lengths)
    entry = np.arange(len(flat))
    owner = np.repeat(np.arange(len(starts)), lengths)
    first_pivot = longest_prefix(trie, terminal, flat, entry, starts[owner] + lengths[owner] - entry)
    return Continuations.of(source, specials, first_pivot, prefix)


@dataclass(frozen=True)
class Conditioned:
    """Stored top-k rows moved onto the pivot token that comes next (see ``Continuations.condition``)."""

    ids: np.ndarray  # [n, k] pivot ids, most probable first; -1 pads
    probs: np.ndarray  # [n, k] the source's probabilities added per pivot id (not renormalised)
    kept: np.ndarray  # [n] probability of the stored tokens that continue the text already emitted
    mapped: np.ndarray  # [n] the part of ``kept`` that landed on a pivot id


def load_continuations(
    source_tok: Any,
    pivot_tok: Any,
    source: vocab.TokenBytes,
    pivot: vocab.TokenBytes,
    specials: np.ndarray,
    cache_dir: Path | None = None,
) -> Continuations:
    """The tables of two tokenizers, built once and cached by content like the vocabulary maps
    (the cache file's key holds both tokenizers' bytes and roles; ``specials`` derives from them).
    ``specials``: the vocabulary map's pivot id per source id (read only for special tokens)."""
    cache = Path(cache_dir) if cache_dir is not None else vocab.default_cache_dir()
    path = vocab.vocab_map_path(cache, source_tok, pivot_tok, source, pivot, f"continuations-{VERSION}")
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            tables = Continuations.of(source, specials, saved["first_pivot"], saved["prefix"])
        if len(tables.first_pivot) == len(tables.prefix) == int(tables.lengths.sum()):
            return tables
    tables = build_continuations(source, pivot, specials)
    with atomic_file(path, "wb") as handle:  # whole or absent
        np.savez(handle, first_pivot=tables.first_pivot, prefix=tables.prefix)
    return tables
