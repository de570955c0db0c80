"""VaRM (Variation Ratio Merge) as a mergekit 0.1.5 merge method named ``varm``.

For each tensor (or group of tensors) and each fine-tuned model k, with the base (pivot) theta_0:
``delta_k = theta_k - theta_0``, ``s_k = mean(delta_k ** 2)``, ``w_k = p_k s_k / sum_j p_j s_j``
and the merged tensor is ``theta_0 + sum_k w_k delta_k``; ``p_k`` is the per-model ``weight`` prior.
mergekit calls the kernel one output tensor at a time, so the merge stays lazy and out-of-core.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import Annotated, Any, Literal

import torch
from mergekit.merge_methods import register, registered_methods
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from pydantic import Field

LOG = logging.getLogger(__name__)

Granularity = Literal["matrix", "element", "layer", "model"]
#: Granularities whose scores span several tensors and so come from an analysis pass.
GROUPED_GRANULARITIES = ("layer", "model")
DEFAULT_EPSILON = 1e-30
STATISTICS_FORMAT = "varm-statistics/1"

_warned_uniform = False


def warn_uniform_once(what: str) -> None:
    """All-zero deltas are legitimate (an untouched matrix) but worth one line, not thousands."""
    global _warned_uniform
    if not _warned_uniform:
        _warned_uniform = True
        LOG.warning(
            "VaRM: %s has (near-)zero deltas in every model; using the normalised priors "
            "(uniform by default). Further such tensors are not reported.",
            what,
        )


def check_priors(priors: Sequence[float], what: str) -> torch.Tensor:
    """Negative priors would make weights that no longer form a convex combination."""
    p = torch.tensor(list(priors), dtype=torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"VaRM: {what}: priors (`weight`) must be finite, >= 0 and not all 0; got {priors}")
    return p


def variation_weights(
    scores: Sequence[float] | torch.Tensor, priors: torch.Tensor, epsilon: float, what: str
) -> torch.Tensor:
    """w_k = p_k s_k / sum_j p_j s_j, or p / sum(p) when the prior-weighted mean score <= epsilon."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    total = (priors * s).sum()
    if total <= epsilon * priors.sum():
        warn_uniform_once(what)
        return priors / priors.sum()
    return priors * s / total


def mean_square(delta: torch.Tensor) -> float:
    """mean(delta^2) without materialising delta^2: one reduction in the tensor's own dtype.

    (Asking vector_norm for a float64 result is 20x slower on CPU.)
    """
    if delta.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(delta).item() ** 2 / delta.numel()


def check_finite(score: float, tensor_name: str, model: Hashable) -> None:
    if score != score or score == float("inf"):
        raise ValueError(
            f"VaRM: tensor {tensor_name!r}: NaN or Inf in the delta of model {model} "
            "(that model or the base checkpoint holds non-finite values)"
        )


@lru_cache(maxsize=4)
def _load_statistics(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if data.get("format") != STATISTICS_FORMAT:
        raise ValueError(f"VaRM: {path} is not a VaRM statistics file (format {data.get('format')!r})")
    return data


def load_statistics(path: str) -> dict[str, Any]:
    """Parsed once per file version: the kernel runs once per tensor."""
    stat = os.stat(path)
    return _load_statistics(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


def stored_scores(
    statistics: str | None, granularity: str, tensor_name: str, models: Sequence[Hashable]
) -> list[float]:
    """Group scores (layer- or model-wide mean squared deltas) written by the analysis pass."""
    if not statistics:
        raise ValueError(
            f"VaRM: granularity {granularity!r} needs scores across tensors: merge with "
            "`varm-merge run` (it runs the analysis pass when `granularity` is set under the "
            "top-level `parameters`), or run `varm-merge weights --granularity "
            f"{granularity} ...` and set `statistics:` to its varm_weights.json"
        )
    data = load_statistics(statistics)
    if data["granularity"] != granularity:
        raise ValueError(
            f"VaRM: {statistics} holds {data['granularity']!r} statistics, the config asks for "
            f"{granularity!r}"
        )
    entry = data["tensors"].get(tensor_name)
    if entry is None:
        raise ValueError(f"VaRM: tensor {tensor_name!r} is missing from the statistics file {statistics}")
    index = {name: i for i, name in enumerate(data["models"])}
    missing = [str(m) for m in models if str(m) not in index]
    if missing:
        raise ValueError(
            f"VaRM: models {missing} are not in the statistics file {statistics} "
            f"(it has {data['models']}); rerun the analysis for this config"
        )
    return [entry["scores"][index[str(m)]] for m in models]


def _element_delta(
    deltas: list[torch.Tensor], priors: torch.Tensor, epsilon: float, name: str
) -> torch.Tensor:
    """Per-element weights: w_k = p_k d_k^2 / sum_j p_j d_j^2, priors where that sum is ~0.

    Priors stay Python floats so the same code runs on any device.
    """
    p = priors.tolist()
    p_sum = sum(p)
    total = torch.zeros_like(deltas[0])
    for pk, d in zip(p, deltas, strict=True):
        total.addcmul_(d, d, value=pk)
    fallback = total <= epsilon * p_sum
    if fallback.all() and deltas[0].numel() > 0:
        warn_uniform_once(f"tensor {name!r}")
    total.masked_fill_(fallback, 1.0)
    merged = torch.zeros_like(total)
    for pk, d in zip(p, deltas, strict=True):
        weight = torch.where(fallback, pk / p_sum, d * d * (pk / total))
        merged.addcmul_(weight, d)
    return merged


@merge_method(
    name="varm",
    pretty_name="VaRM (Variation Ratio Merge)",
    reference_url="https://arxiv.org/abs/2402.16107",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def varm_merge(
    group: TensorGroup,
    weight: PerNonBase[Annotated[float, Field(ge=0)]] = 1.0,
    granularity: Granularity = "matrix",
    epsilon: Annotated[float, Field(ge=0)] = DEFAULT_EPSILON,
    statistics: str | None = None,
) -> torch.Tensor:
    """Merge one tensor: the base plus the variation-ratio-weighted deltas of the other models."""
    base = group.base.tensor
    entries = group.non_base
    name = group.metadata.name or "<unnamed tensor>"
    if not base.is_floating_point() or not all(e.tensor.is_floating_point() for e in entries):
        raise TypeError(f"VaRM: tensor {name!r} is not floating point; VaRM merges weights only")
    priors = check_priors(weight.values_for(entries), f"tensor {name!r}")
    work_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    # A fresh copy (kernels must not write to their inputs) that becomes the result.
    merged = base.to(work_dtype, copy=True)
    deltas, scores = [], []
    for entry in entries:
        deltas.append(entry.tensor.to(work_dtype, copy=True).sub_(merged))
        scores.append(mean_square(deltas[-1]))
        check_finite(scores[-1], name, entry.id)

    if granularity == "element":
        merged.add_(_element_delta(deltas, priors, epsilon, name))
    else:
        if granularity in GROUPED_GRANULARITIES:
            scores = stored_scores(statistics, granularity, name, [e.id for e in entries])
        weights = variation_weights(scores, priors, epsilon, f"tensor {name!r}")
        for w, delta in zip(weights.tolist(), deltas, strict=True):
            merged.add_(delta, alpha=w)
    return merged.to(base.dtype)


def ensure_registered() -> None:
    """mergekit has no plugin entry point: each process must register `varm` before planning."""
    if all(m.spec.name != varm_merge.spec.name for m in registered_methods()):
        register(varm_merge)
