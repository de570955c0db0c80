"""Model directories that cannot be used, refused before any work (issue 22 §3).

Every command that reads a model directory checks it first (``models.check_model_directory``):
whatever is wrong with it, the user gets one line naming the directory and what is missing, exit
status 1, no traceback, and no output. A model whose weights transformers would initialise at
random (missing from the checkpoint, or saved in another shape than config.json gives) is
refused when it loads, naming the weights; a causal LM given as a reward model is refused up
front, from its config.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model, write_chats
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from fusion_train.cli import main
from fusion_train.implicit.score import RewardModel, RewardScorer
from fusion_train.models import ModelLoadError, check_model_directory, load_model


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM and reward model, chat data, and empty folders standing for the other
    inputs of commands (they are read after the model directory is checked)."""
    root = tmp_path_factory.mktemp("model-dirs")
    build_tiny_model(tokenizer_dirs["smollm2"], root / "model", hidden=16)
    tiny_llama(tokenizer_dirs["smollm2"], root / "reward", classifier=True)
    write_chats(root / "chats.jsonl")
    for name in ("fused", "prefs", "samples"):
        (root / name).mkdir()
    return root


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _split_in_two_shards(model: Path) -> None:
    """model.safetensors as two shards and an index, as save_pretrained writes large models."""
    state = load_file(model / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, model / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (model / "model.safetensors").unlink()


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])


def _broken_link(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(model / "blobs" / "gone")


def _as_pickle(model: Path) -> None:
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


# name -> (how to break a copy of a good model directory, what the error line must say)
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config.json": (lambda m: (m / "config.json").unlink(), "no config.json"),
    "config.json not JSON": (
        lambda m: (m / "config.json").write_text('{"model_type": "llama",'),
        "not valid JSON",
    ),
    "config.json without model_type": (
        lambda m: (m / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'),
        "no model_type",
    ),
    "unknown model_type": (lambda m: _edit_json(m / "config.json", model_type="llama9"), "'llama9'"),
    "a classifier, not a causal LM": (
        lambda m: _edit_json(m / "config.json", architectures=["LlamaForSequenceClassification"]),
        "a classifier, not a causal LM",
    ),
    "model code not trusted": (
        lambda m: _edit_json(m / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.X"}),
        "runs its own code (modeling_x.X",
    ),
    "no weights": (lambda m: (m / "model.safetensors").unlink(), "no weights in safetensors format"),
    "pickle weights only": (_as_pickle, "pytorch_model.bin"),
    "weights cut short": (lambda m: _truncate(m / "model.safetensors"), "not a complete safetensors file"),
    "weights a broken link": (_broken_link, "a link to a missing file"),
    "index naming a missing shard": (
        lambda m: (_split_in_two_shards(m), (m / "model-00002-of-00002.safetensors").unlink()),
        "1 of the 2 weights files model.safetensors.index.json names are missing (model-00002-of-00002",
    ),
    "a shard cut short": (
        lambda m: (_split_in_two_shards(m), _truncate(m / "model-00001-of-00002.safetensors")),
        "model-00001-of-00002.safetensors: not a complete safetensors file",
    ),
    "index not JSON": (
        lambda m: (_split_in_two_shards(m), (m / "model.safetensors.index.json").write_text("{")),
        "not a weights index",
    ),
    "no tokenizer files": (lambda m: (m / "tokenizer.json").unlink(), "no tokenizer files"),
    "config.json a directory": (
        lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()),
        "config.json: cannot be read (Is a directory)",
    ),
}
CAUSAL_LM_ONLY = (
    "a classifier, not a causal LM",
    "model code not trusted",
)  # a reward model is refused otherwise
COMMANDS = ("represent", "evaluate", "sample", "train", "sft", "dpo", "score")


def command_line(command: str, ws: Path, model: Path, out: Path) -> list[str]:
    data = str(ws / "chats.jsonl")
    return {
        "represent": ["represent", "--model", str(model), "--data", data, "--out", str(out)],
        "evaluate": ["evaluate", "--model", f"m={ws / 'model'}", "--model", f"broken={model}", "--data", data,
                     "--out", str(out)],
        "sample": ["sample", "--model", str(model), "--data", data, "--out", str(out)],
        "train": ["train", "--model", str(model), "--fused", str(ws / "fused"), "--out", str(out)],
        "sft": ["sft", "--model", str(model), "--prefs", str(ws / "prefs"), "--out", str(out)],
        "dpo": ["dpo", "--model", str(model), "--prefs", str(ws / "prefs"), "--out", str(out)],
        "score": ["score", "--samples", str(ws / "samples"), "--reward-model", str(model), "--out", str(out)],
    }[command]  # fmt: skip


def assert_refused(args: list[str], names: list[str], tmp_path: Path, loads: bool = False) -> str:
    """Exit status 1, one line (``loads``: after the progress bar of loading the weights), no
    traceback, and nothing new in ``tmp_path`` but the inputs; the error line."""
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    if loads:
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "an output was left behind"
    return lines[0]


@pytest.mark.parametrize(
    ("broken", "command"),
    [(b, c) for b in BROKEN for c in COMMANDS if not (c == "score" and b in CAUSAL_LM_ONLY)],
)
def test_a_broken_model_directory_is_one_line_before_any_work(
    broken: str, command: str, ws: Path, tmp_path: Path
) -> None:
    """score reads a reward model (broken the same ways), the other commands a causal LM."""
    model = tmp_path / "broken-model"
    shutil.copytree(ws / ("reward" if command == "score" else "model"), model)
    damage, says = BROKEN[broken]
    damage(model)
    assert_refused(command_line(command, ws, model, tmp_path / "out"), [str(model), says], tmp_path)


@pytest.mark.slow
def test_sharded_weights_and_weights_behind_links_pass_and_load(ws: Path, tmp_path: Path) -> None:
    """The check is no stricter than transformers: sharded weights with their index, and weights
    behind a link (as in a hub cache's snapshot) pass it and load."""
    sharded = shutil.copytree(ws / "model", tmp_path / "sharded")
    _split_in_two_shards(sharded)
    linked = shutil.copytree(ws / "model", tmp_path / "linked")
    (linked / "blobs").mkdir()
    (linked / "model.safetensors").rename(linked / "blobs" / "abc")
    (linked / "model.safetensors").symlink_to(linked / "blobs" / "abc")
    expected = load_file(ws / "model" / "model.safetensors")
    for model in (sharded, linked):
        assert check_model_directory(model) == model
        loaded = load_model(model).state_dict()
        assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


# --------------------------------------------------------------------------- weights at random


def tiny_llama(tokenizer_dir: Path, out: Path, classifier: bool = False, tied: bool = False) -> Path:
    """A random one-layer Llama saved with its tokenizer: a causal LM (``tied``: its LM head is the
    embedding, not saved), or a sequence classifier with one output."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def drop_weights(model: Path, *names: str) -> Path:
    """The model directory with the weights ``names`` left out of its checkpoint."""
    state = load_file(model / "model.safetensors")
    save_file({k: v for k, v in state.items() if k not in names}, model / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    return model


@pytest.mark.slow
def test_a_causal_lm_is_refused_as_a_reward_model_before_anything_is_scored(ws: Path, tmp_path: Path) -> None:
    """The issue's case: with --reward-label 0 a causal LM used to score with a random head."""
    for extra in ([], ["--reward-label", "0"]):
        args = ["score", "--samples", str(ws / "samples"), "--reward-model", str(ws / "model"),
                "--out", str(tmp_path / "out"), *extra]  # fmt: skip
        line = assert_refused(
            args, [str(ws / "model"), "LlamaForCausalLM", "not a sequence classifier"], tmp_path
        )
        assert "pass a reward model with its head saved" in line


@pytest.mark.slow
def test_a_reward_model_without_its_head_is_refused_naming_it(tokenizer_dirs: dict, tmp_path: Path) -> None:
    """config.json says sequence classifier, the checkpoint has no score head: caught when the
    weights load, from transformers' own loading info."""
    model = drop_weights(
        tiny_llama(tokenizer_dirs["smollm2"], tmp_path / "rm", classifier=True), "score.weight"
    )
    with pytest.raises(ModelLoadError) as refused:
        RewardScorer(RewardModel(str(model), 0, "LABEL_0", 1))
    assert str(refused.value) == (
        f"{model}: 1 weights of LlamaForSequenceClassification are not in the checkpoint and would be initialised "
        "at random (score.weight); pass a reward model with its head saved (a *ForSequenceClassification model, "
        "or one with its own code)."
    )


@pytest.mark.slow
def test_a_causal_lm_without_its_head_is_refused_by_every_command(ws: Path, tmp_path: Path) -> None:
    model = drop_weights(
        shutil.copytree(ws / "model", tmp_path / "headless"), "lm_head.weight", "model.norm.weight"
    )
    message = (f"{model}: 2 weights of LlamaForCausalLM are not in the checkpoint and would be initialised at random "
               "(lm_head.weight, model.norm.weight); pass a causal LM with all its weights saved.")  # fmt: skip
    for device_map in (None, {"": "cpu"}):  # also placed as it loads, as on a GPU
        with pytest.raises(ModelLoadError) as refused:
            load_model(model, device_map=device_map)
        assert str(refused.value) == message
    # represent loads the model before it claims its output: one line and nothing written
    line = assert_refused(command_line("represent", ws, model, tmp_path / "out"), [], tmp_path, loads=True)
    assert line == f"Error: {message}"


@pytest.mark.slow
def test_weights_of_another_shape_than_config_json_gives_are_refused(ws: Path, tmp_path: Path) -> None:
    model = shutil.copytree(ws / "model", tmp_path / "resized")
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    _edit_json(model / "config.json", vocab_size=64)
    with pytest.raises(ModelLoadError, match=r"2 weights of LlamaForCausalLM have another shape") as refused:
        load_model(model)
    assert f"lm_head.weight: [49152, {hidden}] saved, [64, {hidden}] expected, ...)" in str(refused.value)


@pytest.mark.slow
def test_a_tied_lm_head_is_not_missing(tokenizer_dirs: dict, tmp_path: Path) -> None:
    """With tied embeddings the checkpoint holds no lm_head.weight, legitimately."""
    model = tiny_llama(tokenizer_dirs["smollm2"], tmp_path / "tied", tied=True)
    assert "lm_head.weight" not in load_file(model / "model.safetensors")
    loaded = load_model(model)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_weights_at_random_are_refused_under_zero3_partitioned_loading(
    tokenizer_dirs: dict, ws: Path, tmp_path: Path
) -> None:
    """Under ZeRO-3 from_pretrained partitions the weights as it loads them (training, and
    represent/evaluate --deepspeed zero3): the loading info still lists what is missing, a tied
    head is still not missing, and weights of another shape are refused too."""
    from transformers import TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    from fusion_train.train import TrainConfig
    from fusion_train.training import deepspeed_config, trainer_arguments, trainer_in_this_process

    headless = drop_weights(shutil.copytree(ws / "model", tmp_path / "headless"), "lm_head.weight")
    tied = tiny_llama(tokenizer_dirs["smollm2"], tmp_path / "tied", tied=True)
    resized = shutil.copytree(ws / "model", tmp_path / "resized")
    _edit_json(resized / "config.json", vocab_size=64)
    config = TrainConfig(model=str(ws / "model"), fused="unused", out=str(tmp_path / "out"), deepspeed="zero3",
                         bf16=False)  # fmt: skip
    with trainer_in_this_process():
        args = trainer_arguments(
            TrainingArguments, config, tmp_path / "work", deepspeed_config("zero3", config, 1)
        )
        assert args.deepspeed and is_deepspeed_zero3_enabled()  # while args live, loading partitions
        with pytest.raises(ModelLoadError, match=r"1 weights of LlamaForCausalLM .* \(lm_head.weight\)"):
            load_model(headless)
        with pytest.raises(
            ModelLoadError, match=r"have another shape in the checkpoint than config\.json gives"
        ):
            load_model(resized)
        assert all(p.numel() == 0 for p in load_model(tied).parameters())  # partitioned, and accepted
