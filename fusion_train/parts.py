"""Stage outputs written in parts: the unit of resuming and of sharing work between ranks.

``represent``, ``sample`` and ``score`` split their records into chunks; each chunk becomes one
part directory (``OUT/parts/part-NNNNN``: a ``datasets`` directory ``data/`` and ``stats.json``)
written whole or not at all. A killed run resumes at the missing parts, rank i of n writes
every n-th part, and the output is read back only once every part exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from fusion_train.errors import UserError
from fusion_train.storage import MANIFEST, atomic_directory, read_json, write_json_atomic

PARTS_DIR = "parts"
STATS = "stats.json"


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


def echo_shard_done(out_dir: Path) -> None:
    """What a stage prints when its shard's parts are written and other shards' are not yet."""
    click.echo(f"{out_dir}: this shard is done; other shards' parts are still missing.")


def part_path(out_dir: Path, index: int) -> Path:
    return out_dir / PARTS_DIR / f"part-{index:05d}"


def parts_to_do(out_dir: Path, num_parts: int, share: tuple[int, int]) -> list[int]:
    """The parts share (i, n) writes (every n-th from i) that do not exist yet."""
    index, count = share
    return [c for c in range(num_parts) if c % count == index and not part_path(out_dir, c).exists()]


def parts_bar(parts: list[int], desc: str, show: bool) -> Iterable[int]:
    """``parts`` with a progress bar (shown by the main rank only, when ``show``)."""
    return tqdm(parts, desc=desc, unit="part", disable=not show)


def write_part(target: Path, data: datasets.Dataset, stats: dict[str, Any] | None = None) -> None:
    """Publish one part atomically: its rows (and its statistics, if the stage keeps any)."""
    with atomic_directory(target) as tmp:
        datasets.disable_progress_bars()  # one bar per stage is enough; parts are small
        try:
            data.save_to_disk(str(tmp / "data"))
        finally:
            datasets.enable_progress_bars()
        if stats is not None:
            write_json_atomic(tmp / STATS, stats)


def all_part_stats(out_dir: Path, num_parts: int) -> list[dict[str, Any]] | None:
    """Every part's statistics, in order, once all parts exist (None before)."""
    parts = [part_path(out_dir, c) for c in range(num_parts)]
    if not all(p.exists() for p in parts):
        return None
    return [read_json(p / STATS) for p in parts]


def read_manifest(out_dir: Path, format: str, command: str, error: type[UserError]) -> dict[str, Any]:
    """The manifest of a ``command`` output this version can read, or ``error`` saying what to do."""
    if not (out_dir / MANIFEST).exists():
        raise error(
            f"{out_dir}: no {MANIFEST}; is it the output of `fusion-train {command} --out {out_dir}`?"
        )
    manifest = read_json(out_dir / MANIFEST)
    found = manifest.get("format")
    if found == format:
        return manifest
    kind = str(found).partition("@")[0]
    if kind != format.partition("@")[0]:  # another stage's output (of any version), not an older one
        raise error(
            f"{out_dir}: holds {kind.removeprefix('fusion-train/')} (format {found!r}), "
            f"not the output of `fusion-train {command}` ({format!r}) that is needed here; pass the --out "
            f"directory of `fusion-train {command}`."
        )
    raise error(
        f"{out_dir}: format {found!r}, this version reads {format!r}; "
        f"run `fusion-train {command}` again into a new --out directory."
    )


def load_parts(out_dir: Path, num_parts: int, command: str, error: type[UserError]) -> list[datasets.Dataset]:
    """Every part's rows, in order (memory-mapped); parts without rows are left out."""
    missing = [c for c in range(num_parts) if not part_path(out_dir, c).exists()]
    if missing:
        raise error(
            f"{out_dir}: {len(missing)} of {num_parts} parts are missing (first: {missing[0]}); rerun "
            f"`fusion-train {command}` with the same arguments (every shard) to finish it."
        )
    parts = [_load_part(part_path(out_dir, c), command, error) for c in range(num_parts)]
    return [part for part in parts if part is not None]


def load_output(
    out_dir: Path, format: str, command: str, error: type[UserError]
) -> tuple[dict[str, Any], datasets.Dataset]:
    """The manifest and all rows of a finished ``command`` output, in part order."""
    manifest = read_manifest(out_dir, format, command, error)
    rows = load_parts(out_dir, manifest["num_parts"], command, error)
    if not rows:
        raise error(f"{out_dir}: no rows in any part; see {out_dir / 'summary.json'} for what was skipped.")
    return manifest, datasets.concatenate_datasets(rows)


def _load_part(part: Path, command: str, error: type[UserError]) -> datasets.Dataset | None:
    """One part's rows; None for a part without rows (``datasets`` saves an empty data set
    without any Arrow file, and cannot read it back)."""
    if (part / "data").is_dir() and not any((part / "data").glob("*.arrow")):
        return None
    try:
        return datasets.load_from_disk(str(part / "data"))
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise error(
            f"{part}: unreadable ({type(exc).__name__}: {exc}); delete this part and rerun "
            f"`fusion-train {command}` with the same arguments, which writes it again."
        ) from exc
