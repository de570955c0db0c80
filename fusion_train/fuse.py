"""Stage 3: fuse the pivot's own distributions with the aligned sources', per sequence.

Candidates for an example are the pivot's representation and every aligned source that covers
the example; a criterion of ``fusion_criteria`` (``min-ce``, FuseChat's MinCE, by default) decides
which of their distributions the fused targets take. Cross-entropy is compared per UTF-8 byte by
default: token counts differ across tokenizers, bytes do not.
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
from fusion_train.fused import FORMAT, fused_features
from fusion_train.fusion_criteria import (
    CRITERIA,
    CRITERIA_HELP,
    DEFAULT_CRITERION,
    MIXED,
    Candidate,
    Fused,
    pivots_own,
)
from fusion_train.representation import example_arrays, load_representation
from fusion_train.settings import options_from, setting
from fusion_train.storage import MANIFEST, atomic_directory, claim_output, read_json, write_json_atomic

CE_UNITS = ("byte", "token")
# Aligned rows resting on less of the source's stored top-k mass keep the pivot's distribution. Only
# rows that --token-align bytes conditioned on the bytes already emitted have less than all of it.
# 0: measured on Gemma-3's distributions, such rows give the gold token no less at low mass than at
# high (README, "Alignment (bench/align.py)"), so nothing is skipped unless asked.
MIN_SOURCE_MASS = 0.0


@dataclass(frozen=True)
class FuseSettings:
    """``fuse``'s settings: its flags and a recipe's ``fuse`` section (and a source's own)."""

    criterion: str = setting(DEFAULT_CRITERION, type=click.Choice(list(CRITERIA)), help=CRITERIA_HELP)
    ce_unit: str = setting(
        "byte",
        type=click.Choice(CE_UNITS),
        help="Compare cross-entropy per UTF-8 byte (comparable across tokenizers) or per token (the papers).",
    )
    min_source_mass: float = setting(
        MIN_SOURCE_MASS,
        type=click.FloatRange(0.0, 1.0),
        help="Aligned rows resting on less than this share of the source's stored top-k mass keep the "
        "pivot's own distribution (only --token-align bytes makes such rows: those conditioned on bytes "
        "few stored tokens continue).",
    )


REPORT = "report.json"
NAN_IDS_KEPT = 10  # example ids listed per candidate whose cross-entropy was NaN
NO_WINNER = "none"  # sequences_won key of examples where every candidate's cross-entropy was NaN


class FusionError(UserError, ValueError):
    """Inputs that cannot be fused together."""


def sequence_cross_entropy(nll: float, tokens: int, num_bytes: int, unit: str) -> float:
    return float(nll) / max(1, num_bytes if unit == "byte" else tokens)


def fuse_example(candidates: list[Candidate], criterion: str, k: int) -> Fused:
    """Fused ``(ids, logprobs)`` for one example, the winning candidate (MIXED for mixtures), and
    the number of tokens each candidate supplied. ``candidates[0]`` is the pivot (covers every row).

    Candidates whose cross-entropy is NaN take no part (np.argmin would pick them). Rows that no
    other candidate covers keep the pivot's distributions, also when the pivot's is NaN; if every
    candidate's is NaN the result is the pivot's own distributions (won by the pivot under a
    per-sequence criterion).
    """
    chosen = CRITERIA[criterion]
    usable = [i for i, c in enumerate(candidates) if not np.isnan(c.cross_entropy)]
    if usable:
        return chosen.fuse(candidates, usable, k)
    ids, logprobs, supplied = pivots_own(candidates, k)
    supplied[0] = len(candidates[0].rows)
    return ids, logprobs, 0 if chosen.per_sequence else MIXED, supplied


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
    criterion: str = DEFAULT_CRITERION,
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
    tally = Tally(names)
    for row in tqdm(range(len(pivot_data)), desc="fuse", unit="example", disable=not progress):
        p = example_arrays(pivot_data, row)
        candidates, present = [_pivot_candidate(p, ce_unit)], [0]
        for s, ((_, data), lookup) in enumerate(zip(sources, index_of, strict=True), start=1):
            if p["id"] in lookup:
                a = example_arrays(data, lookup[p["id"]])
                candidate, below_mass = _source_candidate(a, ce_unit, min_source_mass)
                tally.below_mass[s] += below_mass
                candidates.append(candidate)
                present.append(s)
        ids, logprobs, winner, supplied = fuse_example(candidates, criterion, top_k)
        tally.add(p, candidates, present, winner, supplied)
        for name in ("id", "domain", "input_ids", "run_message", "run_start", "run_length"):
            columns[name].append(p[name])
        columns["topk_ids"].append(ids)
        columns["topk_logprobs"].append(logprobs.astype(np.float16))
        columns["winner"].append(present[winner] if winner != MIXED else MIXED)

    report = {
        "criterion": criterion,
        "ce_unit": ce_unit,
        "examples": len(pivot_data),
        "candidates": names,
        **tally.report(),
        "seconds": time.perf_counter() - started,
    }
    with atomic_directory(out_dir / "data") as tmp:
        datasets.Dataset.from_dict(columns, features=fused_features(top_k)).save_to_disk(str(tmp))
    write_json_atomic(out_dir / REPORT, report)
    return report


def _pivot_candidate(p: dict[str, Any], ce_unit: str) -> Candidate:
    """The pivot's own distributions, on every one of its tokens."""
    return Candidate(
        np.arange(len(p["target_logprob"])),
        p["topk_ids"],
        p["topk_logprobs"].astype(np.float32),
        p["target_logprob"].astype(np.float32),
        sequence_cross_entropy(p["nll"], p["num_target_tokens"], p["num_target_bytes"], ce_unit),
    )


def _source_candidate(a: dict[str, Any], ce_unit: str, min_source_mass: float) -> tuple[Candidate, int]:
    """A source's aligned distributions, less the rows resting on less than ``min_source_mass``
    of its stored mass, and how many rows that left out."""
    # `align` outputs from before source_mass was recorded used the whole stored mass on every row.
    mass = a.get("source_mass", np.ones(len(a["aligned_index"]), dtype=np.float16))
    enough = mass.astype(np.float32) >= min_source_mass
    candidate = Candidate(
        a["aligned_index"][enough],
        a["topk_ids"][enough],
        a["topk_logprobs"][enough].astype(np.float32),
        a["target_logprob"][enough].astype(np.float32),
        sequence_cross_entropy(
            a["source_nll"], a["source_num_target_tokens"], a["source_num_target_bytes"], ce_unit
        ),
    )
    return candidate, int((~enough).sum())


class Tally:
    """What the fuse report counts, per candidate (the pivot first, then the sources)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.wins: Counter[str] = Counter()
        self.wins_by_domain: dict[str, Counter[str]] = {}
        self.tokens_from = np.zeros(len(names), dtype=np.int64)
        self.nan_counts = np.zeros(len(names), dtype=np.int64)
        self.nan_ids: list[list[str]] = [[] for _ in names]
        self.below_mass = np.zeros(len(names), dtype=np.int64)

    def add(
        self,
        p: dict[str, Any],
        candidates: list[Candidate],
        present: list[int],
        winner: int,
        supplied: np.ndarray,
    ) -> None:
        """One example: who supplied its tokens, who won it, whose cross-entropy was NaN."""
        self.tokens_from[present] += supplied
        nan = [s for s, c in zip(present, candidates, strict=True) if np.isnan(c.cross_entropy)]
        for s in nan:
            self.nan_counts[s] += 1
            if len(self.nan_ids[s]) < NAN_IDS_KEPT:
                self.nan_ids[s].append(str(p["id"]))
        winner_name = self.names[present[winner]] if winner != MIXED else "mixed"
        if len(nan) == len(candidates):
            winner_name = NO_WINNER
        self.wins[winner_name] += 1
        self.wins_by_domain.setdefault(str(p["domain"]), Counter())[winner_name] += 1

    def report(self) -> dict[str, Any]:
        names = self.names
        return {
            "sequences_won": dict(self.wins),
            "sequences_won_by_domain": {d: dict(c) for d, c in sorted(self.wins_by_domain.items())},
            "tokens_supplied": dict(zip(names, self.tokens_from.tolist(), strict=True)),
            "nan_cross_entropy": dict(zip(names, self.nan_counts.tolist(), strict=True)),
            "nan_cross_entropy_ids": dict(zip(names, self.nan_ids, strict=True)),
            "rows_below_min_source_mass": dict(zip(names[1:], self.below_mass[1:].tolist(), strict=True)),
        }


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
@options_from(FuseSettings)
def fuse_command(
    pivot_dir: str,
    aligned_dirs: tuple[str, ...],
    out_dir: str,
    criterion: str,
    ce_unit: str,
    min_source_mass: float,
) -> None:
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
