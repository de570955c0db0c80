"""Fusion criteria on constructed candidates, checked against by-hand expectations and a dense
reference for blending."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_train.fuse import Candidate, fuse_example, sequence_cross_entropy


def candidate(rows, ids, probs, gold, nll, tokens, num_bytes, unit="byte") -> Candidate:
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logprobs = np.where(np.asarray(ids) >= 0, np.log(probs), -np.inf).astype(np.float32)
    return Candidate(
        np.asarray(rows),
        np.asarray(ids, dtype=np.int32),
        logprobs,
        np.log(np.asarray(gold, dtype=np.float32)),
        sequence_cross_entropy(nll, tokens, num_bytes, unit),
    )


def three_token_example(unit: str) -> list[Candidate]:
    """A pivot with 3 supervised tokens; a source aligned on tokens 0 and 2 only.

    Per byte the pivot is better (10/20 < 12/20); per token the source is (12/12 < 10/5):
    the source split the same 20 bytes into more, easier tokens.
    """
    pivot = candidate([0, 1, 2], [[1, 2], [3, 4], [5, 6]], [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]],
                      [0.6, 0.7, 0.9], nll=10.0, tokens=5, num_bytes=20, unit=unit)  # fmt: skip
    source = candidate([0, 2], [[2, 7], [6, -1]], [[0.8, 0.1], [0.5, 0.0]], [0.8, 0.5],
                       nll=12.0, tokens=12, num_bytes=20, unit=unit)  # fmt: skip
    return [pivot, source]


def test_min_ce_per_byte_and_per_token_choose_differently() -> None:
    ids, logprobs, winner, supplied = fuse_example(three_token_example("byte"), "min-ce", k=2)
    assert winner == 0
    assert ids.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert supplied.tolist() == [3, 0]

    ids, logprobs, winner, supplied = fuse_example(three_token_example("token"), "min-ce", k=2)
    assert winner == 1
    # Aligned rows take the source's distribution; the unaligned middle row keeps the pivot's.
    assert ids.tolist() == [[2, 7], [3, 4], [6, -1]]
    np.testing.assert_allclose(np.exp(logprobs[0]), [0.8, 0.1], rtol=1e-6)
    assert logprobs[2, 1] == -np.inf
    assert supplied.tolist() == [1, 2]


def test_min_ce_pads_a_narrower_candidate_to_the_output_width() -> None:
    ids, logprobs, _, _ = fuse_example(three_token_example("token"), "min-ce", k=3)
    assert ids.shape == (3, 3) and ids[1].tolist() == [3, 4, -1] and logprobs[1, 2] == -np.inf


def test_token_min_ce_takes_the_candidate_that_liked_the_gold_token_best() -> None:
    ids, _, winner, supplied = fuse_example(three_token_example("byte"), "token-min-ce", k=2)
    # Row 0: source 0.8 > pivot 0.6; row 1: only the pivot; row 2: pivot 0.9 > source 0.5.
    assert winner == -1
    assert ids.tolist() == [[2, 7], [3, 4], [5, 6]]
    assert supplied.tolist() == [2, 1]


def test_avg_ce_matches_a_dense_mixture() -> None:
    candidates = three_token_example("byte")
    ids, logprobs, winner, _ = fuse_example(candidates, "avg-ce", k=3)
    assert winner == -1
    ce = np.array([c.cross_entropy for c in candidates])
    weights = np.exp(-ce) / np.exp(-ce).sum()
    vocab = 8
    for row in range(3):
        dense = np.zeros(vocab)
        total = 0.0
        for c, w in zip(candidates, weights, strict=True):
            if row not in c.rows:
                continue
            r = list(c.rows).index(row)
            p = np.exp(c.logprobs[r].astype(np.float64))
            for token, prob in zip(c.ids[r], p / p.sum(), strict=True):
                if token >= 0:
                    dense[token] += w * prob
            total += w
        dense /= total
        expected = np.argsort(-dense, kind="stable")[:3]
        expected = expected[dense[expected] > 0]
        got = ids[row][ids[row] >= 0]
        assert sorted(got.tolist()) == sorted(expected.tolist())
        np.testing.assert_allclose(np.exp(logprobs[row][: len(got)]), dense[got], rtol=1e-6)


@pytest.mark.parametrize("unit", ["byte", "token"])
def test_sequence_cross_entropy_units(unit: str) -> None:
    expected = 12.0 / (30 if unit == "byte" else 4)
    assert sequence_cross_entropy(12.0, 4, 30, unit) == pytest.approx(expected)
