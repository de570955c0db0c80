"""Memory of a recipe run in one process, stage by stage: what each stage leaves behind.

Recipes run their stages in one process (training included), so whatever a stage keeps alive
(models, trainers, engines, caches, DeepSpeed/accelerate state, mergekit's loaders) adds up from
stage to stage. This runs the demo's models and data as a ``method: both`` recipe (the explicit and
the implicit stages, quick size unless ``--default-size``) in this process and records, for every
stage, the peak resident memory while it ran and the memory the process still holds after it
(after a garbage collection and returning freed heap pages to the system), against the process
before the first stage. Results: a table on stdout and ``OUT/stage_memory.json``.

    python bench/stage_memory.py [--out runs/bench-stage-memory] [--default-size]
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import psutil

from fusion_train import pipeline
from fusion_train.demo import demo_recipe, implicit_demo_recipe
from fusion_train.recipe import parse_recipe
from fusion_train.stages import Stages

GIB = 2**30


def settled_rss() -> int:
    """Resident memory once garbage is collected and glibc has returned its free pages."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the figure includes free heap pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


class PeakSampler:
    """The largest resident memory of this process seen since ``reset`` (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss


class StageMemory:
    """Wraps the recipe's stage calls and records each stage's peak and retained memory."""

    def __init__(self) -> None:
        self.sampler = PeakSampler()
        self.baseline = settled_rss()
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def measure(self, label: str) -> Iterator[None]:
        self.sampler.reset()
        started = time.perf_counter()
        yield
        retained = settled_rss()
        self.rows.append({"stage": label, "seconds": round(time.perf_counter() - started, 1),
                          "peak_gib": self.sampler.peak / GIB, "retained_gib": retained / GIB,
                          "retained_over_start_gib": (retained - self.baseline) / GIB})  # fmt: skip
        row = self.rows[-1]
        click.echo(f"  [memory] {label}: peak {row['peak_gib']:.2f} GiB, after {row['retained_gib']:.2f} GiB "
                   f"({row['retained_over_start_gib']:+.2f} over the start)")  # fmt: skip

    def wrap(self, label_of: Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.measure(label_of(*args, **kwargs)):
                return function(*args, **kwargs)

        return measured


def both_recipe(out: Path, quick: bool) -> dict[str, Any]:
    """The demo's explicit and implicit recipes as one ``method: both`` recipe."""
    return {**demo_recipe(out, quick), **implicit_demo_recipe(out, quick), "method": "both"}


@click.command()
@click.option("--out", "out_dir", default="runs/bench-stage-memory", type=click.Path(file_okay=False))
@click.option("--default-size", is_flag=True, help="The demo's default size instead of its quick one.")
def main(out_dir: str, default_size: bool) -> None:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = parse_recipe(both_recipe(out, not default_size), base=out, default_run_dir=out)
    memory = StageMemory()
    original_run = Stages.run
    Stages.run = memory.wrap(lambda self, stage, name, *a, **k: f"{stage}/{name}", original_run)
    pipeline.evaluate = memory.wrap(lambda *a, **k: "evaluate", pipeline.evaluate)
    try:
        pipeline.run_pipeline(recipe)
    finally:
        Stages.run = original_run
    end = settled_rss()
    result = {"baseline_gib": memory.baseline / GIB, "end_gib": end / GIB, "stages": memory.rows,
              "peak_gib": max(r["peak_gib"] for r in memory.rows),
              "largest_retained_over_start_gib": max(r["retained_over_start_gib"] for r in memory.rows)}  # fmt: skip
    (out / "stage_memory.json").write_text(json.dumps(result, indent=2))
    click.echo(f"\nprocess at start: {memory.baseline / GIB:.2f} GiB, at the end: {end / GIB:.2f} GiB")
    click.echo("| stage | seconds | peak GiB | after GiB | over start GiB |\n|---|---:|---:|---:|---:|")
    for r in memory.rows:
        click.echo(f"| {r['stage']} | {r['seconds']} | {r['peak_gib']:.2f} | {r['retained_gib']:.2f} | "
                   f"{r['retained_over_start_gib']:+.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
