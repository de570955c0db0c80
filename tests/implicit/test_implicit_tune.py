"""`fusion-train sft` and `fusion-train dpo` (TRL's SFTTrainer and DPOTrainer, WRPO) end to end on a
tiny model through the CLI: they publish a loadable model with a summary, every preference loss
starts at its formula's value for a policy equal to the reference, SFT resumes from its last
checkpoint, 2 CPU ranks under ZeRO-2 work through --nproc and train what one process does with
their global batch, and bad input is a one-line error."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

pytest.importorskip("trl")

from numeric import approx_at_scale, assert_same_adam_updates
from train_fixtures import assert_left_no_rank_behind

from fusion_train.cli import main
from fusion_train.implicit.dpo import dpo_command
from fusion_train.implicit.preference_losses import LOSSES
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY
from fusion_train.training import work_dir


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
    [{"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "What is the capital of France?"}],
]


def write_prefs(out: Path, wrpo: bool = True, varied: bool = False) -> Path:
    """A `fusion-train prefer` output directory: sft/ and pairs/ (with chosen_source when ``wrpo``);
    ``varied``: the i-th answers are i + 1 times as long, so examples differ in their token counts."""

    def times(i: int) -> int:
        return i + 1 if varied else 1

    sft = [{"id": str(i), "prompt": p, "completion": say(f"Answer number {i}." * times(i)), "source": "a",
            "score": 1.0} for i, p in enumerate(PROMPTS)]  # fmt: skip
    pairs = []
    for i, p in enumerate(PROMPTS):
        pair = {"id": str(i), "prompt": p, "chosen": say(f"Good answer {i}." * times(i)), "rejected": say("I do not know."),
                "source": "a", "chosen_score": 1.0, "rejected_score": 0.0, "margin": 1.0}  # fmt: skip
        if wrpo:
            pair |= {"chosen_source": say(f"The source's best answer {i}."), "chosen_source_score": 1.0}
        pairs.append(pair)
    out.mkdir(parents=True)
    datasets.Dataset.from_list(sft).save_to_disk(str(out / "sft"))
    datasets.Dataset.from_list(pairs).save_to_disk(str(out / "pairs"))
    settings = {"mode": "wrpo" if wrpo else "fusechat3", "margin": 0.01}
    (out / "manifest.json").write_text(
        json.dumps({"format": "fusion-train/preferences@1", "settings": settings})
    )
    return out


@pytest.fixture(scope="module")
def model_dir(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model(
        tokenizer_dirs["smollm2"], tmp_path_factory.mktemp("tune") / "m", hidden=16, layers=1
    )


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prefs(tmp_path_factory.mktemp("prefs") / "wrpo")


QUICK = ["--logging-steps", "1", "--warmup-ratio", "0", "--per-device-batch-size", "2"]


def invoke(*arguments: str):
    return CliRunner().invoke(main, [str(a) for a in arguments])


def check_published(out: Path, steps: int, bf16: bool = False) -> dict:
    assert out.is_dir() and not (out / "training_args.bin").exists()
    assert not (work_dir(out) / "final").exists()  # renamed into place
    umask = os.umask(0)
    os.umask(umask)  # every file as readable as the umask allows (safetensors itself writes 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()} == {0o666 & ~umask}
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == steps and summary["world_size"] == 1 and summary["bf16"] is bf16
    AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory
    assert (out / "tokenizer.json").is_file()
    return summary


def test_sft_publishes_a_model_and_resumes_from_its_last_checkpoint(
    model_dir: Path, prefs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sft"
    arguments = ["sft", "--model", model_dir, "--prefs", prefs, "--out", out, "--max-steps", 2, "--save-steps", 1,
                 "--lr", "1e-3", *QUICK]  # fmt: skip
    saved = dict(os.environ)
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    # Run in this process, as a world of one: its rank's variables were the run's only.
    assert_left_no_rank_behind(monkeypatch, saved)
    summary = check_published(out, 2)
    assert summary["stage"] == "sft" and summary["data"]["examples"] == len(PROMPTS)
    assert summary["data"]["prefer"]["mode"] == "wrpo"
    assert summary["loss"]["start"]["loss"] > 0 and summary["resumed_from"] is None
    assert not list(prefs.rglob("cache-*"))  # TRL's tokenization wrote nothing into the input

    # As if killed after the first checkpoint: without --resume the checkpoints are refused, with it
    # the run continues from checkpoint-1.
    shutil.rmtree(out)
    shutil.rmtree(work_dir(out) / "checkpoint-2")
    refused = invoke(*arguments)
    assert refused.exit_code == 1 and "pass --resume" in refused.output
    result = invoke(*arguments, "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    resumed = check_published(out, 2)
    assert resumed["resumed_from"] == "checkpoint-1"


# The loss at step 0, where the policy is the reference: -log sigmoid(0) for the DPO family, IPO's
# (0 - 1 / (2 beta))^2 and the hinge's max(0, 1 - 0), at each loss's default beta (0.1 for both).
AT_STEP_ZERO = {
    "sigmoid": math.log(2),
    "sigmoid_norm": math.log(2),
    "wrpo": math.log(2),
    "ipo": 25.0,
    "hinge": 1.0,
}


@pytest.mark.parametrize("loss", AT_STEP_ZERO)
def test_dpo_starts_at_its_value_for_the_reference_policy_and_publishes_a_model(
    loss: str, model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    out = tmp_path / loss
    result = invoke("dpo", "--loss", loss, "--model", model_dir, "--prefs", prefs, "--out", out, "--max-steps", 2,
                    *QUICK)  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = check_published(out, 2)
    settings = summary["settings"]
    assert (settings["loss"], settings["beta"], settings["learning_rate"]) == (
        loss, LOSSES[loss].beta, LOSSES[loss].learning_rate,
    )  # fmt: skip
    assert settings["alpha_max"] == (0.1 if loss == "wrpo" else None)
    start = summary["loss"]["start"]
    assert start["step"] == 1 and start["loss"] == approx_at_scale(AT_STEP_ZERO[loss], dtype=torch.float32)
    assert set(start) == {"step", "loss", "grad_norm", "learning_rate", *LOSSES[loss].metrics}
    if loss == "wrpo":
        assert start["wrpo/alpha"] == 0.0
    assert not list(prefs.rglob("cache-*"))


def test_wrpo_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    """The alpha schedule continues from the checkpoint's step, and the weights come out the same."""
    from safetensors.torch import load_file

    out = tmp_path / "wrpo"
    arguments = ["dpo", "--loss", "wrpo", "--model", model_dir, "--prefs", prefs, "--out", out, "--max-steps", 3,
                 "--save-steps", 1, "--save-total-limit", 0, "--lr", "1e-3", *QUICK]  # fmt: skip
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    uninterrupted = load_file(out / "model.safetensors")
    shutil.rmtree(out)
    for step in (2, 3):
        shutil.rmtree(work_dir(out) / f"checkpoint-{step}")
    result = invoke(*arguments, "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = check_published(out, 3)
    assert summary["resumed_from"] == "checkpoint-1"
    assert summary["loss"]["end"]["wrpo/alpha"] == pytest.approx(0.1 * 2 / 3)
    assert_same_adam_updates(load_file(out / "model.safetensors"), uninterrupted,
                             load_file(model_dir / "model.safetensors"))  # fmt: skip


def test_bf16_only_when_asked_on_cpu(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    """Off by default on CPUs (TRL's own default would be on); asked for, DeepSpeed's bf16 runs
    policy and reference alike, so step 0 is still ln 2."""
    from fusion_train.training import bf16_support

    if not bf16_support()[0]:
        pytest.skip("this CPU cannot train in bf16")
    out = tmp_path / "bf16"
    result = invoke("dpo", "--loss", "wrpo", "--bf16", "--model", model_dir, "--prefs", prefs, "--out", out,
                    "--max-steps", 1, *QUICK)  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = check_published(out, 1, bf16=True)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert summary["loss"]["start"]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_bad_input_is_one_line(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for stage, split in (("sft", "sft"), ("dpo", "pairs")):
        result = invoke(stage, "--model", model_dir, "--prefs", empty, "--out", tmp_path / "out")
        assert result.exit_code == 1
        assert result.output.strip() == f"Error: {empty}: no {split}/ data set in it; pass the output directory of " \
            "`fusion-train prefer`."  # fmt: skip

    # With --nproc the launching process checks the input once, before any rank starts.
    result = invoke("sft", "--model", model_dir, "--prefs", empty, "--out", tmp_path / "out", "--nproc", "2")
    assert result.exit_code == 1 and result.output.startswith(f"Error: {empty}: no sft/ data set in it")

    fusechat3 = write_prefs(tmp_path / "fusechat3", wrpo=False)
    result = invoke(
        "dpo", "--loss", "wrpo", "--model", model_dir, "--prefs", fusechat3, "--out", tmp_path / "out"
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert (
        "no chosen_source column: --loss wrpo needs pairs of `fusion-train prefer --mode wrpo`"
        in result.output
    )

    sft_only = write_prefs(tmp_path / "sft-only")  # what `prefer --mode sft` writes: no pairs/
    shutil.rmtree(sft_only / "pairs")
    (sft_only / "manifest.json").write_text(
        json.dumps({"format": "fusion-train/preferences@1", "settings": {"mode": "sft"}})
    )
    result = invoke("dpo", "--model", model_dir, "--prefs", sft_only, "--out", tmp_path / "out")
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: {sft_only}: the output of `fusion-train prefer --mode sft`, the SFT set alone (no pairs/); "
        "preference training needs the output of `fusion-train prefer --mode fusechat3` or `--mode wrpo`."
    )

    plain = tmp_path / "no-template"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    result = invoke("sft", "--model", plain, "--prefs", prefs, "--out", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "the tokenizer has no chat template" in result.output

    (tmp_path / "taken").mkdir()
    result = invoke("dpo", "--model", model_dir, "--prefs", prefs, "--out", tmp_path / "taken")
    assert result.exit_code == 1 and "taken already exists; pass another --out" in result.output

    result = invoke("dpo", "--loss", "sigmoid", "--alpha-max", "0.2", "--model", model_dir, "--prefs", prefs,
                    "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "--alpha-max is WRPO's" in result.output
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


@pytest.mark.parametrize(("stage", "flags", "values"), [
    ("sft", ["--max-length", "77"], {"max_length": 77}),
    ("dpo", ["--loss", "wrpo", "--alpha-max", "0.3", "--beta", "0.2"], {"loss": "wrpo", "alpha_max": 0.3, "beta": 0.2}),
])  # fmt: skip
def test_a_command_under_nproc_gives_every_rank_the_settings_it_trains_with_here(
    stage: str,
    flags: list[str],
    values: dict,
    model_dir: Path,
    prefs: Path,
    tmp_path: Path,
    monkeypatch,
    launched_calls,
) -> None:
    """Under ``--nproc 2`` the call file every rank reads holds the settings (checked here first)
    that the same command line trains with in this process."""
    module = importlib.import_module(f"fusion_train.implicit.{stage}")
    arguments = [stage, "--model", model_dir, "--prefs", prefs, "--out", tmp_path / "out", *QUICK, *flags]
    result = invoke(*arguments, "--nproc", "2")
    assert result.exit_code == 0, result.output
    (launched,) = launched_calls
    assert launched.nproc == 2 and launched.call.function is getattr(module, stage)
    (settings,) = launched.call.arguments.values()
    assert settings.per_device_batch_size == 2 and settings.out == str(tmp_path / "out")
    assert {name: getattr(settings, name) for name in values} == values
    here: list[object] = []
    monkeypatch.setattr(module, stage, lambda settings: here.append(settings))
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output
    assert here == [settings]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_two_ranks(*arguments: str) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "fusion_train", *map(str, arguments), "--nproc", "2",
               "--master-port", str(free_port())]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_sft_on_two_cpu_ranks_under_zero3_partitions_the_weights(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "zero3"
    run_on_two_ranks("sft", "--model", model_dir, "--prefs", prefs, "--out", out, "--deepspeed", "zero3",
                     "--max-steps", 1, *QUICK, "--per-device-batch-size", 1)  # fmt: skip
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
    parameters = summary["parameters"]
    for held in parameters["held_per_rank"]:
        assert 0.45 * parameters["total"] <= held <= 0.55 * parameters["total"], parameters
    model = AutoModelForCausalLM.from_pretrained(out)  # full tensors gathered on save
    assert sum(p.numel() for p in model.parameters()) == parameters["total"]


@pytest.mark.parametrize("stage", [["sft"], ["dpo", "--loss", "wrpo"]], ids=["sft", "wrpo"])
def test_two_ranks_train_the_model_one_process_trains_with_their_global_batch(
    stage: list[str], model_dir: Path, tmp_path: Path
) -> None:
    """2 ranks x 1 example per step (ZeRO-2, through the command's own --nproc) = 1 process x 2
    examples per step, same seed: the same examples in the same steps (the launched ranks split
    each step's batch of the seeded order), the same loss normalisation (SFT: per token across both
    ranks; DPO: per pair), so the same trained weights up to float32 rounding. WRPO starts at ln 2
    on 2 ranks too (the policy is its reference), and the published model loads."""
    from safetensors.torch import load_file

    prefs = write_prefs(tmp_path / "prefs", varied=True)
    common = [*stage, "--model", model_dir, "--prefs", prefs, "--deepspeed", "zero2", "--max-steps", 2, "--lr",
              "1e-3", "--seed", 3, *QUICK]  # fmt: skip
    result = invoke(*common, "--out", tmp_path / "one", "--per-device-batch-size", 2)
    assert result.exit_code == 0, result.output + repr(result.exception)
    run_on_two_ranks(*common, "--out", tmp_path / "two", "--per-device-batch-size", 1)
    summaries = [json.loads((tmp_path / name / SUMMARY).read_text()) for name in ("one", "two")]
    assert [s["world_size"] for s in summaries] == [1, 2] and [s["steps"] for s in summaries] == [2, 2]
    assert summaries[1]["deepspeed"]["zero_optimization"]["stage"] == 2
    assert summaries[1]["loss"]["start"]["loss"] == approx_at_scale(
        summaries[0]["loss"]["start"]["loss"], dtype=torch.float32
    )
    if stage[0] == "dpo":
        assert summaries[1]["loss"]["start"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    AutoModelForCausalLM.from_pretrained(tmp_path / "two")

    start = load_file(model_dir / "model.safetensors")
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert one.keys() == two.keys() == start.keys()
    # Two Adam steps (lr 1e-3, then 5e-4 on the cosine schedule) move a weight by up to 1.5e-3: Adam's
    # first updates are about lr * sign(gradient). The runs differ only in the order float32 sums are
    # taken (one matrix product over 2 examples, against two ranks' gradients all-reduced), which
    # Adam passes on as numeric.assert_same_adam_updates says; a wrong pairing of the examples
    # (another seed, which pairs them otherwise, moves weights by 3e-3) or averaging SFT's loss per
    # rank instead of per token (the answers here differ in length) changes the updates themselves.
    moved = max((one[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3, moved
    assert_same_adam_updates(two, one, start)


def test_the_papers_defaults_and_global_batch(tmp_path: Path) -> None:
    """The learning rates and epochs the papers give (written out here, not read from the code),
    and the gradient accumulation a recipe picks to reach their global batch of 128: rounded up to
    whole micro-batches of processes x per-device batch, and at most an eighth of the examples, so
    a small data set still takes 8 steps or so."""
    from fusion_train.implicit.dpo import DPOSettings
    from fusion_train.implicit.sections import DPOStage, SFTStage, command_values
    from fusion_train.implicit.sft import sft_command
    from fusion_train.implicit.tuning import papers_grad_accumulation

    papers = {"sigmoid": (0.01, 3e-7), "sigmoid_norm": (10.0, 8e-7), "wrpo": (0.01, 3e-7),
              "ipo": (0.1, 1e-6), "hinge": (0.1, 1e-6)}  # the last two: TRL's DPOConfig defaults  # fmt: skip
    for loss, (beta, learning_rate) in papers.items():
        settings = DPOSettings(model="m", prefs="p", out="o", loss=loss)
        assert (settings.beta, settings.learning_rate, settings.epochs) == (beta, learning_rate, 1.0)
    assert [papers_grad_accumulation(1, 1), papers_grad_accumulation(2, 3), papers_grad_accumulation(16, 8)] == [
        128, 22, 1,
    ]  # fmt: skip
    assert [papers_grad_accumulation(1, 1, n) for n in (0, 7, 8, 45, 1023, 1024, 10**6)] == [
        1,
        1,
        1,
        5,
        127,
        128,
        128,
    ]
    assert papers_grad_accumulation(2, 2, 400) == 13  # 400 // 8 = 50 examples a step: 13 micro-steps of 4

    sft_fusechat3, sft_wrpo = (
        command_values(SFTStage(), "fusechat3", 2, 1000),
        command_values(SFTStage(), "wrpo", 1),
    )
    assert (sft_fusechat3["learning_rate"], sft_fusechat3["epochs"], sft_fusechat3["grad_accumulation"]) == (
        5e-6,
        3.0,
        63,
    )
    assert (sft_wrpo["learning_rate"], sft_wrpo["epochs"], sft_wrpo["grad_accumulation"]) == (7e-6, 1.0, 128)
    chosen = command_values(SFTStage(learning_rate=1e-5, epochs=2.0, grad_accumulation=4), "wrpo", 1, 50)
    assert (chosen["learning_rate"], chosen["epochs"], chosen["grad_accumulation"]) == (1e-5, 2.0, 4)
    dpo = command_values(DPOStage(per_device_batch_size=4), "wrpo", 1, 40)
    assert (dpo["loss"], dpo["learning_rate"], dpo["epochs"], dpo["grad_accumulation"]) == (
        "wrpo",
        None,
        1.0,
        2,
    )

    for command in (sft_command, dpo_command):
        text = " ".join(CliRunner().invoke(command, ["--help"], terminal_width=200).output.split())
        assert "global batch of 128" in text, command.name
    text = " ".join(CliRunner().invoke(dpo_command, ["--help"], terminal_width=200).output.split())
    assert "sigmoid 3e-7 (FuseChat-3.0, Qwen-2.5; Gemma-2: lr 5e-7)" in text
    assert (
        "--beta FLOAT RANGE beta of the loss. Default by --loss: sigmoid 0.01 (FuseChat-3.0, Qwen-2.5; "
        in text
    )
    assert (
        "ipo 1e-6 (TRL's DPOConfig defaults; the paper gives none), hinge 1e-6 (TRL's DPOConfig defaults)"
        in text
    )
    assert (
        "--alpha-max FLOAT RANGE WRPO: the weight of the source's response at the end of training (default 0.1"
        in text
    )
