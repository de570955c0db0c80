"""Float comparisons that hold on any CPU, kernel set and thread count.

The same float computation gives different bits on different machines: the vector width (AVX-512,
AVX2, or PyTorch's generic kernels under ``ATEN_CPU_CAPABILITY=default``) and the number of threads
change the order in which sums are accumulated. Reordering a sum changes it by a few rounding units
*of its largest terms*, so an element near zero can be off by as much as a large one: an
element-wise relative tolerance, or an absolute epsilon picked on one machine, passes there and
fails on the next. Every float comparison in the tests therefore bounds the largest difference by

    ulps x (the dtype's rounding unit) x (the scale of the tensor compared: its largest magnitude)

with ``ulps`` saying how many roundings the computation may accumulate. Integers and ids are
compared exactly, never through here. ``make test-portability`` runs the numeric tests natively,
with one thread and with generic kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

# Two evaluations of the same formula in different summation orders: sums over up to a few
# thousand terms (a hidden size, a chunk of the vocabulary, the tokens of a batch) drift by a few
# rounding units each, and a gradient compounds a few such sums. 64 units of float32 is 7.6e-6 of
# the tensor's largest element: far below any error a wrong formula, mask or scale produces.
DEFAULT_ULPS = 64


def rounding_unit(dtype: torch.dtype | np.dtype | str) -> float:
    """The spacing of the dtype's numbers just above 1 (float32: 2**-23, bf16: 2**-7)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def _as_float64(values: object) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def scale_of(values: object) -> float:
    """The largest finite magnitude (0 for an empty or all-infinite tensor)."""
    tensor = _as_float64(values)
    finite = tensor[torch.isfinite(tensor)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def rounding_bound(scale: float, dtype: torch.dtype | np.dtype | str, ulps: float = DEFAULT_ULPS) -> float:
    """How far two evaluations of a value of magnitude ``scale`` may differ in ``dtype``."""
    return ulps * rounding_unit(dtype) * scale


def assert_close_at_scale(
    actual: object,
    expected: object,
    *,
    dtype: torch.dtype | np.dtype | str,
    ulps: float = DEFAULT_ULPS,
    scale: float | None = None,
    msg: str = "",
) -> None:
    """``max |actual - expected| <= ulps x rounding_unit(dtype) x scale``; ``scale`` defaults to the
    largest magnitude of either tensor (a reference rounded to zero must not shrink the bound).
    ``dtype`` is the precision the values were computed in, not the one they are stored in: a
    float32 result cast to float64 still carries float32 rounding. Non-finite elements must sit at
    the same places with the same values."""
    ours, theirs = _as_float64(actual), _as_float64(expected)
    where = f"{msg}: " if msg else ""
    assert ours.shape == theirs.shape, f"{where}shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    finite = torch.isfinite(theirs)
    assert torch.equal(finite, torch.isfinite(ours)), f"{where}non-finite elements at other places"
    assert torch.equal(ours[~finite], theirs[~finite]), f"{where}non-finite elements differ"
    if scale is None:
        scale = max(scale_of(ours), scale_of(theirs))
    bound = rounding_bound(scale, dtype, ulps)
    difference = float((ours[finite] - theirs[finite]).abs().max()) if finite.any() else 0.0
    assert difference <= bound, (
        f"{where}largest difference {difference:.3g} > {ulps} x {dtype} rounding x scale {scale:.3g} "
        f"= {bound:.3g}"
    )


def approx_at_scale(
    expected: float | Sequence[float],
    *,
    dtype: torch.dtype | np.dtype | str,
    ulps: float = DEFAULT_ULPS,
    scale: float | None = None,
) -> object:
    """``pytest.approx`` for scalars (or lists) with the same bound; ``scale`` defaults to the
    largest magnitude in ``expected`` (pass the operands' scale for a difference of two values)."""
    if scale is None:
        scale = scale_of(expected)
    return pytest.approx(expected, rel=0, abs=rounding_bound(scale, dtype, ulps))


def assert_stored_close(
    actual: object, expected: object, *, stored: np.dtype | str, computed: torch.dtype | str, ulps: float
) -> None:
    """Values computed in ``computed`` precision and stored rounded to ``stored`` (e.g. float16 log
    probabilities): a computation difference at the column's scale can move a value across a
    rounding boundary of the stored format, so each element may also differ by one stored step of
    its own magnitude."""
    ours, theirs = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert ours.shape == theirs.shape
    finite = np.isfinite(theirs)
    assert (np.isfinite(ours) == finite).all() and (ours[~finite] == theirs[~finite]).all()
    step = np.spacing(np.abs(theirs[finite]).astype(stored)).astype(np.float64)
    computation = rounding_bound(max(scale_of(ours), scale_of(theirs)), computed, ulps)
    excess = np.abs(ours[finite] - theirs[finite]) - (step + computation)
    assert (excess <= 0).all(), f"{int((excess > 0).sum())} values beyond one stored step + rounding"


def adam_update_bound(dtype: torch.dtype | str = torch.float32, ulps: float = DEFAULT_ULPS) -> float:
    """The relative agreement of two Adam runs whose gradients differ by rounding (see below); it
    also bounds the relative difference of what the runs compute from their weights (losses)."""
    return float(np.sqrt(rounding_bound(1.0, dtype, ulps)))


def assert_same_adam_updates(
    trained: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | str = torch.float32,
    ulps: float = DEFAULT_ULPS,
) -> None:
    """Two runs of Adam from the same weights whose gradients differ by rounding: their updates
    (trained - initial) agree per tensor in norm, ``|du - du_ref| <= sqrt(ulps x rounding) |du_ref|``.

    Adam divides each gradient by its own running scale, so a rounding difference ``d`` (at the
    scale of the tensor's gradient ``G``) changes a weight's update by about ``d/|g|`` of a step,
    capped at a whole step: elements whose gradient lies within ``d`` of zero (a share of about
    ``d/G``) may take any update. They dominate the norm of the difference, which is about
    ``sqrt(d/G)`` of the update's norm; an element-wise bound cannot hold on another machine."""
    bound = adam_update_bound(dtype, ulps)
    for name, start in initial.items():
        ours = trained[name].double() - start.double()
        theirs = reference[name].double() - start.double()
        norm = float(theirs.norm())
        difference = float((ours - theirs).norm())
        assert difference <= bound * norm, (
            f"{name}: updates differ by {difference:.3g} = {difference / max(norm, 1e-300):.3g} of their "
            f"norm {norm:.3g} (bound {bound:.3g})"
        )


# The representation's columns computed in float32 and stored rounded (docs/formats.md); the others
# (ids, byte offsets, counts) are integers and compare exactly.
STORED_FLOAT_COLUMNS = {"topk_logprobs": "float16", "target_logprob": "float16", "nll": "float64"}


def assert_same_representation(ours: object, reference: object, ulps: float = DEFAULT_ULPS) -> None:
    """Two representations of the same data by the same model, computed with other kernels or
    thread counts (e.g. on launched ranks): integer columns equal, float columns up to float32
    rounding at each column's scale (and one step of their stored format)."""
    ours_rows, reference_rows = ours.to_dict(), reference.to_dict()
    assert ours_rows.keys() == reference_rows.keys()
    for column, values in reference_rows.items():
        if column not in STORED_FLOAT_COLUMNS:
            assert ours_rows[column] == values, column
            continue
        flat = [_flatten(v) for v in (ours_rows[column], values)]
        assert_stored_close(*flat, stored=STORED_FLOAT_COLUMNS[column], computed="float32", ulps=ulps)


def _flatten(values: object) -> np.ndarray:
    """A column of (ragged, nested) lists of floats as one flat array."""
    if isinstance(values, list | tuple):
        return np.concatenate([_flatten(v) for v in values]) if values else np.zeros(0)
    return np.asarray(values, dtype=np.float64).ravel()
