"""`fusion-train train` in one process: the sparse loss against a dense reference, the CLM-only
baseline against transformers' own loss, and every bad input refused before training starts.
The multi-rank DeepSpeed runs are in test_train_deepspeed.py."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from logits_losses import supervised_loss_sums
from numeric import approx_at_scale, assert_close_at_scale
from train_fixtures import (
    assert_left_no_rank_behind,
    batch_from_rows,
    build_fused,
    dense_loss_sums,
    dense_reference_losses,
    fused_rows,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from fusion_train import train as train_module
from fusion_train import training
from fusion_train.cli import main
from fusion_train.errors import TrainInputError
from fusion_train.fused import load_fused
from fusion_train.launch import world_size_of
from fusion_train.losses import CHUNK_TOKENS
from fusion_train.train import (
    FusionCollator,
    FusionTrainer,
    TrainConfig,
    prepare,
    train_command,
)
from fusion_train.training import deepspeed_config, work_dir

# (device, dtype) pairs the loss is checked on: float32 and bf16 on the CPU, and bf16 on a CUDA GPU
# where the machine has one (CI's machines do not; run the suite on a GPU machine to cover it).
PRECISIONS = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]  # fmt: skip


def _trainer(
    model_dir: Path,
    tmp_path: Path,
    lm_weight: float,
    temperature: float = 1.0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    loss_chunk_tokens: int = CHUNK_TOKENS,
):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True)
    trainer = FusionTrainer(
        model=model,
        args=args,
        lm_weight=lm_weight,
        temperature=temperature,
        tokenizer_size=len(tokenizer),
        loss_chunk_tokens=loss_chunk_tokens,
    )
    return trainer, model, tokenizer


def _collated(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows as they reach the collator from the stored data set (numpy, float16 values)."""
    import numpy as np

    as_numpy = [
        {
            "input_ids": np.array(r["input_ids"]),
            "run_start": np.array(r["run_start"]),
            "run_length": np.array(r["run_length"]),
            "topk_ids": np.array(r["topk_ids"], dtype=np.int64),
            "topk_logprobs": np.array(r["topk_logprobs"], dtype=np.float16).astype(np.float32),
        }
        for r in rows
    ]
    return FusionCollator(pad_id)(as_numpy)


@pytest.mark.parametrize(("device", "dtype"), PRECISIONS)
@pytest.mark.parametrize("name", ["mistral", "qwen"])
@pytest.mark.parametrize(("lm_weight", "temperature"), [(0.0, 1.0), (0.5, 2.0)])
def test_sparse_loss_matches_dense_reference(
    tiny_models, tmp_path, name, lm_weight, temperature, device, dtype
):
    """Value and gradient of the trainer's loss (the chunked head), on an ordinary and a padded
    vocabulary (qwen: 151,936 rows > 151,851 ids).

    In bf16 both losses read the same bf16 logits and compute in float32/float64; their logit
    gradients are rounded to bf16 (the reference rounds once; the chunked head rounds each chunk's
    logit gradient and its product with the hidden states, summed in float32), so the parameter
    gradients agree to about a bf16 step.
    """
    # Several row chunks of the chunked head (single-row chunks are matrix-vector products, whose
    # float32 sums over 152k rows drift by ~1e-5 relative).
    trainer, model, tokenizer = _trainer(
        tiny_models[name], tmp_path, lm_weight, temperature, device, dtype, loss_chunk_tokens=2
    )
    rows = fused_rows(tiny_models[name], examples=3, top_k=4)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    sparse = trainer.compute_loss(model, {k: v.to(device) for k, v in _collated(rows, pad_id).items()})
    sparse.backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    batch = {k: v.to(device) for k, v in batch_from_rows(rows, pad_id).items()}
    logits = model(**batch).logits
    clm, fusion = dense_reference_losses(logits, rows, len(tokenizer), temperature)
    dense = lm_weight * clm + (1 - lm_weight) * fusion
    dense.backward()

    assert sparse.item() == approx_at_scale(dense.item(), dtype=torch.float32)
    for parameter_name, parameter in model.named_parameters():
        assert_close_at_scale(sparse_grads[parameter_name], parameter.grad, dtype=dtype,
                              ulps=64 if dtype == torch.float32 else 4, msg=parameter_name)  # fmt: skip
    if name == "qwen":  # padded rows are never fusion targets, but the CLM softmax includes them
        padded_rows = sparse_grads["lm_head.weight"][len(tokenizer) :]
        assert (padded_rows.abs().sum() > 0) == (lm_weight > 0)


@pytest.mark.parametrize("name", ["mistral", "qwen"])
def test_clm_only_baseline_is_the_plain_causal_lm_loss(tiny_models, tmp_path, name):
    trainer, model, tokenizer = _trainer(tiny_models[name], tmp_path, lm_weight=1.0)
    rows = fused_rows(tiny_models[name], examples=3)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = batch_from_rows(rows, pad_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, row in enumerate(rows):
        for start, count in zip(row["run_start"], row["run_length"], strict=True):
            labels[i, start : start + count] = torch.tensor(row["input_ids"][start : start + count])
    plain = model(**batch, labels=labels).loss
    ours = trainer.compute_loss(model, _collated(rows, pad_id))
    assert ours.item() == approx_at_scale(plain.item(), dtype=torch.float32)


def test_loss_is_normalised_by_the_accumulated_token_count(tiny_models, tmp_path):
    """With num_items_in_batch (the Trainer's count over accumulation steps) the loss is sum / count."""
    trainer, model, tokenizer = _trainer(tiny_models["mistral"], tmp_path, lm_weight=0.9)
    rows = fused_rows(tiny_models["mistral"], examples=2)
    inputs = _collated(rows, tokenizer.eos_token_id)
    tokens = sum(sum(r["run_length"]) for r in rows)
    mean = trainer.compute_loss(model, inputs)
    scaled = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(4 * tokens))
    assert scaled.item() == approx_at_scale(mean.item() / 4, dtype=torch.float32)


PADDING_ROW = ([-1, -1, -1], [-math.inf, -math.inf, -math.inf])


@pytest.mark.parametrize("vocab", [11, 13], ids=["unpadded", "padded"])
def test_rows_whose_targets_are_all_padding_add_nothing_to_the_fusion_loss(vocab: int) -> None:
    """Rows with only padding targets (-1, -inf): finite losses equal to the dense sums, value and
    gradient; such a row's fusion gradient is zero, so its logits get the CLM gradient only."""
    torch.manual_seed(0)
    size = 11  # tokenizer ids; with vocab 13 the last two rows are padding rows of the embedding
    logits = (3 * torch.randn(5, vocab, dtype=torch.float64)).float().requires_grad_()
    labels = torch.tensor([1, 4, 7, 2, 9])
    topk_ids = [[4, 0, 9], PADDING_ROW[0], [3, 7, -1], PADDING_ROW[0], [10, 9, 8]]
    topk_logprobs = [[-0.5, -1.5, -2.0], PADDING_ROW[1], [-0.2, -2.5, -math.inf], PADDING_ROW[1],
                     [-1.0, -1.1, -3.0]]  # fmt: skip
    sums = supervised_loss_sums(
        logits, labels, size, torch.tensor(topk_ids), torch.tensor(topk_logprobs), temperature=2.0
    )
    assert torch.isfinite(sums.clm) and torch.isfinite(sums.fusion)
    (0.3 * sums.clm + 0.7 * sums.fusion).backward()
    grad = logits.grad.clone()

    reference = logits.detach().clone().requires_grad_()
    clm, fusion = dense_loss_sums(reference, labels, topk_ids, topk_logprobs, size, temperature=2.0)
    (0.3 * clm + 0.7 * fusion).backward()
    assert sums.clm.item() == approx_at_scale(clm.item(), dtype=torch.float32)
    assert sums.fusion.item() == approx_at_scale(fusion.item(), dtype=torch.float32)
    assert_close_at_scale(grad, reference.grad, dtype=torch.float32)
    clm_only = torch.softmax(logits.detach().double(), -1) - torch.nn.functional.one_hot(labels, vocab)
    assert_close_at_scale(grad[[1, 3]], 0.3 * clm_only[[1, 3]], dtype=torch.float32)


def test_trainer_loss_with_all_padding_target_rows_matches_the_dense_reference(tiny_models, tmp_path):
    """The same through the Trainer: all-padding rows still count in the token normaliser."""
    trainer, model, tokenizer = _trainer(tiny_models["mistral"], tmp_path, lm_weight=0.25)
    rows = fused_rows(tiny_models["mistral"], examples=2, top_k=3)
    for row in rows:
        for j in range(0, len(row["topk_ids"]), 3):
            row["topk_ids"][j], row["topk_logprobs"][j] = list(PADDING_ROW[0]), list(PADDING_ROW[1])
    sparse = trainer.compute_loss(model, _collated(rows, tokenizer.eos_token_id))
    assert torch.isfinite(sparse)
    clm, fusion = dense_reference_losses(
        model(**batch_from_rows(rows, tokenizer.eos_token_id)).logits, rows, len(tokenizer)
    )
    assert sparse.item() == approx_at_scale((0.25 * clm + 0.75 * fusion).item(), dtype=torch.float32)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def pivot(tiny_models) -> Path:
    return tiny_models["mistral"]


@pytest.fixture
def good_fused(pivot, tmp_path) -> Path:
    return build_fused(pivot, tmp_path / "fused")


def _rows_with(pivot: Path, change) -> list[dict]:
    rows = fused_rows(pivot, examples=3)
    change(rows)
    return rows


def test_fused_data_loads_and_drops_examples_without_supervised_tokens(pivot, tmp_path):
    def empty_second(rows):
        rows[1].update(run_start=[], run_length=[], run_message=[], topk_ids=[], topk_logprobs=[])

    rows = _rows_with(pivot, empty_second)
    loaded = load_fused(
        build_fused(pivot, tmp_path / "fused", rows=rows), AutoTokenizer.from_pretrained(pivot)
    )
    assert loaded.stats["examples"] == 2
    assert loaded.stats["dropped_ids"] == ["ex1"]
    assert loaded.stats["supervised_tokens"] == sum(len(r["topk_ids"]) for r in rows)
    assert [list(ids) for ids in loaded.data["input_ids"]] == [rows[0]["input_ids"], rows[2]["input_ids"]]


def _set(row_index: int, column: str, position: tuple[int, int], value):
    def change(rows):
        rows[row_index][column][position[0]][position[1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message", "example"),
    [
        (_set(0, "topk_logprobs", (0, 0), math.nan), "NaN", 0),
        (_set(1, "topk_logprobs", (2, 1), math.inf), "log-probability inf", 1),
        (_set(0, "topk_logprobs", (0, 0), -math.inf), "-inf on a valid id", 0),
        (_set(2, "topk_ids", (0, 1), 32000), "target id 32000 outside", 2),
        (_set(0, "topk_ids", (1, 2), -5), "target id -5 outside", 0),
        (lambda rows: rows[1]["input_ids"].__setitem__(0, 40000), "input_ids outside", 1),
        (lambda rows: rows[0].update(run_start=[0]), "supervised runs", 0),
        (lambda rows: rows[0].update(run_length=[rows[0]["run_length"][0] + 50]), "supervised runs", 0),
        (lambda rows: [rows[2][c].pop() for c in ("topk_ids", "topk_logprobs")], "target rows for", 2),
    ],
)
def test_bad_fused_data_is_refused_naming_the_example(pivot, tmp_path, change, message, example):
    rows = _rows_with(pivot, change)
    fused = build_fused(pivot, tmp_path / "fused", rows=rows)
    with pytest.raises(TrainInputError, match=message) as error:
        load_fused(fused, AutoTokenizer.from_pretrained(pivot))
    assert f"fused example {example} (id {rows[example]['id']!r})" in str(error.value)


def test_padding_slots_may_hold_minus_inf(pivot, good_fused):
    data = load_fused(good_fused, AutoTokenizer.from_pretrained(pivot)).data.with_format(None)
    assert any(-1 in row for example in data["topk_ids"] for row in example)  # the fixture pads some rows


def test_fused_data_for_another_pivot_is_refused(tiny_models, pivot, tmp_path):
    fused = build_fused(tiny_models["smollm2"], tmp_path / "fused")
    with pytest.raises(TrainInputError, match="was fused for the pivot tokenizer"):
        load_fused(fused, AutoTokenizer.from_pretrained(pivot))


def test_empty_data_and_no_supervised_tokens_are_refused(pivot, tmp_path):
    with pytest.raises(TrainInputError, match="empty"):
        load_fused(build_fused(pivot, tmp_path / "a", rows=[]), AutoTokenizer.from_pretrained(pivot))

    def nothing_supervised(rows):
        for row in rows:
            row.update(run_start=[], run_length=[], run_message=[], topk_ids=[], topk_logprobs=[])

    fused = build_fused(pivot, tmp_path / "b", rows=_rows_with(pivot, nothing_supervised))
    with pytest.raises(TrainInputError, match="no example has supervised tokens"):
        load_fused(fused, AutoTokenizer.from_pretrained(pivot))


def test_other_formats_are_refused(pivot, tmp_path):
    fused = build_fused(pivot, tmp_path / "fused", format="fusion-train/aligned@1")
    with pytest.raises(TrainInputError, match="is not 'fusion-train/fused@1'"):
        load_fused(fused, AutoTokenizer.from_pretrained(pivot))


def _config(pivot: Path, fused: Path, tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(model=str(pivot), fused=str(fused), out=str(tmp_path / "target"), **changes)


@pytest.mark.parametrize(
    ("ds", "changes", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, {}, "train_micro_batch_size_per_gpu=4 vs hf"),
        ({"gradient_accumulation_steps": 8}, {"grad_accumulation": 2}, "gradient_accumulation_steps=8"),
        ({"train_batch_size": 2}, {}, "train_batch_size=2 vs hf train_batch_size \\(calculated\\)=4"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {}, "optimizer.params.lr=0.001"),
        ({"bf16": {"enabled": True}}, {"bf16": False}, "bf16.enabled=True"),
        ({"fp16": {"enabled": True}}, {}, "fp16.enabled=True"),
        ({"scheduler": {"type": "WarmupLR"}}, {}, "ds scheduler is set"),
        ({"zero_optimization": {"stage": 3}}, {}, "stage3_gather_16bit_weights_on_model_save"),
    ],
)
def test_deepspeed_config_contradicting_the_command_line_is_refused(
    pivot, good_fused, tmp_path, ds, changes, message
):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(TrainInputError, match=message):
        deepspeed_config(str(path), _config(pivot, good_fused, tmp_path, **changes), world_size=4)


def test_presets_agree_with_the_defaults_and_bad_specs_are_refused(pivot, good_fused, tmp_path):
    config = _config(pivot, good_fused, tmp_path)
    for preset in ("zero2", "zero3", "zero3-offload"):
        resolved = deepspeed_config(preset, config, world_size=8)
        assert resolved["optimizer"]["params"]["torch_adam"] is True
    assert deepspeed_config("zero3", config, 2)["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]
    with pytest.raises(TrainInputError, match="not a preset"):
        deepspeed_config("zero4", config, 1)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TrainInputError, match="not valid JSON"):
        deepspeed_config(str(tmp_path / "broken.json"), config, 1)


def test_output_and_checkpoint_state_are_checked(pivot, good_fused, tmp_path):
    config = _config(pivot, good_fused, tmp_path)
    assert prepare(_config(pivot, good_fused, tmp_path, resume=True), world_size=1).resume_from is None
    shutil.rmtree(work_dir(config.out))
    (work_dir(config.out) / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(TrainInputError, match="pass --resume"):
        prepare(config, world_size=1)
    shutil.rmtree(work_dir(config.out))
    prepare(config, world_size=1)  # records the run's manifest
    with pytest.raises(ValueError, match="differs in: settings"):
        prepare(_config(pivot, good_fused, tmp_path, learning_rate=1.0), world_size=1)
    Path(config.out).mkdir()
    with pytest.raises(TrainInputError, match="already exists"):
        prepare(config, world_size=1)


def test_training_in_this_process_twice_leaves_no_rank_behind(pivot, good_fused, tmp_path, monkeypatch):
    """train() run by a library caller, a world of one: the rank's variables are the run's only
    (a later launch in the same process is not refused as one inside a launched rank), a second
    run reuses the process group transformers keeps, and after a ZeRO-3 run models load whole
    again (transformers' Trainer would leave ZeRO-3 switched on for every later from_pretrained)."""
    import os

    from transformers.integrations import is_deepspeed_zero3_enabled

    from fusion_train.models import load_model

    saved = dict(os.environ)
    for run, deepspeed in (("first", "zero2"), ("second", "zero3")):
        config = TrainConfig(model=str(pivot), fused=str(good_fused), out=str(tmp_path / run), max_steps=1,
                             warmup_ratio=0.0, logging_steps=1, bf16=False, deepspeed=deepspeed)  # fmt: skip
        summary = train_module.train(config)
        assert summary is not None and summary["steps"] == 1 and summary["world_size"] == 1
        assert_left_no_rank_behind(monkeypatch, saved)
    assert not is_deepspeed_zero3_enabled()
    model = load_model(pivot)
    assert all(p.numel() > 0 for p in model.parameters())  # not partitioned away by zero.Init


def test_cli_reports_bad_input_before_training(pivot, tmp_path):
    rows = _rows_with(pivot, _set(0, "topk_logprobs", (0, 0), math.nan))
    fused = build_fused(pivot, tmp_path / "fused", rows=rows)
    runner = CliRunner()
    result = runner.invoke(
        main, ["train", "--model", str(pivot), "--fused", str(fused), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "fused example 0 (id 'ex0')" in result.output
    assert not work_dir(tmp_path / "o").exists()
    result = runner.invoke(
        main,
        [
            "train",
            "--model",
            str(pivot),
            "--fused",
            str(fused),
            "--out",
            "o",
            "--no-fusion",
            "--lm-weight",
            "0.5",
        ],
    )
    assert result.exit_code == 1
    assert "--no-fusion means --lm-weight 1.0" in result.output


def test_bf16_where_it_cannot_run_is_refused_before_training(pivot, good_fused, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "bf16_support", lambda: (False, False))
    args = [
        "train",
        "--model",
        str(pivot),
        "--fused",
        str(good_fused),
        "--out",
        str(tmp_path / "b"),
        "--bf16",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--bf16: this machine cannot train in bf16" in result.output
    assert not work_dir(tmp_path / "b").exists()
    assert training.resolve_bf16(None) is False and training.resolve_bf16(False) is False


def test_launcher_problems_are_reported_before_starting(pivot, good_fused, tmp_path, monkeypatch):
    base = ["--model", str(pivot), "--fused", str(good_fused), "--out", str(tmp_path / "o")]
    runner = CliRunner()
    result = runner.invoke(train_command, [*base, "--nproc", "0"])
    assert result.exit_code == 2 and "'--nproc': 0 is not in the range x>=1" in result.output
    cases = [(["--hostfile", str(tmp_path / "missing")], "no such file")]
    (tmp_path / "hosts").write_text("node-a slots=two\n")
    cases.append((["--hostfile", str(tmp_path / "hosts")], "--hostfile"))
    (tmp_path / "two-hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    cases.append((["--hostfile", str(tmp_path / "two-hosts")], "needs pdsh"))
    for extra, message in cases:
        result = runner.invoke(train_command, base + extra)
        assert result.exit_code == 1, result.output
        assert message in result.output
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    (tmp_path / "one-host").write_text("localhost slots=2\n")
    result = runner.invoke(train_command, [*base, "--hostfile", str(tmp_path / "one-host")])
    assert result.exit_code == 1
    assert "`deepspeed` launcher is not installed" in result.output  # the nodes of a hostfile need it
    result = runner.invoke(train_command, [*base, "--nproc", "2"])  # this machine's processes do not
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: the processes could not start: [Errno 2] No such file or directory: '{sys.executable}'"
    ], result.output


def test_world_size_counts_nproc_on_every_node_of_the_hostfile(tmp_path):
    """The deepspeed launcher starts --num_gpus N processes on each node of a hostfile (else each
    node's slots): the world whose batch size and data shares the inputs are checked for."""
    two_nodes = tmp_path / "two-nodes"
    two_nodes.write_text("node-a slots=4\nnode-b slots=8\n")
    one_node = tmp_path / "one-node"
    one_node.write_text("node-a slots=4\n")
    assert world_size_of(2, str(two_nodes)) == 4  # 2 on node-a + 2 on node-b
    assert world_size_of(None, str(two_nodes)) == 12  # 4 + 8 slots
    assert world_size_of(3, str(one_node)) == 3
    assert world_size_of(None, str(one_node)) == 4
    assert world_size_of(3, None) == 3 and world_size_of(None, None) == 1


def test_no_fusion_trains_with_lm_weight_one_and_refuses_another_given_lm_weight(tmp_path, monkeypatch):
    """--no-fusion is --lm-weight 1.0; an --lm-weight given with it must be 1.0 as well, the
    default's value (0.9) included: one line naming both flags, before anything is read."""
    for name in ("model", "fused"):
        (tmp_path / name).mkdir()
    base = ["train", "--model", str(tmp_path / "model"), "--fused", str(tmp_path / "fused"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    seen = []
    monkeypatch.setattr(train_module, "train", lambda config: seen.append(config.lm_weight))
    runner = CliRunner()
    for extra, lm_weight in [([], 0.9), (["--lm-weight", "0.5"], 0.5), (["--no-fusion"], 1.0),
                             (["--no-fusion", "--lm-weight", "1.0"], 1.0), (["--lm-weight", "1", "--no-fusion"], 1.0)]:  # fmt: skip
        result = runner.invoke(main, base + extra)
        assert result.exit_code == 0, (extra, result.output)
        assert seen.pop() == lm_weight, extra
    for extra, shown in [(["--no-fusion", "--lm-weight", "0.9"], "0.9"), (["--lm-weight", "0.5", "--no-fusion"], "0.5"),
                         (["--no-fusion", "--lm-weight", "0"], "0")]:  # fmt: skip
        result = runner.invoke(main, base + extra)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (extra, result.output)
        assert "Traceback" not in result.output
        assert result.output.strip().splitlines() == [
            f"Error: --no-fusion means --lm-weight 1.0, but --lm-weight {shown} was given; drop one of them."
        ]
    assert seen == [] and not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


def test_launched_processes_receive_the_configuration_a_run_here_trains_with(
    pivot, good_fused, tmp_path, monkeypatch, launched_calls
):
    """The command line, written out by hand, gives the configuration below; under ``--nproc 2``
    the call file every rank reads holds the same (checked here first), and so does the call
    made in this process without it."""
    config = _config(pivot, good_fused, tmp_path, bf16=False, lm_weight=0.7, save_total_limit=0, resume=True,
                     loss_chunk_tokens=37, learning_rate=2e-5, scheduler="constant")  # fmt: skip
    arguments = ["--model", str(pivot), "--fused", str(good_fused), "--out", str(tmp_path / "target"), "--no-bf16",
                 "--lm-weight", "0.7", "--save-total-limit", "0", "--resume", "--loss-chunk-tokens", "37", "--lr",
                 "2e-5", "--scheduler", "constant"]  # fmt: skip
    result = CliRunner().invoke(train_command, [*arguments, "--nproc", "2"])
    assert result.exit_code == 0, result.output
    (launched,) = launched_calls
    assert launched.nproc == 2 and launched.call.function is train_module.train
    assert launched.call.arguments == {"config": config}
    seen = []
    monkeypatch.setattr(train_module, "train", lambda config: seen.append(config))
    result = CliRunner().invoke(train_command, arguments)
    assert result.exit_code == 0, result.output
    assert seen == [config]
    assert config.run_settings()["loss_chunk_tokens"] == 37  # recorded: it changes float summation order


def test_a_summary_with_non_finite_numbers_is_published_with_nulls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An fp16 step's grad_norm is inf where the loss scaler skipped it: the model is still published,
    its summary valid JSON, and the log names what became null."""
    trainer = SimpleNamespace(
        args=SimpleNamespace(output_dir=str(tmp_path / "work")),
        is_world_process_zero=lambda: True,
        accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
        save_model=lambda folder: Path(folder).mkdir(parents=True),
    )
    summary = {"steps": 2, "loss": {"start": {"loss": 0.7, "grad_norm": math.inf}, "end": {"loss": math.nan}}}
    with caplog.at_level("WARNING"):
        result = training.publish(trainer, tmp_path / "model", lambda: summary)  # type: ignore[arg-type]
    expected = {"steps": 2, "loss": {"start": {"loss": 0.7, "grad_norm": None}, "end": {"loss": None}}}
    assert result == expected
    written = (tmp_path / "model" / "training_summary.json").read_text()
    assert json.loads(written, parse_constant=pytest.fail) == expected
    assert "non-finite numbers written as null: loss.start.grad_norm, loss.end.loss" in caplog.text
