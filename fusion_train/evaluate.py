"""Evaluation: cross-entropy of reference responses in bits per UTF-8 byte.

Per-token losses cannot be compared across tokenizers (the same text is a different number of
tokens); per byte they can, so every model (pivot, sources in their own tokenizers and
templates, targets, merges) is scored on the same held-out responses in one unit. Only the
response text counts: the end-of-turn token has no bytes and a base model without a chat
template has never seen one, so it is left out. Confidence intervals come from a bootstrap over
examples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm.auto import tqdm

from fusion_train import options
from fusion_train.calls import StageCall
from fusion_train.chat import Conversation, data_fingerprint, load_conversations, resolve_chat_template
from fusion_train.encoding import ChatTokenizer, encode_conversation
from fusion_train.errors import Command, UserError
from fusion_train.inference import (
    Batching,
    InferenceSettings,
    check_before_launch,
    inference_settings,
    load_scorer,
)
from fusion_train.launch import (
    Rank,
    all_ranks,
    barrier,
    launch_options,
    process_group,
)
from fusion_train.models import check_model_directory, load_tokenizer, model_fingerprint
from fusion_train.settings import options_from, setting, settings_from
from fusion_train.storage import atomic_write_text, read_json, refuse_unrelated, write_json_atomic

# What evaluate writes into --out (it keeps no manifest: a rerun rewrites the report, reusing the losses).
OUTPUTS = ("report.json", "report.md", "report.png", "losses")
BOOTSTRAP_SAMPLES = 1000
ROLES = ("pivot", "source", "target", "baseline", "merge", "implicit", "model")  # how the report groups rows


class EvaluateError(UserError, ValueError):
    """Models or options that cannot be compared as given."""


@dataclass(frozen=True)
class EvaluateSettings(Batching):
    """How each model reads the references (``max_length`` is part of its losses' cache key)."""

    max_length: int = setting(
        2048,
        type=options.MAX_LENGTH,
        help="Longest tokenized conversation, in each model's tokens; longer ones are cut.",
    )


@dataclass(frozen=True)
class ExampleLoss:
    id: str
    domain: str
    nll: float  # nats, summed over the response's tokens
    num_bytes: int


@dataclass(frozen=True)
class BitsPerByte:
    value: float
    low: float  # 95% bootstrap interval
    high: float
    examples: int


def response_losses(
    model_dir: str | Path,
    conversations: list[Conversation],
    *,
    chat_template: str | None = None,
    max_length: int = 2048,
    batch_tokens: int = 4096,
    gguf_file: str | None = None,
    inference: InferenceSettings | None = None,
    progress: bool = True,
    name: str | None = None,
) -> list[ExampleLoss]:
    """Summed negative log-likelihood and byte count of every example's assistant text.
    (``name``: the model's name on the progress bar; default: its directory's name.)

    In a launched job (inside :func:`process_group`) every rank scores every n-th batch of the
    same length-sorted batches a single process would form, so the figures do not depend on the
    number of ranks, and every rank returns all of them."""
    tokenizer = load_tokenizer(model_dir, gguf_file)
    template, _ = resolve_chat_template(tokenizer, chat_template)
    scorer = load_scorer(model_dir, inference or InferenceSettings(), gguf_file, top_k=1)
    chat = ChatTokenizer.of(tokenizer, template)
    encoded = [
        e
        for c in conversations
        if not isinstance(e := encode_conversation(chat, c, max_length, "truncate"), str)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rank = Rank.of_this_process()
    mine = scorer.batches(encoded, batch_tokens)[rank.rank :: rank.world_size]
    losses: dict[str, ExampleLoss] = {}
    bar = tqdm(
        mine,
        desc=f"evaluate {name or Path(model_dir).name}",
        unit="batch",
        disable=not (progress and rank.is_main),
    )
    for batch in bar:
        for scored in scorer.score(batch, 1, len(tokenizer), pad_id):
            example = scored.example
            text_tokens = np.array(example.byte_end) > np.array(example.byte_start)  # not end-of-turn
            nll = -float(scored.target_logprob[text_tokens].astype(np.float64).sum())
            losses[example.conv.id] = ExampleLoss(
                example.conv.id, example.conv.domain, nll, example.num_bytes
            )
    scorer.finish()
    for share in all_ranks(losses):
        losses.update(share)
    return [losses[e.conv.id] for e in encoded]


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], examples: int, seed: int) -> BitsPerByte:
    """``statistic`` of all examples, with a 95% interval from resampling examples.

    ``statistic`` maps index arrays of shape [draws, examples] to one value per draw."""
    value = statistic(np.arange(examples)[None, :])[0]
    draws = np.random.default_rng(seed).integers(0, examples, size=(BOOTSTRAP_SAMPLES, examples))
    low, high = np.percentile(statistic(draws), [2.5, 97.5])
    return BitsPerByte(float(value), float(low), float(high), examples)


def _bits_per_byte_of(losses: list[ExampleLoss]) -> Callable[[np.ndarray], np.ndarray]:
    nll = np.array([x.nll for x in losses])
    num_bytes = np.array([x.num_bytes for x in losses], dtype=np.float64)
    return lambda index: nll[index].sum(axis=1) / num_bytes[index].sum(axis=1) / math.log(2)


def bits_per_byte(losses: list[ExampleLoss], seed: int = 0) -> BitsPerByte:
    """Total nats over total bytes, in bits, with a 95% bootstrap interval over examples."""
    return _bootstrap(_bits_per_byte_of(losses), len(losses), seed)


def bits_per_byte_difference(
    losses: list[ExampleLoss], reference: list[ExampleLoss], seed: int = 0
) -> BitsPerByte:
    """bits/byte of ``losses`` minus those of ``reference`` on the same examples, resampled in pairs.

    Two models scored on the same text share most of their per-example variation (hard
    examples are hard for both), so the paired interval is far narrower than the two separate
    intervals suggest: it is what says whether one model is better than another."""
    if [x.id for x in losses] != [x.id for x in reference]:
        raise ValueError(
            "a paired difference needs both models' losses on the same examples, in the same order"
        )
    model, base = _bits_per_byte_of(losses), _bits_per_byte_of(reference)
    return _bootstrap(lambda index: model(index) - base(index), len(losses), seed)


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a display name, a role in the comparison, a local directory."""

    name: str
    path: str
    role: str = "model"  # pivot, source, target, baseline, merge ...
    chat_template: str | None = None


def losses_key(spec: ModelSpec, data_fingerprint: str, max_length: int, dtype: str) -> str:
    """Names a model's cached losses by everything they depend on: the model's files (not its path,
    so a model replaced at the same path is scored again), the text of a chat template given
    for it, the data, the length limit and the dtype the weights run in."""
    template = None
    if spec.chat_template:  # a built-in name or a .jinja file, whose text may change
        text, _ = resolve_chat_template(None, spec.chat_template)
        template = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = [model_fingerprint(spec.path), template, data_fingerprint, max_length, dtype]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def evaluate(
    models: list[ModelSpec],
    data_path: str | Path,
    out_dir: str | Path,
    *,
    max_length: int = 2048,
    batch_tokens: int = 4096,
    compare_to: str | None = None,
    cache_dir: str | Path | None = None,
    inference: InferenceSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every model on the same responses; write report.json, report.md and report.png.

    Per-model losses are cached in ``cache_dir`` (default ``out_dir/losses/``; see
    :func:`losses_key`), so adding a model to a finished evaluation scores only the new one.
    Figures are computed over the examples every model could score, so all rows describe the
    same text. With ``compare_to`` (a model's name), every row also gets its paired difference
    to that model. In a launched job the ranks share each model's batches and rank 0 writes.
    """
    out_dir = Path(out_dir)
    refuse_unrelated(out_dir, OUTPUTS)
    inference = inference or InferenceSettings()
    inference.check()
    for spec in models:  # every one before the first is scored
        check_model_directory(spec.path)
    if len({m.name for m in models}) < len(models):
        raise EvaluateError("two models have the same name; names label the report's rows")
    if compare_to is not None and compare_to not in {m.name for m in models}:
        raise EvaluateError(
            f"compare_to={compare_to!r} is not one of the models: {', '.join(m.name for m in models)}"
        )
    conversations = load_conversations(data_path)
    fingerprint = data_fingerprint(conversations)
    dtype = str(inference.resolved_dtype()).removeprefix("torch.")
    per_model: dict[str, list[ExampleLoss]] = {}
    with process_group(deepspeed=inference.deepspeed is not None) as rank:
        for spec in models:
            cached = (
                Path(cache_dir or out_dir / "losses")
                / f"{losses_key(spec, fingerprint, max_length, dtype)}.json"
            )
            if cached.exists():
                per_model[spec.name] = [ExampleLoss(**x) for x in read_json(cached)]
                continue
            losses = response_losses(
                spec.path,
                conversations,
                chat_template=spec.chat_template,
                max_length=max_length,
                batch_tokens=batch_tokens,
                inference=inference,
                progress=progress,
                name=spec.name,
            )
            if rank.is_main:
                write_json_atomic(cached, [asdict(x) for x in losses])
            barrier()  # no rank looks for the next cached file before it is written
            per_model[spec.name] = losses

    report = comparison(models, per_model, conversations, data_path, compare_to)
    if rank.is_main:
        write_json_atomic(out_dir / "report.json", report)
        atomic_write_text(out_dir / "report.md", markdown_report(report))
        plot_report(report, out_dir / "report.png")
    return report


def comparison(
    models: list[ModelSpec],
    per_model: dict[str, list[ExampleLoss]],
    conversations: list[Conversation],
    data_path: str | Path,
    compare_to: str | None,
) -> dict[str, Any]:
    """The report: every model's bits per byte (overall, by domain, and paired against
    ``compare_to``) over the examples every model could score."""
    common = set.intersection(*({x.id for x in losses} for losses in per_model.values()))
    if not common:
        raise EvaluateError(f"{data_path}: no example could be scored by every model")
    order = [c.id for c in conversations if c.id in common]
    common_losses = {}
    for name, losses in per_model.items():
        by_id = {x.id: x for x in losses}
        common_losses[name] = [by_id[i] for i in order]
    domains = sorted({x.domain for losses in common_losses.values() for x in losses if x.domain})
    rows = []
    for spec in models:
        losses = common_losses[spec.name]
        by_domain = {d: asdict(bits_per_byte([x for x in losses if x.domain == d])) for d in domains}
        row = {**asdict(spec), "bits_per_byte": asdict(bits_per_byte(losses)), "by_domain": by_domain}
        if compare_to is not None:
            row["difference"] = asdict(bits_per_byte_difference(losses, common_losses[compare_to]))
        rows.append(row)
    report = {
        "data": str(Path(data_path).resolve()),
        "examples": len(common),
        "domains": domains,
        "compare_to": compare_to,
        "models": rows,
    }
    return report


def markdown_report(report: dict[str, Any]) -> str:
    """The comparison table a person reads: lower bits per byte is better."""
    domains = report["domains"]
    reference = report.get("compare_to")
    header = [
        "model",
        "role",
        "bits/byte (95% CI)",
        *([f"minus {reference} (paired 95% CI)"] if reference else []),
        *domains,
    ]
    lines = [
        f"Cross-entropy of the reference responses in bits per UTF-8 byte on {report['examples']} held-out "
        "examples (lower is better; comparable across tokenizers).",
        *(
            [f"A difference below zero whose interval excludes zero means better than {reference}."]
            if reference
            else []
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in sorted(report["models"], key=lambda r: r["bits_per_byte"]["value"]):
        bpb = row["bits_per_byte"]
        cells = [row["name"], row["role"], f"{bpb['value']:.4f} ({bpb['low']:.4f}-{bpb['high']:.4f})"]
        if reference:
            diff = row["difference"]
            cells.append(f"{diff['value']:+.4f} ({diff['low']:+.4f} to {diff['high']:+.4f})")
        cells += [f"{row['by_domain'][d]['value']:.4f}" for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Horizontal bars with 95% intervals, best model on top; with a reference model, a second
    panel of paired differences to it, the figure that says which model is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["models"], key=lambda r: -r["bits_per_byte"]["value"])
    values = [r["bits_per_byte"]["value"] for r in rows]
    errors = [
        [v - r["bits_per_byte"]["low"] for v, r in zip(values, rows, strict=True)],
        [r["bits_per_byte"]["high"] - v for v, r in zip(values, rows, strict=True)],
    ]
    roles = sorted({r["role"] for r in rows})
    colours = {role: plt.get_cmap("tab10")(i) for i, role in enumerate(roles)}
    reference = report.get("compare_to")
    panels = 2 if reference else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(7 * panels, 0.45 * len(rows) + 1.5), sharey=True, squeeze=False
    )
    ax = axes[0][0]
    ax.barh(
        [r["name"] for r in rows], values, xerr=errors, color=[colours[r["role"]] for r in rows], capsize=3
    )
    ax.set_xlabel("bits per byte of reference responses (lower is better)")
    ax.set_xlim(min(values) * 0.95 - 0.01, max(v + e for v, e in zip(values, errors[1], strict=True)) * 1.02)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[role]) for role in roles]
    ax.legend(handles, roles, loc="lower right", fontsize="small")
    ax.set_title(f"Held-out cross-entropy, {report['examples']} examples")
    if reference:
        _plot_differences(axes[0][1], rows, reference, [colours[r["role"]] for r in rows])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _plot_differences(ax: Any, rows: list[dict[str, Any]], reference: str, colours: list[Any]) -> None:
    """Paired differences to ``reference`` with their intervals, one row per model.

    Models fine-tuned from one start differ by far less than models of different sizes, so the
    axis is scaled to the median model's interval and larger differences are written at the edge
    rather than drawn: otherwise a source model's gap would flatten every target's to a dot.
    """
    extents = sorted(
        max(abs(r["difference"]["low"]), abs(r["difference"]["high"])) for r in rows if r["name"] != reference
    )
    limit = 1.3 * extents[(len(extents) - 1) // 2] if extents else 0.0
    limit = limit if limit > 0 else 1.0
    for y, (row, colour) in enumerate(zip(rows, colours, strict=True)):
        diff = row["difference"]
        if row["name"] == reference:
            ax.text(0, y, " reference", va="center", fontsize="small", color="grey")
        elif abs(diff["value"]) > limit:
            side = 1 if diff["value"] > 0 else -1
            label = f"{diff['value']:+.3f} →" if side > 0 else f"← {diff['value']:+.3f}"
            ax.text(
                side * limit,
                y,
                label,
                va="center",
                ha="right" if side > 0 else "left",
                fontsize="small",
                color=colour,
            )
        else:
            ax.errorbar(
                diff["value"],
                y,
                xerr=[[diff["value"] - diff["low"]], [diff["high"] - diff["value"]]],
                fmt="o",
                color=colour,
                capsize=3,
            )
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_xlim(-limit, limit)
    ax.set_xlabel(f"bits/byte minus {reference}, paired 95% CI (left of 0: better)")
    ax.set_title(f"Difference to {reference}")


def parse_model_option(item: str) -> ModelSpec:
    """``NAME=DIR[:ROLE]``. DIR may hold ':' (and '='): the text after the last ':' is the role only
    when it is one of ROLES and DIR is not itself a directory."""
    name, rest = parse_pair(item, "--model", "NAME=DIR[:ROLE]")
    path, sep, role = rest.rpartition(":")
    if Path(rest).is_dir() or not sep or role not in ROLES:
        path, role = rest, "model"
    if not Path(path).is_dir():
        head, sep, tail = rest.rpartition(":")
        hint = f" (unknown role {tail!r}; roles: {', '.join(ROLES)})" if sep and Path(head).is_dir() else ""
        raise click.BadParameter(f"{item!r}: no model directory {path}{hint}", param_hint="--model")
    return ModelSpec(name, path, role)


@click.command("evaluate", cls=Command)
@options.chat_data
@click.option(
    "--model",
    "models",
    required=True,
    multiple=True,
    metavar="NAME=DIR[:ROLE]",
    help=f"A model to score, repeatable: a name for the report, its directory, optionally a role "
    f"({', '.join(ROLES)}).",
)
@click.option(
    "--compare-to",
    default=None,
    metavar="NAME",
    help="Also give every model's paired difference to this one (e.g. the CLM-only baseline).",
)
@click.option(
    "--chat-template",
    "chat_templates",
    multiple=True,
    metavar="NAME=TEMPLATE",
    help="The chat template of the model named NAME (built-in name or .jinja file), repeatable. "
    "Default: each tokenizer's own, else the plain fallback.",
)
@options.output_directory("Report directory; models scored before are reused.")
@options_from(EvaluateSettings)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where scored models' losses are kept, keyed by content (default: OUT/losses).",
)
@options_from(InferenceSettings)
@launch_options
def evaluate_command(**params: Any) -> None:
    """Compare models by the bits per byte they need for the reference responses.

    With --nproc N the batches of every model are split between N processes (one per GPU, or
    CPU processes; with --hostfile, on every node); the figures do not change."""
    templates = dict(
        parse_pair(item, "--chat-template", "NAME=TEMPLATE") for item in params["chat_templates"]
    )
    specs = [parse_model_option(item) for item in params["models"]]
    unknown = sorted(set(templates) - {spec.name for spec in specs})
    if unknown:
        raise click.BadParameter(f"no --model is named {unknown[0]!r}", param_hint="--chat-template")
    specs = [replace(spec, chat_template=templates.get(spec.name)) for spec in specs]

    def check() -> None:
        refuse_unrelated(Path(params["out_dir"]), OUTPUTS)
        load_conversations(params["data_path"])
        for spec in specs:
            check_model_directory(spec.path)
        check_before_launch(inference_settings(params))

    arguments = {
        "models": specs,
        "data_path": params["data_path"],
        "out_dir": params["out_dir"],
        **asdict(settings_from(EvaluateSettings, params)),
        "compare_to": params["compare_to"],
        "cache_dir": params["cache_dir"],
        "inference": inference_settings(params),
    }
    StageCall(evaluate, arguments, Path(params["out_dir"]), report_evaluated).from_command(params, check)


def report_evaluated(out: Path, report: dict[str, Any]) -> None:
    """What `evaluate` prints at the end: the report's table and where it is."""
    click.echo(markdown_report(report))
    click.echo(f"written: {out / 'report.md'}, report.json, report.png")


def parse_pair(item: str, option: str, metavar: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise click.BadParameter(f"expected {metavar}, got {item!r}", param_hint=option)
    return name, value


if __name__ == "__main__":
    evaluate_command(prog_name="fusion-train evaluate")
