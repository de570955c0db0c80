"""Reference token alignment: dynamic time warping over token strings (FuseLLM / FuseChat).

This is the public reference code's algorithm, kept plain on purpose: it is the baseline the
span alignment is compared and benchmarked against. Time and memory are
O(len(source) * len(pivot)), in Python.
"""

from __future__ import annotations


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def dtw_align(source_tokens: list[str], pivot_tokens: list[str]) -> list[tuple[int, int]]:
    """Align two token sequences by dynamic time warping with an edit-distance cost.

    Tokens are compared as decoded text (``" world"``, not ``"Ġworld"`` or ``"▁world"``).
    ``D[i][j] = ed(source[i], pivot[j]) + min(D[i-1][j-1], D[i-1][j], D[i][j-1])`` with
    ``D[0][0] = ed(source[0], pivot[0])``.

    Returns the warping path as ``(source_index, pivot_index)`` pairs from ``(0, 0)`` to
    ``(len(source) - 1, len(pivot) - 1)``, ordered by both indices; consecutive pairs advance
    one index or both. Every token of each sequence appears in at least one pair: a source index
    repeated with several pivot indices is a one-to-many match, a pivot index repeated with several
    source indices a many-to-one match. The path is traced back from the end; among steps of equal
    cost it takes the diagonal, then a step back in the pivot, then in the source. (FuseLLM's
    ``dtw(blending, base)`` ranks the source step before the pivot step; both orders give optimal
    paths, which differ only where costs tie.) An empty sequence gives an empty list.
    """
    n, m = len(source_tokens), len(pivot_tokens)
    if n == 0 or m == 0:
        return []
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]  # row/column 0: the border before any token
    cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            step = edit_distance(source_tokens[i - 1], pivot_tokens[j - 1])
            cost[i][j] = step + min(cost[i - 1][j - 1], cost[i - 1][j], cost[i][j - 1])
    i, j = n, m
    path = [(i - 1, j - 1)]
    while i > 1 or j > 1:
        diagonal = cost[i - 1][j - 1] if i > 1 and j > 1 else inf
        up = cost[i - 1][j] if i > 1 else inf
        left = cost[i][j - 1] if j > 1 else inf
        best = min(diagonal, up, left)
        if diagonal == best:
            i, j = i - 1, j - 1
        elif left == best:
            j -= 1
        else:
            i -= 1
        path.append((i - 1, j - 1))
    path.reverse()
    return path
