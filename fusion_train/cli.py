"""The ``fusion-train`` command: one sub-command per pipeline stage.

Each stage module keeps its work in a plain function and its click command next to it; this
file only collects the commands, so ``fusion-train --help`` lists every stage.
"""

from __future__ import annotations

import click

from fusion_train import __version__
from fusion_train.align import align_command
from fusion_train.demo import demo_command
from fusion_train.errors import Group
from fusion_train.evaluate import evaluate_command
from fusion_train.fuse import fuse_command
from fusion_train.implicit.dpo import dpo_command
from fusion_train.implicit.prefer import prefer_command
from fusion_train.implicit.rate import rate_command
from fusion_train.implicit.sample import sample_command
from fusion_train.implicit.score import score_command
from fusion_train.implicit.sft import sft_command
from fusion_train.pipeline import run_command
from fusion_train.represent import represent_command
from fusion_train.sweep import sweep_command
from fusion_train.train import train_command


@click.group(cls=Group, context_settings={"show_default": True})
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
    sft (fine-tune on the best responses), dpo (DPO, length-normalised DPO or WRPO on the pairs);
    rate (mean score and win rate against a baseline of models' scored answers to held-out prompts).

    Errors in your input are one line naming the culprit; --debug shows their traceback.
    """


main.add_command(represent_command)
main.add_command(align_command)
main.add_command(fuse_command)
main.add_command(train_command)
main.add_command(evaluate_command)
main.add_command(run_command)
main.add_command(sweep_command)
main.add_command(demo_command)
main.add_command(sample_command)
main.add_command(score_command)
main.add_command(prefer_command)
main.add_command(sft_command)
main.add_command(dpo_command)
main.add_command(rate_command)
