"""Stage 3: fuse the pivot's own distributions with the aligned sources', per sequence.

Candidates for an example are the pivot's representation and every aligned source that covers
the example. ``min-ce`` (FuseChat's MinCE) keeps the candidate with the lowest cross-entropy on
the gold response; ``avg-ce`` blends candidates with weights ``softmax(-CE)``; ``token-min-ce``
decides per token by the log-probability each candidate gave the gold text. Cross-entropy is
compared per UTF-8 byte by default: token counts differ across tokenizers, bytes do not.
Pivot tokens a source could not align keep the pivot's own distribution, and so do those whose
aligned distribution rests on less than ``--min-source-mass`` of the source's stored top-k mass
(``--token-align bytes`` conditions some of them on bytes few stored tokens continue). A candidate
whose cross-entropy is NaN never wins under any criterion; the report counts such candidates.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import datasets
import numpy as np
from tqdm.auto import tqdm

from fusion_train import options
from fusion_train.align import FORMAT as ALIGNED_FORMAT
from fusion_train.errors import Command, UserError
from fusion_train.represent import (
    example_arrays,
    load_representation,
    sequence_columns,
    topk_columns,
)
from fusion_train.storage import MANIFEST, atomic_directory, claim_output, read_json, write_json_atomic

FORMAT = "fusion-train/fused@1"
CRITERIA = ("min-ce", "avg-ce", "token-min-ce")
CE_UNITS = ("byte", "token")
# Aligned rows resting on less of the source's stored top-k mass keep the pivot's distribution. Only
# rows that --token-align bytes conditioned on the bytes already emitted have less than all of it.
# 0: measured on Gemma-3's distributions, such rows give the gold token no less at low mass than at
# high (README, "Alignment (bench/align.py)"), so nothing is skipped unless asked.
MIN_SOURCE_MASS = 0.0
REPORT = "report.json"
NAN_IDS_KEPT = 10  # example ids listed per candidate whose cross-entropy was NaN
NO_WINNER = "none"  # sequences_won key of examples where every candidate's cross-entropy was NaN


class FusionError(UserError, ValueError):
    """Inputs that cannot be fused together."""


def fused_features(top_k: int) -> datasets.Features:
    return datasets.Features({**sequence_columns(), **topk_columns(top_k), "winner": datasets.Value("int32")})


@dataclass
class Candidate:
    """One candidate's distributions for one example, on the pivot's supervised tokens."""

    rows: np.ndarray  # indices of the pivot's supervised tokens this candidate covers
    ids: np.ndarray  # [len(rows), k] pivot ids, -1 padding
    logprobs: np.ndarray  # [len(rows), k] float32, -inf padding
    target_logprob: np.ndarray  # [len(rows)] log-probability of the gold text
    cross_entropy: float  # per byte or per token, over the candidate's own tokens


def sequence_cross_entropy(nll: float, tokens: int, num_bytes: int, unit: str) -> float:
    return float(nll) / max(1, num_bytes if unit == "byte" else tokens)


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


def fuse_example(
    candidates: list[Candidate], criterion: str, k: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Fused ``(ids, logprobs)`` for one example, the winning candidate (-1 for mixtures), and
    the number of tokens each candidate supplied. ``candidates[0]`` is the pivot (covers every row).

    Candidates whose cross-entropy is NaN take no part (np.argmin would pick them). Rows that no
    other candidate covers keep the pivot's distributions, also when the pivot's is NaN; if every
    candidate's is NaN the result is the pivot's own distributions (winner 0).
    """
    pivot = candidates[0]
    num_rows = len(pivot.rows)
    ids, logprobs = (a.copy() for a in pad_width(pivot.ids, pivot.logprobs, k))
    supplied = np.zeros(len(candidates), dtype=np.int64)
    usable = [i for i, c in enumerate(candidates) if not np.isnan(c.cross_entropy)]
    if not usable:
        supplied[0] = num_rows
        return ids, logprobs, 0 if criterion == "min-ce" else -1, supplied
    if criterion == "min-ce":
        winner = min(usable, key=lambda i: candidates[i].cross_entropy)  # ties: the first, as argmin
        chosen = candidates[winner]
        ids[chosen.rows], logprobs[chosen.rows] = pad_width(chosen.ids, chosen.logprobs, k)
        supplied[winner] = len(chosen.rows)
        supplied[0] += num_rows - len(chosen.rows) if winner else 0
        return ids, logprobs, winner, supplied
    if criterion == "avg-ce":
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
        return ids, logprobs, -1, supplied
    # token-min-ce: per row, the candidate that gave the gold text the highest log-probability.
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
    return ids, logprobs, -1, supplied


def _load_aligned(path: Path, pivot_manifest: dict[str, Any]) -> tuple[dict[str, Any], datasets.Dataset]:
    if not (path / MANIFEST).exists() or not (path / "data").exists():
        raise FusionError(f"{path}: not a finished `fusion-train align` output (no manifest.json or data/).")
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != ALIGNED_FORMAT:
        raise FusionError(
            f"{path}: format {manifest.get('format')!r} is not {ALIGNED_FORMAT!r}; "
            "(re-)run `fusion-train align` with this version to make it."
        )
    if manifest["pivot"] != pivot_manifest:
        raise FusionError(
            f"{path}: aligned against a different pivot representation ({manifest['pivot']['model']['path']}); "
            "align every source against the --pivot given here."
        )
    return manifest, datasets.load_from_disk(str(path / "data"))


def conditions_on_bytes(aligned_manifests: list[dict[str, Any]]) -> bool:
    """Whether any aligned source was made by ``--token-align bytes``: only its rows can rest on
    less than the whole stored mass, so only then does ``--min-source-mass`` change the output."""
    return any(m["settings"].get("token_align") == "bytes" for m in aligned_manifests)


def fuse(
    pivot_dir: str | Path,
    aligned_dirs: list[str | Path],
    out_dir: str | Path,
    criterion: str = "min-ce",
    ce_unit: str = "byte",
    progress: bool = True,
    min_source_mass: float = MIN_SOURCE_MASS,
) -> dict[str, Any]:
    """Write fused targets for every pivot example into ``out_dir``; return the report."""
    if criterion not in CRITERIA:
        raise FusionError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if ce_unit not in CE_UNITS:
        raise FusionError(f"unknown --ce-unit {ce_unit!r}; choose byte or token")
    if not 0.0 <= min_source_mass <= 1.0:
        raise FusionError(f"--min-source-mass {min_source_mass} is not a share between 0 and 1")
    if not aligned_dirs:
        raise FusionError("give at least one --aligned directory (the output of `fusion-train align`).")
    pivot_dir, out_dir = Path(pivot_dir), Path(out_dir)
    pivot_data = load_representation(pivot_dir)
    pivot_manifest = read_json(pivot_dir / MANIFEST)
    sources = [_load_aligned(Path(p), pivot_manifest) for p in aligned_dirs]
    names = ["pivot"] + [Path(m["source"]["model"]["path"]).name for m, _ in sources]
    if len({m["source"]["model"]["path"] for m, _ in sources}) < len(sources):
        raise FusionError("the same source was given twice with --aligned.")
    top_k = max([pivot_manifest["settings"]["top_k"]] + [m["top_k"] for m, _ in sources])
    manifest = {
        "format": FORMAT,
        "pivot": pivot_manifest["model"],
        "pivot_representation": pivot_manifest,
        "sources": [m["source"] for m, _ in sources],
        "settings": {m["source"]["model"]["path"]: m["settings"] for m, _ in sources},
        "criterion": criterion,
        "ce_unit": ce_unit,
        "top_k": top_k,
    }
    if conditions_on_bytes([m for m, _ in sources]):  # absent otherwise: manifests of older runs match
        manifest["min_source_mass"] = min_source_mass
    claim_output(out_dir, manifest)
    if (out_dir / REPORT).exists():  # written last: the output is complete
        return read_json(out_dir / REPORT)

    started = time.perf_counter()
    index_of = [{id_: i for i, id_ in enumerate(data["id"])} for _, data in sources]
    columns: dict[str, list[Any]] = {name: [] for name in fused_features(top_k)}
    wins: Counter[str] = Counter()
    wins_by_domain: dict[str, Counter[str]] = {}
    tokens_from = np.zeros(len(names), dtype=np.int64)
    nan_counts = np.zeros(len(names), dtype=np.int64)
    nan_ids: list[list[str]] = [[] for _ in names]
    below_mass = np.zeros(len(names), dtype=np.int64)
    for row in tqdm(range(len(pivot_data)), desc="fuse", unit="example", disable=not progress):
        p = example_arrays(pivot_data, row)
        candidates = [
            Candidate(
                np.arange(len(p["target_logprob"])),
                p["topk_ids"],
                p["topk_logprobs"].astype(np.float32),
                p["target_logprob"].astype(np.float32),
                sequence_cross_entropy(p["nll"], p["num_target_tokens"], p["num_target_bytes"], ce_unit),
            )
        ]
        present = [0]
        for s, ((_, data), lookup) in enumerate(zip(sources, index_of, strict=True), start=1):
            if p["id"] not in lookup:
                continue
            a = example_arrays(data, lookup[p["id"]])
            # `align` outputs from before source_mass was recorded used the whole stored mass on every row.
            mass = a.get("source_mass", np.ones(len(a["aligned_index"]), dtype=np.float16))
            enough = mass.astype(np.float32) >= min_source_mass
            below_mass[s] += int((~enough).sum())
            candidates.append(
                Candidate(
                    a["aligned_index"][enough],
                    a["topk_ids"][enough],
                    a["topk_logprobs"][enough].astype(np.float32),
                    a["target_logprob"][enough].astype(np.float32),
                    sequence_cross_entropy(
                        a["source_nll"], a["source_num_target_tokens"], a["source_num_target_bytes"], ce_unit
                    ),
                )
            )
            present.append(s)
        ids, logprobs, winner, supplied = fuse_example(candidates, criterion, top_k)
        tokens_from[present] += supplied
        nan = [s for s, c in zip(present, candidates, strict=True) if np.isnan(c.cross_entropy)]
        for s in nan:
            nan_counts[s] += 1
            if len(nan_ids[s]) < NAN_IDS_KEPT:
                nan_ids[s].append(str(p["id"]))
        winner_name = names[present[winner]] if winner >= 0 else "mixed"
        if len(nan) == len(candidates):
            winner_name = NO_WINNER
        wins[winner_name] += 1
        wins_by_domain.setdefault(str(p["domain"]), Counter())[winner_name] += 1
        for name in ("id", "domain", "input_ids", "run_message", "run_start", "run_length"):
            columns[name].append(p[name])
        columns["topk_ids"].append(ids)
        columns["topk_logprobs"].append(logprobs.astype(np.float16))
        columns["winner"].append(present[winner] if winner >= 0 else -1)

    report = {
        "criterion": criterion,
        "ce_unit": ce_unit,
        "examples": len(pivot_data),
        "candidates": names,
        "sequences_won": dict(wins),
        "sequences_won_by_domain": {d: dict(c) for d, c in sorted(wins_by_domain.items())},
        "tokens_supplied": dict(zip(names, tokens_from.tolist(), strict=True)),
        "nan_cross_entropy": dict(zip(names, nan_counts.tolist(), strict=True)),
        "nan_cross_entropy_ids": dict(zip(names, nan_ids, strict=True)),
        "rows_below_min_source_mass": dict(zip(names[1:], below_mass[1:].tolist(), strict=True)),
        "seconds": time.perf_counter() - started,
    }
    with atomic_directory(out_dir / "data") as tmp:
        datasets.Dataset.from_dict(columns, features=fused_features(top_k)).save_to_disk(str(tmp))
    write_json_atomic(out_dir / REPORT, report)
    return report


@click.command("fuse", cls=Command)
@options.pivot_representation
@click.option(
    "--aligned",
    "aligned_dirs",
    required=True,
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="An aligned source (output of `fusion-train align`); repeat for several sources.",
)
@options.output_directory()
@click.option(
    "--criterion",
    type=click.Choice(CRITERIA),
    default="min-ce",
    help="min-ce: per sequence, the candidate with the lowest cross-entropy (FuseChat's MinCE); "
    "avg-ce: blend with weights softmax(-CE); token-min-ce: decide per token.",
)
@click.option(
    "--ce-unit",
    type=click.Choice(CE_UNITS),
    default="byte",
    help="Compare cross-entropy per UTF-8 byte (comparable across tokenizers) or per token (the papers).",
)
@click.option(
    "--min-source-mass",
    type=click.FloatRange(0.0, 1.0),
    default=MIN_SOURCE_MASS,
    show_default=True,
    help="Aligned rows resting on less than this share of the source's stored top-k mass keep the pivot's "
    "own distribution (only --token-align bytes makes such rows: those conditioned on bytes few stored "
    "tokens continue).",
)
def fuse_command(pivot_dir: str, aligned_dirs: tuple[str, ...], out_dir: str, criterion: str, ce_unit: str,
                 min_source_mass: float) -> None:  # fmt: skip
    """Fuse the pivot's and the aligned sources' distributions into training targets."""
    report = fuse(pivot_dir, list(aligned_dirs), out_dir, criterion, ce_unit, min_source_mass=min_source_mass)
    won = ", ".join(f"{name} {count}" for name, count in report["sequences_won"].items())
    click.echo(
        f"{out_dir}: {report['examples']} examples fused ({criterion}, per {ce_unit}); sequences won: {won}"
    )
    nan = {name: count for name, count in report.get("nan_cross_entropy", {}).items() if count}
    if nan:
        listed = "; ".join(
            f"{name} {count} ({', '.join(report['nan_cross_entropy_ids'][name])}"
            f"{', ...' if count > len(report['nan_cross_entropy_ids'][name]) else ''})"
            for name, count in nan.items()
        )
        click.echo(f"NaN cross-entropy, never chosen: {listed}")
    below = {name: count for name, count in report["rows_below_min_source_mass"].items() if count}
    if below:
        listed = ", ".join(f"{name} {count}" for name, count in below.items())
        click.echo(f"aligned rows below --min-source-mass {min_source_mass}, the pivot's own kept: {listed}")
