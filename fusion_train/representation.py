"""The representation format that ``represent`` writes and align, fuse and train read: one row
per conversation with its tokens, its supervised positions (as runs), their byte spans and the
model's top-k next-token distribution at each (see ``docs/formats.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from fusion_train import parts
from fusion_train.errors import UserError

FORMAT = "fusion-train/representation@2"  # @2: byte spans replace clipped character spans
SUMMARY = "summary.json"


class RepresentationError(UserError, ValueError):
    """Representations that are missing, incomplete or inconsistent."""


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
