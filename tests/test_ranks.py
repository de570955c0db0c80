"""represent and evaluate on several ranks: 2 CPU processes started by `--nproc 2` (gloo),
against the single-process run of the same data; ZeRO-3 partitioned inference; devices.

What would make these fail: a rank skipping or repeating a part or a batch, rank 0 finishing
before the others wrote their share, ZeRO-3 ranks running different numbers of forward passes
(a hang, caught by the timeout), a partitioned LM head scored from a rank's empty shard, options
lost on the way to the ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numeric import (
    DEFAULT_ULPS,
    approx_at_scale,
    assert_close_at_scale,
    assert_same_representation,
    assert_stored_close,
)

from fusion_train.cli import main
from fusion_train.evaluate import ModelSpec, evaluate
from fusion_train.inference import InferenceSettings
from fusion_train.launch import LaunchError, free_port, resolve_device
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import load_representation

pytestmark = pytest.mark.slow
# The CLI as a module: also where the package is on PYTHONPATH rather than installed (the GPU check).
FUSION_TRAIN = [sys.executable, "-m", "fusion_train"]


def run_cli(*arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*FUSION_TRAIN, *arguments, "--master-port", str(free_port())],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def represent_arguments(model: Path, chats: Path, out: Path) -> list[str]:
    """The settings of conftest's ``represented`` fixture, as a command line."""
    return ["represent", "--model", str(model), "--data", str(chats), "--out", str(out), "--top-k", "5",
            "--chunk-size", "3", "--batch-tokens", "256"]  # fmt: skip


def test_represent_on_two_ranks_equals_one_process(
    tiny_models: dict, chats: Path, represented: dict, tmp_path: Path
) -> None:
    # 7 records in parts of 3: rank 0 writes parts 0 and 2, rank 1 part 1
    run_cli(*represent_arguments(tiny_models["qwen"], chats, tmp_path), "--nproc", "2")
    # the same batches, on ranks of one thread: equal up to float32 rounding
    assert_same_representation(load_representation(tmp_path), load_representation(represented["qwen"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["placement"]["world_size"] == 2 and summary["represented"] == 7


def test_represent_zero3_holds_half_the_weights_per_rank_and_agrees(
    tiny_models: dict, chats: Path, represented: dict, tmp_path: Path
) -> None:
    run_cli(
        *represent_arguments(tiny_models["smollm2"], chats, tmp_path), "--nproc", "2", "--deepspeed", "zero3"
    )
    parameters = json.loads((tmp_path / "summary.json").read_text())["placement"]["parameters"]
    total, held = parameters["total"], parameters["held_per_rank"]
    assert len(held) == 2 and all(0.45 * total <= h <= 0.55 * total for h in held), parameters

    ours = load_representation(tmp_path)
    reference = load_representation(represented["smollm2"])
    assert ours["id"] == reference["id"] and ours["input_ids"] == reference["input_ids"]
    ids = np.concatenate([np.asarray(x) for x in ours["topk_ids"]])
    reference_ids = np.concatenate([np.asarray(x) for x in reference["topk_ids"]])
    assert (ids == reference_ids).all(axis=1).mean() >= 0.99
    logprobs = np.concatenate([np.asarray(x, dtype=np.float32) for x in ours["topk_logprobs"]])
    reference_logprobs = np.concatenate([np.asarray(x, dtype=np.float32) for x in reference["topk_logprobs"]])
    assert_stored_close(logprobs, reference_logprobs, stored="float16", computed="float32", ulps=DEFAULT_ULPS)
    assert_close_at_scale(ours["nll"], reference["nll"], dtype=torch.float32)


def test_evaluate_on_two_ranks_gives_the_same_bits_per_byte(
    tiny_models: dict, chats: Path, tmp_path: Path
) -> None:
    models = [ModelSpec("pivot", str(tiny_models["smollm2"]), "pivot"),
              ModelSpec("source", str(tiny_models["mistral"]), "source", "llama2")]  # fmt: skip
    one = evaluate(models, chats, tmp_path / "one", batch_tokens=128, compare_to="pivot", progress=False)
    run_cli("evaluate", "--data", str(chats), "--out", str(tmp_path / "two"), "--model", f"pivot={models[0].path}:pivot",
            "--model", f"source={models[1].path}:source", "--chat-template", "source=llama2", "--compare-to", "pivot",
            "--batch-tokens", "128", "--nproc", "2")  # fmt: skip
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    # the same batches, on ranks of one thread: equal up to float32 rounding at the models' scale
    scale = max(r["bits_per_byte"]["value"] for r in one["models"])
    for ours, reference in zip(two["models"], one["models"], strict=True):
        for figure in ("bits_per_byte", "difference"):
            assert (ours[figure] is None) == (reference[figure] is None), figure
            for key, value in (reference[figure] or {}).items():
                expected = (
                    value
                    if isinstance(value, int)
                    else approx_at_scale(value, dtype=torch.float32, scale=scale)
                )
                assert ours[figure][key] == expected, (figure, key)
    assert two["examples"] == one["examples"] == 7
    assert [r["chat_template"] for r in two["models"]] == [None, "llama2"]


def evaluate_arguments(tiny_models: dict, chats: Path, out: Path) -> list[str]:
    return ["evaluate", "--data", str(chats), "--out", str(out), "--model", f"pivot={tiny_models['smollm2']}:pivot",
            "--model", f"source={tiny_models['mistral']}:source", "--chat-template", "source=llama2",
            "--compare-to", "pivot", "--max-length", "64", "--batch-tokens", "128", "--dtype", "bfloat16"]  # fmt: skip


@pytest.mark.parametrize("stage", ["represent", "evaluate"])
def test_a_command_under_nproc_gives_every_rank_the_call_it_makes_here(
    stage: str, tiny_models: dict, chats: Path, tmp_path: Path, monkeypatch, launched_calls
) -> None:
    """What ``--nproc 2`` hands the ranks (the call file, read back as a rank reads it) is the call
    the command makes in this process without it: the function, every argument (settings
    dataclasses and model lists whole) and what prints the result; the launcher gets the
    processes and the port."""
    out = tmp_path / "out"
    if stage == "represent":
        arguments = [
            *represent_arguments(tiny_models["qwen"], chats, out),
            "--limit",
            "4",
            "--dtype",
            "bfloat16",
        ]
    else:
        arguments = evaluate_arguments(tiny_models, chats, out)
    module = importlib.import_module(f"fusion_train.{stage}")
    result = CliRunner().invoke(main, [*arguments, "--nproc", "2", "--master-port", "29911"])
    assert result.exit_code == 0, result.output
    (launched,) = launched_calls
    assert (launched.nproc, launched.hostfile, launched.master_port) == (2, None, 29911)
    call = launched.call
    assert call.function is getattr(module, stage) and call.out == out
    assert call.report is getattr(module, f"report_{stage}{'ed' if stage == 'represent' else 'd'}")

    here: list[dict] = []
    monkeypatch.setattr(module, stage, lambda **arguments: here.append(arguments))
    monkeypatch.setattr(module, call.report.__name__, lambda out, result: None)
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert here == [call.arguments] and len(launched_calls) == 1


def test_device_map_auto_places_the_model_and_changes_nothing(
    tiny_models: dict, chats: Path, represented: dict, tmp_path: Path
) -> None:
    """accelerate's placement (here: all on the CPU, the only device) gives the same parts."""
    settings = RepresentSettings(top_k=5, chunk_size=3)
    inference = InferenceSettings(device_map="auto")
    represent(
        tiny_models["qwen"], chats, tmp_path, settings, inference=inference, batch_tokens=256, progress=False
    )
    assert load_representation(tmp_path).to_dict() == load_representation(represented["qwen"]).to_dict()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_is_honoured_and_a_missing_gpu_refused(tiny_models: dict, chats: Path, tmp_path: Path) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LaunchError, match="no CUDA GPU"):
        resolve_device("cuda:0")
    out = tmp_path / "cuda"
    result = CliRunner().invoke(main, [*represent_arguments(tiny_models["qwen"], chats, out), "--device", "cuda"])  # fmt: skip
    assert (
        result.exit_code == 1
        and "--device cuda: no CUDA GPU" in result.output
        and "Traceback" not in result.output
    )
    result = CliRunner().invoke(main, [*represent_arguments(tiny_models["qwen"], chats, out), "--device", "gpu"])  # fmt: skip
    assert result.exit_code == 1 and "--device gpu: expected auto, cpu, cuda or cuda:N" in result.output
    for flags, message in [
        (["--engine", "vllm"], "--engine vllm needs a CUDA GPU"),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size is vLLM's"),
        (["--device-map", "auto", "--deepspeed", "zero3"], "choose one"),
        (["--engine", "vllm", "--nproc", "2"], "drop --nproc"),
    ]:
        result = CliRunner().invoke(main, [*represent_arguments(tiny_models["qwen"], chats, out), *flags])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, flags
    assert not out.exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_represent_on_the_gpu_agrees_with_the_cpu(tiny_models: dict, chats: Path, tmp_path: Path) -> None:
    """Against a CPU run of its own: conftest's ``represented`` takes the GPU too where there is one."""
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    run_cli(*represent_arguments(tiny_models["qwen"], chats, cpu), "--device", "cpu", "--dtype", "float32")
    run_cli(*represent_arguments(tiny_models["qwen"], chats, gpu), "--device", "cuda", "--dtype", "float32",
            "--nproc", "1")  # fmt: skip
    ours, reference = load_representation(gpu), load_representation(cpu)
    ids = np.concatenate([np.asarray(x) for x in ours["topk_ids"]])
    reference_ids = np.concatenate([np.asarray(x) for x in reference["topk_ids"]])
    assert (ids == reference_ids).all(axis=1).mean() >= 0.99
    summary = json.loads((gpu / "summary.json").read_text())
    assert summary["placement"]["device"] == "cuda:0"


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs a CUDA GPU and vLLM",
)
def test_vllm_engine_agrees_with_the_hf_engine(tmp_path: Path) -> None:
    """Both engines on SmolLM2-135M-Instruct and 40 alpaca-eval answers, in float32 on the GPU."""
    from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, smollm2_instruct_dir

    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[:40]))
    model = smollm2_instruct_dir()
    common = ["represent", "--model", str(model), "--data", str(data), "--top-k", "10", "--max-length", "512",
              "--dtype", "float32", "--device", "cuda"]  # fmt: skip
    run_cli(*common, "--out", str(tmp_path / "hf"), "--nproc", "1")
    run_cli(*common, "--out", str(tmp_path / "vllm"), "--engine", "vllm")
    hf, vllm = load_representation(tmp_path / "hf"), load_representation(tmp_path / "vllm")
    assert hf["input_ids"] == vllm["input_ids"] and hf["byte_start"] == vllm["byte_start"]
    ids = [np.concatenate([np.asarray(x) for x in r["topk_ids"]]) for r in (hf, vllm)]
    assert (ids[0] == ids[1]).all(axis=1).mean() >= 0.99
    logprobs = [
        np.concatenate([np.asarray(x, dtype=np.float32) for x in r["topk_logprobs"]]) for r in (hf, vllm)
    ]
    same = (ids[0] == ids[1]).all(axis=1)
    assert np.abs(logprobs[0][same] - logprobs[1][same]).max() <= 0.02
