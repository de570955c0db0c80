"""Stage 2: move a source model's recorded distributions onto the pivot's tokens and vocabulary.

Token alignment uses the byte spans both representations recorded. A pivot token receives a
source token's distribution only when the two cover exactly the same bytes of the rendered text
(counted from the first byte of the same assistant message, template text before or after the
answer included) and stand for the same bytes, or are both the end-of-turn token (matched by
role). Both distributions then predict the same text after the same text: exact, and linear in
length. Everything else gets no source distribution: a token covering several of the other's,
byte pieces of one character, and the first token of an answer when one template puts a space
before it (``Hello`` against ``▁Hello``); the pivot's own distribution stands in for them in
``fuse``, and the report counts them. ``--token-align dtw`` is the reference method (dynamic time
warping over token strings), kept for comparison.

``--token-align bytes`` gives those other tokens the source's view too: a source distribution is
a distribution over the next bytes of the text, so a pivot token starting where a source token
starts takes that distribution moved onto the pivot tokens each source token's bytes begin with,
and a pivot token starting inside a source token takes that token's distribution conditioned on
the bytes already emitted (``fusion_train.continuations``; the method with a worked example is in
docs/formats.md).

Vocabulary mapping (which pivot id a source id means) compares tokens as raw bytes; see
``fusion_train.vocab``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import datasets
import numpy as np
from tqdm.auto import tqdm

from fusion_train import continuations, options, vocab
from fusion_train.chat import resolve_chat_template
from fusion_train.dtw import dtw_align
from fusion_train.errors import Command, UserError
from fusion_train.models import load_tokenizer
from fusion_train.representation import example_arrays, load_representation, read_manifest, topk_columns
from fusion_train.settings import options_from, setting
from fusion_train.storage import atomic_directory, claim_output, read_json, write_json_atomic

FORMAT = "fusion-train/aligned@2"  # @2: pairs cover the same bytes of the rendered text
TOKEN_ALIGN = ("spans", "dtw", "bytes")
REPORT = "report.json"


@dataclass(frozen=True)
class AlignSettings:
    """``align``'s settings: its flags and a recipe's ``align`` section (and a source's own)."""

    token_align: str = setting(
        "spans",
        type=click.Choice(TOKEN_ALIGN),
        help="spans: tokens covering the same bytes pair up; bytes: also every other pivot token, from the "
        "source distribution at (or conditioned inside) the source token covering its first byte; dtw: the "
        "reference dynamic time warping.",
    )
    vocab_map: str = setting(
        "exact",
        type=click.Choice(vocab.VOCAB_MAPS),
        help="Source ids without an exact byte match: exact = drop them, mined = nearest pivot token by "
        "edit distance, stats = the pivot token they align with most often in this corpus.",
    )


class AlignmentError(UserError, ValueError):
    """Representations that cannot be aligned with each other."""


def aligned_features(top_k: int) -> datasets.Features:
    seq, value = datasets.Sequence, datasets.Value
    return datasets.Features(
        {
            "id": value("string"),
            "aligned_index": seq(value("int32")),
            **topk_columns(top_k),
            "mapped_mass": seq(value("float16")),
            "source_mass": seq(value("float16")),
            "target_logprob": seq(value("float16")),
            "source_nll": value("float64"),
            "source_num_target_tokens": value("int32"),
            "source_num_target_bytes": value("int32"),
        }
    )


# --------------------------------------------------------------------------- token alignment

SPAN_BITS = 24  # byte offsets within +-8 MiB of a message's start; 15 bits of message index
SPAN_BIAS = 1 << (SPAN_BITS - 1)
MAX_MESSAGES = 1 << (63 - 2 * SPAN_BITS)


def supervised_positions(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Positions of the supervised tokens, in order, from the stored runs."""
    starts, lengths = arrays["run_start"], arrays["run_length"]
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(lengths.sum())


def gold_ids(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The supervised tokens' ids, in order."""
    return arrays["input_ids"][supervised_positions(arrays)]


def span_keys(arrays: dict[str, np.ndarray], clip: bool = False) -> np.ndarray:
    """One int64 per supervised token: (message, byte start, byte end) packed, so that equal
    spans are equal keys and key order is span order.

    ``clip=True`` gives the spans cut to the answer's own bytes (start at 0, end at the
    end-of-turn token's offset): the former rule, which paired tokens covering different bytes
    of the rendered text; kept only to count in the report the pairs it would have made.
    """
    messages = np.repeat(arrays["run_message"], arrays["run_length"]).astype(np.int64)
    start, end = arrays["byte_start"].astype(np.int64), arrays["byte_end"].astype(np.int64)
    if clip:
        limit = np.full(len(end), np.iinfo(np.int32).max, dtype=np.int64)
        end_of_turn = start == end
        for message, offset in zip(messages[end_of_turn], start[end_of_turn], strict=True):
            limit[messages == message] = offset
        start, end = np.clip(start, 0, limit), np.clip(end, 0, limit)
    start, end = start + SPAN_BIAS, end + SPAN_BIAS
    if len(messages) and (
        messages.max() >= MAX_MESSAGES or min(start.min(), end.min()) < 0 or end.max() >= 1 << SPAN_BITS
    ):
        raise AlignmentError(
            f"an example with a message longer than {SPAN_BIAS:,} bytes or more than {MAX_MESSAGES:,} "
            "messages cannot be aligned by spans; use --token-align dtw."
        )
    return (messages << (2 * SPAN_BITS)) | (start << SPAN_BITS) | end


def token_codes(pivot: vocab.TokenBytes, source: vocab.TokenBytes) -> tuple[np.ndarray, np.ndarray]:
    """Per token id of each tokenizer, a number equal across the two exactly when the tokens stand
    for the same bytes (text tokens) or play the same role (end of turn, eos, bos).

    Other special tokens and ids without a token get -1 (pivot) and -2 (source): never equal.
    """
    codes: dict[bytes | str, int] = {}

    def table(token_bytes: vocab.TokenBytes, unmatched: int) -> np.ndarray:
        out = np.full(len(token_bytes), unmatched, dtype=np.int64)
        for index, piece in enumerate(token_bytes.pieces):
            special = token_bytes.specials.get(index)
            role = next((r for r in special.roles if r in vocab.MATCHED_ROLES), None) if special else None
            key = piece if piece is not None else role
            if key is not None:
                out[index] = codes.setdefault(key, len(codes))
        return out

    return table(pivot, -1), table(source, -2)


def align_by_spans(
    pivot_keys: np.ndarray,
    source_keys: np.ndarray,
    pivot_codes: np.ndarray | None = None,
    source_codes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(pivot_i, source_j)`` of tokens with identical, unambiguous spans that stand
    for the same bytes (equal ``token_codes`` of their ids, when given).

    A span shared by several tokens on one side is ambiguous: it is left unaligned rather than
    guessed. Keys come in position order, which is span order, so one pass finds duplicates and
    a binary search finds matches.
    """
    if len(pivot_keys) == 0 or len(source_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    source_order = None
    if np.any(source_keys[1:] < source_keys[:-1]):  # not in span order: sort first
        source_order = np.argsort(source_keys, kind="stable")
        source_keys = source_keys[source_order]
        source_codes = None if source_codes is None else source_codes[source_order]
    found = np.minimum(np.searchsorted(source_keys, pivot_keys), len(source_keys) - 1)
    match = (source_keys[found] == pivot_keys) & _unambiguous(pivot_keys) & _unambiguous(source_keys)[found]
    if pivot_codes is not None and source_codes is not None:
        match &= source_codes[found] == pivot_codes
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
    pivot_codes: np.ndarray,
    source_codes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference alignment: DTW over the token strings of each assistant message.

    A pivot token on a one-to-one step of the path takes its source token. Where the path
    pairs several tokens with one (many-to-one, either way), a pivot token takes the first of
    its source tokens that stands for the same text (equal ``token_codes``), and none if no
    such token exists: a token covering part of another's text predicts something else.
    """
    pivot_ids, source_ids = gold_ids(pivot_arrays), gold_ids(source_arrays)
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
        p_steps = Counter(p for _, p in path)
        s_steps = Counter(s for s, _ in path)
        for s, p in path:
            pivot_row, source_row = int(p_rows[p]), int(s_rows[s])
            one_to_one = p_steps[p] == 1 and s_steps[s] == 1
            same_text = pivot_codes[pivot_ids[pivot_row]] == source_codes[source_ids[source_row]]
            if one_to_one or same_text:
                pairs.setdefault(pivot_row, source_row)
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


@dataclass(frozen=True)
class BytePlaces:
    """Which stored source distribution speaks for which pivot token under ``--token-align bytes``."""

    pivot_index: np.ndarray  # rows of the pivot's supervised tokens, ascending
    source_index: np.ndarray  # the source row whose stored distribution speaks for each
    offset: np.ndarray  # bytes of that source token already emitted before the pivot token starts
    same_span: np.ndarray  # bool: a pair ``align_by_spans`` makes (same bytes covered and stood for)
    not_own_bytes: int  # pivot text tokens covering other bytes than they stand for: left out
    no_source_token: int  # pivot tokens whose first byte no usable source token covers


def _offset_keys(messages: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(message, byte offset) packed into one int64 that sorts like the pair (ranges as ``span_keys``)."""
    return (messages.astype(np.int64) << SPAN_BITS) | (offsets.astype(np.int64) + SPAN_BIAS)


def align_by_bytes(
    pivot_arrays: dict[str, np.ndarray],
    source_arrays: dict[str, np.ndarray],
    gold: tuple[np.ndarray, np.ndarray],
    lengths: tuple[np.ndarray, np.ndarray],
    pairs: tuple[np.ndarray, np.ndarray],
) -> BytePlaces:
    """The source token whose distribution speaks for each pivot token, and at which offset.

    ``pairs`` (``align_by_spans`` with token codes) come first, at offset 0: the same bytes
    covered and stood for, and the end-of-turn tokens by role. Every other pivot token that
    stands for as many bytes as it covers takes the source token covering its first byte: offset
    0 where both start at the same byte, else the number of that token's bytes before it. A
    source token qualifies when it stands for as many bytes as it covers (so its bytes are the
    text's: the emitted bytes are read from them) and overlaps no other source token. ``gold``: both
    sides' supervised token ids (``gold_ids``); ``lengths``: the bytes each pivot and each source
    id stands for. One search over sorted keys: linear in the tokens of the example, plus a log.
    """
    (p_ids, s_ids), (pivot_lengths, source_lengths) = gold, lengths
    p_start, p_end = (pivot_arrays[k].astype(np.int64) for k in ("byte_start", "byte_end"))
    s_start, s_end = (source_arrays[k].astype(np.int64) for k in ("byte_start", "byte_end"))
    p_messages = np.repeat(pivot_arrays["run_message"], pivot_arrays["run_length"])
    s_messages = np.repeat(source_arrays["run_message"], source_arrays["run_length"])
    usable = np.flatnonzero((s_end > s_start) & (source_lengths[s_ids] == s_end - s_start))
    starts = _offset_keys(s_messages[usable], s_start[usable])
    ends = _offset_keys(s_messages[usable], s_end[usable])
    order = np.argsort(starts, kind="stable")
    usable, starts, ends = usable[order], starts[order], ends[order]
    overlap = ends[:-1] > starts[1:]  # keys of one message sort by offset, messages apart
    alone = np.ones(len(usable), dtype=bool)
    alone[:-1] &= ~overlap
    alone[1:] &= ~overlap
    usable, starts, ends = usable[alone], starts[alone], ends[alone]

    paired = np.zeros(len(p_ids), dtype=bool)
    paired[pairs[0]] = True
    own = (p_end > p_start) & (pivot_lengths[p_ids] == p_end - p_start)
    rows = np.flatnonzero(~paired & own)
    keys = _offset_keys(p_messages[rows], p_start[rows])
    found = np.searchsorted(starts, keys, side="right") - 1
    covered = (found >= 0) & (keys < ends[np.maximum(found, 0)])
    rows, found = rows[covered], found[covered]
    pivot_index = np.concatenate([pairs[0], rows])
    source_index = np.concatenate([pairs[1], usable[found]])
    offset = np.concatenate([np.zeros(len(pairs[0]), dtype=np.int64), p_start[rows] - s_start[usable[found]]])
    same_span = np.concatenate([np.ones(len(pairs[0]), dtype=bool), np.zeros(len(rows), dtype=bool)])
    order = np.argsort(pivot_index, kind="stable")
    return BytePlaces(
        pivot_index[order],
        source_index[order],
        offset[order],
        same_span[order],
        not_own_bytes=int((~paired & ~own & (p_end > p_start)).sum()),
        no_source_token=int((~covered).sum()),
    )


@dataclass(frozen=True)
class AlignedRows:
    """One example's source distributions on the pivot's supervised tokens: the columns written."""

    pivot_index: np.ndarray  # rows of the pivot's supervised tokens that got a distribution
    ids: np.ndarray  # [n, k] pivot ids, most probable first, -1 pads
    probs: np.ndarray  # [n, k] float32
    mapped_mass: np.ndarray  # share of the source mass used that landed on pivot ids
    source_mass: np.ndarray  # share of the stored top-k mass used (1 but where conditioned on bytes)
    target_logprob: np.ndarray  # the source's log-probability of the pivot token's text
    source_rows: int  # rows a source distribution was found for, before dropping zero mapped mass
    nothing_kept: int = 0  # conditioned rows where no stored token continues the emitted bytes


def span_rows(
    pivot_index: np.ndarray, source_index: np.ndarray, s: dict[str, np.ndarray], mapping: vocab.VocabMap
) -> AlignedRows:
    """``spans`` and ``dtw``: each paired pivot token takes its source token's distribution,
    mapped id by id (``mapping``); rows where nothing maps are left out."""
    source_probs = np.exp(s["topk_logprobs"][source_index].astype(np.float32))
    mapped = mapping.apply(s["topk_ids"][source_index], source_probs)
    # The share of each row's top-k probability that lands on pivot ids.
    mass = mapped.mass / np.maximum(source_probs.sum(axis=1), np.finfo(np.float32).tiny)
    keep = mass > 0  # nothing of the source's top-k maps to pivot ids: no distribution to offer
    return AlignedRows(
        pivot_index[keep],
        mapped.ids[keep],
        mapped.probs[keep],
        mass[keep],
        np.ones(int(keep.sum())),
        s["target_logprob"][source_index[keep]].astype(np.float32),
        len(pivot_index),
    )


def byte_rows(
    places: BytePlaces,
    gold: tuple[np.ndarray, np.ndarray],
    s: dict[str, np.ndarray],
    tables: continuations.Continuations,
) -> AlignedRows:
    """``bytes``: each placed pivot token takes its source token's stored distribution as a
    distribution over the next pivot token (``Continuations.condition``); conditioned rows
    (offset > 0) are renormalised by the mass kept. Rows that keep nothing, or map nothing, are
    left out. ``target_logprob`` is the source's own gold log-probability where the spans agree
    (as ``spans``), else the converted probability of the pivot's gold token. ``gold``: both
    sides' supervised token ids (``gold_ids``)."""
    source_probs = np.exp(s["topk_logprobs"][places.source_index].astype(np.float32))
    view = tables.condition(
        s["topk_ids"][places.source_index], source_probs, gold[1][places.source_index], places.offset
    )
    tiny = np.finfo(np.float32).tiny
    kept = np.maximum(view.kept, tiny)
    probs = view.probs
    inside = np.flatnonzero(places.offset > 0)
    probs[inside] /= kept[inside, None]
    target = s["target_logprob"][places.source_index].astype(np.float32)
    converted = np.flatnonzero(~places.same_span)
    pivot_gold = gold[0][places.pivot_index[converted]]
    with np.errstate(divide="ignore"):
        target[converted] = np.log(
            (probs[converted] * (view.ids[converted] == pivot_gold[:, None])).sum(axis=1)
        )
    keep = view.mapped > 0
    return AlignedRows(
        places.pivot_index[keep],
        view.ids[keep],
        probs[keep],
        (view.mapped / kept)[keep],
        (view.kept / np.maximum(source_probs.sum(axis=1), tiny))[keep],
        target[keep],
        len(places.pivot_index),
        int((view.kept <= 0).sum()),
    )


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


def settings_problem(token_align: str, vocab_map: str) -> str | None:
    """What is wrong with a combination of settings, or None (recipes are checked with it too)."""
    if token_align not in TOKEN_ALIGN:
        return f"unknown token_align {token_align!r}; choose one of {', '.join(TOKEN_ALIGN)}"
    if vocab_map not in vocab.VOCAB_MAPS:
        return f"unknown vocab_map {vocab_map!r}; choose one of {', '.join(vocab.VOCAB_MAPS)}"
    if token_align == "bytes" and vocab_map != "exact":
        return (
            f"vocab_map {vocab_map} does not apply to token_align bytes, which maps every source token by its "
            "bytes (to the longest pivot token they begin with); leave vocab_map at exact with it"
        )
    return None


@dataclass(frozen=True)
class Aligner:
    """Everything aligning one example needs, built once per pair of tokenizers."""

    token_align: str
    pivot_table: np.ndarray  # token_codes
    source_table: np.ndarray
    strings: tuple[list[str], list[str]] | None = None  # dtw: the tokens' printable texts
    pivot_lengths: np.ndarray | None = None  # bytes: the bytes each pivot id stands for
    tables: continuations.Continuations | None = None  # bytes

    @classmethod
    def of(
        cls,
        token_align: str,
        pivot_bytes: vocab.TokenBytes,
        source_bytes: vocab.TokenBytes,
        tables: continuations.Continuations | None = None,
    ) -> Aligner:
        """``tables``: the byte-continuation tables of the pair, which ``bytes`` needs."""
        pivot_table, source_table = token_codes(pivot_bytes, source_bytes)
        if token_align == "dtw":
            strings = (token_strings(pivot_bytes), token_strings(source_bytes))
            return cls(token_align, pivot_table, source_table, strings=strings)
        if token_align == "bytes":
            if tables is None:
                raise ValueError("--token-align bytes needs the byte-continuation tables of the pair")
            lengths = continuations.piece_lengths(pivot_bytes)
            return cls(token_align, pivot_table, source_table, pivot_lengths=lengths, tables=tables)
        return cls(token_align, pivot_table, source_table)

    def pairs(
        self, p: dict[str, np.ndarray], s: dict[str, np.ndarray], gold: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens paired one-to-one: by spans (``bytes`` starts from these too), or by DTW.
        ``gold``: both sides' supervised token ids (``gold_ids``)."""
        if self.strings is not None:
            return align_by_dtw(p, s, *self.strings, self.pivot_table, self.source_table)
        return align_by_spans(
            span_keys(p), span_keys(s), self.pivot_table[gold[0]], self.source_table[gold[1]]
        )

    def rows(
        self, p: dict[str, np.ndarray], s: dict[str, np.ndarray], mapping: vocab.VocabMap
    ) -> tuple[AlignedRows, BytePlaces | None]:
        """The source's distributions on one example's pivot tokens (and, for bytes, where from);
        ``mapping`` maps source ids for ``spans`` and ``dtw``."""
        gold = gold_ids(p), gold_ids(s)
        pairs = self.pairs(p, s, gold)
        if self.tables is None or self.pivot_lengths is None:
            return span_rows(*pairs, s, mapping), None
        places = align_by_bytes(p, s, gold, (self.pivot_lengths, self.tables.lengths), pairs)
        return byte_rows(places, gold, s, self.tables), places


def align(
    pivot_dir: str | Path,
    source_dir: str | Path,
    out_dir: str | Path,
    token_align: str = "spans",
    vocab_map: str = "exact",
    progress: bool = True,
) -> dict[str, Any]:
    """Write the source's distributions on the pivot's supervised tokens; return the report."""
    problem = settings_problem(token_align, vocab_map)
    if problem:
        raise AlignmentError(f"--token-align {token_align} --vocab-map {vocab_map}: {problem}.")
    pivot_dir, source_dir, out_dir = Path(pivot_dir), Path(source_dir), Path(out_dir)
    pivot_manifest, source_manifest = read_manifest(pivot_dir), read_manifest(source_dir)
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
    if (out_dir / REPORT).exists():  # written last: the output is complete
        return read_json(out_dir / REPORT)

    started = time.perf_counter()
    pivot_data, source_data = load_representation(pivot_dir), load_representation(source_dir)
    source_rows = {id_: i for i, id_ in enumerate(source_data["id"])}
    pivot_ids = set(pivot_data["id"])
    examples = Examples(pivot_data, source_data, source_rows)
    aligner, mapping = _aligner_and_map(pivot_manifest, source_manifest, token_align, vocab_map, examples)
    columns, counts, mass_sum = _aligned_columns(
        aligner, mapping, examples, top_k, token_align, len(pivot_ids & source_rows.keys()), progress
    )
    if not columns["id"]:
        raise AlignmentError(f"{pivot_dir} and {source_dir} share no example ids; nothing to align.")
    missing_in_source = sorted(pivot_ids - source_rows.keys())
    missing_in_pivot = sorted(source_rows.keys() - pivot_ids)
    pivot_tokens, aligned_tokens = counts["pivot_tokens"], counts["aligned"]
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
        "pairs_refused_by_byte_rule": counts["refused"],
        "tokens_without_mapped_mass": counts["zero_mass"],
        "mapped_topk_mass_share": mass_sum / max(1, aligned_tokens),
        "vocab_map_counts": mapping.counts,
        "seconds": time.perf_counter() - started,
    }
    if token_align == "bytes":
        report["bytes"] = {key: counts[key] for key in BYTE_COUNTS}
    with atomic_directory(out_dir / "data") as tmp:
        datasets.Dataset.from_dict(columns, features=aligned_features(top_k)).save_to_disk(str(tmp))
    write_json_atomic(out_dir / REPORT, report)
    return report


@dataclass(frozen=True)
class Examples:
    """The examples both representations hold, as pairs of arrays in the pivot's order."""

    pivot: datasets.Dataset
    source: datasets.Dataset
    source_rows: dict[str, int]  # where each id's row is in the source's

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        for row in range(len(self.pivot)):
            p = example_arrays(self.pivot, row)
            if p["id"] in self.source_rows:
                yield p, example_arrays(self.source, self.source_rows[p["id"]])


def _aligner_and_map(
    pivot_manifest: dict[str, Any],
    source_manifest: dict[str, Any],
    token_align: str,
    vocab_map: str,
    examples: Examples,
) -> tuple[Aligner, vocab.VocabMap]:
    """The token alignment and the vocabulary map of a pair of models: ``stats`` counts over
    ``examples`` which pivot token each source token aligns with; ``bytes`` needs the map first."""
    pivot_tok, pivot_template = _tokenizer_and_template(pivot_manifest)
    source_tok, source_template = _tokenizer_and_template(source_manifest)
    pivot_bytes = vocab.token_bytes(pivot_tok, pivot_template)
    source_bytes = vocab.token_bytes(source_tok, source_template)
    aligner = None if token_align == "bytes" else Aligner.of(token_align, pivot_bytes, source_bytes)
    cooccurrence = None
    if vocab_map == "stats" and aligner is not None:
        # FuseChat-2.0: count which pivot token each source token aligns with. Source tokens that
        # need these counts have no pivot token with their bytes, so no byte-exact pair shows them:
        # count the pivot token that covers the same bytes of the answer instead.
        source_gold, pivot_gold = [], []
        for p, s in examples:
            if token_align == "spans":
                pivot_index, source_index = align_by_spans(span_keys(p, clip=True), span_keys(s, clip=True))
            else:
                pivot_index, source_index = aligner.pairs(p, s, (gold_ids(p), gold_ids(s)))
            source_gold.append(gold_ids(s)[source_index])
            pivot_gold.append(gold_ids(p)[pivot_index])
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
    if aligner is None:  # bytes: special tokens in a top-k go where the (exact) map sends them
        tables = continuations.load_continuations(
            source_tok, pivot_tok, source_bytes, pivot_bytes, mapping.source_to_pivot
        )
        aligner = Aligner.of(token_align, pivot_bytes, source_bytes, tables)
    return aligner, mapping


def _aligned_columns(
    aligner: Aligner,
    mapping: vocab.VocabMap,
    examples: Examples,
    top_k: int,
    token_align: str,
    total: int,
    progress: bool,
) -> tuple[dict[str, list[Any]], Counter[str], float]:
    """The aligned data's columns, example by example, with the report's counts and the mapped
    top-k mass summed over the aligned tokens."""
    columns: dict[str, list[Any]] = {name: [] for name in aligned_features(top_k)}
    counts: Counter[str] = Counter()
    mass_sum = 0.0
    for p, s in tqdm(examples, total=total, desc="align", disable=not progress):
        rows, places = aligner.rows(p, s, mapping)
        if token_align == "spans":  # what the former rule (spans clipped to the answer) would have paired
            answer_pairs = align_by_spans(span_keys(p, clip=True), span_keys(s, clip=True))[0]
            counts["refused"] += len(np.setdiff1d(answer_pairs, rows.pivot_index))
        if places is not None:
            counts.update(_byte_counts(places, rows, p))
        counts["pivot_tokens"] += len(p["target_logprob"])
        counts["aligned"] += len(rows.pivot_index)
        counts["zero_mass"] += rows.source_rows - rows.nothing_kept - len(rows.pivot_index)
        mass_sum += float(rows.mapped_mass.sum())
        with np.errstate(divide="ignore"):
            logprobs = np.where(rows.ids >= 0, np.log(rows.probs), -np.inf)
        columns["id"].append(p["id"])
        columns["aligned_index"].append(rows.pivot_index.astype(np.int32))
        columns["topk_ids"].append(rows.ids.astype(np.int32))
        columns["topk_logprobs"].append(logprobs.astype(np.float16))
        columns["mapped_mass"].append(rows.mapped_mass.astype(np.float16))
        columns["source_mass"].append(rows.source_mass.astype(np.float16))
        columns["target_logprob"].append(rows.target_logprob.astype(np.float16))
        columns["source_nll"].append(float(s["nll"]))
        columns["source_num_target_tokens"].append(int(s["num_target_tokens"]))
        columns["source_num_target_bytes"].append(int(s["num_target_bytes"]))
    return columns, counts, mass_sum


# What the report counts under "bytes": pivot tokens by where their distribution came from, or why
# none came; the answers' first tokens likewise; the source mass the conditioned rows kept.
BYTE_COUNTS = (
    "same_span",
    "shared_start",
    "inside",
    "nothing_kept",
    "not_own_bytes",
    "no_source_token",
    "first_same_span",
    "first_shared_start",
    "first_inside",
    "first_uncovered",
    "inside_kept_mass_below_half",
)


def _byte_counts(places: BytePlaces, rows: AlignedRows, p: dict[str, np.ndarray]) -> Counter[str]:
    """One example's share of ``BYTE_COUNTS``: which case covered each pivot token, or why none
    did; the first token of each answer likewise."""
    written = np.isin(places.pivot_index, rows.pivot_index)
    kinds = np.where(places.same_span, 0, np.where(places.offset > 0, 2, 1))
    counts: Counter[str] = Counter()
    for kind, name in enumerate(("same_span", "shared_start", "inside")):
        counts[name] = int((written & (kinds == kind)).sum())
    counts["nothing_kept"] = rows.nothing_kept
    counts["not_own_bytes"] = places.not_own_bytes
    counts["no_source_token"] = places.no_source_token
    messages = np.repeat(p["run_message"], p["run_length"])
    firsts = np.flatnonzero(np.diff(messages, prepend=-1) != 0)  # each answer's first supervised row
    labels = np.array(["first_same_span", "first_shared_start", "first_inside", "first_uncovered"])
    kind_of_first = np.full(len(firsts), 3)
    if len(places.pivot_index):
        where = np.minimum(np.searchsorted(places.pivot_index, firsts), len(places.pivot_index) - 1)
        hit = (places.pivot_index[where] == firsts) & written[where]
        kind_of_first[hit] = kinds[where[hit]]
    counts.update(labels[kind_of_first].tolist())
    counts["inside_kept_mass_below_half"] = int((rows.source_mass < 0.5).sum())
    return counts


def format_report(report: dict[str, Any]) -> str:
    line = (
        f"examples aligned {report['examples_aligned']} ({report['examples_aligned_share']:.1%}; "
        f"missing in source {report['missing_in_source']['count']}, in pivot {report['missing_in_pivot']['count']}), "
    )
    if report["token_align"] == "bytes":
        found = report["bytes"]
        line += (
            f"pivot tokens with a source distribution {report['tokens_aligned_share']:.1%} (same span "
            f"{found['same_span']}, same start {found['shared_start']}, inside a source token {found['inside']}; "
            f"no stored token continues the text {found['nothing_kept']}), "
        )
    else:
        line += (
            f"pivot tokens aligned one-to-one {report['tokens_aligned_share']:.1%} "
            f"({report['pairs_refused_by_byte_rule']} same-answer-text pairs refused: other bytes), "
        )
    return line + f"mapped top-k mass {report['mapped_topk_mass_share']:.1%}, {report['seconds']:.1f} s"


@click.command("align", cls=Command)
@options.pivot_representation
@click.option(
    "--source",
    "source_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A source model's representation of the same data.",
)
@options.output_directory()
@options_from(AlignSettings)
def align_command(pivot_dir: str, source_dir: str, out_dir: str, token_align: str, vocab_map: str) -> None:
    """Map a source's recorded distributions onto the pivot's tokens and vocabulary."""
    report = align(pivot_dir, source_dir, out_dir, token_align, vocab_map)
    click.echo(f"{out_dir}: {format_report(report)}")
