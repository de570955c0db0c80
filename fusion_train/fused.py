"""The fused-data format that ``fuse`` writes and ``train`` reads: the pivot's tokens and
supervised runs (as in a representation) with one fused top-k target distribution per supervised
token, and the candidate that won each example (see ``docs/formats.md``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fusion_train.errors import TrainInputError
from fusion_train.models import tokenizer_hash
from fusion_train.representation import sequence_columns, topk_columns
from fusion_train.storage import MANIFEST, read_json

log = logging.getLogger(__name__)

FORMAT = "fusion-train/fused@1"
FUSED_COLUMNS = ("input_ids", "run_start", "run_length", "topk_ids", "topk_logprobs")


@dataclass
class FusedData:
    """Fused targets that passed every check, with examples without supervised tokens left out."""

    manifest: dict[str, Any]
    data: datasets.Dataset
    stats: dict[str, Any] = field(default_factory=dict)


def load_fused(path: str | Path, tokenizer: Any) -> FusedData:
    """Read and check fused targets for the pivot whose tokenizer is ``tokenizer``.

    Checked in one vectorised pass over the Arrow columns: the pivot's tokenizer, token and target
    ids inside the tokenizer's ids, supervised runs inside their sequence and in order, one target
    row per supervised token, and log-probabilities without NaN or +inf (and without -inf on a
    valid id: -inf marks padding only).
    """
    path = Path(path)
    manifest, data = _open_fused(path, tokenizer)
    supervised = np.zeros(len(data), dtype=np.int64)
    rows_without_target = 0
    offset = 0
    for batch in data.data.table.select(list(FUSED_COLUMNS)).to_batches(max_chunksize=4096):
        check = BatchCheck(path, data, offset, len(tokenizer))
        supervised[offset : offset + batch.num_rows] = check.supervised_runs(batch)
        rows_without_target += check.targets(batch, supervised[offset : offset + batch.num_rows])
        offset += batch.num_rows

    keep = np.flatnonzero(supervised > 0)
    if keep.size == 0:
        raise TrainInputError(f"{path}: no example has supervised tokens; nothing to train on.")
    dropped = np.flatnonzero(supervised == 0)
    stats = {
        "examples": int(keep.size),
        "supervised_tokens": int(supervised.sum()),
        "rows_without_target": rows_without_target,  # add nothing to the fusion loss
        "dropped_without_supervised_tokens": int(dropped.size),
        "dropped_ids": data.select(dropped[:20])["id"] if dropped.size else [],
    }
    if dropped.size:
        log.warning("%s: %d examples have no supervised tokens and are left out.", path, dropped.size)
    kept = data.select(keep) if dropped.size else data  # an index mapping, nothing written next to the input
    return FusedData(manifest, kept.with_format("numpy", columns=list(FUSED_COLUMNS)), stats)


def _open_fused(path: Path, tokenizer: Any) -> tuple[dict[str, Any], datasets.Dataset]:
    """The manifest and data of a fuse output, fused for this tokenizer, with every column."""
    if not (path / MANIFEST).is_file() or not (path / "data" / "state.json").is_file():
        raise TrainInputError(f"{path}: no {MANIFEST} and data/; pass the output of `fusion-train fuse`.")
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise TrainInputError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}.")
    pivot = manifest.get("pivot") or {}
    own_hash = tokenizer_hash(tokenizer)
    if pivot.get("tokenizer_hash") != own_hash:
        raise TrainInputError(
            f"{path} was fused for the pivot tokenizer {pivot.get('tokenizer_hash')} ({pivot.get('path')}), "
            f"but --model has tokenizer {own_hash}. Train the pivot the data was fused for, or rerun "
            "`fusion-train fuse` with this model as the pivot."
        )
    if not read_json(path / "data" / "state.json").get("_data_files"):  # datasets cannot load 0 shards
        raise TrainInputError(f"{path}: the data set is empty; nothing to train on.")
    data = datasets.load_from_disk(str(path / "data"))
    missing = [c for c in ("id", *FUSED_COLUMNS) if c not in data.column_names]
    if missing:
        raise TrainInputError(f"{path}: columns {missing} are missing (see docs/formats.md, fused targets).")
    if len(data) == 0:
        raise TrainInputError(f"{path}: the data set is empty; nothing to train on.")
    return manifest, data


@dataclass(frozen=True)
class BatchCheck:
    """The checks of one Arrow batch of fused examples, which start at row ``offset``."""

    path: Path
    data: datasets.Dataset
    offset: int
    vocab: int

    def fail(self, index: int, problem: str) -> TrainInputError:
        """The error for the batch's example ``index``, named by its place and id in the data."""
        at = self.offset + int(index)
        return TrainInputError(f"fused example {at} (id {self.data[at]['id']!r}): {problem}")

    def supervised_runs(self, batch: pa.RecordBatch) -> np.ndarray:
        """Supervised tokens per example, after checking the token ids and the runs."""
        n, vocab = batch.num_rows, self.vocab
        input_ids = batch.column("input_ids")
        lengths = pc.list_value_length(input_ids).to_numpy(zero_copy_only=False)
        tokens = input_ids.flatten().to_numpy(zero_copy_only=False)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            token_example = np.repeat(np.arange(n), lengths)
            bad = token_example[(tokens < 0) | (tokens >= vocab)][0]
            raise self.fail(bad, f"input_ids outside the tokenizer's ids [0, {vocab})")
        runs_per_example = pc.list_value_length(batch.column("run_start")).to_numpy(zero_copy_only=False)
        starts = batch.column("run_start").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        counts = batch.column("run_length").flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        run_example = np.repeat(np.arange(n), runs_per_example)
        ends = starts + counts
        bad_run = (starts < 1) | (counts < 0) | (ends > lengths[run_example])
        later = run_example[1:] == run_example[:-1]
        bad_run[1:] |= later & (starts[1:] < ends[:-1])
        if bad_run.any():
            raise self.fail(
                run_example[bad_run][0],
                "supervised runs must lie in 1 .. len(input_ids) - 1 and be in position order",
            )
        return np.bincount(run_example, weights=counts, minlength=n).astype(np.int64)

    def targets(self, batch: pa.RecordBatch, supervised: np.ndarray) -> int:
        """Check one target row per supervised token, its ids and log-probabilities; the rows
        with no target (every id padding)."""
        n, vocab = batch.num_rows, self.vocab
        topk_ids = batch.column("topk_ids")
        rows = pc.list_value_length(topk_ids).to_numpy(zero_copy_only=False)
        mismatch = np.flatnonzero(rows != supervised)
        if mismatch.size:
            i = mismatch[0]
            raise self.fail(i, f"{rows[i]} target rows for {supervised[i]} supervised tokens")
        flat_rows = topk_ids.flatten()
        k = flat_rows.type.list_size if pa.types.is_fixed_size_list(flat_rows.type) else None
        ids = flat_rows.flatten().to_numpy(zero_copy_only=False)
        logprobs = batch.column("topk_logprobs").flatten().flatten().to_numpy(zero_copy_only=False)
        if k is None or ids.size != logprobs.size:
            raise TrainInputError(f"{self.path}: topk_ids/topk_logprobs are not k-wide rows of equal shape.")
        valid = ids >= 0
        bad_entry = (ids < -1) | (ids >= vocab) | np.isnan(logprobs) | np.isposinf(logprobs)
        bad_entry |= valid & np.isneginf(logprobs)
        if bad_entry.any():
            entry = int(np.flatnonzero(bad_entry)[0])
            row_example = np.repeat(np.arange(n), rows)
            problem = (
                f"target id {ids[entry]} outside the tokenizer's ids [0, {vocab}) (-1 pads)"
                if ids[entry] < -1 or ids[entry] >= vocab
                else f"log-probability {logprobs[entry]} for id {ids[entry]} (NaN, +inf, or -inf on a valid id)"
            )
            raise self.fail(row_example[entry // k], problem)
        return int((~valid.reshape(-1, k)).all(axis=1).sum())


def fused_features(top_k: int) -> datasets.Features:
    return datasets.Features({**sequence_columns(), **topk_columns(top_k), "winner": datasets.Value("int32")})
