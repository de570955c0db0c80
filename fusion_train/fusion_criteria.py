"""The fusion criteria of ``fusion-train fuse --criterion`` and a recipe's ``fuse.criterion``, one
:class:`FusionCriterion` each, in ``CRITERIA``.

A criterion decides, for one example, which candidates' distributions the fused targets take:
the candidates are the pivot's own (``candidates[0]``, on every supervised token) and every aligned
source's. The ``--criterion`` choices and their help, ``fuse``'s check and the recipe's are derived
from ``CRITERIA``; adding a criterion is one declaration below and its function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fusion_train.registries import by_name

MIXED = -1  # the winner of an example whose rows come from several candidates

# An example's fused (ids [rows, k], logprobs [rows, k], winner, tokens each candidate supplied)
Fused = tuple[np.ndarray, np.ndarray, int, np.ndarray]


@dataclass
class Candidate:
    """One candidate's distributions for one example, on the pivot's supervised tokens."""

    rows: np.ndarray  # indices of the pivot's supervised tokens this candidate covers
    ids: np.ndarray  # [len(rows), k] pivot ids, -1 padding
    logprobs: np.ndarray  # [len(rows), k] float32, -inf padding
    target_logprob: np.ndarray  # [len(rows)] log-probability of the gold text
    cross_entropy: float  # per byte or per token, over the candidate's own tokens


def pad_width(ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (or keep) the top-k arrays to width ``k`` with -1 ids and -inf log-probabilities."""
    missing = k - ids.shape[1]
    if missing <= 0:
        return ids[:, :k], logprobs[:, :k]
    return (
        np.pad(ids, ((0, 0), (0, missing)), constant_values=-1),
        np.pad(logprobs, ((0, 0), (0, missing)), constant_values=-np.inf),
    )


def blend(
    candidates: list[Candidate], weights: np.ndarray, num_rows: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mix candidates' renormalised top-k distributions row by row, keeping the top ``k`` ids.

    Where a candidate does not cover a row, the weights of the others are renormalised.
    """
    row_parts, id_parts, prob_parts, weight_parts = [], [], [], []
    for candidate, weight in zip(candidates, weights, strict=True):
        probs = np.exp(candidate.logprobs.astype(np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
        row_parts.append(np.repeat(candidate.rows, candidate.ids.shape[1]))
        id_parts.append(candidate.ids.ravel())
        prob_parts.append(probs.ravel() * weight)
        weight_parts.append(np.full(len(candidate.rows), weight))
    present = np.bincount(
        np.concatenate([c.rows for c in candidates]), np.concatenate(weight_parts), num_rows
    )
    rows, ids, probs = np.concatenate(row_parts), np.concatenate(id_parts), np.concatenate(prob_parts)
    valid = ids >= 0
    rows, ids, probs = rows[valid], ids[valid], probs[valid] / present[rows[valid]]
    if len(ids) == 0:  # no candidate has a valid entry on any row
        return np.full((num_rows, k), -1, dtype=np.int32), np.full((num_rows, k), -np.inf, dtype=np.float32)
    # Sum the probability of the same id within a row, then keep each row's k largest.
    keys, inverse = np.unique(rows.astype(np.int64) * (ids.max() + 1) + ids, return_inverse=True)
    summed = np.bincount(inverse, probs)
    key_rows, key_ids = keys // (ids.max() + 1), keys % (ids.max() + 1)
    order = np.lexsort((-summed, key_rows))
    key_rows, key_ids, summed = key_rows[order], key_ids[order], summed[order]
    rank = np.arange(len(key_rows)) - np.searchsorted(key_rows, key_rows)
    keep = rank < k
    out_ids = np.full((num_rows, k), -1, dtype=np.int32)
    out_logprobs = np.full((num_rows, k), -np.inf, dtype=np.float32)
    out_ids[key_rows[keep], rank[keep]] = key_ids[keep]
    out_logprobs[key_rows[keep], rank[keep]] = np.log(summed[keep])
    return out_ids, out_logprobs


def pivots_own(candidates: list[Candidate], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pivot's distributions at width ``k``, which a criterion overwrites where it takes another
    candidate's, and no token supplied yet."""
    pivot = candidates[0]
    ids, logprobs = (a.copy() for a in pad_width(pivot.ids, pivot.logprobs, k))
    return ids, logprobs, np.zeros(len(candidates), dtype=np.int64)


def lowest_sequence_ce(candidates: list[Candidate], usable: list[int], k: int) -> Fused:
    """FuseChat's MinCE: the candidate with the lowest cross-entropy supplies every row it covers."""
    ids, logprobs, supplied = pivots_own(candidates, k)
    num_rows = len(candidates[0].rows)
    winner = min(usable, key=lambda i: candidates[i].cross_entropy)  # ties: the first, as argmin
    chosen = candidates[winner]
    ids[chosen.rows], logprobs[chosen.rows] = pad_width(chosen.ids, chosen.logprobs, k)
    supplied[winner] = len(chosen.rows)
    supplied[0] += num_rows - len(chosen.rows) if winner else 0
    return ids, logprobs, winner, supplied


def softmax_ce_blend(candidates: list[Candidate], usable: list[int], k: int) -> Fused:
    """Every candidate's distributions mixed with weights softmax(-cross-entropy), row by row."""
    ids, logprobs, supplied = pivots_own(candidates, k)
    num_rows = len(candidates[0].rows)
    scores = -np.array([candidates[i].cross_entropy for i in usable])
    top = scores.max()
    weights = np.exp(scores - top) if np.isfinite(top) else (scores == top).astype(np.float64)
    blended = blend([candidates[i] for i in usable], weights / weights.sum(), num_rows, k)
    covered = np.zeros(num_rows, dtype=bool)
    for i in usable:
        covered[candidates[i].rows] = True
        supplied[i] = len(candidates[i].rows)
    ids[covered], logprobs[covered] = blended[0][covered], blended[1][covered]
    supplied[0] += int((~covered).sum())
    return ids, logprobs, MIXED, supplied


def highest_token_logprob(candidates: list[Candidate], usable: list[int], k: int) -> Fused:
    """Per row, the candidate that gave the gold text the highest log-probability."""
    ids, logprobs, supplied = pivots_own(candidates, k)
    num_rows = len(candidates[0].rows)
    best = np.full(num_rows, -np.inf)
    source_of = np.zeros(num_rows, dtype=np.int64)
    for index in usable:
        candidate = candidates[index]
        better = candidate.target_logprob > best[candidate.rows]
        best[candidate.rows[better]] = candidate.target_logprob[better]
        source_of[candidate.rows[better]] = index
    for index, candidate in enumerate(candidates[1:], start=1):
        take = source_of[candidate.rows] == index
        padded_ids, padded_logprobs = pad_width(candidate.ids[take], candidate.logprobs[take], k)
        ids[candidate.rows[take]], logprobs[candidate.rows[take]] = padded_ids, padded_logprobs
    supplied += np.bincount(source_of, minlength=len(candidates))
    return ids, logprobs, MIXED, supplied


@dataclass(frozen=True)
class FusionCriterion:
    """One criterion: its name, what it does (for --help) and the function that fuses an example."""

    name: str  # --criterion, fuse.criterion in a recipe; part of the fuse stage's key
    help: str  # one line, in --help
    # (candidates, the indices of those whose cross-entropy is not NaN (never empty), k) -> fused
    fuse: Callable[[list[Candidate], list[int], int], Fused]
    # One candidate wins each example (the winner column names it); else the winner is MIXED. Where
    # no candidate's cross-entropy is usable, the winner is then the pivot (0).
    per_sequence: bool = False


def registry(*criteria: FusionCriterion) -> dict[str, FusionCriterion]:
    """The criteria by name; a name declared twice is refused."""
    return by_name("fusion criteria", criteria)


CRITERIA = registry(
    FusionCriterion(
        "min-ce",
        "per sequence, the candidate with the lowest cross-entropy (FuseChat's MinCE)",
        lowest_sequence_ce,
        per_sequence=True,
    ),
    FusionCriterion("avg-ce", "blend with weights softmax(-CE)", softmax_ce_blend),
    FusionCriterion(
        "token-min-ce",
        "per token, the candidate that gave the gold token the highest probability",
        highest_token_logprob,
    ),
)
DEFAULT_CRITERION = "min-ce"
CRITERIA_HELP = "; ".join(f"{criterion.name}: {criterion.help}" for criterion in CRITERIA.values()) + "."
