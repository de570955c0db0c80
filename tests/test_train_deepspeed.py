"""`fusion-train train` as real DeepSpeed jobs: 2 CPU ranks (gloo) for ZeRO-2 and ZeRO-3, in float32
and bf16, two node ranks, and single-process runs killed after a step or while a checkpoint was
being written, resumed to the weights of an uninterrupted run; bf16 on GPUs (NCCL) where the
machine has any. Each run is a subprocess with its own port."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from numeric import adam_update_bound, approx_at_scale, assert_close_at_scale, assert_same_adam_updates
from safetensors.torch import load_file
from train_driver import PROBE_TOKENS
from train_fixtures import batch_from_rows, build_fused, dense_reference_losses, fused_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_train.calls import StageCall
from fusion_train.launch import deepspeed_launcher
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY
from fusion_train.train import TrainConfig, prepare, train
from fusion_train.training import work_dir

VENV_BIN = Path(sys.executable).parent
DRIVER = Path(__file__).with_name("train_driver.py")
KILL_DRIVER = Path(__file__).with_name("kill_driver.py")
TIMEOUT = 420
# A few quick steps that visibly move a tiny model: 8 examples, global batch 4.
SETTINGS = {
    "max_steps": 6,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "logging_steps": 1,
    "save_steps": 1000,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(gpus: bool = False, **extra: str) -> dict[str, str]:
    """The launched ranks' environment: CPU ranks (gloo) see no GPU, also on a machine that has one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(command: list[str], gpus: bool = False, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(gpus, **env))


def _train_keeping_engine_logits(
    tmp_path: Path, configs: list[dict], ranks: int, gpus: bool = False
) -> list[Path]:
    """Train each config, one after the other, in one job under the ``deepspeed`` launcher through
    the test driver; return the files holding the engine's logits on PROBE_TOKENS at the end of
    each training."""
    config_path = tmp_path / "configs.json"
    config_path.write_text(json.dumps(configs))
    command = [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(_free_port())]
    result = _run([*command, str(DRIVER), str(config_path), "logits", str(tmp_path)], gpus=gpus)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [tmp_path / f"{number}.safetensors" for number in range(len(configs))]


def _options(settings: dict) -> list[str]:
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("train-ds")
    pivot = tiny_models["mistral"]
    rows = fused_rows(pivot, examples=8, top_k=4)
    return pivot, build_fused(pivot, root / "fused", rows=rows), rows


def _dense_fusion_loss(model_dir: Path, rows: list[dict]) -> float:
    """The fusion loss on the whole fixed set, by the dense reference (independent of the trainer)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(**batch_from_rows(rows, tokenizer.eos_token_id)).logits
    return dense_reference_losses(logits, rows, len(tokenizer))[1].item()


def _check_output(out: Path, pivot: Path, rows: list[dict]) -> dict:
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", SUMMARY}
    assert expected <= names, names
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert "training_args.bin" not in names
    umask = os.umask(0)
    os.umask(umask)  # every file as readable as the umask allows (safetensors itself writes 0600)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()} == {0o666 & ~umask}
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == SETTINGS["max_steps"]
    assert summary["data"]["examples"] == len(rows)
    before, after = _dense_fusion_loss(pivot, rows), _dense_fusion_loss(out, rows)
    assert after < before - 0.5, (before, after)
    assert summary["loss"]["end"]["fusion_loss"] < summary["loss"]["start"]["fusion_loss"]
    return summary


def test_zero2_two_ranks_through_the_cli_launcher(setup, tmp_path):
    pivot, fused, rows = setup
    out = tmp_path / "target-zero2"
    command = [str(VENV_BIN / "fusion-train"), "train", "--model", str(pivot), "--fused", str(fused)]
    command += ["--out", str(out), "--nproc", "2", "--master-port", str(_free_port()), "--deepspeed", "zero2"]
    result = _run([*command, "--gradient-checkpointing", *_options({**SETTINGS, "per_device_batch_size": 2})])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = _check_output(out, pivot, rows)
    assert summary["world_size"] == 2
    parameters = summary["parameters"]  # ZeRO-2 partitions optimizer states, not parameters
    assert parameters["held_per_rank"] == [parameters["total"]] * 2

    # Data parallelism changes nothing: one process with the whole global batch of 4 takes the same
    # steps (loss normalised over all ranks' tokens; the gradient norm would show a scale error,
    # which Adam's updates would hide).
    single = tmp_path / "target-one-process"
    base = [sys.executable, "-m", "fusion_train.train", "--model", str(pivot), "--fused", str(fused)]
    result = _run([*base, "--out", str(single), *_options({**SETTINGS, "per_device_batch_size": 4})])
    assert result.returncode == 0, result.stderr[-5000:]
    reference = json.loads((single / SUMMARY).read_text())
    _assert_same_steps(summary, reference)
    assert_same_adam_updates(load_file(out / "model.safetensors"), load_file(single / "model.safetensors"),
                             load_file(pivot / "model.safetensors"))  # fmt: skip


def _assert_same_steps(summary: dict, reference: dict) -> None:
    """Same losses and gradient norms: at the first step (same weights) up to float32 rounding,
    at the last up to what Adam makes of rounding (``numeric.assert_same_adam_updates``)."""
    for name in ("loss", "clm_loss", "fusion_loss", "grad_norm"):
        start, end = (reference["loss"][which][name] for which in ("start", "end"))
        assert summary["loss"]["start"][name] == approx_at_scale(start, dtype=torch.float32), name
        assert summary["loss"]["end"][name] == pytest.approx(end, rel=adam_update_bound()), name


def test_zero3_offload_two_ranks_partitions_and_saves_full_tensors(setup, tmp_path):
    """The zero3-offload preset (ZeRO-3, optimizer states in CPU memory): each rank holds half of
    the parameters, the saved model has full tensors and gives the engine's logits. (Plain ZeRO-3
    on 2 ranks: the chunked-head, bf16 and two-node tests.)"""
    pivot, fused, rows = setup
    out = tmp_path / "target-zero3-offload"
    config = {"model": str(pivot), "fused": str(fused), "out": str(out), "deepspeed": "zero3-offload"}
    (engine_logits,) = _train_keeping_engine_logits(
        tmp_path, [{**config, **SETTINGS, "per_device_batch_size": 2}], 2
    )

    summary = _check_output(out, pivot, rows)
    assert summary["world_size"] == 2
    assert summary["deepspeed"]["zero_optimization"]["stage"] == 3
    assert summary["deepspeed"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    parameters = summary["parameters"]
    for held in parameters["held_per_rank"]:
        assert 0.45 * parameters["total"] <= held <= 0.55 * parameters["total"], parameters
    assert sum(parameters["held_per_rank"]) >= parameters["total"]

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(pivot, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert tensor.shape == reference.state_dict()[name].shape, name
    with torch.no_grad():
        logits = model(input_ids=PROBE_TOKENS).logits
    assert_close_at_scale(logits, load_file(engine_logits)["logits"], dtype=torch.float32)


RESUME_SETTINGS = {**SETTINGS, "max_steps": 4, "save_steps": 2, "per_device_batch_size": 2}


def _resume_options(pivot: Path, fused: Path, out: Path) -> list[str]:
    """`fusion-train train` options of the resume tests' runs (one process)."""
    return ["--model", str(pivot), "--fused", str(fused), "--out", str(out), *_options(RESUME_SETTINGS)]


ONE_PROCESS = [sys.executable, "-m", "fusion_train.train"]


@dataclass(frozen=True)
class Uninterrupted:
    out: Path
    log: str
    extensions: Path  # where torch would have put JIT-compiled ops (TORCH_EXTENSIONS_DIR)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> Uninterrupted:
    """The resume tests' run without a kill, in one process: what a resumed run must end with."""
    pivot, fused, _ = setup
    root = tmp_path_factory.mktemp("uninterrupted")
    extensions = root / "torch-extensions"
    command = [*ONE_PROCESS, *_resume_options(pivot, fused, root / "target")]
    result = _run(command, TORCH_EXTENSIONS_DIR=str(extensions))
    assert result.returncode == 0, result.stderr[-5000:]
    return Uninterrupted(root / "target", result.stdout + result.stderr, extensions)


@pytest.mark.slow
def test_cpu_training_compiles_no_deepspeed_op(uninterrupted):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory op (deepspeed_shm_comm) with the
    system compiler at the start of every first run; training does not need it."""
    assert "deepspeed_shm_comm" not in uninterrupted.log
    assert not uninterrupted.extensions.exists() or not any(uninterrupted.extensions.iterdir())


def _resume_and_compare(setup, out: Path, uninterrupted: Uninterrupted) -> tuple[dict, str]:
    """Resume the killed run at ``out``; check it equals the uninterrupted run; return its summary
    and log."""
    pivot, fused, _ = setup
    resumed = _run([*ONE_PROCESS, *_resume_options(pivot, fused, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == RESUME_SETTINGS["max_steps"]
    assert summary["loss"]["start"]["step"] == 1  # the log history came back with the checkpoint
    assert_same_adam_updates(load_file(out / "model.safetensors"),
                             load_file(uninterrupted.out / "model.safetensors"),
                             load_file(pivot / "model.safetensors"))  # fmt: skip
    return summary, resumed.stderr


def test_killed_run_resumes_from_its_checkpoint(setup, tmp_path, uninterrupted):
    pivot, fused, _ = setup
    out = tmp_path / "resumed"
    config_path = tmp_path / "config.json"
    config_path.write_text(
        json.dumps({"model": str(pivot), "fused": str(fused), "out": str(out), **RESUME_SETTINGS})
    )
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "1", "--master_port", str(_free_port())]
    killed = _run([*torchrun, str(DRIVER), str(config_path), "kill", "3"])
    assert killed.returncode != 0
    assert not out.exists()
    assert sorted(p.name for p in work_dir(out).glob("checkpoint-*")) == ["checkpoint-2"]

    summary, _ = _resume_and_compare(setup, out, uninterrupted)
    assert summary["resumed_from"] == "checkpoint-2"


@pytest.mark.slow
def test_run_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(
    setup, tmp_path, uninterrupted
):
    """Killed while checkpoint-4 was being written (weights, optimizer and RNG states saved, the
    Trainer's state not yet): --resume ignores it, says so, and resumes from checkpoint-2."""
    pivot, fused, _ = setup
    out = tmp_path / "resumed"
    state = "transformers.trainer_callback:TrainerState.save_to_json"  # a checkpoint's last file
    killed = _run([sys.executable, str(KILL_DRIVER), "before", state, "2", "train",
                   *_resume_options(pivot, fused, out)])  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-5000:]
    work = work_dir(out)
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (work / "checkpoint-4" / "model.safetensors").exists()
    assert not (work / "checkpoint-4" / "trainer_state.json").exists()

    summary, log = _resume_and_compare(setup, out, uninterrupted)
    assert summary["resumed_from"] == "checkpoint-2"
    assert "ignoring checkpoint-4 (killed while being written); resuming from checkpoint-2" in log


def test_two_nodes_through_the_per_node_launcher(setup, tmp_path):
    """A 2-node ZeRO-3 run: what `deepspeed --hostfile` starts on each node (through pdsh),
    here two per-node launchers on one machine, one rank each, meeting over TCP."""
    pivot, fused, rows = setup
    out = tmp_path / "target-two-nodes"
    config = TrainConfig(model=str(pivot), fused=str(fused), out=str(out), deepspeed="zero3",
                         **{**SETTINGS, "per_device_batch_size": 2})  # fmt: skip
    prepare(config, world_size=2)  # what `fusion-train train --hostfile` checks before launching
    world_info = base64.urlsafe_b64encode(json.dumps({"node-a": [0], "node-b": [0]}).encode()).decode()
    port = _free_port()
    launcher = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    call = tmp_path / "call.json"  # what `fusion-train train --hostfile` writes where every node reads it
    StageCall(train, {"config": config}, out).write(call)
    module = ["--module", "fusion_train.calls", str(call)]
    nodes = [[*launcher, f"--node_rank={rank}", *module] for rank in (0, 1)]
    running = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
               for node in nodes]  # fmt: skip
    outputs = [process.communicate(timeout=TIMEOUT)[0] for process in running]
    assert [p.returncode for p in running] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    summary = _check_output(out, pivot, rows)
    assert summary["world_size"] == 2
    parameters = summary["parameters"]
    for held in parameters["held_per_rank"]:  # each node holds about half of the parameters
        assert 0.45 * parameters["total"] <= held <= 0.55 * parameters["total"], parameters


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")],
        ),
    ],
)
def test_bf16_mixed_precision(setup, tmp_path, device):
    """bf16 mixed precision (DeepSpeed's bf16 path) under ZeRO-2 and ZeRO-3 (one after the other in
    one launched job) on 2 CPU ranks, and on the machine's GPUs (NCCL, up to 2 ranks) where it has
    any: learns, and the saved bf16 weights give the engine's logits."""
    pivot, fused, rows = setup
    ranks = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    stages = ("zero2", "zero3")
    outs = [tmp_path / f"target-{stage}-bf16" for stage in stages]
    configs = [{"model": str(pivot), "fused": str(fused), "out": str(out), "deepspeed": stage, "bf16": True,
                **SETTINGS, "per_device_batch_size": 4 // ranks} for stage, out in zip(stages, outs, strict=True)]  # fmt: skip
    engine_logits = _train_keeping_engine_logits(tmp_path, configs, ranks, gpus=device == "cuda")

    for stage, out, logits_file in zip(stages, outs, engine_logits, strict=True):
        summary = _check_output(out, pivot, rows)
        assert summary["world_size"] == ranks and summary["bf16"] is True
        assert summary["deepspeed"]["zero_optimization"]["stage"] == int(stage[-1])
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(device)
        with torch.no_grad():
            logits = model(input_ids=PROBE_TOKENS.to(device)).logits.float().cpu()
        assert_close_at_scale(logits, load_file(logits_file)["logits"], dtype=torch.bfloat16, ulps=4)


@pytest.mark.parametrize(
    ("model", "stages"), [("llama", ("zero2", "zero3")), ("gemma2-tied-softcap", ("zero3",))]
)
def test_chunked_head_trains_like_the_logits_loss(setup, tmp_path, model, stages):
    """2 CPU ranks, a few steps: the chunked head (``loss_chunk_tokens`` 3, so the head's weight
    gradient is summed over many chunks; under ZeRO-3 inside the partitioned head's call) takes the same
    steps as the logits-based loss under each ZeRO stage: same losses and gradient norms, same
    weights. Also on a Gemma-2 whose head is its (tied) embedding and whose logits are soft-capped."""
    pivot, fused, rows = setup
    if model != "llama":
        from test_losses_chunked import _tiny_gemma2

        pivot = _tiny_gemma2(pivot, tmp_path / "gemma2")
        fused = build_fused(pivot, tmp_path / "fused-gemma2", rows=rows)
    # Every run in one launched job, one after the other (the driver checks each used its loss).
    runs = {
        (stage, loss): tmp_path / stage / loss / "target"
        for stage in stages
        for loss in ("logits", "chunked")
    }
    configs = [{"loss": loss, "config": {"model": str(pivot), "fused": str(fused), "out": str(out), "deepspeed": stage,
                                         **SETTINGS, "per_device_batch_size": 2, "loss_chunk_tokens": 3}}
               for (stage, loss), out in runs.items()]  # fmt: skip
    config_path = tmp_path / "configs.json"
    config_path.write_text(json.dumps(configs))
    command = [deepspeed_launcher(), "--num_gpus", "2", "--master_port", str(_free_port())]
    result = _run([*command, str(DRIVER), str(config_path), "losses", "-"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for stage in stages:
        summaries = {
            loss: json.loads((runs[stage, loss] / SUMMARY).read_text()) for loss in ("logits", "chunked")
        }
        assert summaries["chunked"]["deepspeed"]["zero_optimization"]["stage"] == int(stage[-1])
        _assert_same_steps(summaries["chunked"], summaries["logits"])
        # The head's gradient summed over chunks rather than in one product: rounding, which Adam
        # amplifies in near-zero gradients.
        assert_same_adam_updates(load_file(runs[stage, "chunked"] / "model.safetensors"),
                                 load_file(runs[stage, "logits"] / "model.safetensors"),
                                 load_file(pivot / "model.safetensors"))  # fmt: skip
        assert summaries["chunked"]["loss"]["end"]["loss"] < summaries["chunked"]["loss"]["start"]["loss"]
