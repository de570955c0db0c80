"""Fusion criteria on constructed candidates, checked against by-hand expectations and a dense
reference for blending; NaN cross-entropies through `fuse` on hand-written stage outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from click.testing import CliRunner
from numeric import assert_close_at_scale

from fusion_train import align, parts, representation
from fusion_train.fuse import Candidate, fuse_command, fuse_example, sequence_cross_entropy


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
    assert_close_at_scale(np.exp(logprobs[0]), [0.8, 0.1], dtype="float32")
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


def dense_mixture(candidates: list[Candidate], weights: np.ndarray, row: int, vocab: int = 8) -> np.ndarray:
    """Row ``row`` of the blend, densely: each covering candidate's renormalised top-k, weighted,
    divided by the weight of the candidates that cover the row."""
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
    return dense / total


def assert_row_is(ids: np.ndarray, logprobs: np.ndarray, dense: np.ndarray, k: int) -> None:
    """The fused row holds the k most probable ids of ``dense`` with their probabilities."""
    expected = np.argsort(-dense, kind="stable")[:k]
    expected = expected[dense[expected] > 0]
    got = ids[ids >= 0]
    assert sorted(got.tolist()) == sorted(expected.tolist())
    assert_close_at_scale(np.exp(logprobs[: len(got)]), dense[got], dtype="float32")


def test_avg_ce_matches_a_dense_mixture() -> None:
    candidates = three_token_example("byte")
    ids, logprobs, winner, _ = fuse_example(candidates, "avg-ce", k=3)
    assert winner == -1
    ce = np.array([c.cross_entropy for c in candidates])
    weights = np.exp(-ce) / np.exp(-ce).sum()
    for row in range(3):
        assert_row_is(ids[row], logprobs[row], dense_mixture(candidates, weights, row), k=3)


# --------------------------------------------------------------------------- NaN cross-entropies


def nan_source() -> Candidate:
    """A source on every row that gave the gold tokens 0.99 (it would win token-min-ce everywhere),
    but whose sequence cross-entropy is NaN (np.argmin would pick it for min-ce)."""
    return candidate([0, 1, 2], [[7, 1], [6, 2], [5, 3]], [[0.99, 0.01]] * 3, [0.99] * 3,
                     nll=math.nan, tokens=3, num_bytes=20)  # fmt: skip


def test_a_nan_candidate_never_wins_min_ce() -> None:
    pivot, source = three_token_example("token")  # the source has the lower cross-entropy
    for candidates in ([pivot, source, nan_source()], [pivot, nan_source(), source]):
        ids, _, winner, supplied = fuse_example(candidates, "min-ce", k=2)
        assert candidates[winner] is source
        assert ids.tolist() == [[2, 7], [3, 4], [6, -1]]
        assert supplied[next(i for i, c in enumerate(candidates) if math.isnan(c.cross_entropy))] == 0


def test_a_nan_candidate_takes_no_part_in_avg_ce() -> None:
    pivot, source = three_token_example("byte")
    ids, logprobs, _, supplied = fuse_example([pivot, source, nan_source()], "avg-ce", k=3)
    assert np.isfinite(np.exp(logprobs)).all() and supplied.tolist() == [3, 2, 0]
    ce = np.array([pivot.cross_entropy, source.cross_entropy])
    weights = np.exp(-ce) / np.exp(-ce).sum()
    for row in range(3):
        assert_row_is(ids[row], logprobs[row], dense_mixture([pivot, source], weights, row), k=3)


def test_a_nan_candidate_supplies_no_token_in_token_min_ce() -> None:
    pivot, source = three_token_example("byte")
    ids, _, _, supplied = fuse_example([pivot, source, nan_source()], "token-min-ce", k=2)
    # As without it: row 0 from the source (0.8 > 0.6), rows 1 and 2 from the pivot.
    assert ids.tolist() == [[2, 7], [3, 4], [5, 6]]
    assert supplied.tolist() == [2, 1, 0]


@pytest.mark.parametrize("criterion", ["min-ce", "avg-ce", "token-min-ce"])
def test_a_nan_pivot_loses_where_a_source_covers_the_token(criterion: str) -> None:
    """The pivot's NaN cross-entropy hands rows to the source; the row only the pivot has keeps its
    distribution (there is nothing else to put there)."""
    pivot, source = three_token_example("byte")  # per byte the pivot would win min-ce
    pivot.cross_entropy = math.nan
    ids, logprobs, winner, supplied = fuse_example([pivot, source], criterion, k=2)
    assert ids.tolist() == [[2, 7], [3, 4], [6, -1]]
    expected = [0.8 / 0.9, 0.1 / 0.9] if criterion == "avg-ce" else [0.8, 0.1]
    assert_close_at_scale(np.exp(logprobs[0]), expected, dtype="float32")
    assert supplied.tolist() == [1, 2]
    assert winner == (1 if criterion == "min-ce" else -1)


@pytest.mark.parametrize("criterion", ["min-ce", "avg-ce", "token-min-ce"])
def test_every_candidate_nan_keeps_the_pivots_distributions(criterion: str) -> None:
    pivot, _ = three_token_example("byte")
    pivot.cross_entropy = math.nan
    ids, _, _, supplied = fuse_example([pivot, nan_source()], criterion, k=2)
    assert ids.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert supplied.tolist() == [3, 0]


@pytest.mark.parametrize(("criterion", "winner"), [("min-ce", 0), ("avg-ce", -1), ("token-min-ce", -1)])
def test_every_candidate_nan_is_won_by_the_pivot_under_a_per_sequence_criterion(
    criterion: str, winner: int
) -> None:
    """The winner column of such an example: the pivot where one candidate wins each sequence, else
    -1 (mixed), as written before the criteria were a registry."""
    pivot, _ = three_token_example("byte")
    pivot.cross_entropy = math.nan
    assert fuse_example([pivot, nan_source()], criterion, k=2)[2] == winner


@pytest.mark.parametrize("unit", ["byte", "token"])
def test_sequence_cross_entropy_units(unit: str) -> None:
    expected = 12.0 / (30 if unit == "byte" else 4)
    assert sequence_cross_entropy(12.0, 4, 30, unit) == pytest.approx(expected)


# --------------------------------------------------------------------------- NaN through `fuse`

# Per example: sequence NLL over 10 bytes of the pivot and the sources alpha, beta (NaN: broken).
NLL = {"ex0": (3.0, 2.0, 1.0), "ex1": (3.0, 2.0, math.nan), "ex2": (math.nan, math.nan, 5.0),
       "ex3": (math.nan, math.nan, math.nan)}  # fmt: skip
# Each candidate's top-2 ids on both supervised tokens, and the probability it gave the gold token:
# the NaN candidates liked the gold tokens best, so token-min-ce would take them if it looked.
IDS = {"pivot": [[10, 11], [12, 13]], "alpha": [[20, 21], [22, 23]], "beta": [[30, 31], [32, 33]]}
GOLD = {"pivot": 0.5, "alpha": 0.6, "beta": 0.7}


def _default(feature: Any) -> Any:
    """A value for a column `fuse` does not read."""
    if isinstance(feature, datasets.Value):
        return "" if feature.dtype == "string" else False if feature.dtype == "bool" else 0
    return []


def _save(path: Path, features: datasets.Features, rows: list[dict[str, Any]]) -> None:
    columns = {name: [row.get(name, _default(feature)) for row in rows] for name, feature in features.items()}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))


def _distribution(name: str) -> dict[str, Any]:
    return {"topk_ids": IDS[name], "topk_logprobs": np.log([[0.6, 0.3], [0.6, 0.3]]).tolist(),
            "target_logprob": [math.log(GOLD[name])] * 2}  # fmt: skip


def write_stage_outputs(root: Path) -> tuple[Path, list[Path]]:
    """A pivot representation and two aligned sources, written by hand in the stages' formats."""
    pivot_dir = root / "pivot"
    pivot_manifest = {"format": representation.FORMAT, "num_parts": 1, "model": {"path": "/models/pivot"},
                      "settings": {"top_k": 2}}  # fmt: skip
    pivot_dir.mkdir()
    (pivot_dir / "manifest.json").write_text(json.dumps(pivot_manifest))
    rows = [
        {"id": id_, "domain": "test", "input_ids": [1, 5, 6, 2], "run_message": [1], "run_start": [1],
         "run_length": [2], "nll": nll[0], "num_target_tokens": 2, "num_target_bytes": 10,
         **_distribution("pivot")}
        for id_, nll in NLL.items()
    ]  # fmt: skip
    _save(parts.part_path(pivot_dir, 0) / "data", representation.representation_features(2), rows)
    aligned = []
    for k, name in enumerate(("alpha", "beta"), start=1):
        out = root / name
        out.mkdir()
        manifest = {"format": align.FORMAT, "pivot": pivot_manifest, "source": {"model": {"path": f"/models/{name}"}},
                    "settings": {}, "top_k": 2}  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(manifest))
        rows = [
            {"id": id_, "aligned_index": [0, 1], "source_mass": [1.0, 1.0], "source_nll": nll[k],
             "source_num_target_tokens": 2, "source_num_target_bytes": 10, **_distribution(name)}
            for id_, nll in NLL.items()
        ]  # fmt: skip
        _save(out / "data", align.aligned_features(2), rows)
        aligned.append(out)
    return pivot_dir, aligned


@pytest.mark.parametrize("criterion", ["min-ce", "avg-ce", "token-min-ce"])
def test_nan_cross_entropies_never_win_and_are_reported(tmp_path: Path, criterion: str) -> None:
    pivot_dir, aligned = write_stage_outputs(tmp_path)
    out = tmp_path / "fused"
    result = CliRunner().invoke(fuse_command, ["--pivot", str(pivot_dir), "--out", str(out),
                                               "--criterion", criterion, *(f"--aligned={a}" for a in aligned)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["nan_cross_entropy"] == {"pivot": 2, "alpha": 2, "beta": 2}
    assert report["nan_cross_entropy_ids"] == {
        "pivot": ["ex2", "ex3"],
        "alpha": ["ex2", "ex3"],
        "beta": ["ex1", "ex3"],
    }
    assert "NaN cross-entropy" in result.output and "beta 2 (ex1, ex3)" in result.output
    fused = {row["id"]: row for row in datasets.load_from_disk(str(out / "data"))}
    # ex2: beta is the only finite candidate; ex3: none is, the pivot's own distributions stay.
    assert fused["ex2"]["topk_ids"] == IDS["beta"] and fused["ex3"]["topk_ids"] == IDS["pivot"]
    assert all(np.isfinite(np.exp(row["topk_logprobs"])).all() for row in fused.values())
    if criterion == "min-ce":
        assert report["sequences_won"] == {"beta": 2, "alpha": 1, "none": 1}
        assert fused["ex1"]["topk_ids"] == IDS["alpha"] and fused["ex0"]["topk_ids"] == IDS["beta"]
        assert report["tokens_supplied"] == {"pivot": 2, "alpha": 2, "beta": 4}
    else:
        assert report["sequences_won"] == {"mixed": 3, "none": 1}
    if criterion == "token-min-ce":  # beta liked ex1's gold tokens best, but its NaN keeps it out
        assert fused["ex1"]["topk_ids"] == IDS["alpha"]
        assert report["tokens_supplied"] == {"pivot": 2, "alpha": 2, "beta": 4}
    if criterion == "avg-ce":  # ex1 blends pivot and alpha only
        assert {i for row in fused["ex1"]["topk_ids"] for i in row} <= set(
            np.ravel(IDS["pivot"] + IDS["alpha"])
        )
        assert report["tokens_supplied"] == {"pivot": 6, "alpha": 4, "beta": 4}
