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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import datasets
import numpy as np

from fusion_train import options
from fusion_train.calls import StageCall
from fusion_train.chat import Conversation, data_fingerprint, load_conversations, resolve_chat_template
from fusion_train.encoding import ChatTokenizer, EncodedExample, encode_conversation
from fusion_train.errors import Command
from fusion_train.inference import (
    AnyScorer,
    Batching,
    InferenceSettings,
    ScoredExample,
    check_before_launch,
    inference_settings,
    load_scorer,
)
from fusion_train.launch import barrier, launch_options, process_group
from fusion_train.models import check_model_directory, identify, load_tokenizer
from fusion_train.parts import (
    all_part_stats,
    echo_shard_done,
    parse_shard,
    part_path,
    parts_bar,
    parts_to_do,
    write_part,
)
from fusion_train.representation import (
    FORMAT,
    SUMMARY,
    RepresentationError,
    position_runs,
    representation_features,
)
from fusion_train.settings import options_from, setting, settings_from
from fusion_train.storage import MANIFEST, claim_output, read_json, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepresentSettings:
    """Everything that changes what ``represent`` writes (recorded in the manifest)."""

    top_k: int = setting(
        10,
        type=options.POSITIVE_INT,
        help="Entries of each next-token distribution to keep (the papers use 10).",
    )
    max_length: int = setting(
        2048, type=options.MAX_LENGTH, help="Longest tokenized conversation, in each model's tokens."
    )
    overflow: str = setting(
        "truncate",
        type=click.Choice(["truncate", "skip"]),
        help="Longer conversations: cut the end (counted in the summary) or leave them out.",
    )
    chat_template: str | None = setting(
        None,
        help="Built-in template (plain, chatml, llama2) or a .jinja file. Default: the tokenizer's own, "
        "else the plain fallback ('User: ...' / 'Assistant: ...</s>' blocks).",
    )
    chunk_size: int = setting(
        256, type=options.POSITIVE_INT, help="Examples per part file (the unit of resuming and sharding)."
    )

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if self.overflow not in ("truncate", "skip"):
            raise ValueError("--overflow must be 'truncate' or 'skip'")


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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        claim_output(
            out_dir,
            {
                "format": FORMAT,
                "model": identity.to_dict(),
                "data": {
                    "path": str(Path(data_path).resolve()),
                    "fingerprint": data_fingerprint(conversations),
                },
                "num_examples": len(conversations),
                "num_parts": num_chunks,
                "chat_template": {"source": template_source, "sha256": _digest(template)},
                "settings": asdict(settings),
                "dtype": scorer.dtype_name,  # the weights' dtype: results differ within its precision
            },
        )

        mine = parts_to_do(out_dir, num_chunks, shard or rank.share)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = representation_features(settings.top_k)
        chat = ChatTokenizer.of(tokenizer, template)
        bar = parts_bar(mine, f"represent {Path(model_path).name}", progress and rank.is_main)
        for chunk in bar:
            begin = chunk * settings.chunk_size
            _write_part(
                scorer,
                chat,
                conversations[begin : begin + settings.chunk_size],
                settings,
                identity.tokenizer_size,
                pad_id,
                batch_tokens,
                features,
                part_path(out_dir, chunk),
            )
        scorer.finish()
        placement = {"world_size": rank.world_size, "device": str(scorer.device), "dtype": scorer.dtype_name}
        placement |= {"deepspeed": inference.deepspeed, "parameters": scorer.parameters()}
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
@options_from(Batching)
@click.option("--limit", type=options.POSITIVE_INT, default=None, help="Use only the first N records.")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model (dequantised on load).")
@options_from(RepresentSettings)
@options_from(InferenceSettings)
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

    With --nproc N the parts are split between N processes (one per GPU, or CPU processes; with
    --hostfile, on every node); with --deepspeed zero3 they also split the weights (ZeRO-3)."""
    p = SimpleNamespace(**params)

    def check() -> None:
        load_conversations(p.data_path)
        check_model_directory(p.model_path, gguf_file=p.gguf_file, trust_remote_code=p.trust_remote_code)
        load_tokenizer(p.model_path, p.gguf_file, p.trust_remote_code)
        check_before_launch(inference_settings(params))

    arguments = {
        "model_path": p.model_path,
        "data_path": p.data_path,
        "out_dir": p.out_dir,
        "settings": settings_from(RepresentSettings, params),
        "inference": inference_settings(params),
        "gguf_file": p.gguf_file,
        "batch_tokens": p.batch_tokens,
        "limit": p.limit,
        "shard": parse_shard(p.shard),
        "trust_remote_code": p.trust_remote_code,
    }
    StageCall(represent, arguments, Path(p.out_dir), report_represented).from_command(params, check)


def report_represented(out: Path, summary: RepresentSummary | None) -> None:
    """What `represent` prints at the end: the counts, or that only this shard's parts are done."""
    if summary is None:
        echo_shard_done(out)
        return
    click.echo(
        f"{out}: {summary.represented}/{summary.examples} examples, {summary.supervised_tokens} supervised "
        f"tokens, {summary.truncated} truncated, skipped {summary.skipped or 'none'}."
    )


if __name__ == "__main__":
    represent_command(prog_name="fusion-train represent")
