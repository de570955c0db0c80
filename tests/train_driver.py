"""Runs ``fusion_train.train.train`` in a launched process with a test callback.

Usage (under ``deepspeed`` or ``torchrun``): ``train_driver.py CONFIG.json MODE ARG`` where MODE is
``logits`` (save the engine's logits on fixed tokens at the end of training to ARG) or ``kill``
(SIGKILL the process at the end of step ARG, like a crashed node), or ``losses`` (CONFIG.json
holds two configs, ``logits`` and ``chunked``: train the first with the logits-based loss, then
the second with the chunked head, one after the other in the same launched job; ARG is unused).

Environment: ``FUSION_TEST_LOSS=logits`` trains with the logits-based loss (the whole ``[N, V]``
logits, then ``logits_losses.SupervisedLosses``) in place of the chunked head, the
reference of the chunked runs.
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


def train_with_each_loss(configs: dict[str, dict]) -> None:
    """Train ``configs["logits"]`` with the logits-based loss, then ``configs["chunked"]`` with
    the chunked head, in this process; refuse to finish unless each run called its own loss."""
    from logits_losses import logits_loss_sums

    chunked = train_module.head_loss_sums
    calls = {"logits": 0, "chunked": 0}

    def counting(loss: str, function):
        def counted(*args, **kwargs):
            calls[loss] += 1
            return function(*args, **kwargs)

        return counted

    for loss, function in (("logits", logits_loss_sums), ("chunked", chunked)):
        train_module.head_loss_sums = counting(loss, function)
        try:
            train(TrainConfig(**configs[loss]))
        finally:
            train_module.head_loss_sums = chunked
        if calls[loss] == 0:
            raise SystemExit(f"the {loss} run never called its loss")


if __name__ == "__main__":
    config_path, mode, argument = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if mode == "losses":
        train_with_each_loss(json.loads(Path(config_path).read_text()))
        sys.exit(0)
    config = TrainConfig(**json.loads(Path(config_path).read_text()))
    if os.environ.get("FUSION_TEST_LOSS") == "logits":
        from logits_losses import logits_loss_sums

        train_module.head_loss_sums = logits_loss_sums
    callback = EngineLogits(argument) if mode == "logits" else KillAtStep(int(argument))
    train(config, callbacks=[callback])
