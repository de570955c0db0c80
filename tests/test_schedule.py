"""A schedule that never trains is refused; every step's learning rate is the one it ran at (issue 22 §3).

With one optimizer step and a warmup, the step ran at learning rate 0 (linear warmup from 0)
while the log printed the peak, and the trained model was the pivot, byte for byte. Expected
rates here are worked out by hand from transformers' schedules (optimization.py): during
``W = ceil(T x warmup_ratio)`` warmup steps step k (from 0) runs at ``peak x k / W``; then linear
at ``peak x (T - k) / (T - W)``, cosine at ``peak x (1 + cos(pi x (k - W) / (T - W))) / 2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import build_tiny_model, write_chats
from safetensors.torch import load_file
from train_fixtures import build_fused, fused_rows
from transformers import TrainerCallback

from fusion_train.cli import main
from fusion_train.recipe import RecipeError, parse_recipe
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY
from fusion_train.train import TrainConfig, prepare, train
from fusion_train.training import Schedule, learning_rates, optimizer_steps, work_dir


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model, fused data of 8 and of 3 examples for it, and preference data."""
    root = tmp_path_factory.mktemp("schedule")
    model = build_tiny_model(tokenizer_dirs["smollm2"], root / "model", hidden=16, layers=1)
    build_fused(model, root / "fused")
    build_fused(model, root / "fused-3", rows=fused_rows(model, examples=3))
    conversation = [{"role": "user", "content": "Hi?"}]
    answer = [{"role": "assistant", "content": "Hello."}]
    (root / "prefs").mkdir()
    datasets.Dataset.from_list([{"prompt": conversation, "completion": answer}] * 4).save_to_disk(
        str(root / "prefs" / "sft")
    )
    pairs = [
        {"prompt": conversation, "chosen": answer, "rejected": [{"role": "assistant", "content": "No."}]}
    ]
    datasets.Dataset.from_list(pairs * 4).save_to_disk(str(root / "prefs" / "pairs"))
    return root


@pytest.mark.parametrize(
    ("scheduler", "steps", "warmup_ratio", "expected"),
    [
        ("linear", 4, 0.5, [0.0, 0.5, 1.0, 0.5]),  # W = 2
        ("cosine", 4, 0.25, [0.0, 1.0, 0.75, 0.25]),  # W = 1: cos(0), cos(pi/3), cos(2 pi/3)
        ("constant_with_warmup", 3, 0.5, [0.0, 0.5, 1.0]),  # W = ceil(1.5) = 2
        ("cosine", 1, 0.03, [0.0]),  # W = ceil(0.03) = 1: the only step is in the warmup
        ("linear", 1, 0.0, [1.0]),
        ("constant", 2, 0.5, [1.0, 1.0]),  # no warmup in this schedule
    ],
)
def test_learning_rates_are_transformers_schedules(
    scheduler: str, steps: int, warmup_ratio: float, expected: list[float]
) -> None:
    settings = Schedule(scheduler=scheduler, warmup_ratio=warmup_ratio)
    rates = list(learning_rates(settings, steps, peak=2e-5))
    assert rates == pytest.approx([2e-5 * e for e in expected], rel=1e-6, abs=0)


@pytest.mark.parametrize(
    ("examples", "batch", "accumulation", "world", "epochs", "expected"),
    [
        (10, 2, 2, 2, 1.0, 2),  # 5 batches, 3 per rank (even batches), 2 steps
        (3, 4, 1, 1, 1.0, 1),  # one short batch
        (8, 1, 3, 1, 2.5, 8),  # 8 batches: 3 steps per epoch (the last of 2), x 2.5 rounded up
        (8, 3, 2, 1, 1.0, 2),  # 3 batches: 2 steps
    ],
)
def test_optimizer_steps_are_counted_as_the_trainer_counts_them(
    examples: int, batch: int, accumulation: int, world: int, epochs: float, expected: int
) -> None:
    settings = Schedule(per_device_batch_size=batch, grad_accumulation=accumulation, epochs=epochs)
    assert optimizer_steps(settings, examples, world) == expected
    assert optimizer_steps(Schedule(max_steps=5, epochs=epochs), examples, world) == 5


def _refused(args: list[str], tmp_path: Path) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, (
        result.output
    )
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()
    return lines[0].removeprefix("Error: ")


def test_a_schedule_that_never_trains_is_refused_by_train_sft_and_dpo(ws: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    train_args = ["train", "--model", str(ws / "model"), "--fused", str(ws / "fused"), "--out", out]
    assert _refused([*train_args, "--max-steps", "1", "--warmup-ratio", "0.1"], tmp_path) == (
        "--max-steps 1 with --warmup-ratio 0.1: every optimizer step runs at learning rate 0 (cosine schedule), so "
        "the model would not change; use more steps or --warmup-ratio 0."
    )
    # by epochs: 3 examples in one batch of 4 are one step, in train's default warmup (0.03)
    by_epochs = ["train", "--model", str(ws / "model"), "--fused", str(ws / "fused-3"), "--out", out,
                 "--epochs", "1", "--per-device-batch-size", "4", "--scheduler", "linear"]  # fmt: skip
    assert _refused(by_epochs, tmp_path).startswith(
        "--epochs 1 over 3 examples (1 optimizer step) with --warmup-ratio 0.03: every optimizer step runs at "
        "learning rate 0 (linear schedule)"
    )
    for stage in ("sft", "dpo"):  # their default warmup is 0.1
        args = [
            stage,
            "--model",
            str(ws / "model"),
            "--prefs",
            str(ws / "prefs"),
            "--out",
            out,
            "--max-steps",
            "1",
        ]
        assert _refused(args, tmp_path).startswith(
            "--max-steps 1 with --warmup-ratio 0.1: every optimizer step"
        )


def test_schedules_with_a_step_that_trains_pass(ws: Path, tmp_path: Path) -> None:
    for i, changes in enumerate([{"max_steps": 1, "warmup_ratio": 0.0}, {"max_steps": 2, "warmup_ratio": 0.5},
                                 {"max_steps": 1, "scheduler": "constant"}, {"epochs": 1.0}]):  # fmt: skip
        config = TrainConfig(model=str(ws / "model"), fused=str(ws / "fused"), out=str(tmp_path / f"out{i}"),
                             **changes)  # fmt: skip
        prepare(config, world_size=1)


def test_a_recipe_whose_schedule_never_trains_is_refused_by_key(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    write_chats(tmp_path / "chats.jsonl")
    pivot, source = str(tiny_models["smollm2"]), str(tiny_models["qwen"])
    recipe = {"pivot": {"name": "pivot", "path": pivot}, "sources": [{"name": "s", "path": source}],
              "data": {"train": "chats.jsonl", "heldout_fraction": 0.25}, "run_dir": "run"}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "train": {"max_steps": 1}}))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1 and not (tmp_path / "run").exists()
    assert result.output.strip() == (
        f"Error: {path}: train.max_steps 1 with train.warmup_ratio 0.03: every optimizer step runs at learning "
        "rate 0 (cosine schedule), so the model would not change; use more steps or train.warmup_ratio 0."
    )
    implicit = {**recipe, "method": "implicit", "score": {"verifiers": ["reference-overlap"]}}
    for stage in ("sft", "dpo"):
        with pytest.raises(
            RecipeError, match=rf"{stage}\.max_steps 1 with {stage}\.warmup_ratio 0\.1: every"
        ):
            parse_recipe({**implicit, stage: {"max_steps": 1}}, base=tmp_path, default_run_dir=tmp_path / "r")
    parse_recipe({**implicit, "sft": {"max_steps": 2}, "dpo": {"max_steps": 1, "warmup_ratio": 0.0}},
                 base=tmp_path, default_run_dir=tmp_path / "r")  # fmt: skip


class WeightsAfterEachStep(TrainerCallback):
    """A copy of the LM head after every optimizer step."""

    def __init__(self) -> None:
        self.heads: list[torch.Tensor] = []

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.heads.append(model.lm_head.weight.detach().clone())


@pytest.mark.slow
def test_training_logs_and_records_the_rate_each_step_ran_at(ws: Path, tmp_path: Path) -> None:
    """8 examples in batches of 3, 2 per step: 2 steps (as counted before training). Linear, warmup
    0.5: W = 1, so step 1 runs at 0 and leaves the weights as they were, step 2 at the peak
    ((2 - 1) / (2 - 1)). Under DeepSpeed the Trainer's own log gave the next step's rate: the
    peak for step 1, 0 for step 2."""
    peak = 1e-3
    config = TrainConfig(model=str(ws / "model"), fused=str(ws / "fused"), out=str(tmp_path / "out"), epochs=1.0,
                         per_device_batch_size=3, grad_accumulation=2, scheduler="linear", warmup_ratio=0.5,
                         learning_rate=peak, logging_steps=10, bf16=False)  # fmt: skip
    assert optimizer_steps(config, 8, 1) == 2
    watch = WeightsAfterEachStep()
    summary = train(config, callbacks=[watch])
    assert summary is not None and summary["steps"] == 2
    history = json.loads((work_dir(config.out) / "checkpoint-2" / "trainer_state.json").read_text())[
        "log_history"
    ]
    # Logged: the first step (logging_first_step) and the last, though logging_steps is 10.
    assert [(entry["step"], entry["learning_rate"]) for entry in history if "loss" in entry] == [
        (1, 0.0),
        (2, peak),
    ]
    assert summary["learning_rate"] == {
        "peak": peak,
        "first": 0.0,
        "last": peak,
        "highest": peak,
        "steps_at_zero": 1,
    }
    assert (summary["loss"]["start"]["learning_rate"], summary["loss"]["end"]["learning_rate"]) == (0.0, peak)
    pivot = load_file(ws / "model" / "model.safetensors")["lm_head.weight"]
    assert torch.equal(watch.heads[0], pivot)  # the step at rate 0 changed nothing
    assert not torch.equal(watch.heads[1], pivot)
    assert torch.equal(load_file(Path(config.out) / "model.safetensors")["lm_head.weight"], watch.heads[1])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_log_the_rate_each_step_ran_at(stage: str, ws: Path, tmp_path: Path) -> None:
    """TRL's trainers under DeepSpeed too: linear, 2 steps, warmup 0.5 (W = 1): 0, then the peak."""
    pytest.importorskip("trl")
    out = tmp_path / "out"
    args = [stage, "--model", str(ws / "model"), "--prefs", str(ws / "prefs"), "--out", str(out), "--max-steps", "2",
            "--warmup-ratio", "0.5", "--scheduler", "linear", "--lr", "1e-4", "--logging-steps", "10",
            "--per-device-batch-size", "2", "--max-length", "64"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((out / SUMMARY).read_text())
    assert (summary["loss"]["start"]["learning_rate"], summary["loss"]["end"]["learning_rate"]) == (0.0, 1e-4)
    assert (summary["loss"]["start"]["step"], summary["loss"]["end"]["step"]) == (1, 2)  # the last, logged
    assert summary["learning_rate"] == {
        "peak": 1e-4,
        "first": 0.0,
        "last": 1e-4,
        "highest": 1e-4,
        "steps_at_zero": 1,
    }
