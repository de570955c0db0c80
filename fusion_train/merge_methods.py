"""The merge methods a recipe's ``merge.methods`` lists and ``varm-merge config NAME`` fills, one
:class:`MergeMethod` each, in ``MERGE_METHODS``.

A method's mergekit config is ``merge_configs/<name>.yml`` (placeholders for the pivot and the
targets); its declaration says how many targets it merges and what a run analyses after it. The
recipe's check and default ``merge.methods``, the stages ``fusion-train run`` merges in and the
report's figures, and ``varm-merge config``'s shipped names are derived from ``MERGE_METHODS``.
Adding a method that mergekit has is its YAML in ``merge_configs/`` and one declaration below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fusion_train.registries import by_name

CONFIG_DIR = Path(str(resources.files("merge_configs")))


def varm_weights(pivot: str, targets: list[str], out: Path) -> None:
    """VaRM's weight of each target per matrix, and their heatmap (``varm-merge weights``)."""
    from varm_merge.weights import analyse  # mergekit and torch load only when a run merges

    analyse(pivot, targets, out)


@dataclass(frozen=True)
class MergeAnalysis:
    """What a run learns from the targets beyond a merged model (VaRM: which target gets the say over
    which matrix): it runs once per set of targets, after the merges, and the report shows its figure."""

    stage: str  # the stage's folder, merge/<stage>-<key>
    run: Callable[[str, list[str], Path], object]  # (pivot, targets, the folder to write into)
    figure: str  # the file in that folder the report shows
    title: str  # the report's heading above it


@dataclass(frozen=True)
class MergeMethod:
    """One method: its config, the number of targets it merges and the analysis run after it."""

    name: str  # merge_configs/<name>.yml; merge.methods; the stage merge/<name> and the model merge-<name>
    title: str  # what it is, in `varm-merge config --help`
    targets: int | None = None  # how many targets it merges (slerp interpolates two); None: any number
    by_default: bool = True  # merged unless a recipe lists its merge.methods
    analysis: MergeAnalysis | None = None

    @property
    def config(self) -> Path:
        return CONFIG_DIR / f"{self.name}.yml"


def registry(*methods: MergeMethod) -> dict[str, MergeMethod]:
    """The methods by name; a name or an analysis's stage declared twice is refused."""
    return by_name("merge methods", methods, [m.analysis.stage for m in methods if m.analysis])


MERGE_METHODS = registry(
    MergeMethod(
        "varm",
        "VaRM, FuseChat's Variation Ratio Merge",
        analysis=MergeAnalysis("varm-weights", varm_weights, "varm_weights.png", "VaRM weights per matrix"),
    ),
    MergeMethod("task_arithmetic", "task arithmetic"),
    MergeMethod("ties", "TIES"),
    MergeMethod("slerp", "spherical interpolation of two targets", targets=2),
    MergeMethod("sce", "FuseChat-2.0's SCE"),
    MergeMethod("linear", "the targets' weighted average"),
    # drops task-vector entries at random, and a run's merges pass no `--random-seed`
    MergeMethod("dare_linear", "DARE, linear", by_default=False),
)
DEFAULT_MERGE_METHODS = tuple(name for name, method in MERGE_METHODS.items() if method.by_default)
