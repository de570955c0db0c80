"""The ``fusion-train`` command: one sub-command per pipeline stage.

Each stage module keeps its work in a plain function and its click command next to it; this
file only collects the commands, so ``fusion-train --help`` lists every stage, and imports a
stage's module only when its command runs.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from fusion_train import __version__
from fusion_train.errors import Group

# Each stage's command, as "module:attribute". A command's module, and what it imports
# (transformers' Trainer, TRL, mergekit, ...), is imported when that command runs or help lists
# the commands, not on every start: `fusion-train align` need not load the trainers.
COMMANDS = {
    "represent": "fusion_train.represent:represent_command",
    "align": "fusion_train.align:align_command",
    "fuse": "fusion_train.fuse:fuse_command",
    "train": "fusion_train.train:train_command",
    "evaluate": "fusion_train.evaluate:evaluate_command",
    "run": "fusion_train.pipeline:run_command",
    "sweep": "fusion_train.sweep:sweep_command",
    "demo": "fusion_train.demo:demo_command",
    "sample": "fusion_train.implicit.sample:sample_command",
    "score": "fusion_train.implicit.score:score_command",
    "prefer": "fusion_train.implicit.prefer:prefer_command",
    "sft": "fusion_train.implicit.sft:sft_command",
    "dpo": "fusion_train.implicit.dpo:dpo_command",
    "rate": "fusion_train.implicit.rate:rate_command",
}


class StageGroup(Group):
    """The group of ``COMMANDS`` (and any added as usual), each imported when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, _, attribute = COMMANDS[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=StageGroup, context_settings={"show_default": True})
@click.version_option(__version__, prog_name="fusion-train")
def main() -> None:
    """Fuse the knowledge of several chat LLMs into one pivot model (FuseChat).

    Stages, in order: represent (record each model's top-k next-token distributions),
    align (map a source's distributions onto the pivot's tokens), fuse (pick or blend
    candidates per sequence), train (distil into the pivot on DeepSpeed ZeRO), then
    evaluate (bits per byte of held-out responses, comparable across tokenizers).
    `run` does all of them (and the merges) from one recipe, `sweep` tries settings
    against the CLM-only baseline, `demo` runs a recipe on real small models.

    Implicit fusion (FuseChat-3.0 / WRPO): sample (several responses per prompt from each
    model), score (reward model and/or verifiers), prefer (SFT set and preference pairs),
    sft (fine-tune on the best responses), dpo (a preference loss on the pairs: DPO, WRPO, ...);
    rate (mean score and win rate against a baseline of models' scored answers to held-out prompts).

    Errors in your input are one line naming the culprit; --debug shows their traceback.
    """
