"""Runs ``fusion_train.train.train`` in a launched process with a test callback.

Usage (under ``deepspeed`` or ``torchrun``): ``train_driver.py CONFIG.json MODE ARG`` where MODE is
``logits`` (CONFIG.json holds a list of configs, trained one after the other in the same launched
job; the engine's logits on fixed tokens at the end of the i-th training go to ARG/i.safetensors) or ``kill``
(SIGKILL the process at the end of step ARG, like a crashed node), or ``losses`` (CONFIG.json
holds a list of runs, each ``{"loss": "logits" or "chunked", "config": {...}}``: each trained
with that loss, one after the other in the same launched job; ARG is unused).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from fusion_train import train as train_module
from fusion_train.train import TrainConfig, train

PROBE_TOKENS = torch.arange(5, 45).reshape(2, 20)


class EngineLogits(TrainerCallback):
    """The trained model's logits as the engine computes them (every rank runs it: ZeRO-3 gathers)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_TOKENS.to(args.device), use_cache=False).logits.float().cpu()
        if state.is_world_process_zero:
            save_file({"logits": logits.contiguous()}, self.path)


class KillAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train_with_each_loss(runs: list[dict]) -> None:
    """Train each run's config with its loss (``logits``: the logits-based loss; ``chunked``: the
    chunked head), in this process, in order; refuse to finish unless each run called its own loss."""
    from logits_losses import logits_loss_sums

    chunked = train_module.head_loss_sums
    for number, run in enumerate(runs):
        calls = 0

        def counted(*args, function=logits_loss_sums if run["loss"] == "logits" else chunked, **kwargs):
            nonlocal calls
            calls += 1
            return function(*args, **kwargs)

        train_module.head_loss_sums = counted
        try:
            train(TrainConfig(**run["config"]))
        finally:
            train_module.head_loss_sums = chunked
        if calls == 0:
            raise SystemExit(f"run {number} ({run['loss']}) never called its loss")


if __name__ == "__main__":
    config_path, mode, argument = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if mode == "losses":
        train_with_each_loss(json.loads(Path(config_path).read_text()))
        sys.exit(0)
    if mode == "logits":
        for number, config in enumerate(json.loads(Path(config_path).read_text())):
            train(
                TrainConfig(**config), callbacks=[EngineLogits(str(Path(argument) / f"{number}.safetensors"))]
            )
        sys.exit(0)
    train(TrainConfig(**json.loads(Path(config_path).read_text())), callbacks=[KillAtStep(int(argument))])
