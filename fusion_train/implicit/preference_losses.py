"""The preference losses of ``fusion-train dpo --loss`` and a recipe's ``dpo.loss``, one
:class:`PreferenceLoss` each, in ``LOSSES``.

Everything that differs by loss is declared here and nowhere else; the rest is derived from
``LOSSES``: the ``--loss`` choices and the defaults that ``--beta`` and ``--learning-rate`` list
with their sources, ``DPOSettings``' checks and defaults, the columns read from ``pairs/``, the
TRL config and trainer of a run, the metrics its summary records, and in a recipe the trained
model's name, the loss each ``prefer.mode`` defaults to and the checks made before anything runs.
Adding a loss that TRL's DPOTrainer computes is one declaration below (``ipo`` and ``hinge`` are);
a loss with a formula of its own also needs its trainer, in ``preference_trainers``.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import DPOTrainer

from fusion_train.implicit.preference_trainers import LengthNormalisedDPOTrainer, WRPOTrainer
from fusion_train.registries import by_name

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# What TRL's DPOTrainer logs of the rewards beta r(y), r(y) = log pi(y|x) - log pi_ref(y|x) summed.
TRL_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass(frozen=True)
class LossSetting:
    """A setting that one loss has beyond beta (WRPO's ``alpha_max``): ``dpo.DPOSettings`` and the
    recipe's ``DPOStage`` hold it in a field of its name, None unless that loss runs."""

    name: str  # the field; its flag is --name-with-dashes
    default: float
    low: float  # the closed range it must lie in
    high: float
    help: str  # what it does, for --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss: how TRL trains with it, its defaults and where they come from, and what it needs."""

    name: str  # --loss, dpo.loss
    title: str  # what it is, in --help and errors
    trainer: type[DPOTrainer]
    loss_type: str  # DPOConfig.loss_type (a trainer of its own ignores it, or checks it)
    beta: float
    learning_rate: float  # the peak; the papers give theirs for a global batch of 128
    source: str  # where beta and the learning rate come from, in --help
    model_name: str  # the trained model's name in a recipe's folders and reports
    columns: tuple[str, ...] = PAIR_COLUMNS  # of prefer's pairs/
    pairs_of: str | None = None  # the `prefer --mode` whose pairs it needs; None: any mode's
    default_of: tuple[str, ...] = ()  # the prefer modes whose recipes train with it unless told
    settings: tuple[LossSetting, ...] = ()
    metrics: tuple[str, ...] = TRL_REWARDS  # logged metrics a run's summary records


def registry(*losses: PreferenceLoss) -> dict[str, PreferenceLoss]:
    """The losses by name; a name, model name, prefer mode's default or setting declared twice is
    refused (the later declaration would silently replace the earlier)."""
    return by_name(
        "preference losses",
        losses,
        [loss.model_name for loss in losses],
        [mode for loss in losses for mode in loss.default_of],
        [setting.name for loss in losses for setting in loss.settings],
    )


LOSSES = registry(
    PreferenceLoss(
        "sigmoid",
        "DPO",
        DPOTrainer,
        "sigmoid",
        beta=0.01,
        learning_rate=3e-7,
        # Qwen-2.5-7B's; Gemma-2-9B's is the same beta at lr 5e-7
        source="FuseChat-3.0, Qwen-2.5; Gemma-2: lr 5e-7",
        model_name="implicit-dpo",
    ),
    PreferenceLoss(
        # TRL's loss, by a trainer that logs the length-normalised rewards it compares
        "sigmoid_norm",
        "length-normalised DPO (FuseChat-3.0's for Llama)",
        LengthNormalisedDPOTrainer,
        "sigmoid_norm",
        beta=10.0,
        learning_rate=8e-7,
        source="FuseChat-3.0, Llama-3.1",
        model_name="implicit-dpo-norm",
        default_of=("fusechat3",),
        metrics=(*TRL_REWARDS, "summed_rewards/margins", "summed_rewards/accuracies"),
    ),
    PreferenceLoss(
        "wrpo",
        "WRPO",
        WRPOTrainer,
        "sigmoid",
        beta=0.01,
        learning_rate=3e-7,
        source="WRPO",
        model_name="implicit-wrpo",
        columns=(*PAIR_COLUMNS, "chosen_source"),
        pairs_of="wrpo",
        default_of=("wrpo",),
        settings=(
            LossSetting(
                "alpha_max", 0.1, 0.0, 1.0, "the weight of the source's response at the end of training"
            ),
        ),
        metrics=(
            *TRL_REWARDS,
            "rewards/chosen_source",
            "rewards/weighted_chosen",
            "rewards/weighted_margins",
            "rewards/weighted_accuracies",
            "wrpo/alpha",
        ),
    ),
    PreferenceLoss(
        # arXiv 2310.12036, eq. 17: (h - 1/(2 tau))^2, beta as tau. TRL's h is the margin of the
        # per-token mean log-ratios (checked with the IPO authors, TRL says); its rewards/* are
        # beta times the summed ones, which can rank a pair otherwise than h does.
        "ipo",
        "IPO, on per-token mean log-ratios as TRL computes it",
        DPOTrainer,
        "ipo",
        beta=0.1,
        learning_rate=1e-6,
        source="TRL's DPOConfig defaults; the paper gives none",
        model_name="implicit-ipo",
    ),
    PreferenceLoss(
        # max(0, 1 - beta (r(y_w) - r(y_l))): SLiC's (arXiv 2305.10425) margin 1/beta on the
        # log-ratios, as RSO (arXiv 2309.06657) writes it; SLiC-HF itself compares policy log-probs
        "hinge",
        "SLiC's hinge loss on the log-ratios",
        DPOTrainer,
        "hinge",
        beta=0.1,
        learning_rate=1e-6,
        source="TRL's DPOConfig defaults",
        model_name="implicit-hinge",
    ),
)

SETTINGS = {setting.name: (setting, loss) for loss in LOSSES.values() for setting in loss.settings}
DEFAULT_LOSS = {mode: loss.name for loss in LOSSES.values() for mode in loss.default_of}  # by prefer mode
