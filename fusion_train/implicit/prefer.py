"""Implicit stage 3: the SFT set and preference pairs, from scored responses.

The papers train SFT and preference optimisation on **different prompts**: trained on a prompt
first, a model has already learnt the response a pair would prefer. FuseChat-3.0 splits its
prompts 4:6 into an SFT set and a DPO set, WRPO 1:2. So does ``--sft-share`` (by default the
mode's paper share): a prompt's set is decided by a hash of its record id, the same on every
run, machine and source, and independent of the held-out split (salted, see :func:`in_sft_set`).

- SFT set (every mode, SFT prompts): per prompt, the best-scored response of all sources (the
  target's own samples, ``--target-source``, never count as a source).
- ``fusechat3`` (FuseChat-3.0, arXiv 2503.04222), preference prompts: a pair of two responses of
  the **same** source, so that it differs in quality rather than in style (a reward model favours
  some models' styles): that source's best against its worst, kept when the score margin lies in
  ``[--margin, --max-margin]`` (0.01 to 0.1 in the paper). Of the sources with a kept pair, the
  one whose chosen scores highest gives it (our reading of "the same source model").
- ``sft``: the SFT set alone. WRPO's first step: the target is fine-tuned on it before it answers
  the prompts itself, so its pairs can only be built afterwards.
- ``wrpo`` (WRPO, arXiv 2412.03187), preference prompts: chosen (y_wt) and rejected (y_l) are the
  target's own best and worst responses, with no margin filter (only identical texts are dropped,
  as in WRPO's reference); ``chosen_source`` (y_ws) is the prompt's best source response, which
  the WRPO loss mixes into the chosen side with a weight that grows during training.

Correctness before reward (``--gate VERIFIER``, FuseChat-3.0's rule for maths and code): on a
prompt the verifier can judge, only correct responses are SFT targets, chosen or y_ws, and a
rejected response is an incorrect one (the lowest-ranked); the ranking scorer orders them. A
prompt none of whose source responses is correct is left out; a prompt without a verifiable
reference (the verifier judged none of its responses) is ranked by the scorer alone.

Never a winner: a response without a score, with a NaN or infinite score (counted per scorer and
source, with example ids: a NaN compares false with everything, so ``max`` over it depends on the
order), or with an empty or whitespace-only text. Output is TRL's conversational format:
``prompt`` (messages), ``completion`` for SFT, ``chosen``/``rejected`` (and ``chosen_source``) as
one-message assistant lists.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import datasets

from fusion_train import options
from fusion_train.errors import Command, UserError
from fusion_train.implicit.preferences import FORMAT, PAIRS_DIR, SFT_DIR
from fusion_train.implicit.score import load_scored
from fusion_train.settings import options_from, setting
from fusion_train.storage import (
    atomic_directory,
    atomic_write_text,
    check_output,
    claim_output,
    write_json_atomic,
)

MODES = ("fusechat3", "wrpo", "sft")
ALL = "all"  # --sft-share all: every prompt gives an SFT example and a pair (not the papers')
NO_BOUND = "none"  # --max-margin none: no upper bound
SPLIT_SALT = "fusion-train/prefer-split:"  # the held-out split hashes the bare id
SPLIT_BUCKETS = 10_000
EXAMPLES = 5  # example ids per scorer and source of non-finite scores
TOLERANCE = 1e-9  # a margin written as 0.95 - 0.94 meets a bound of 0.01
HINTS = {  # why pairs were dropped -> what to change (margins, no source response: see drop_hints)
    "one response": "Sample more responses per prompt (--num-samples), or keep more of them scored.",
    "identical responses": "Sample at a higher --temperature.",
    "no target response": "Score the target's own samples (sampled after SFT) together with the sources'.",
    "nothing correct": "Every source response to some prompts failed the --gate verifier: sample more "
    "responses (--num-samples) or use stronger sources.",
    "no incorrect response": "Every response of the sources that had a correct one was correct: a pair needs "
    "an incorrect one too; sample more responses (--num-samples, --temperature).",
}


@dataclass(frozen=True)
class PaperRule:
    """A paper's data settings: the SFT share of the prompts and the margin window of a pair."""

    sft_share: float
    margin: float
    max_margin: float | str


PAPER_RULES = {
    "fusechat3": PaperRule(0.4, 0.01, 0.1),  # FuseChat-3.0: SFT:DPO prompts 4:6; margins 0.01 to 0.1
    "wrpo": PaperRule(1 / 3, 0.0, NO_BOUND),  # WRPO: 1/3 SFT, 2/3 preference; no margin filter
    "sft": PaperRule(1 / 3, 0.0, NO_BOUND),  # the SFT set alone is WRPO's first step
}


class PreferError(UserError, ValueError):
    """Scored responses from which the asked-for data cannot be built."""


def share_value(value: float | str) -> float | str:
    """``--sft-share``: a fraction from 0 to 1, or ``all``; ValueError says what else is wanted."""
    if value == ALL:
        return ALL
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = math.nan
    if not 0 <= share <= 1:  # NaN too
        raise ValueError(f"expected a fraction from 0 to 1, or {ALL} (every prompt in both sets)")
    return share


def bound_value(value: float | str) -> float | str:
    """``--max-margin``: a non-negative number, or ``none``; ValueError says what else is wanted."""
    if value == NO_BOUND:
        return NO_BOUND
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = math.nan
    if not 0 <= bound < math.inf:
        raise ValueError(f"expected a non-negative number, or {NO_BOUND} (no upper bound)")
    return bound


class NumberOrWord(click.ParamType):
    """A click type for a number option that also takes one word (``all``, ``none``)."""

    def __init__(self, check: Callable[[Any], Any], metavar: str) -> None:
        self.check, self.name = check, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.name  # as written (click would upper-case the word: ALL, which it refuses)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self.check(value)
        except ValueError as error:
            self.fail(f"{value!r}: {error}", param, ctx)


@dataclass(frozen=True)
class PreferSettings:
    """How ``prefer`` splits the prompts and picks its pairs, besides ``--mode`` (None: the mode's
    paper value, ``PAPER_RULES``); a recipe's prefer section takes all but ``target_source``."""

    sft_share: float | str | None = setting(
        None,
        type=NumberOrWord(share_value, "SHARE|all"),
        help="Share of the prompts (by a hash of the record id) in the SFT set; the rest give pairs. 'all': "
        "every prompt in both (not the papers'). Default: the papers': fusechat3 0.4 (FuseChat-3.0's 4:6), "
        "wrpo and sft 1/3 (WRPO's). Give prefer --mode sft and --mode wrpo the same share.",
    )
    margin: float | None = setting(
        None,
        type=options.NON_NEGATIVE_FLOAT,
        help="Smallest score difference between chosen and rejected for a pair to be kept. Default: the "
        "papers': fusechat3 0.01 (FuseChat-3.0), wrpo 0 (WRPO has no margin filter). ArmoRM's scale: other "
        "scorers may need others.",
    )
    max_margin: float | str | None = setting(
        None,
        type=NumberOrWord(bound_value, "FLOAT|none"),
        help="Largest score difference for a pair to be kept (a wider one is as suspect as a narrow one); "
        "'none': no bound. Default: the papers': fusechat3 0.1 (FuseChat-3.0), wrpo none (WRPO).",
    )
    gate: str | None = setting(
        None,
        metavar="VERIFIER",
        help="Correctness before reward (FuseChat-3.0's rule for maths and code): a verifier of the scored "
        "data (e.g. numeric-answer); SFT target, chosen and y_ws are correct responses, rejected an incorrect "
        "one, ranked by --scorer. Prompts with no correct response are left out; those it cannot judge (no "
        "reference) are ranked by --scorer alone. Default: none.",
    )
    gate_pass: float = setting(
        1.0,
        help="A response passes --gate when its verifier score is at least this (numeric-answer: 1 right, "
        "0 wrong).",
    )
    target_source: str | None = setting(
        None,
        help="Source name of the target's own samples: required for wrpo; left out of the SFT set in both "
        "modes.",
    )
    scorer: str | None = setting(
        None, help="Which score ranks responses (needed when there are several besides --gate)."
    )
    drop_truncated: bool = setting(
        False, help="Leave out responses cut at --max-new-tokens (finish reason 'length')."
    )


@dataclass(frozen=True)
class Rules:
    """What ``prefer`` builds, every default resolved: recorded in the manifest and the report."""

    mode: str
    scorer: str
    gate: str | None
    gate_pass: float
    margin: float
    max_margin: float | str
    sft_share: float | str
    target_source: str | None
    drop_truncated: bool

    def margin_reason(self, margin: float) -> str | None:
        """Why a reward margin is outside the window, or None."""
        if margin < self.margin - TOLERANCE:
            return "below margin"
        if self.max_margin != NO_BOUND and margin > float(self.max_margin) + TOLERANCE:
            return "above max margin"
        return None


def in_sft_set(record_id: str, share: float) -> bool:
    """Whether a prompt belongs to the SFT set (else to the preference set): a hash of its record
    id, as the held-out split (pipeline.split_data) but salted, so that the two splits are
    independent (unsalted, a held-out fraction of 0.1 would take the ids an SFT share would)."""
    digest = hashlib.sha256((SPLIT_SALT + record_id).encode("utf-8")).hexdigest()
    return int(digest, 16) % SPLIT_BUCKETS < round(share * SPLIT_BUCKETS)


def sides_of(record_id: str, rules: Rules) -> set[str]:
    """The sets (``sft``, ``preference``) a prompt feeds in this mode (mode sft: the SFT set only)."""
    if rules.sft_share == ALL:
        sides = {"sft", "preference"}
    else:
        sides = {"sft"} if in_sft_set(record_id, float(rules.sft_share)) else {"preference"}
    return sides - {"preference"} if rules.mode == "sft" else sides


@dataclass(frozen=True)
class Response:
    """One scored response, ranked within its prompt; ``correct``: the gate's verdict (None without
    a gate, or where the record has no verifiable reference)."""

    source: str
    sample_index: int
    text: str
    score: float
    correct: bool | None = None


def best(responses: list[Response]) -> Response:
    """The highest score; ties go to the earliest response (sources in input order, then sample index)."""
    return max(responses, key=lambda r: r.score)  # max keeps the first of equal keys


def worst(responses: list[Response]) -> Response:
    """The lowest score; ties go to the earliest response."""
    return min(responses, key=lambda r: r.score)


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def choose_scorer(manifest: dict[str, Any], scorer: str | None, leave_out: str | None = None) -> str:
    """The score that ranks responses: ``scorer``, or the only one (besides ``leave_out``, the gate)."""
    names = [s["name"] for s in manifest["scorers"]]
    if scorer is None:
        rest = [n for n in names if n != leave_out]
        if len(rest) != 1:
            raise PreferError(
                f"the responses have several scores ({', '.join(names)}); pick one with --scorer."
                if rest
                else f"--gate {leave_out!r} is the only score of these responses; rank them with another "
                "(score with --reward-model too, and pass --scorer)."
            )
        return rest[0]
    if scorer not in names:
        raise PreferError(
            f"--scorer {scorer!r}: not among the scores of these responses: {', '.join(names)}."
        )
    return scorer


def check_gate(manifest: dict[str, Any], gate: str | None, gate_pass: float) -> None:
    """A gate is a verifier of the scored data, with a finite pass mark."""
    if gate is None:
        return
    verifiers = [s["name"] for s in manifest["scorers"] if s.get("kind") == "verifier"]
    if gate not in verifiers:
        found = ", ".join(verifiers) or "none; score with --verifier NAME"
        raise PreferError(f"--gate {gate!r}: not a verifier of these scores (verifiers: {found}).")
    if not math.isfinite(gate_pass):
        raise PreferError(f"--gate-pass {gate_pass}: give a finite number.")


def flag(key: str) -> str:
    """A setting's command-line flag, as errors name it."""
    return "--" + key.replace("_", "-")


def data_settings(
    mode: str,
    sft_share: float | str | None,
    margin: float | None,
    max_margin: float | str | None,
    name: Callable[[str], str] = flag,
) -> dict[str, Any]:
    """The split and the margin window of a run: the mode's paper values where None, each checked;
    errors call a setting ``name(key)`` (a recipe names its keys)."""
    if mode not in MODES:
        raise PreferError(f"--mode {mode!r}: use one of {', '.join(MODES)}.")
    paper = PAPER_RULES[mode]
    given = {"sft_share": sft_share, "margin": margin, "max_margin": max_margin}
    values = {key: getattr(paper, key) if value is None else value for key, value in given.items()}
    for key, check in (("sft_share", share_value), ("max_margin", bound_value)):
        try:
            values[key] = check(values[key])
        except ValueError as error:
            raise PreferError(f"{name(key)} {values[key]!r}: {error}.") from None
    if not 0 <= values["margin"] < math.inf:
        raise PreferError(f"{name('margin')} {values['margin']}: give a non-negative number.")
    if values["max_margin"] != NO_BOUND and values["margin"] > values["max_margin"]:
        raise PreferError(
            f"{name('margin')} {values['margin']} is above {name('max_margin')} {values['max_margin']}: no pair "
            "could be kept."
        )
    return values


def resolve_rules(manifest: dict[str, Any], mode: str, **given: Any) -> Rules:
    """The settings of a run, every default resolved and checked against the scored data."""
    values = data_settings(mode, given["sft_share"], given["margin"], given["max_margin"])
    check_gate(manifest, given["gate"], given["gate_pass"])
    scorer = choose_scorer(manifest, given["scorer"], given["gate"])
    if scorer == given["gate"]:
        raise PreferError(
            f"--gate {scorer!r} is also --scorer; rank with another score (e.g. a reward model's)."
        )
    return Rules(
        mode=mode,
        scorer=scorer,
        gate=given["gate"],
        gate_pass=given["gate_pass"],
        target_source=given["target_source"],
        drop_truncated=given["drop_truncated"],
        **values,
    )


def check_sources(manifest: dict[str, Any], rules: Rules, scored_dir: str | Path) -> list[str]:
    """The scored sources, in input order; the target's must be one of them, and not the only one."""
    sources = list(dict.fromkeys(s["source"] for s in manifest["samples"]))
    target = rules.target_source
    if rules.mode == "wrpo" and target is None:
        raise PreferError("--mode wrpo needs --target-source: the source name of the target's own samples.")
    if target is not None and target not in sources:
        raise PreferError(f"--target-source {target!r}: no such source among {', '.join(sources)}.")
    if sources == [target]:
        raise PreferError(
            f"{scored_dir}: holds only the target's samples ({target}); score the sources' too."
        )
    return sources


@dataclass
class Collected:
    """The scored responses that may be ranked, per prompt and source, and why others may not."""

    prompts: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    responses: dict[str, dict[str, list[Response]]] = field(default_factory=lambda: defaultdict(dict))
    verifiable: set[str] = field(default_factory=set)  # records the gate judged
    excluded: Counter[str] = field(default_factory=Counter)
    non_finite: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # scorer -> source -> ids


def exclusion(row: dict[str, Any], value: float | None, verdict: float | None, rules: Rules) -> str | None:
    """Why a response can be neither an SFT target nor in a pair, or None."""
    if value is None:
        return "not judged"
    if not math.isfinite(value) or (verdict is not None and not math.isfinite(verdict)):
        return "non-finite score"
    if not row["response"].strip():
        return "empty response"
    if rules.drop_truncated and row["finish_reason"] == "length":
        return "truncated"
    return None


def collect(rows: datasets.Dataset, rules: Rules) -> Collected:
    """Every response that may be ranked, with the gate's verdict; in a record the gate judged, a
    response it could not judge is left out too (it is neither correct nor incorrect)."""
    data = Collected()
    first_source: dict[str, str] = {}
    for row in rows:
        key, src = row["id"], row["source"]
        if key not in data.prompts:
            data.prompts[key], first_source[key] = row["prompt"], src
        elif row["prompt"] != data.prompts[key]:
            raise PreferError(
                f"record {key!r}: sources {first_source[key]!r} and {src!r} were given different prompts under the "
                "same id; sample every source from the same prompt data."
            )
        value = row["scores"][rules.scorer]
        verdict = row["scores"][rules.gate] if rules.gate else None
        for name, score in ((rules.scorer, value), (rules.gate, verdict)):
            if name is not None and score is not None and not math.isfinite(score):
                data.non_finite.setdefault(name, {}).setdefault(src, []).append(
                    f"{key}#{row['sample_index']}"
                )
        if verdict is not None:
            data.verifiable.add(key)
        reason = exclusion(row, value, verdict, rules)
        if reason is not None:
            data.excluded[reason] += 1
            continue
        correct = None if verdict is None else verdict >= rules.gate_pass
        response = Response(src, row["sample_index"], row["response"], value, correct)
        data.responses[key].setdefault(src, []).append(response)
    for key in data.verifiable:
        for src, responses in data.responses[key].items():
            judged = [r for r in responses if r.correct is not None]
            data.excluded["not judged by the gate"] += len(responses) - len(judged)
            data.responses[key][src] = judged
    return data


@dataclass(frozen=True)
class Candidate:
    """A pair from one source's (WRPO: the target's) responses; ``reason`` says why it is not kept."""

    chosen: Response | None = None
    rejected: Response | None = None
    reason: str | None = None
    margin: float | None = None  # where the margin window was applied


def pair_within(responses: list[Response], verifiable: bool, rules: Rules) -> Candidate:
    """Best against worst of ``responses``; with a verifiable reference, the best correct against the
    worst incorrect, kept whatever their margin (correctness says which is better: our reading of
    FuseChat-3.0, which states the margin window for reward-ranked pairs)."""
    if verifiable:
        right = [r for r in responses if r.correct]
        wrong = [r for r in responses if r.correct is False]
        if not right or not wrong:
            return Candidate(reason="no correct response" if not right else "no incorrect response")
        chosen, rejected = best(right), worst(wrong)
    elif len(responses) < 2:
        return Candidate(reason="one response")
    else:
        chosen = best(responses)
        rejected = worst([r for r in responses if r is not chosen])
    if chosen.text == rejected.text:
        return Candidate(chosen, rejected, "identical responses")
    if verifiable:
        return Candidate(chosen, rejected)
    margin = chosen.score - rejected.score
    return Candidate(chosen, rejected, rules.margin_reason(margin), margin)


def source_pick(responses: dict[str, list[Response]], verifiable: bool, rules: Rules) -> Response | str:
    """The prompt's best source response (SFT target, y_ws), or why there is none: with a
    verifiable reference it must be correct."""
    pool = [r for src, rs in responses.items() if src != rules.target_source for r in rs]
    if not pool:
        return "no source response"
    eligible = [r for r in pool if r.correct] if verifiable else pool
    return best(eligible) if eligible else "nothing correct"


@dataclass
class Tally:
    """What a run kept and dropped, for the report."""

    sft_dropped: Counter[str] = field(default_factory=Counter)
    pairs_dropped: Counter[str] = field(default_factory=Counter)
    by_source: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    prompts: Counter[str] = field(default_factory=Counter)  # per set; gate: with / without reference
    margins: list[float] = field(default_factory=list)


def pair_row(
    key: str, prompt: list, top: Response, candidates: dict[str, Candidate], rules: Rules, tally: Tally
) -> dict[str, Any] | None:
    """The kept pair of a preference prompt (fusechat3: of the source whose chosen scores highest;
    ties to the earlier source), or None, counting why by the reason of ``top``'s source."""
    tally.margins += [c.margin for c in candidates.values() if c.margin is not None]
    kept = {src: c for src, c in candidates.items() if c.reason is None}
    if not kept:
        reason = candidates[top.source].reason or ""
        tally.pairs_dropped[reason] += 1
        for src, candidate in candidates.items():
            tally.by_source[src][f"dropped: {candidate.reason}"] += 1
        return None
    owner, pair = max(kept.items(), key=lambda item: item[1].chosen.score)  # type: ignore[union-attr]
    chosen, rejected = pair.chosen, pair.rejected
    assert chosen is not None and rejected is not None
    row = {
        "id": key,
        "prompt": prompt,
        "chosen": assistant(chosen.text),
        "rejected": assistant(rejected.text),
        "source": owner,
        "chosen_score": chosen.score,
        "rejected_score": rejected.score,
        "margin": chosen.score - rejected.score,
    }
    if rules.mode == "wrpo":
        row |= {"chosen_source": assistant(top.text), "chosen_source_score": top.score}
    tally.by_source[owner]["pairs"] += 1
    return row


def candidates_of(
    responses: dict[str, list[Response]], top: Response, verifiable: bool, rules: Rules
) -> dict[str, Candidate]:
    """fusechat3: every source's candidate pair; wrpo: the target's, under ``top``'s source."""
    if rules.mode == "fusechat3":
        return {
            src: pair_within(rs, verifiable, rules)
            for src, rs in responses.items()
            if src != rules.target_source and rs
        }
    own = responses.get(rules.target_source or "", [])
    return {
        top.source: pair_within(own, verifiable, rules) if own else Candidate(reason="no target response")
    }


def build(data: Collected, rules: Rules) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Tally]:
    """The SFT rows of the SFT prompts and the pairs of the preference prompts."""
    tally = Tally()
    sft_rows, pair_rows = [], []
    for key, prompt in data.prompts.items():
        sides = sides_of(key, rules)
        if not sides:
            continue
        tally.prompts.update(f"{side} prompts" for side in sorted(sides))
        verifiable = key in data.verifiable
        if rules.gate is not None:
            tally.prompts["with a reference" if verifiable else "ranked alone (no reference)"] += 1
        responses = data.responses.get(key, {})
        top = source_pick(responses, verifiable, rules)
        if isinstance(top, str):
            for side in sides:
                (tally.sft_dropped if side == "sft" else tally.pairs_dropped)[top] += 1
            tally.prompts[top] += 1
            continue
        if "sft" in sides:
            sft_rows.append(
                {
                    "id": key,
                    "prompt": prompt,
                    "completion": assistant(top.text),
                    "source": top.source,
                    "score": top.score,
                }
            )
            tally.by_source[top.source]["sft"] += 1
        if "preference" in sides:
            row = pair_row(key, prompt, top, candidates_of(responses, top, verifiable, rules), rules, tally)
            pair_rows += [row] if row else []
    return sft_rows, pair_rows, tally


def make_report(
    rules: Rules, data: Collected, rows: int, sources: list[str], sft: int, pairs: int, tally: Tally
) -> dict[str, Any]:
    """report.json: the settings, then what was kept and left out, and why."""
    non_finite = {
        name: {src: {"responses": len(ids), "examples": ids[:EXAMPLES]} for src, ids in by_source.items()}
        for name, by_source in data.non_finite.items()
    }
    gate_keys = ("with a reference", "ranked alone (no reference)", "nothing correct")
    return {
        **asdict(rules),
        "prompts": len(data.prompts),
        "sft_prompts": tally.prompts["sft prompts"],
        "preference_prompts": tally.prompts["preference prompts"],
        "responses": rows,
        "responses_excluded": dict(data.excluded),
        "non_finite": non_finite,
        "sft_examples": sft,
        "sft_dropped": dict(tally.sft_dropped),
        "pairs": pairs,
        "pairs_dropped": dict(tally.pairs_dropped),
        "gate_prompts": {k: tally.prompts[k] for k in gate_keys} if rules.gate else None,
        "largest_margin": max(tally.margins, default=None),
        "by_source": {src: dict(tally.by_source[src]) for src in sources if src in tally.by_source},
    }


def prefer(
    scored_dir: str | Path,
    out_dir: str | Path,
    *,
    mode: str,
    margin: float | None = None,
    max_margin: float | str | None = None,
    sft_share: float | str | None = None,
    gate: str | None = None,
    gate_pass: float = 1.0,
    target_source: str | None = None,
    scorer: str | None = None,
    drop_truncated: bool = False,
) -> dict[str, Any]:
    """Write ``sft/`` and ``pairs/`` (datasets; none with no rows: mode ``sft`` has no ``pairs/``,
    ``sft_share`` 0 no ``sft/``), ``report.json`` and ``report.md`` into ``out_dir``; return the
    report. ``None`` for ``margin``, ``max_margin`` or ``sft_share`` is the mode's paper value
    (``PAPER_RULES``). No pair kept (mode ``sft``: no SFT example) is an error, and nothing is
    written then."""
    manifest, rows = load_scored(scored_dir)
    rules = resolve_rules(
        manifest,
        mode,
        margin=margin,
        max_margin=max_margin,
        sft_share=sft_share,
        gate=gate,
        gate_pass=gate_pass,
        target_source=target_source,
        scorer=scorer,
        drop_truncated=drop_truncated,
    )
    sources = check_sources(manifest, rules, scored_dir)
    out_dir = Path(out_dir)
    made = {
        "format": FORMAT,
        "scored": {
            "path": str(Path(scored_dir).resolve()),
            "fingerprint": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16],
        },
        "settings": asdict(rules),
    }
    check_output(out_dir, made)  # another run's or the user's folder: refused before any work
    data = collect(rows, rules)
    sft_rows, pair_rows, tally = build(data, rules)
    report = make_report(rules, data, len(rows), sources, len(sft_rows), len(pair_rows), tally)
    refuse_empty(report, tally, scored_dir)
    claim_output(out_dir, made)
    datasets.disable_progress_bars()  # two small data sets; the report says what was written
    try:
        for name, data_rows in ((SFT_DIR, sft_rows), (PAIRS_DIR, pair_rows)):
            if not data_rows:  # --sft-share 0, or mode sft (no pairs): datasets cannot load an empty one
                continue
            with atomic_directory(out_dir / name) as tmp:
                datasets.Dataset.from_list(data_rows).save_to_disk(str(tmp))
    finally:
        datasets.enable_progress_bars()
    write_json_atomic(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    return report


def refuse_empty(report: dict[str, Any], tally: Tally, scored_dir: str | Path) -> None:
    """No SFT example where SFT is asked for (the SFT share is not 0), or no pair in a pair mode:
    an error saying why, and what to change."""
    hints = drop_hints(report, tally)
    share = report["sft_share"]
    if not report["sft_examples"] and (
        report["mode"] == "sft" or (report["mode"] == "fusechat3" and share != 0)
    ):
        counts = f"{report['sft_prompts']} of {report['prompts']} prompts in the SFT set (--sft-share {shown(share)})"
        raise PreferError(
            f"{scored_dir}: no SFT example ({counts}; dropped: {report['sft_dropped']}; responses left out: "
            f"{report['responses_excluded']}). {hints}".rstrip()
            if report["sft_prompts"]
            else f"{scored_dir}: no SFT example: {counts}; raise --sft-share, or use --sft-share {ALL}."
        )
    if report["mode"] != "sft" and not report["pairs"]:
        counts = f"{report['preference_prompts']} of {report['prompts']} prompts in the preference set"
        raise PreferError(
            f"{scored_dir}: no preference pair kept ({counts}; dropped: {report['pairs_dropped']}). {hints}".rstrip()
            if report["preference_prompts"]
            else f"{scored_dir}: no preference pair: {counts} (--sft-share {shown(share)}); lower --sft-share, or use "
            f"--sft-share {ALL}."
        )


def drop_hints(report: dict[str, Any], tally: Tally) -> str:
    """What to change, for the reasons pairs (or SFT examples) were dropped; only advice that can help."""
    dropped = tally.pairs_dropped + tally.sft_dropped
    excluded = report["responses_excluded"]
    hints = []
    if "below margin" in dropped:
        largest = report["largest_margin"]
        hints.append(
            f"Lower --margin (the largest margin was {largest:.4g})."
            if largest
            else "Every pair's scores tie, so no pair can have a margin: rank with another scorer (--scorer, or "
            "score with a reward model), or sample more, more varied responses (--num-samples, --temperature)."
        )
    if "above max margin" in dropped:
        above = min(m for m in tally.margins if m > report["max_margin"] + TOLERANCE)
        hints.append(
            f"Raise --max-margin, or pass --max-margin {NO_BOUND} (the smallest margin above it was {above:.4g})."
        )
    if "no source response" in dropped:
        if excluded.get("not judged"):
            hints.append(
                "Some prompts' responses were all left unjudged: use a scorer that judges them (the built-in "
                "verifiers need a reference answer in the data)."
            )
        if excluded.get("truncated"):
            hints.append("Some prompts' responses were all cut at --max-new-tokens: drop --drop-truncated.")
        if excluded.get("non-finite score"):
            hints.append(
                f"Some scores are NaN or infinite (report.json: non_finite): check the scorer {report['scorer']}."
            )
        if report["target_source"] is not None and not excluded:
            hints.append("Score the sources' samples together with the target's.")
    return " ".join([*hints, *(HINTS[reason] for reason in HINTS if reason in dropped)])


def shown(value: float | str) -> str:
    """A setting as a person reads it: 1/3 as 0.3333, words as they are."""
    return value if isinstance(value, str) else f"{value:.4g}"


def markdown_report(report: dict[str, Any]) -> str:
    """What a person checks before training: the split, how many pairs each source gave, why others
    were dropped, and scores that could not rank anything."""
    reasons = sorted(
        {k for counts in report["by_source"].values() for k in counts if k.startswith("dropped")}
    )
    header = ["source", "SFT examples", "pairs", *reasons]
    window = f"margin {shown(report['margin'])} to {shown(report['max_margin'])}"
    gate = f", gate {report['gate']} (pass {shown(report['gate_pass'])})" if report["gate"] else ""
    lines = [
        f"Mode {report['mode']}, scorer {report['scorer']}{gate}, {window}"
        + (f", target {report['target_source']}" if report["target_source"] else "")
        + f": {report['sft_examples']} SFT examples and {report['pairs']} pairs from {report['prompts']} prompts "
        f"({report['responses']} responses).",
        f"Prompts split by id hash at --sft-share {shown(report['sft_share'])}: {report['sft_prompts']} SFT, "
        f"{report['preference_prompts']} preference.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for source, counts in report["by_source"].items():
        cells = [source, counts.get("sft", 0), counts.get("pairs", 0), *(counts.get(r, 0) for r in reasons)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        f"SFT prompts dropped: {report['sft_dropped'] or 'none'}.",
        f"Pairs dropped: {report['pairs_dropped'] or 'none'}.",
        f"Responses left out: {report['responses_excluded'] or 'none'}.",
    ]
    if report["gate_prompts"]:
        lines.append(f"Prompts by --gate {report['gate']}: {report['gate_prompts']}.")
    for name, by_source in report["non_finite"].items():
        for source, found in by_source.items():
            lines.append(
                f"Non-finite {name} scores of {source}: {found['responses']}, e.g. "
                f"{', '.join(found['examples'])} (record id#sample)."
            )
    if report["mode"] == "wrpo":
        lines.append(
            "WRPO pairs: a row's source is the source of its y_ws (chosen_source); chosen and rejected are "
            "the target's own."
        )
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
@options_from(PreferSettings)
def prefer_command(scored_dir: str, out_dir: str, mode: str, **settings: Any) -> None:
    """Build the SFT set and preference pairs (TRL conversational format) from scored responses.

    SFT examples and pairs come from different prompts (--sft-share), as in both papers."""
    report = prefer(scored_dir, out_dir, mode=mode, **settings)
    click.echo(markdown_report(report))
    written = [str(Path(out_dir) / name) for name in (SFT_DIR, PAIRS_DIR) if (Path(out_dir) / name).exists()]
    click.echo(f"written: {', '.join(written)}, report.json, report.md")
