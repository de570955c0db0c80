"""The VaRM analysis pass: per-tensor variation statistics and weights, streamed from safetensors.

It reads every model once, one tensor at a time, and writes what the merge would use:
- ``varm_weights.json`` (also the ``statistics:`` file that layer/model granularity merges read),
- ``varm_weights.csv`` (one row per tensor per model),
- ``varm_weights.png`` (heatmap: layers x matrix types, one panel per model).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from varm_merge.method import (
    DEFAULT_EPSILON,
    STATISTICS_FORMAT,
    check_finite,
    check_priors,
    mean_square,
    variation_weights,
)

REPORT_GRANULARITIES = ("matrix", "layer", "model")
JSON_NAME, CSV_NAME, PNG_NAME = "varm_weights.json", "varm_weights.csv", "varm_weights.png"
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def check_granularity(granularity: str) -> None:
    if granularity not in REPORT_GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {REPORT_GRANULARITIES} (element weights are per parameter "
            f"and are not reported); got {granularity!r}"
        )


def split_name(name: str) -> tuple[int | None, str]:
    """(layer index, matrix type): ``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj.weight``)."""
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def group_of(name: str, granularity: str) -> str:
    """Tensors sharing a group share scores; tensors outside numbered layers are their own group."""
    if granularity == "model":
        return "model"
    layer, _ = split_name(name)
    if granularity == "layer" and layer is not None:
        return f"layer {layer}"
    return name


class Checkpoint:
    """Lazy access to one safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path, stack: ExitStack):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.path}: no .safetensors files (VaRM reads safetensors only, never pickles)"
            )
        self._handles = {f: stack.enter_context(safe_open(self.path / f, framework="pt")) for f in files}
        self.files: dict[str, str] = {}
        for f, handle in self._handles.items():
            self.files.update(dict.fromkeys(handle.keys(), f))

    def names(self) -> list[str]:
        """Tensor names grouped by shard, so reading follows the files."""
        return sorted(self.files, key=lambda n: (self.files[n], n))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{self.path}: tensor {name!r} is missing")
        return self._handles[self.files[name]].get_tensor(name)


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    sum_sq: list[float]  # sum of squared deltas, one per model

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def stream_statistics(base: str | Path, models: Sequence[str | Path]) -> tuple[list[TensorStats], list[str]]:
    """One pass over all checkpoints: sums of squared deltas per floating tensor and model.

    Returns the statistics and the names of non-floating tensors (buffers), which VaRM leaves to
    mergekit (it copies them when all models agree).
    """
    stats: list[TensorStats] = []
    skipped: list[str] = []
    with ExitStack() as stack:
        base_ckpt = Checkpoint(base, stack)
        ckpts = [Checkpoint(m, stack) for m in models]
        for name in base_ckpt.names():
            b = base_ckpt.get(name)
            if not b.is_floating_point():
                skipped.append(name)
                continue
            b = b.to(torch.float64 if b.dtype == torch.float64 else torch.float32)
            sums = []
            for ckpt in ckpts:
                t = ckpt.get(name)
                if t.shape != b.shape:
                    raise ValueError(
                        f"VaRM: tensor {name!r} has shape {tuple(t.shape)} in {ckpt.path} but "
                        f"{tuple(b.shape)} in the base. The analysis pass needs equal shapes; for "
                        "vocabulary-resized models merge with `granularity: matrix` and a mergekit "
                        "`tokenizer:` setting"
                    )
                if not t.is_floating_point():
                    raise TypeError(
                        f"VaRM: tensor {name!r} is {t.dtype} in {ckpt.path} but floating in the base"
                    )
                score = mean_square(t.to(b.dtype) - b)
                check_finite(score, name, ckpt.path)
                sums.append(score * b.numel())
            stats.append(TensorStats(name=name, shape=tuple(b.shape), sum_sq=sums))
    return stats, skipped


def group_scores(stats: Sequence[TensorStats], granularity: str) -> dict[str, list[float]]:
    """Element-weighted mean squared delta per group: sum of squares over the group / its size."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for s in stats:
        g = group_of(s.name, granularity)
        acc = sums.setdefault(g, [0.0] * len(s.sum_sq))
        sums[g] = [a + x for a, x in zip(acc, s.sum_sq, strict=True)]
        counts[g] = counts.get(g, 0) + s.numel
    return {g: [x / counts[g] if counts[g] else 0.0 for x in v] for g, v in sums.items()}


def build_report(
    stats: Sequence[TensorStats],
    skipped: Sequence[str],
    *,
    base: str,
    models: Sequence[str],
    granularity: str = "matrix",
    priors: Sequence[float] | None = None,
    epsilon: float = DEFAULT_EPSILON,
) -> dict[str, Any]:
    """The JSON document: per tensor, its own mean squared deltas, its group's scores and weights."""
    check_granularity(granularity)
    priors = [1.0] * len(models) if priors is None else list(priors)
    if len(priors) != len(models):
        raise ValueError(f"{len(priors)} priors for {len(models)} models")
    p = check_priors(priors, "analysis")
    scores = group_scores(stats, granularity)
    tensors = {}
    for s in stats:
        g = group_of(s.name, granularity)
        layer, matrix = split_name(s.name)
        tensors[s.name] = {
            "shape": list(s.shape),
            "layer": layer,
            "matrix": matrix,
            "group": g,
            "mean_sq_delta": [x / s.numel if s.numel else 0.0 for x in s.sum_sq],
            "scores": scores[g],
            "weights": variation_weights(scores[g], p, epsilon, f"group {g!r}").tolist(),
        }
    return {
        "format": STATISTICS_FORMAT,
        "granularity": granularity,
        "epsilon": epsilon,
        "base": base,
        "models": list(models),
        "priors": priors,
        "skipped_non_floating": list(skipped),
        "tensors": tensors,
    }


def csv_rows(report: dict[str, Any]) -> Iterator[list[Any]]:
    yield ["tensor", "layer", "matrix", "group", "model", "mean_sq_delta", "score", "prior", "weight"]
    for name, t in report["tensors"].items():
        for k, model in enumerate(report["models"]):
            layer = "" if t["layer"] is None else t["layer"]
            yield [
                name,
                layer,
                t["matrix"],
                t["group"],
                model,
                t["mean_sq_delta"][k],
                t["scores"][k],
                report["priors"][k],
                t["weights"][k],
            ]


def distinct_names(paths: list[str]) -> list[str]:
    """The shortest trailing parts of each path that tell the models apart (``a/model``, ``b/model``)."""
    parts = [Path(p).parts or (p,) for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return paths


def plot_heatmap(report: dict[str, Any], path: Path) -> bool:
    """Layers x matrix types, one panel per model; False when no tensor sits in a numbered layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tensors = report["tensors"].values()
    layered = [(t["layer"], t["matrix"], t["weights"]) for t in tensors if t["layer"] is not None]
    if not layered:
        return False
    layers = sorted({layer for layer, _, _ in layered})
    matrices = list(dict.fromkeys(m for _, m, _ in layered))
    n_models = len(report["models"])
    grid = np.full((n_models, len(layers), len(matrices)), np.nan)
    for layer, matrix, weights in layered:
        grid[:, layers.index(layer), matrices.index(matrix)] = weights

    width = max(4.0, 0.5 * len(matrices) + 1.5)
    height = max(3.0, 0.18 * len(layers) + 2.0)
    fig, axes = plt.subplots(1, n_models, figsize=(width * n_models, height), squeeze=False)
    labels = [m.removesuffix(".weight") for m in matrices]
    titles = distinct_names([str(m) for m in report["models"]])
    for k, ax in enumerate(axes[0]):
        image = ax.imshow(grid[k], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(titles[k], fontsize=9)
        ax.set_xticks(range(len(matrices)), labels, rotation=60, ha="right", fontsize=7)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"VaRM weight ({report['granularity']})")
    fig.suptitle("VaRM weights per layer and matrix type")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: str | Path, heatmap: bool = True) -> dict[str, Path]:
    """Write JSON, CSV and (optionally) the heatmap; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / JSON_NAME, "csv": out / CSV_NAME}
    written["json"].write_text(json.dumps(report, indent=1), encoding="utf-8")
    with open(written["csv"], "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(csv_rows(report))
    if heatmap and plot_heatmap(report, out / PNG_NAME):
        written["png"] = out / PNG_NAME
    return written


def analyse(
    base: str,
    models: Sequence[str],
    out_dir: str | Path,
    *,
    granularity: str = "matrix",
    priors: Sequence[float] | None = None,
    epsilon: float = DEFAULT_EPSILON,
    local_paths: dict[str, str] | None = None,
    heatmap: bool = True,
) -> dict[str, Path]:
    """Stream the checkpoints once and write the report; `local_paths` maps model keys to directories."""
    check_granularity(granularity)
    local = local_paths or {}
    stats, skipped = stream_statistics(local.get(base, base), [local.get(m, m) for m in models])
    report = build_report(
        stats, skipped, base=base, models=models, granularity=granularity, priors=priors, epsilon=epsilon
    )
    return write_report(report, out_dir, heatmap=heatmap)
