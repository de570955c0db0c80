"""The closest pivot token by edit distance over bytes, for source tokens no pivot token
equals (the ``mined`` fallback of a vocabulary map): a deletion join finds near matches of short
tokens at once, a chunked dynamic programme the rest, within a bounded memory budget."""

from __future__ import annotations

import numpy as np


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
