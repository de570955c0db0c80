"""Stage 1: record what a model knows about a chat data set.

For every supervised (assistant) token the model's top-k next-token distribution that predicts
it, the log-probability of the token itself, and the character span of the token inside the
assistant message; per sequence the total negative log-likelihood and the number of supervised
tokens and UTF-8 bytes. The layout is documented in ``docs/formats.md``.

Work is split into chunks of examples; each chunk becomes one part directory written atomically,
so a killed run resumes at the first missing part and several processes (``--shard i/n`` or
launcher ranks) can split the chunks between them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import datasets
import numpy as np
import pyarrow as pa

from fusion_train import options, parts, vocab
from fusion_train.chat import (
    Conversation,
    data_fingerprint,
    load_conversations,
    render,
    resolve_chat_template,
)
from fusion_train.errors import Command, UserError
from fusion_train.inference import (
    AnyScorer,
    InferenceSettings,
    ScoredExample,
    check_before_launch,
    inference_settings,
    load_scorer,
)
from fusion_train.launch import barrier, launch_if_asked, launch_options, process_group
from fusion_train.models import check_model_directory, identify, load_tokenizer
from fusion_train.parts import all_part_stats, part_path, parts_bar, parts_to_do, write_part
from fusion_train.storage import MANIFEST, claim_output, read_json, write_json_atomic

log = logging.getLogger(__name__)

MODULE = "fusion_train.represent"  # what the launcher runs in every process
FORMAT = "fusion-train/representation@2"  # @2: byte spans replace clipped character spans
SUMMARY = "summary.json"


class RepresentationError(UserError, ValueError):
    """Representations that are missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class RepresentSettings:
    """Everything that changes what ``represent`` writes (recorded in the manifest)."""

    top_k: int = 10
    max_length: int = 2048
    overflow: str = "truncate"  # "truncate": cut the end and count it; "skip": leave the example out
    chat_template: str | None = None  # built-in name or .jinja file; default: the tokenizer's own
    chunk_size: int = 256  # examples per part

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if self.overflow not in ("truncate", "skip"):
            raise ValueError("--overflow must be 'truncate' or 'skip'")


def sequence_columns() -> dict[str, Any]:
    """The conversation as a model tokenized it and where its supervised tokens are (shared by
    the representation and the fused targets)."""
    seq, value = datasets.Sequence, datasets.Value
    return {
        "id": value("string"),
        "domain": value("string"),
        "input_ids": seq(value("int32")),
        "run_message": seq(value("int32")),
        "run_start": seq(value("int32")),
        "run_length": seq(value("int32")),
    }


def topk_columns(top_k: int) -> dict[str, Any]:
    """One top-k distribution per supervised token: ids and log-probabilities (every stage's format)."""
    seq, value = datasets.Sequence, datasets.Value
    return {
        "topk_ids": seq(seq(value("int32"), length=top_k)),
        "topk_logprobs": seq(seq(value("float16"), length=top_k)),
    }


def representation_features(top_k: int) -> datasets.Features:
    """The Arrow schema of one representation (see docs/formats.md)."""
    seq, value = datasets.Sequence, datasets.Value
    return datasets.Features(
        {
            **sequence_columns(),
            "byte_start": seq(value("int32")),
            "byte_end": seq(value("int32")),
            "target_logprob": seq(value("float16")),
            **topk_columns(top_k),
            "nll": value("float64"),
            "num_target_tokens": value("int32"),
            "num_target_bytes": value("int32"),
            "truncated": value("bool"),
        }
    )


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class ChatTokenizer:
    """A tokenizer with the chat template it renders conversations in, and the raw bytes each of
    its token ids stands for (``fusion_train.vocab.token_bytes``; ``None`` for special tokens):
    what ``encode_conversation`` needs to place every token on the bytes of the rendered text."""

    tokenizer: Any
    template: str
    pieces: Sequence[bytes | None]

    @classmethod
    def of(cls, tokenizer: Any, template: str) -> ChatTokenizer:
        return cls(tokenizer, template, vocab.token_bytes(tokenizer, template).pieces)


@dataclass
class EncodedExample:
    """A conversation tokenized in one model's template, with its supervised tokens located."""

    conv: Conversation
    input_ids: list[int]
    positions: list[int]  # supervised positions p (>= 1): logits at p - 1 predict input_ids[p]
    messages: list[int]  # index of the assistant message each supervised token belongs to
    # The bytes each token covers, counted from the first byte of that message's content, not
    # clipped to it: a token that also covers template text before the answer starts below 0.
    # End-of-turn tokens: start = end = the content's length in bytes.
    byte_start: list[int]
    byte_end: list[int]
    num_bytes: int
    truncated: bool


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``offsets[c]`` is where character ``c`` of ``text`` starts in its UTF-8 encoding (and
    ``offsets[len(text)]`` the encoding's length)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def token_byte_spans(
    text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], pieces: Sequence[bytes | None]
) -> tuple[list[int], list[int]]:
    """The bytes of ``text.encode()`` each token covers, as ``[start, end)`` lists.

    A tokenizer reports character offsets, which cannot tell the byte pieces of one character
    apart (both pieces of a split emoji claim the whole emoji). The tokens' own bytes can: walking
    the text with a cursor, a token whose bytes are the next bytes of the text, within its
    character span, covers exactly those. A token whose bytes are not in the text there (special
    tokens, text changed by a normaliser, the space SentencePiece adds at the start) gets its
    character span in bytes; it then stands for other bytes than it covers, and alignment, which
    compares both, never pairs it with a token that stands for the text.
    """
    data = text.encode("utf-8")
    char_bytes = char_to_byte_offsets(text)
    starts, ends = [], []
    cursor = 0
    for token, (a, b) in zip(ids, offsets, strict=True):
        low, high = int(char_bytes[a]), int(char_bytes[b])
        piece = pieces[token] if 0 <= token < len(pieces) else None
        if piece and cursor < high and cursor + len(piece) > low and data.startswith(piece, cursor):
            start, end = cursor, cursor + len(piece)
        elif piece and low >= cursor and data.startswith(piece, low):  # the tokenizer skipped text
            start, end = low, low + len(piece)
        else:
            start, end = low, high
        starts.append(start)
        ends.append(end)
        cursor = max(cursor, end)
    return starts, ends


def encode_conversation(
    chat: ChatTokenizer, conv: Conversation, max_length: int, overflow: str
) -> EncodedExample | str:
    """Tokenize ``conv`` and find its supervised tokens; a string is the reason to skip it."""
    assistant = conv.assistant_indices
    if not assistant:
        return "no assistant message"
    if any(not conv.messages[i]["content"].strip() for i in assistant):
        return "empty assistant message"
    rendered = render(chat.tokenizer, chat.template, conv)
    enc = chat.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    token_start, token_end = token_byte_spans(rendered.text, ids, offsets, chat.pieces)
    char_bytes = char_to_byte_offsets(rendered.text)
    special = set(chat.tokenizer.all_special_ids)

    positions, messages, starts, ends = [], [], [], []
    covered: dict[int, tuple[int, int]] = {}  # message -> the verbatim content's bytes, relative
    cursor = 0
    for m in assistant:
        text_start, content_start, length = rendered.content_offsets[m]
        content = conv.messages[m]["content"]
        first, last = int(char_bytes[text_start]), int(char_bytes[text_start + length])
        base = first - len(content[:content_start].encode("utf-8"))  # where the content's byte 0 would be
        covered[m] = (first - base, last - base)
        while cursor < len(ids) and token_end[cursor] <= first:
            cursor += 1
        while cursor < len(ids) and token_start[cursor] < last:
            if token_end[cursor] > max(token_start[cursor], first):  # zero-width tokens cover nothing
                positions.append(cursor)
                messages.append(m)
                starts.append(token_start[cursor] - base)
                ends.append(token_end[cursor] - base)
            cursor += 1
        # The special token that closes the turn (<|im_end|>, </s>, <end_of_turn>) is supervised too:
        # a model must learn to stop. It may follow only whitespace that the template adds.
        if (
            cursor < len(ids)
            and ids[cursor] in special
            and not rendered.text[text_start + length : offsets[cursor][0]].strip()
        ):
            content_bytes = len(content.encode("utf-8"))
            positions.append(cursor)
            messages.append(m)
            starts.append(content_bytes)
            ends.append(content_bytes)
            cursor += 1

    truncated = len(ids) > max_length
    if truncated:
        if overflow == "skip":
            return f"longer than --max-length {max_length} ({len(ids)} tokens)"
        ids = ids[:max_length]
        keep = sum(p < max_length for p in positions)
        positions, messages, starts, ends = positions[:keep], messages[:keep], starts[:keep], ends[:keep]
    # Position 0 has no preceding logits to predict it.
    first_kept = next((i for i, p in enumerate(positions) if p >= 1), len(positions))
    positions, messages = positions[first_kept:], messages[first_kept:]
    starts, ends = starts[first_kept:], ends[first_kept:]
    if not positions:
        return "no supervised token within --max-length" if truncated else "no supervised token"
    num_bytes = _covered_bytes(covered, messages, starts, ends)
    return EncodedExample(conv, ids, positions, messages, starts, ends, num_bytes, truncated)


def _covered_bytes(
    verbatim: dict[int, tuple[int, int]], messages: list[int], starts: list[int], ends: list[int]
) -> int:
    """UTF-8 bytes of the assistant text the supervised tokens cover (the union of their spans,
    within the part of each message the template reproduces)."""
    total = 0
    for m in sorted(set(messages)):
        low, high = verbatim[m]
        hit = np.zeros(high - low, dtype=bool)
        for msg, a, b in zip(messages, starts, ends, strict=True):
            if msg == m:
                hit[max(a, low) - low : max(min(b, high), low) - low] = True
        total += int(hit.sum())
    return total


# --------------------------------------------------------------------------- scoring


def position_runs(positions: list[int], messages: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Compress supervised positions into runs of consecutive positions within one message."""
    run_message, run_start, run_length = [], [], []
    for p, m in zip(positions, messages, strict=True):
        if run_start and run_message[-1] == m and run_start[-1] + run_length[-1] == p:
            run_length[-1] += 1
        else:
            run_message.append(m)
            run_start.append(p)
            run_length.append(1)
    return run_message, run_start, run_length


def to_row(scored: ScoredExample) -> dict[str, Any]:
    e = scored.example
    run_message, run_start, run_length = position_runs(e.positions, e.messages)
    return {
        "id": e.conv.id,
        "domain": e.conv.domain,
        "input_ids": np.asarray(e.input_ids, dtype=np.int32),
        "run_message": run_message,
        "run_start": run_start,
        "run_length": run_length,
        "byte_start": np.asarray(e.byte_start, dtype=np.int32),
        "byte_end": np.asarray(e.byte_end, dtype=np.int32),
        "target_logprob": scored.target_logprob.astype(np.float16),
        "topk_ids": scored.topk_ids,
        "topk_logprobs": scored.topk_logprobs.astype(np.float16),
        "nll": float(-scored.target_logprob.astype(np.float64).sum()),
        "num_target_tokens": len(e.positions),
        "num_target_bytes": e.num_bytes,
        "truncated": e.truncated,
    }


# --------------------------------------------------------------------------- the stage


@dataclass
class RepresentSummary:
    examples: int = 0
    represented: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    placement: dict[str, Any] = field(default_factory=dict)  # ranks, device, dtype, parameters held

    def add(self, other: dict[str, Any]) -> None:
        for key in ("examples", "represented", "supervised_tokens", "truncated"):
            setattr(self, key, getattr(self, key) + other[key])
        self.skipped = dict(Counter(self.skipped) + Counter(other["skipped"]))
        for reason, ids in other["skipped_ids"].items():
            self.skipped_ids.setdefault(reason, []).extend(ids)
        self.seconds += other["seconds"]


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (None: the launcher's RANK / WORLD_SIZE, or a single process)."""
    if not shard:
        return None
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected i/n such as 0/2, got {shard!r}", param_hint="--shard") from None
    if not 0 <= index < count:
        raise click.BadParameter(f"shard index must be in [0, {count})", param_hint="--shard")
    return index, count


def represent(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: RepresentSettings = RepresentSettings(),
    *,
    inference: InferenceSettings | None = None,
    gguf_file: str | None = None,
    batch_tokens: int = 4096,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> RepresentSummary | None:
    """Write the representation of ``data_path`` by the model at ``model_path`` into ``out_dir``.

    In a launched job every rank takes every n-th part and rank 0 writes the summary once all
    exist; ``shard`` (i, n) splits the parts between independent processes instead. Returns
    the summary once every part exists (``None`` on other ranks, or while shards are missing).
    """
    out_dir = Path(out_dir)
    conversations = load_conversations(data_path)[:limit]
    check_model_directory(model_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_path, gguf_file, trust_remote_code)
    template, template_source = resolve_chat_template(tokenizer, settings.chat_template)
    inference = inference or InferenceSettings()
    inference.check()
    with process_group(deepspeed=inference.deepspeed is not None) as rank:
        scorer = load_scorer(model_path, inference, gguf_file, trust_remote_code, top_k=settings.top_k)
        identity = identify(model_path, gguf_file, tokenizer, scorer.vocab_size)
        num_chunks = -(-len(conversations) // settings.chunk_size)
        manifest = {
            "format": FORMAT,
            "model": identity.to_dict(),
            "data": {"path": str(Path(data_path).resolve()), "fingerprint": data_fingerprint(conversations)},
            "num_examples": len(conversations),
            "num_parts": num_chunks,
            "chat_template": {
                "source": template_source,
                "sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            },
            "settings": asdict(settings),
            "dtype": scorer.dtype_name,  # the weights' dtype: results differ within its precision
        }
        claim_output(out_dir, manifest)

        mine = parts_to_do(out_dir, num_chunks, shard or rank.share)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = representation_features(settings.top_k)
        chat = ChatTokenizer.of(tokenizer, template)
        bar = parts_bar(mine, f"represent {Path(model_path).name}", progress and rank.is_main)
        for chunk in bar:
            begin = chunk * settings.chunk_size
            _write_part(
                scorer, chat, conversations[begin : begin + settings.chunk_size], settings,
                identity.tokenizer_size, pad_id, batch_tokens, features, part_path(out_dir, chunk),
            )  # fmt: skip
        scorer.finish()
        placement = {"world_size": rank.world_size, "device": str(scorer.device), "dtype": scorer.dtype_name,
                     "deepspeed": inference.deepspeed, "parameters": scorer.parameters()}  # fmt: skip
        barrier()
    if not rank.is_main:
        return None
    summary = finalize(out_dir, placement)
    if summary is not None and summary.represented == 0:
        raise RepresentationError(
            f"{data_path}: none of the {summary.examples} records could be represented (skipped: "
            f"{summary.skipped}); every record needs a non-empty assistant reply within --max-length."
        )
    return summary


def _write_part(
    scorer: AnyScorer,
    chat: ChatTokenizer,
    conversations: list[Conversation],
    settings: RepresentSettings,
    tokenizer_size: int,
    pad_id: int,
    batch_tokens: int,
    features: datasets.Features,
    target: Path,
) -> None:
    started = time.perf_counter()
    encoded: list[EncodedExample] = []
    skipped_ids: dict[str, list[str]] = {}
    for conv in conversations:
        result = encode_conversation(chat, conv, settings.max_length, settings.overflow)
        if isinstance(result, str):
            log.warning("skipping record %r: %s", conv.id, result)
            skipped_ids.setdefault(result, []).append(conv.id)
        else:
            encoded.append(result)
    by_id: dict[str, ScoredExample] = {}
    for batch in scorer.batches(encoded, batch_tokens):
        for scored in scorer.score(batch, settings.top_k, tokenizer_size, pad_id):
            by_id[scored.example.conv.id] = scored
    rows = [to_row(by_id[e.conv.id]) for e in encoded]  # back in input order: output is deterministic
    columns = {name: [row[name] for row in rows] for name in features}
    stats = {
        "examples": len(conversations),
        "represented": len(rows),
        "supervised_tokens": sum(len(e.positions) for e in encoded),
        "truncated": sum(e.truncated for e in encoded),
        "skipped": {reason: len(ids) for reason, ids in skipped_ids.items()},
        "skipped_ids": skipped_ids,
        "seconds": time.perf_counter() - started,
    }
    write_part(target, datasets.Dataset.from_dict(columns, features=features), stats)


def finalize(out_dir: Path, placement: dict[str, Any] | None = None) -> RepresentSummary | None:
    """Write ``summary.json`` once every part is present; return the summary (or None).
    ``placement``: how the last run placed the model (recorded, for the reader)."""
    stats = all_part_stats(out_dir, read_json(out_dir / MANIFEST)["num_parts"])
    if stats is None:
        return None
    summary = RepresentSummary(placement=placement or {})
    for part in stats:
        summary.add(part)
    write_json_atomic(out_dir / SUMMARY, asdict(summary))
    return summary


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a representation this version can read, or a clear error."""
    return parts.read_manifest(out_dir, FORMAT, "represent", RepresentationError)


def load_representation(out_dir: str | Path) -> datasets.Dataset:
    """The complete representation in ``out_dir`` as one memory-mapped data set, in input order."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    non_empty = parts.load_parts(out_dir, manifest["num_parts"], "represent", RepresentationError)
    if not non_empty:
        raise RepresentationError(
            f"{out_dir}: no example was represented (see skipped in {SUMMARY}); check the data and --max-length."
        )
    return datasets.concatenate_datasets(non_empty)


def example_arrays(data: datasets.Dataset, index: int) -> dict[str, np.ndarray]:
    """One example's columns as numpy arrays of their stored dtypes (zero-copy from Arrow)."""
    table = data.with_format("arrow")[index : index + 1]
    arrays: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            values = column.values
            if pa.types.is_fixed_size_list(values.type):
                width = values.type.list_size
                arrays[name] = values.values.to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                arrays[name] = values.to_numpy(zero_copy_only=False)
        else:
            arrays[name] = column.to_numpy(zero_copy_only=False)[0]
    return arrays


# --------------------------------------------------------------------------- command


@click.command("represent", cls=Command)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Local model directory (safetensors, or the folder holding --gguf-file).",
)
@options.chat_data
@options.output_directory()
@click.option(
    "--top-k",
    type=options.POSITIVE_INT,
    default=10,
    help="Entries of each next-token distribution to keep (the papers use 10).",
)
@options.max_length
@click.option(
    "--overflow",
    type=click.Choice(["truncate", "skip"]),
    default="truncate",
    help="Longer conversations: cut the end (counted in the summary) or leave them out.",
)
@options.batch_tokens
@click.option("--limit", type=options.POSITIVE_INT, default=None, help="Use only the first N records.")
@click.option(
    "--chat-template",
    default=None,
    help="Built-in template (plain, chatml, llama2) or a .jinja file. Default: the tokenizer's own, "
    "else the plain fallback ('User: ...' / 'Assistant: ...</s>' blocks).",
)
@click.option("--gguf-file", default=None, help="GGUF file name inside --model (dequantised on load).")
@options.inference_options
@click.option(
    "--chunk-size",
    type=options.POSITIVE_INT,
    default=256,
    help="Examples per part file (the unit of resuming and sharding).",
)
@click.option(
    "--shard",
    default=None,
    help="i/n: process every n-th part starting at i. Default: RANK/WORLD_SIZE of torchrun or "
    "the deepspeed launcher, else everything.",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory.")
@launch_options
def represent_command(**params: Any) -> None:
    """Record a model's top-k next-token distributions on every assistant token of a chat data set.

    With --nproc N the parts are split between N processes (one per GPU, or CPU processes) under
    the deepspeed launcher; with --deepspeed zero3 they also split the weights (ZeRO-3)."""
    p = SimpleNamespace(**params)

    def check() -> None:
        load_conversations(p.data_path)
        check_model_directory(p.model_path, gguf_file=p.gguf_file, trust_remote_code=p.trust_remote_code)
        load_tokenizer(p.model_path, p.gguf_file, p.trust_remote_code)
        check_before_launch(inference_settings(params))

    if launch_if_asked(MODULE, represent_command, params, check):
        return
    settings = RepresentSettings(p.top_k, p.max_length, p.overflow, p.chat_template, p.chunk_size)
    summary = represent(
        p.model_path, p.data_path, p.out_dir, settings, inference=inference_settings(params),
        gguf_file=p.gguf_file, batch_tokens=p.batch_tokens, limit=p.limit, shard=parse_shard(p.shard),
        trust_remote_code=p.trust_remote_code,
    )  # fmt: skip
    if summary is None:
        if p.shard:
            click.echo(f"{p.out_dir}: this shard is done; other shards' parts are still missing.")
        return
    click.echo(
        f"{p.out_dir}: {summary.represented}/{summary.examples} examples, {summary.supervised_tokens} supervised "
        f"tokens, {summary.truncated} truncated, skipped {summary.skipped or 'none'}."
    )


if __name__ == "__main__":
    represent_command(prog_name="fusion-train represent")
