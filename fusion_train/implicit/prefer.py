"""Implicit stage 3: the SFT set and preference pairs, from scored responses.

Every mode writes the SFT set: per prompt, the best-scored response of all sources (the target's
own samples, ``--target-source``, never count as a source). Pairs follow one of two papers:

- ``fusechat3`` (FuseChat-3.0, arXiv 2503.04222): one pair per prompt, both responses from the
  **same** source, so the pair differs in quality rather than in style (a reward model favours
  some models' styles): chosen = the prompt's best response overall, rejected = the worst
  other response of the same source; kept when their score margin is at least ``--margin``.
- ``sft``: the SFT set alone. WRPO's first step: the target is fine-tuned on it before it
  answers the prompts itself, so its pairs can only be built afterwards.
- ``wrpo`` (WRPO, arXiv 2412.03187): the target answers the prompts itself (after SFT); chosen
  (y_wt) and rejected (y_l) are the target's own best and worst responses, kept when their margin
  is at least ``--margin``; ``chosen_source`` (y_ws) is the prompt's best source response, which
  the WRPO loss mixes into the chosen side with a weight that grows during training.

Output is TRL's conversational format: ``prompt`` (messages), ``completion`` for SFT, and
``chosen``/``rejected`` (and ``chosen_source``) as one-message assistant lists.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import datasets

from fusion_train import options
from fusion_train.errors import Command, UserError
from fusion_train.implicit.score import load_scored
from fusion_train.storage import atomic_directory, atomic_write_text, claim_output, write_json_atomic

FORMAT = "fusion-train/preferences@1"
MODES = ("fusechat3", "wrpo", "sft")
SFT_DIR, PAIRS_DIR = "sft", "pairs"
HINTS = {  # why pairs were dropped -> what to change (below margin, no source response: see drop_hints)
    "one response": "Sample more responses per prompt (--num-samples), or keep more of them scored.",
    "identical responses": "Sample at a higher --temperature.",
    "no target response": "Score the target's own samples (sampled after SFT) together with the sources'.",
}


class PreferError(UserError, ValueError):
    """Scored responses from which the asked-for data cannot be built."""


@dataclass(frozen=True)
class Response:
    """One scored response, ranked within its prompt."""

    source: str
    sample_index: int
    text: str
    score: float


def best(responses: list[Response]) -> Response:
    """The highest score; ties go to the earliest response (sources in input order, then sample index)."""
    return max(responses, key=lambda r: r.score)  # max keeps the first of equal keys


def worst(responses: list[Response]) -> Response:
    """The lowest score; ties go to the earliest response."""
    return min(responses, key=lambda r: r.score)


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def choose_scorer(manifest: dict[str, Any], scorer: str | None) -> str:
    names = [s["name"] for s in manifest["scorers"]]
    if scorer is None:
        if len(names) > 1:
            raise PreferError(
                f"the responses have several scores ({', '.join(names)}); pick one with --scorer."
            )
        return names[0]
    if scorer not in names:
        raise PreferError(
            f"--scorer {scorer!r}: not among the scores of these responses: {', '.join(names)}."
        )
    return scorer


def prefer(
    scored_dir: str | Path,
    out_dir: str | Path,
    *,
    mode: str,
    margin: float = 0.01,
    target_source: str | None = None,
    scorer: str | None = None,
    drop_truncated: bool = False,
) -> dict[str, Any]:
    """Write ``sft/`` and ``pairs/`` (datasets; mode ``sft``: only ``sft/``) and
    ``report.json``/``report.md`` into ``out_dir``; return the report. No pair reaching ``margin``
    (mode ``sft``: no SFT example) is an error, and nothing is written then."""
    if mode not in MODES:
        raise PreferError(f"--mode {mode!r}: use one of {', '.join(MODES)}.")
    if margin < 0:
        raise PreferError("--margin must be at least 0.")
    manifest, rows = load_scored(scored_dir)
    scorer = choose_scorer(manifest, scorer)
    sources = list(dict.fromkeys(s["source"] for s in manifest["samples"]))
    if mode == "wrpo" and target_source is None:
        raise PreferError("--mode wrpo needs --target-source: the source name of the target's own samples.")
    if target_source is not None and target_source not in sources:
        raise PreferError(f"--target-source {target_source!r}: no such source among {', '.join(sources)}.")
    if sources == [target_source]:
        raise PreferError(
            f"{scored_dir}: holds only the target's samples ({target_source}); score the sources' too."
        )

    prompts: dict[str, list[dict[str, str]]] = {}
    prompt_source: dict[str, str] = {}
    responses: dict[str, dict[str, list[Response]]] = defaultdict(lambda: defaultdict(list))
    excluded: Counter[str] = Counter()
    for row in rows:
        key = row["id"]
        if key not in prompts:
            prompts[key], prompt_source[key] = row["prompt"], row["source"]
        elif row["prompt"] != prompts[key]:
            raise PreferError(
                f"record {key!r}: sources {prompt_source[key]!r} and {row['source']!r} were given different prompts "
                "under the same id; sample every source from the same prompt data."
            )
        value = row["scores"][scorer]
        if value is None:
            excluded["not judged"] += 1
        elif drop_truncated and row["finish_reason"] == "length":
            excluded["truncated"] += 1
        else:
            responses[key][row["source"]].append(
                Response(row["source"], row["sample_index"], row["response"], value)
            )

    sft_rows, pair_rows = [], []
    dropped: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    largest_margin = None
    for key, prompt in prompts.items():
        pool = [r for src, rs in responses[key].items() if src != target_source for r in rs]
        if not pool:
            dropped["no source response"] += 1
            continue
        top = best(pool)
        sft_rows.append({"id": key, "prompt": prompt, "completion": assistant(top.text), "source": top.source,
                         "score": top.score})  # fmt: skip
        by_source[top.source]["sft"] += 1
        if mode == "sft":
            continue
        if mode == "fusechat3":
            chosen, candidates = top, responses[key][top.source]
        else:
            candidates = responses[key].get(target_source, [])  # type: ignore[arg-type]
            if not candidates:
                dropped["no target response"] += 1
                continue
            chosen = best(candidates)
        others = [r for r in candidates if r is not chosen]
        owner = top.source
        if not others:
            dropped["one response"] += 1
            by_source[owner]["dropped: one response"] += 1
            continue
        rejected = worst(others)
        gap = chosen.score - rejected.score
        largest_margin = gap if largest_margin is None else max(largest_margin, gap)
        reason = _drop_reason(chosen, rejected, margin)
        if reason is not None:
            dropped[reason] += 1
            by_source[owner][f"dropped: {reason}"] += 1
            continue
        pair = {"id": key, "prompt": prompt, "chosen": assistant(chosen.text), "rejected": assistant(rejected.text),
                "source": owner, "chosen_score": chosen.score, "rejected_score": rejected.score,
                "margin": chosen.score - rejected.score}  # fmt: skip
        if mode == "wrpo":
            pair |= {"chosen_source": assistant(top.text), "chosen_source_score": top.score}
        pair_rows.append(pair)
        by_source[owner]["pairs"] += 1

    report = {
        "mode": mode,
        "scorer": scorer,
        "margin": margin,
        "target_source": target_source,
        "prompts": len(prompts),
        "responses": len(rows),
        "responses_excluded": dict(excluded),
        "sft_examples": len(sft_rows),
        "pairs": len(pair_rows),
        "pairs_dropped": dict(dropped),
        "largest_margin": largest_margin,
        "by_source": {src: dict(by_source[src]) for src in sources if src in by_source},
    }
    hints = drop_hints(dropped, excluded, largest_margin, target_source)
    if mode == "sft" and not sft_rows:
        raise PreferError(
            f"{scored_dir}: no prompt has a scored source response ({dict(excluded)} left out). {hints}".rstrip()
        )
    if mode != "sft" and not pair_rows:
        raise PreferError(
            f"{scored_dir}: no preference pair kept ({len(prompts)} prompts; dropped: {dict(dropped)}). {hints}".rstrip()
        )
    out_dir = Path(out_dir)
    claim_output(out_dir, {
        "format": FORMAT,
        "scored": {"path": str(Path(scored_dir).resolve()),
                   "fingerprint": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]},
        "settings": {"mode": mode, "margin": margin, "target_source": target_source, "scorer": scorer,
                     "drop_truncated": drop_truncated},
    })  # fmt: skip
    datasets.disable_progress_bars()  # two small data sets; the report says what was written
    try:
        for name, data in ((SFT_DIR, sft_rows), (PAIRS_DIR, pair_rows))[: 1 if mode == "sft" else 2]:
            with atomic_directory(out_dir / name) as tmp:
                datasets.Dataset.from_list(data).save_to_disk(str(tmp))
    finally:
        datasets.enable_progress_bars()
    write_json_atomic(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    return report


def drop_hints(
    dropped: Counter[str], excluded: Counter[str], largest_margin: float | None, target_source: str | None
) -> str:
    """What to change, for the reasons pairs (or SFT examples) were dropped; only advice that can help."""
    hints = []
    if "below margin" in dropped:
        hints.append(
            f"Lower --margin (the largest margin was {largest_margin:.4g})."
            if largest_margin
            else "Every pair's scores tie, so no pair can have a margin: rank with another scorer (--scorer, or "
            "score with a reward model), or sample more, more varied responses (--num-samples, --temperature)."
        )
    if "no source response" in dropped:
        if excluded["not judged"]:
            hints.append(
                "Some prompts' responses were all left unjudged: use a scorer that judges them (the built-in "
                "verifiers need a reference answer in the data)."
            )
        if excluded["truncated"]:
            hints.append("Some prompts' responses were all cut at --max-new-tokens: drop --drop-truncated.")
        if target_source is not None and not excluded:
            hints.append("Score the sources' samples together with the target's.")
    return " ".join([*hints, *(HINTS[reason] for reason in HINTS if reason in dropped)])


def _drop_reason(chosen: Response, rejected: Response, margin: float) -> str | None:
    """Why a (chosen, rejected) pair teaches nothing, or None to keep it."""
    if chosen.text == rejected.text:
        return "identical responses"
    if chosen.score - rejected.score < margin:
        return "below margin"
    return None


def markdown_report(report: dict[str, Any]) -> str:
    """What a person checks before training: how many pairs each source gave, and why others were dropped."""
    reasons = sorted(
        {k for counts in report["by_source"].values() for k in counts if k.startswith("dropped")}
    )
    header = ["source", "SFT examples", "pairs", *reasons]
    lines = [
        f"Mode {report['mode']}, scorer {report['scorer']}, margin {report['margin']}"
        + (f", target {report['target_source']}" if report["target_source"] else "")
        + f": {report['sft_examples']} SFT examples and {report['pairs']} pairs from {report['prompts']} prompts "
        f"({report['responses']} responses).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for source, counts in report["by_source"].items():
        cells = [source, counts.get("sft", 0), counts.get("pairs", 0), *(counts.get(r, 0) for r in reasons)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", f"Pairs dropped: {report['pairs_dropped'] or 'none'}.",
              f"Responses left out: {report['responses_excluded'] or 'none'}."]  # fmt: skip
    if report["mode"] == "wrpo":
        lines.append("WRPO pairs: a row's source is the source of its y_ws (chosen_source); chosen and rejected are "
                     "the target's own.")  # fmt: skip
    return "\n".join(lines) + "\n"


@click.command("prefer", cls=Command)
@click.option(
    "--scored",
    "scored_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Output of `fusion-train score`.",
)
@options.output_directory("Output directory: sft/, pairs/, report.json, report.md.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    required=True,
    help="fusechat3: best vs worst response of one source; wrpo: the target's own best vs worst, "
    "plus the best source response as chosen_source; sft: the SFT set alone (WRPO's first step).",
)
@click.option(
    "--margin",
    type=options.NON_NEGATIVE_FLOAT,
    default=0.01,
    help="Smallest score difference between chosen and rejected for a pair to be kept.",
)
@click.option(
    "--target-source",
    default=None,
    help="Source name of the target's own samples: required for wrpo; left out of the SFT set in both modes.",
)
@click.option("--scorer", default=None, help="Which score ranks responses (needed when there are several).")
@click.option(
    "--drop-truncated",
    is_flag=True,
    help="Leave out responses cut at --max-new-tokens (finish reason 'length').",
)
def prefer_command(
    scored_dir: str, out_dir: str, mode: str, margin: float, target_source: str | None, scorer: str | None,
    drop_truncated: bool,
) -> None:  # fmt: skip
    """Build the SFT set and preference pairs (TRL conversational format) from scored responses."""
    report = prefer(scored_dir, out_dir, mode=mode, margin=margin, target_source=target_source, scorer=scorer,
                    drop_truncated=drop_truncated)  # fmt: skip
    click.echo(markdown_report(report))
    written = [Path(out_dir) / SFT_DIR] + ([] if mode == "sft" else [Path(out_dir) / PAIRS_DIR])
    click.echo(f"written: {', '.join(map(str, written))}, report.json, report.md")
