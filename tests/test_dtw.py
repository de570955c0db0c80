"""The reference DTW alignment against hand-worked cases and an exhaustive search over paths."""

from __future__ import annotations

import itertools
import random

import pytest

from fusion_train.dtw import dtw_align, edit_distance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), (" world", " world", 0)],
)
def test_edit_distance_known_values(a: str, b: str, expected: int) -> None:
    assert edit_distance(a, b) == expected


def _path_cost(source: list[str], pivot: list[str], path: list[tuple[int, int]]) -> int:
    return sum(edit_distance(source[i], pivot[j]) for i, j in path)


def _all_paths(n: int, m: int) -> list[list[tuple[int, int]]]:
    """Every warping path from (0, 0) to (n-1, m-1) with steps (1,0), (0,1), (1,1)."""
    if (n, m) == (1, 1):
        return [[(0, 0)]]
    paths = []
    for di, dj in ((1, 1), (1, 0), (0, 1)):
        if n - di >= 1 and m - dj >= 1:
            paths += [[*p, (n - 1, m - 1)] for p in _all_paths(n - di, m - dj)]
    return paths


def _is_warping_path(path: list[tuple[int, int]], n: int, m: int) -> bool:
    steps = {(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(path)}
    return path[0] == (0, 0) and path[-1] == (n - 1, m - 1) and steps <= {(1, 0), (0, 1), (1, 1)}


def test_one_to_many_split_word() -> None:
    # "Hello" is split in two by the pivot: both pivot pieces align to the one source token.
    source = ["Hello", " world", "!"]
    pivot = ["Hel", "lo", " world", "!"]
    assert dtw_align(source, pivot) == [(0, 0), (0, 1), (1, 2), (2, 3)]


def test_many_to_one() -> None:
    assert dtw_align(["a", "b", "c"], ["abc"]) == [(0, 0), (1, 0), (2, 0)]


def test_identical_sequences_align_on_the_diagonal() -> None:
    tokens = ["The", " cat", " sat", "\n", "😀", "中文"]
    assert dtw_align(tokens, tokens) == [(i, i) for i in range(len(tokens))]


def test_empty_sequences() -> None:
    assert dtw_align([], ["a"]) == []
    assert dtw_align(["a"], []) == []


def test_ties_prefer_the_diagonal() -> None:
    # All costs are equal (every pair differs by one substitution): the diagonal is taken
    # whenever possible.
    assert dtw_align(["a", "b", "c"], ["x", "y"]) == [(0, 0), (1, 0), (2, 1)]


def test_ties_between_the_two_single_steps_go_to_the_pivot_step() -> None:
    # source a b a, pivot b a b; cumulative costs D[i][j] (source i, pivot j, from 1):
    #        b  a  b
    #    a   1  1  2
    #    b   1  2  1
    #    a   2  1  2
    # At (3, 3) the diagonal D[2][2] = 2 is worse than both single steps, which tie at 1: the
    # step back in the pivot, to (3, 2), is taken (a source step would go to (2, 3)); then the
    # diagonal to (2, 1), and the source step to (1, 1), the only one left.
    assert dtw_align(["a", "b", "a"], ["b", "a", "b"]) == [(0, 0), (1, 0), (2, 1), (2, 2)]


def test_path_is_optimal_on_random_sequences() -> None:
    rng = random.Random(7)
    pieces = ["a", "b", "ab", " a", "ba", " ", "abc"]
    for _ in range(60):
        source = [rng.choice(pieces) for _ in range(rng.randint(1, 5))]
        pivot = [rng.choice(pieces) for _ in range(rng.randint(1, 5))]
        path = dtw_align(source, pivot)
        assert _is_warping_path(path, len(source), len(pivot))
        best = min(_path_cost(source, pivot, p) for p in _all_paths(len(source), len(pivot)))
        assert _path_cost(source, pivot, path) == best
