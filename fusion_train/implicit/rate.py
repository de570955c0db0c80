"""Implicit evaluation: rate models by their scored answers to held-out prompts.

Every model answers the same held-out prompts (``fusion-train sample``, one source per model,
usually ``--num-samples 1``) and the answers are scored together (``fusion-train score``, a
reward model or verifiers). ``rate`` reads that ``score`` output and reports, for one scorer:

- per model, its **mean score** over the prompts it was judged on, a model's several samples on
  one prompt averaged first so that every prompt counts once, with a bootstrap interval over
  prompts (percentile method);
- per model other than ``--baseline``, its **win rate** against the baseline on the prompts both
  were judged on: a higher score wins (1), an equal one ties (0.5), a lower one loses (0), as in
  AlpacaEval, with a paired bootstrap interval (prompts resampled, the same ones for both models).

A response the scorer could not judge (a None score) is left out and counted; a prompt none of
whose responses was judged counts for neither statistic.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from fusion_train import options
from fusion_train.errors import Command, UserError
from fusion_train.implicit.prefer import choose_scorer
from fusion_train.implicit.score import load_scored
from fusion_train.settings import options_from, setting
from fusion_train.storage import atomic_file, atomic_write_text, claim_output, write_json_atomic

FORMAT = "fusion-train/rates@1"
DRAWS_PER_BLOCK = 10_000_000  # resampled prompt indices held at once


@dataclass(frozen=True)
class RateSettings:
    """What ``rate`` compares and how sure it is (a recipe's rate section takes the baseline and the
    bootstrap's settings; its seed also seeds the answers)."""

    baseline: str = setting(metavar="NAME", help="The model (source name) the others are compared with.")
    scorer: str | None = setting(None, help="Which score rates the answers (needed when there are several).")
    resamples: int = setting(1000, type=options.POSITIVE_INT, help="Bootstrap resamples of the prompts.")
    confidence: float = setting(
        0.95,
        type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
        help="Level of the bootstrap intervals.",
    )
    seed: int = setting(0, help="Seed of the bootstrap resampling.")


class RateError(UserError, ValueError):
    """Scored responses that cannot be rated as asked."""


def bootstrap_interval(
    values: np.ndarray, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per prompt): ``resamples``
    draws of as many prompts with replacement, the same draws for every call with this seed and
    number of prompts (so two models' statistics on the same prompts are resampled in pairs)."""
    rng = np.random.default_rng(seed)
    block = max(1, DRAWS_PER_BLOCK // len(values))  # bounded memory for many prompts
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), size=(min(block, resamples - start), len(values)))].mean(
                axis=1
            )
            for start in range(0, resamples, block)
        ]
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def prompt_scores(rows: Any, scorer: str, sources: list[str]) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Prompt ids (first-seen order), a [source, prompt] array of each source's mean judged score
    on each prompt (NaN where it has none), and per source the responses the scorer left unjudged
    (no score, or a non-finite one: ``score``'s summary names them)."""
    ids: dict[str, int] = {}
    prompts: dict[str, tuple[Any, str]] = {}
    index = {src: i for i, src in enumerate(sources)}
    cells: list[tuple[int, int, float]] = []
    unjudged = dict.fromkeys(sources, 0)
    for row in rows:
        key = row["id"]
        if key not in ids:
            ids[key] = len(ids)
            prompts[key] = (row["prompt"], row["source"])
        elif row["prompt"] != prompts[key][0]:
            raise RateError(
                f"record {key!r}: models {prompts[key][1]!r} and {row['source']!r} were given different prompts "
                "under the same id; sample every model from the same prompt data."
            )
        value = row["scores"][scorer]
        if value is None or not math.isfinite(value):  # a NaN or infinite reward judges nothing either
            unjudged[row["source"]] += 1
        else:
            cells.append((index[row["source"]], ids[key], value))
    sums = np.zeros((len(sources), len(ids)))
    counts = np.zeros((len(sources), len(ids)))
    if cells:
        src, col, value = (np.array(x) for x in zip(*cells, strict=True))
        np.add.at(sums, (src, col), value)
        np.add.at(counts, (src, col), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(ids), np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), unjudged


def rate(scored_dir: str | Path, out_dir: str | Path, settings: RateSettings) -> dict[str, Any]:
    """Mean score and win rate against the baseline of every model (source) of a ``score`` output,
    with bootstrap intervals; write ``report.json``, ``report.md`` and ``rates.png`` into ``out_dir``
    and return the report. Bad input raises a :class:`RateError` before anything is written."""
    baseline, resamples, confidence, seed = (
        settings.baseline, settings.resamples, settings.confidence, settings.seed
    )  # fmt: skip
    if resamples < 1:
        raise RateError(f"--resamples {resamples}: give at least 1.")
    if not 0 < confidence < 1:
        raise RateError(f"--confidence {confidence}: give a level between 0 and 1, e.g. 0.95.")
    manifest, rows = load_scored(scored_dir)
    scorer = choose_scorer(manifest, settings.scorer)
    sources = list(dict.fromkeys(s["source"] for s in manifest["samples"]))
    if baseline not in sources:
        raise RateError(
            f"--baseline {baseline!r}: not one of the models scored in {scored_dir}: {', '.join(sources)}."
        )
    prompts, models = rate_models(rows, scorer, sources, baseline, resamples, confidence, seed)
    report = {
        "format": FORMAT,
        "scored": str(Path(scored_dir).resolve()),
        "scorer": scorer,
        "baseline": baseline,
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "prompts": prompts,
        "models": models,
    }
    out_dir = Path(out_dir)
    claim_output(
        out_dir,
        {
            "format": FORMAT,
            "scored": {
                "path": str(Path(scored_dir).resolve()),
                "fingerprint": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16],
            },
            "settings": asdict(replace(settings, scorer=scorer)),
        },
    )
    write_json_atomic(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    plot_rates(report, out_dir / "rates.png")
    return report


def rate_models(
    rows: Any,
    scorer: str,
    sources: list[str],
    baseline: str,
    resamples: int,
    confidence: float,
    seed: int,
) -> tuple[int, list[dict[str, Any]]]:
    """The number of prompts, and each model's row of the report: its responses and prompts
    judged, its mean score and its win rate against ``baseline``, with bootstrap intervals."""
    ids, table, unjudged = prompt_scores(rows, scorer, sources)
    answered = {src: set() for src in sources}
    responses = dict.fromkeys(sources, 0)
    for key, src in zip(rows["id"], rows["source"], strict=True):
        answered[src].add(key)
        responses[src] += 1
    base = table[sources.index(baseline)]
    if np.isnan(base).all():
        raise RateError(
            f"--baseline {baseline!r}: none of its {responses[baseline]} responses was judged by {scorer}, so nothing "
            "can be compared with it; pick another baseline or scorer."
        )

    models = []
    for src, scores in zip(sources, table, strict=True):
        judged = scores[~np.isnan(scores)]
        model: dict[str, Any] = {
            "name": src,
            "baseline": src == baseline,
            "responses": responses[src],
            "responses_not_judged": unjudged[src],
            "prompts": len(judged),
            "prompts_not_judged": len(answered[src]) - len(judged),
            "mean_score": None,
            "win_rate": None,
        }
        if len(judged):
            low, high = bootstrap_interval(judged, resamples, confidence, seed)
            model["mean_score"] = {"value": float(judged.mean()), "low": low, "high": high}
        if src != baseline:
            model["win_rate"] = win_rate(scores, base, resamples, confidence, seed)
        models.append(model)
    return len(ids), models


def win_rate(
    scores: np.ndarray, base: np.ndarray, resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Win rate of ``scores`` against ``base`` (per prompt, NaN where not judged) on the prompts
    both were judged on, with its paired bootstrap interval and the counts behind it."""
    both = ~np.isnan(scores) & ~np.isnan(base)
    outcome = np.where(scores[both] > base[both], 1.0, np.where(scores[both] == base[both], 0.5, 0.0))
    result: dict[str, Any] = {
        "value": None,
        "low": None,
        "high": None,
        "wins": int((outcome == 1).sum()),
        "ties": int((outcome == 0.5).sum()),
        "losses": int((outcome == 0).sum()),
        "prompts": int(both.sum()),
        "prompts_left_out": int((~both).sum()),
    }
    if len(outcome):
        low, high = bootstrap_interval(outcome, resamples, confidence, seed)
        result |= {"value": float(outcome.mean()), "low": low, "high": high}
    return result


def _order(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Best first: by win rate (the baseline at 0.5, its rate against itself), then mean score;
    models without either come last."""

    def key(model: dict[str, Any]) -> tuple[float, float]:
        rate_ = 0.5 if model["baseline"] else (model["win_rate"] or {}).get("value")
        mean = (model["mean_score"] or {}).get("value")
        return (-rate_ if rate_ is not None else 1.0, -mean if mean is not None else np.inf)

    return sorted(report["models"], key=key)


def markdown_report(report: dict[str, Any]) -> str:
    """The table a person reads: models sorted by win rate against the baseline."""
    level = f"{report['confidence']:.0%}"
    header = [
        "model",
        f"win rate vs {report['baseline']} ({level} CI)",
        "wins / ties / losses",
        "prompts compared",
        f"mean score ({level} CI)",
        "prompts judged",
        "responses not judged",
    ]
    lines = [
        f"Scorer {report['scorer']} on {report['prompts']} prompts; win rate against {report['baseline']} counts a tie "
        f"as half a win; intervals: percentile bootstrap over prompts, {report['resamples']} resamples.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model in _order(report):
        mean, wins = model["mean_score"], model["win_rate"]
        if model["baseline"]:
            rate_cells = ["baseline", "", ""]
        elif wins["value"] is None:
            rate_cells = ["n/a", "0 / 0 / 0", "0"]
        else:
            rate_cells = [
                f"{wins['value']:.3f} ({wins['low']:.3f}-{wins['high']:.3f})",
                f"{wins['wins']} / {wins['ties']} / {wins['losses']}",
                str(wins["prompts"]),
            ]
        mean_cell = (
            "n/a" if mean is None else f"{mean['value']:.4g} ({mean['low']:.4g} to {mean['high']:.4g})"
        )
        cells = [
            model["name"],
            *rate_cells,
            mean_cell,
            str(model["prompts"]),
            str(model["responses_not_judged"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_rates(report: dict[str, Any], path: Path) -> None:
    """Two panels, best model on top (the conventions of evaluate's report.png): mean score and win
    rate against the baseline, each with its interval; a grey line marks 0.5 (as good as the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _order(report)[::-1]  # barh draws the first row at the bottom
    names = [m["name"] for m in rows]
    colours = [plt.get_cmap("tab10")(1 if m["baseline"] else 0) for m in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(rows) + 1.5), sharey=True, squeeze=False)
    level = f"{report['confidence']:.0%}"
    for ax, field, label in (
        (axes[0][0], "mean_score", f"mean {report['scorer']} score per prompt, {level} CI"),
        (axes[0][1], "win_rate", f"win rate against {report['baseline']} (ties count half), {level} CI"),
    ):
        for y, (model, colour) in enumerate(zip(rows, colours, strict=True)):
            stat = model[field]
            if model["baseline"] and field == "win_rate":
                ax.text(0.5, y, " baseline", va="center", fontsize="small", color="grey")
            elif stat is None or stat["value"] is None:
                ax.text(
                    0.5 if field == "win_rate" else 0, y, " n/a", va="center", fontsize="small", color="grey"
                )
            else:
                ax.errorbar(
                    stat["value"],
                    y,
                    xerr=[[stat["value"] - stat["low"]], [stat["high"] - stat["value"]]],
                    fmt="o",
                    color=colour,
                    capsize=3,
                )
        ax.set_xlabel(label)
    axes[0][0].set_yticks(range(len(rows)), names)
    axes[0][0].set_title(f"Mean score, {report['prompts']} prompts")
    axes[0][1].axvline(0.5, color="grey", linewidth=1)
    axes[0][1].set_xlim(-0.02, 1.02)
    axes[0][1].set_title(f"Win rate against {report['baseline']}")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


@click.command("rate", cls=Command)
@click.option(
    "--scored",
    "scored_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Output of `fusion-train score` on every model's answers to the same held-out prompts.",
)
@options.output_directory("Output directory: report.json, report.md, rates.png.")
@options_from(RateSettings)
def rate_command(scored_dir: str, out_dir: str, **settings: Any) -> None:
    """Rate models by their scored answers: mean score and win rate against a baseline, with bootstrap CIs."""
    report = rate(scored_dir, out_dir, RateSettings(**settings))
    click.echo(markdown_report(report))
    click.echo(f"written: {Path(out_dir) / 'report.md'}, report.json, rates.png")
