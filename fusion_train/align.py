"""Stage 2: move a source model's recorded distributions onto the pivot's tokens and vocabulary.

Token alignment uses the character spans both representations recorded: a pivot token and a
source token covering exactly the same characters of the same assistant message predict the
same text, so the source's distribution can stand for the pivot's token. That is exact and
linear in length. Tokens whose spans differ (one token covering several of the other's, or
byte pieces of one character) get no source distribution: the pivot's own stands in for them
later, and they are counted. ``--token-align dtw`` is the reference method (dynamic time warping
over token strings), kept for comparison and for data recorded without spans.

Vocabulary mapping (which pivot id a source id means) compares tokens as raw bytes; see
``fusion_train.vocab``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import datasets
import numpy as np
from tqdm.auto import tqdm

from fusion_train import options, vocab
from fusion_train.chat import resolve_chat_template
from fusion_train.dtw import dtw_align
from fusion_train.models import load_tokenizer
from fusion_train.represent import RepresentationError, example_arrays, load_representation, topk_columns
from fusion_train.storage import MANIFEST, atomic_directory, claim_output, read_json, write_json_atomic

FORMAT = "fusion-train/aligned@1"
TOKEN_ALIGN = ("spans", "dtw")
REPORT = "report.json"


class AlignmentError(ValueError):
    """Representations that cannot be aligned with each other."""


def aligned_features(top_k: int) -> datasets.Features:
    seq, value = datasets.Sequence, datasets.Value
    return datasets.Features(
        {
            "id": value("string"),
            "aligned_index": seq(value("int32")),
            **topk_columns(top_k),
            "mapped_mass": seq(value("float16")),
            "target_logprob": seq(value("float16")),
            "source_nll": value("float64"),
            "source_num_target_tokens": value("int32"),
            "source_num_target_bytes": value("int32"),
        }
    )


# --------------------------------------------------------------------------- token alignment


def supervised_positions(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Positions of the supervised tokens, in order, from the stored runs."""
    starts, lengths = arrays["run_start"], arrays["run_length"]
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(lengths.sum())


def span_keys(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One int64 per supervised token: (message, start, end) packed so that equal spans are equal keys."""
    messages = np.repeat(arrays["run_message"], arrays["run_length"]).astype(np.int64)
    return (
        (messages << 44) | (arrays["char_start"].astype(np.int64) << 22) | arrays["char_end"].astype(np.int64)
    )


def align_by_spans(pivot_keys: np.ndarray, source_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(pivot_i, source_j)`` of tokens with identical, unambiguous spans.

    A span shared by several tokens on one side (byte pieces of one character) is ambiguous: it
    is left unaligned rather than guessed. Keys come in position order, which is span order, so
    one pass finds duplicates and a binary search finds matches.
    """
    if len(pivot_keys) == 0 or len(source_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    source_order = None
    if np.any(source_keys[1:] < source_keys[:-1]):  # not from a representation: sort first
        source_order = np.argsort(source_keys, kind="stable")
        source_keys = source_keys[source_order]
    found = np.minimum(np.searchsorted(source_keys, pivot_keys), len(source_keys) - 1)
    match = (source_keys[found] == pivot_keys) & _unambiguous(pivot_keys) & _unambiguous(source_keys)[found]
    pivot_index, source_index = np.flatnonzero(match), found[match]
    return pivot_index, (source_index if source_order is None else source_order[source_index])


def _unambiguous(keys: np.ndarray) -> np.ndarray:
    """True where a key occurs once (duplicates of a key are neighbours, or anywhere if unsorted)."""
    if np.any(keys[1:] < keys[:-1]):
        values, counts = np.unique(keys, return_counts=True)
        return np.isin(keys, values[counts == 1])
    repeated = keys[1:] == keys[:-1]
    once = np.ones(len(keys), dtype=bool)
    once[1:] &= ~repeated
    once[:-1] &= ~repeated
    return once


def align_by_dtw(
    pivot_arrays: dict[str, np.ndarray],
    source_arrays: dict[str, np.ndarray],
    pivot_text: list[str],
    source_text: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The reference alignment: DTW over the token strings of each assistant message.

    A pivot token paired with one source token takes it; one paired with several takes the
    first (as the reference implementation does).
    """
    pivot_ids = pivot_arrays["input_ids"][supervised_positions(pivot_arrays)]
    source_ids = source_arrays["input_ids"][supervised_positions(source_arrays)]
    pivot_messages = np.repeat(pivot_arrays["run_message"], pivot_arrays["run_length"])
    source_messages = np.repeat(source_arrays["run_message"], source_arrays["run_length"])
    pairs: dict[int, int] = {}
    for message in np.unique(pivot_messages):
        p_rows = np.flatnonzero(pivot_messages == message)
        s_rows = np.flatnonzero(source_messages == message)
        if len(s_rows) == 0:
            continue
        path = dtw_align(
            [source_text[i] for i in source_ids[s_rows]], [pivot_text[i] for i in pivot_ids[p_rows]]
        )
        for s, p in path:
            pairs.setdefault(int(p_rows[p]), int(s_rows[s]))
    pivot_index = np.array(sorted(pairs), dtype=np.int64)
    return pivot_index, np.array([pairs[i] for i in pivot_index], dtype=np.int64)


def token_strings(token_bytes: vocab.TokenBytes) -> list[str]:
    """Printable text of every token, special tokens by their own names (for DTW costs)."""
    return [
        piece.decode("utf-8", errors="replace")
        if piece is not None
        else token_bytes.specials.get(i, vocab.SpecialToken("", ())).content
        for i, piece in enumerate(token_bytes.pieces)
    ]


# --------------------------------------------------------------------------- the stage


def check_pair(pivot: dict[str, Any], source: dict[str, Any], pivot_dir: Path, source_dir: Path) -> None:
    """Refuse representations that cannot describe the same examples the same way."""
    if (
        pivot["model"]["path"] == source["model"]["path"]
        and pivot["model"]["gguf_file"] == source["model"]["gguf_file"]
    ):
        raise AlignmentError(
            f"{source_dir} is a representation of the pivot model itself; pass a source model's."
        )
    if pivot["data"]["fingerprint"] != source["data"]["fingerprint"]:
        raise AlignmentError(
            f"{pivot_dir} and {source_dir} represent different data sets "
            f"({pivot['data']['path']} vs {source['data']['path']}); represent both on the same data."
        )
    if pivot["settings"]["max_length"] != source["settings"]["max_length"]:
        raise AlignmentError(
            f"{pivot_dir} and {source_dir} used different --max-length "
            f"({pivot['settings']['max_length']} vs {source['settings']['max_length']}); use the same for both."
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST).exists():
        raise AlignmentError(f"{path}: no manifest.json; is it the output of `fusion-train represent`?")
    return read_json(path / MANIFEST)


def _tokenizer_and_template(manifest: dict[str, Any]) -> tuple[Any, str]:
    """The tokenizer and chat template a representation was made with (the template tells which
    special token ends an assistant turn)."""
    model = manifest["model"]
    try:
        tokenizer = load_tokenizer(model["path"], model["gguf_file"])
    except (OSError, ValueError) as exc:
        raise AlignmentError(
            f"cannot load the tokenizer of {model['path']} recorded in a representation's manifest ({exc}); "
            "the model directory must still exist where it was when `represent` ran."
        ) from exc
    template, _ = resolve_chat_template(tokenizer, manifest["settings"]["chat_template"])
    return tokenizer, template


def _pairs(
    pivot: datasets.Dataset, source: datasets.Dataset, source_rows: dict[str, int]
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    for row in range(len(pivot)):
        p = example_arrays(pivot, row)
        if p["id"] in source_rows:
            yield p, example_arrays(source, source_rows[p["id"]])


def align(
    pivot_dir: str | Path,
    source_dir: str | Path,
    out_dir: str | Path,
    token_align: str = "spans",
    vocab_map: str = "exact",
    progress: bool = True,
) -> dict[str, Any]:
    """Write the source's distributions on the pivot's supervised tokens; return the report."""
    if token_align not in TOKEN_ALIGN:
        raise AlignmentError(f"unknown --token-align {token_align!r}; choose spans or dtw")
    if vocab_map not in vocab.METHODS:
        raise AlignmentError(f"unknown --vocab-map {vocab_map!r}; choose one of {', '.join(vocab.METHODS)}")
    pivot_dir, source_dir, out_dir = Path(pivot_dir), Path(source_dir), Path(out_dir)
    pivot_manifest, source_manifest = _read_manifest(pivot_dir), _read_manifest(source_dir)
    check_pair(pivot_manifest, source_manifest, pivot_dir, source_dir)
    top_k = source_manifest["settings"]["top_k"]
    manifest = {
        "format": FORMAT,
        "pivot": pivot_manifest,
        "source": source_manifest,
        "settings": {"token_align": token_align, "vocab_map": vocab_map},
        "top_k": top_k,
    }
    claim_output(out_dir, manifest)
    if (out_dir / "data").exists():
        return read_json(out_dir / REPORT)

    started = time.perf_counter()
    pivot_data, source_data = load_representation(pivot_dir), load_representation(source_dir)
    pivot_tok, pivot_template = _tokenizer_and_template(pivot_manifest)
    source_tok, source_template = _tokenizer_and_template(source_manifest)
    source_rows = {id_: i for i, id_ in enumerate(source_data["id"])}
    pivot_ids = set(pivot_data["id"])

    if token_align == "dtw":
        pivot_text = token_strings(vocab.token_bytes(pivot_tok, pivot_template))
        source_text = token_strings(vocab.token_bytes(source_tok, source_template))

    def token_pairs(p: dict[str, np.ndarray], s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if token_align == "spans":
            return align_by_spans(span_keys(p), span_keys(s))
        return align_by_dtw(p, s, pivot_text, source_text)

    cooccurrence = None
    if vocab_map == "stats":  # FuseChat-2.0: count which pivot token each source token aligns with
        source_gold, pivot_gold = [], []
        for p, s in _pairs(pivot_data, source_data, source_rows):
            pivot_index, source_index = token_pairs(p, s)
            source_gold.append(s["input_ids"][supervised_positions(s)][source_index])
            pivot_gold.append(p["input_ids"][supervised_positions(p)][pivot_index])
        source_all, pivot_all = np.concatenate(source_gold), np.concatenate(pivot_gold)
        cooccurrence = (source_all, pivot_all, np.ones(len(source_all), dtype=np.int64))
    mapping = vocab.build_vocab_map(
        source_tok,
        pivot_tok,
        vocab_map,
        cooccurrence,
        source_template=source_template,
        pivot_template=pivot_template,
    )

    features = aligned_features(top_k)
    columns: dict[str, list[Any]] = {name: [] for name in features}
    pivot_tokens = aligned_tokens = zero_mass = 0
    mass_sum = 0.0
    iterator = _pairs(pivot_data, source_data, source_rows)
    for p, s in tqdm(iterator, total=len(pivot_ids & source_rows.keys()), desc="align", disable=not progress):
        pivot_index, source_index = token_pairs(p, s)
        source_probs = np.exp(s["topk_logprobs"][source_index].astype(np.float32))
        mapped = mapping.apply(s["topk_ids"][source_index], source_probs)
        # The share of each row's top-k probability that lands on pivot ids.
        ids, probs = mapped.ids, mapped.probs
        mass = mapped.mass / np.maximum(source_probs.sum(axis=1), np.finfo(np.float32).tiny)
        keep = mass > 0  # nothing of the source's top-k maps to pivot ids: no distribution to offer
        zero_mass += int((~keep).sum())
        pivot_tokens += len(p["target_logprob"])
        aligned_tokens += int(keep.sum())
        mass_sum += float(mass[keep].sum())
        with np.errstate(divide="ignore"):
            logprobs = np.where(ids >= 0, np.log(probs), -np.inf)
        columns["id"].append(p["id"])
        columns["aligned_index"].append(pivot_index[keep].astype(np.int32))
        columns["topk_ids"].append(ids[keep].astype(np.int32))
        columns["topk_logprobs"].append(logprobs[keep].astype(np.float16))
        columns["mapped_mass"].append(mass[keep].astype(np.float16))
        columns["target_logprob"].append(s["target_logprob"][source_index[keep]])
        columns["source_nll"].append(float(s["nll"]))
        columns["source_num_target_tokens"].append(int(s["num_target_tokens"]))
        columns["source_num_target_bytes"].append(int(s["num_target_bytes"]))

    if not columns["id"]:
        raise AlignmentError(f"{pivot_dir} and {source_dir} share no example ids; nothing to align.")
    missing_in_source = sorted(pivot_ids - source_rows.keys())
    missing_in_pivot = sorted(source_rows.keys() - pivot_ids)
    report = {
        "pivot": pivot_manifest["model"]["path"],
        "source": source_manifest["model"]["path"],
        "token_align": token_align,
        "vocab_map": vocab_map,
        "examples_aligned": len(columns["id"]),
        "examples_aligned_share": len(columns["id"]) / len(pivot_ids),
        "missing_in_source": {"count": len(missing_in_source), "first_ids": missing_in_source[:10]},
        "missing_in_pivot": {"count": len(missing_in_pivot), "first_ids": missing_in_pivot[:10]},
        "pivot_supervised_tokens": pivot_tokens,
        "tokens_aligned": aligned_tokens,
        "tokens_aligned_share": aligned_tokens / max(1, pivot_tokens),
        "tokens_without_mapped_mass": zero_mass,
        "mapped_topk_mass_share": mass_sum / max(1, aligned_tokens),
        "vocab_map_counts": mapping.counts,
        "seconds": time.perf_counter() - started,
    }
    with atomic_directory(out_dir / "data") as tmp:
        datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp))
    write_json_atomic(out_dir / REPORT, report)
    return report


def format_report(report: dict[str, Any]) -> str:
    return (
        f"examples aligned {report['examples_aligned']} ({report['examples_aligned_share']:.1%}; "
        f"missing in source {report['missing_in_source']['count']}, in pivot {report['missing_in_pivot']['count']}), "
        f"pivot tokens aligned one-to-one {report['tokens_aligned_share']:.1%}, "
        f"mapped top-k mass {report['mapped_topk_mass_share']:.1%}, {report['seconds']:.1f} s"
    )


@click.command("align")
@options.pivot_representation
@click.option(
    "--source",
    "source_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A source model's representation of the same data.",
)
@options.output_directory()
@click.option(
    "--token-align",
    type=click.Choice(TOKEN_ALIGN),
    default="spans",
    help="spans: exact, by recorded character spans; dtw: the reference dynamic time warping.",
)
@click.option(
    "--vocab-map",
    type=click.Choice(vocab.METHODS),
    default="exact",
    help="Source ids without an exact byte match: exact = drop them, mined = nearest pivot token by "
    "edit distance, stats = the pivot token they align with most often in this corpus.",
)
def align_command(pivot_dir: str, source_dir: str, out_dir: str, token_align: str, vocab_map: str) -> None:  # fmt: skip
    """Map a source's recorded distributions onto the pivot's tokens and vocabulary."""
    try:
        report = align(pivot_dir, source_dir, out_dir, token_align, vocab_map)
    except (AlignmentError, RepresentationError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out_dir}: {format_report(report)}")
