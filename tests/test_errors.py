"""Bad input through both CLIs: one line naming the culprit, a non-zero exit, no traceback, no
partial output. ``--debug`` (or FUSION_TRAIN_DEBUG=1) shows the traceback; bugs always keep it.

Each case is a row of CASES: how to build the input, and what the error line must name. The
rows are examples of kinds of bad input (data, flags, recipes, merge configs, model folders);
the mechanism under test is general (any UserError, at any depth, in any command).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from safetensors.torch import load_file
from varm_fixtures import make_base, make_target, save_model, tiny_config

from fusion_train import explicit, pipeline
from fusion_train.cli import main as fusion_train
from fusion_train.errors import DEBUG_ENV, UserError, user_message
from fusion_train.evaluate import parse_model_option
from fusion_train.recipe import RecipeError
from varm_merge.cli import main as varm_merge
from varm_merge.cli import run_command

CLIS = {"fusion-train": fusion_train, "varm-merge": varm_merge}


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny chat model, good chat data, empty model folders for recipes, tiny merge models."""
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("errors")
    build_tiny_model(tokenizer_dirs["smollm2"], root / "model", hidden=16)
    records = [{"instruction": f"Add {i} and {i}.", "output": f"{2 * i}."} for i in range(8)]
    (root / "chats.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("m-pivot", "m-source"):
        (root / name).mkdir()
    base = make_base(root / "base")
    make_target(root / "t1", base, seed=1)
    nan = make_target(root / "nan", base, seed=4)
    nan["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_model(root / "nan", nan, tiny_config())
    make_target(root / "pickled", base, seed=5)
    state = load_file(root / "pickled" / "model.safetensors")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save(state, root / "pickled" / "pytorch_model.bin")
    return root


@dataclass
class Case:
    """A command line (built in a fresh folder), what its error line must name, what must not exist."""

    cli: str
    args: list[str]
    names: list[str]
    absent: list[Path] = field(default_factory=list)


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def data_case(name: str, content: str | bytes, *names: str) -> Callable[[Path, Path], Case]:
    """`represent` on a bad data file: the model is fine, the data names the file and record."""

    def build(ws: Path, tmp: Path) -> Case:
        data = _file(tmp, name, content)
        args = ["represent", "--model", str(ws / "model"), "--data", str(data), "--out", str(tmp / "out")]
        return Case("fusion-train", args, [name, *names], [tmp / "out"])

    return build


def out_case(command: str) -> Callable[[Path, Path], Case]:
    """A command whose --out holds a file of the user's: refused, the file left alone (one rule for all)."""

    def build(ws: Path, tmp: Path) -> Case:
        out = _file(tmp / "mine", "notes.txt", "mine").parent
        model = f"m={ws / 'model'}" if command == "evaluate" else str(ws / "model")
        args = [command, "--model", model, "--data", str(ws / "chats.jsonl"), "--out", str(out)]
        names = ["mine holds files that are not an output of this command (notes.txt; no manifest.json)",
                 "new or empty --out"]  # fmt: skip
        return Case("fusion-train", args, names)

    return build


def flag_case(command: str, flag: str, value: str, *names: str) -> Callable[[Path, Path], Case]:
    """A number out of range: refused by click's range types, before anything is read."""

    def build(ws: Path, tmp: Path) -> Case:
        model, data, out = str(ws / "model"), str(ws / "chats.jsonl"), str(tmp / "out")
        required = {
            "represent": ["--model", model, "--data", data, "--out", out],
            "evaluate": ["--model", f"m={model}", "--data", data, "--out", out],
            "train": ["--model", model, "--fused", str(ws / "m-source"), "--out", out],
        }[command]
        return Case("fusion-train", [command, flag, value, *required], [flag, *names], [tmp / "out"])

    return build


def write_recipe(ws: Path, tmp: Path, **changes: object) -> Path:
    """A recipe that parses (empty model folders suffice before any stage), with ``changes``:
    ``train={...}`` replaces a section, ``text=...`` the whole file; "ws:NAME" is a workspace path."""

    def in_ws(value: object) -> object:
        if isinstance(value, dict):
            return {k: in_ws(v) for k, v in value.items()}
        if isinstance(value, list):
            return [in_ws(v) for v in value]
        return str(ws / value[3:]) if isinstance(value, str) and value.startswith("ws:") else value

    recipe = {
        "pivot": {"name": "pivot", "path": "ws:m-pivot"},
        "sources": [{"name": "source", "path": "ws:m-source"}],
        "data": {"train": "ws:chats.jsonl", "heldout_fraction": 0.25},
        "run_dir": "run",
        **{k: v for k, v in changes.items() if k != "text"},
    }
    recipe = in_ws(recipe)
    path = tmp / "recipe.yaml"
    text = changes.get("text")
    path.write_bytes(text if isinstance(text, bytes) else str(text or yaml.safe_dump(recipe)).encode())
    return path


def recipe_case(names: list[str], command: str = "run", **changes: object) -> Callable[[Path, Path], Case]:
    """`run` (or `sweep`) on a bad recipe: refused before any stage runs (no run folder)."""

    def build(ws: Path, tmp: Path) -> Case:
        args = [command, str(write_recipe(ws, tmp, **changes))]
        if command == "sweep":
            args += ["--vary", "train.lm_weight=0.5,1.5"]
        return Case("fusion-train", args, names, [tmp / "run"])

    return build


def merge_case(names: list[str], config: object = None, text: str | None = None, *options: str,
               out_exists: bool = False) -> Callable[[Path, Path], Case]:  # fmt: skip
    """`varm-merge run` on a bad config; model names in ``config`` are folders of the workspace."""

    def build(ws: Path, tmp: Path) -> Case:
        def local(value: object) -> object:
            if isinstance(value, dict):
                return {
                    k: local(v) if k in ("model", "base_model", "models") else v for k, v in value.items()
                }
            if isinstance(value, list):
                return [local(v) for v in value]
            return str(ws / value) if isinstance(value, str) and (ws / value).exists() else value

        path = tmp / "merge.yml"
        path.write_text(text if text is not None else yaml.safe_dump(local(config)))
        out = tmp / "merged"
        if out_exists:
            (out / "keep").mkdir(parents=True)
        return Case("varm-merge", ["run", str(path), str(out), "--quiet", *options], names,
                    [] if out_exists else [out])  # fmt: skip

    return build


def varm(*targets: str, **extra: object) -> dict:
    return {"merge_method": "varm", "base_model": "base", "models": [{"model": t} for t in targets],
            "dtype": "float32", **extra}  # fmt: skip


ALPACA = '{"instruction": "Hi", "output": "Hello"}\n'
CASES: dict[str, Callable[[Path, Path], Case]] = {
    # data
    "empty data file": data_case("empty.jsonl", "", "no records found"),
    "blank-only data file": data_case("blank.jsonl", "\n   \n\t\n", "no records found"),
    "empty JSON list": data_case("empty.json", "[]", "no records found"),
    "not UTF-8": data_case(
        "latin1.jsonl",
        ALPACA.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
        "line 2",
        "not UTF-8",
    ),
    "JSON line that does not parse": data_case(
        "bad.jsonl", ALPACA + '{"messages": [\n', "line 2", "not valid JSON"
    ),
    "JSON file that does not parse": data_case("bad.json", '[{"instruction": "a",', "invalid JSON"),
    "Alpaca output null": data_case(
        "null.jsonl",
        ALPACA + '{"instruction": "Hi", "output": null}\n',
        "record 1",
        "'output' must be text, got null",
    ),
    "Alpaca instruction a number": data_case(
        "num.jsonl",
        '{"instruction": 7, "output": "x"}\n',
        "record 0",
        "'instruction' must be text, got int 7",
    ),
    "message content null": data_case(
        "msg.jsonl",
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]}\n',
        "record 0, messages[1]",
        "'content' must be text, got null",
    ),
    "ShareGPT value a list": data_case(
        "share.jsonl",
        '{"conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "Yo"}]}\n',
        "conversations[0]",
        "'value' must be text, got list",
    ),
    "messages not a list": data_case("str.jsonl", '{"messages": "Hi"}\n', "'messages' must be a list"),
    "record not an object": data_case("list.json", "[1, 2]", "record 0", "expected a JSON object"),
    "unknown record shape": data_case(
        "shape.jsonl", '{"prompt": "a", "completion": "b"}\n', "unknown record shape"
    ),
    # numbers
    "--chunk-size 0": flag_case("represent", "--chunk-size", "0", "0 is not in the range x>=1"),
    "--top-k 0": flag_case("represent", "--top-k", "0", "0 is not in the range x>=1"),
    "--limit -3": flag_case("represent", "--limit", "-3", "-3 is not in the range x>=1"),
    "--limit 0": flag_case("represent", "--limit", "0", "0 is not in the range x>=1"),
    "--max-length negative": flag_case("represent", "--max-length", "-5", "not in the range x>=2"),
    "--batch-tokens negative": flag_case("represent", "--batch-tokens", "-1", "not in the range x>=1"),
    "evaluate --batch-tokens 0": flag_case("evaluate", "--batch-tokens", "0", "not in the range x>=1"),
    "train --lm-weight 1.5": flag_case("train", "--lm-weight", "1.5", "1.5 is not in the range 0.0<=x<=1.0"),
    "train --per-device-batch-size 0": flag_case("train", "--per-device-batch-size", "0", "x>=1"),
    "train --loss-chunk-tokens 0": flag_case(
        "train", "--loss-chunk-tokens", "0", "0 is not in the range x>=1"
    ),
    # recipes
    "recipe not YAML": recipe_case(
        ["recipe.yaml, line 2", "not valid YAML"], text="pivot: {name: p\nsources: [\n"
    ),
    "recipe not UTF-8": recipe_case(["recipe.yaml", "not UTF-8"], text=b"pivot: caf\xe9\n"),
    "recipe a list": recipe_case(["expected a mapping at the top level"], text="- pivot\n"),
    "train.lm_weight 1.5": recipe_case(
        ["train.lm_weight", "1.5 is not in the range 0.0<=x<=1.0"], train={"lm_weight": 1.5}
    ),
    "represent.top_k 0": recipe_case(["represent.top_k", "not in the range x>=1"], represent={"top_k": 0}),
    "represent.max_length text": recipe_case(
        ["represent.max_length", "expected an integer"], represent={"max_length": "long"}
    ),
    "unknown merge method": recipe_case(["merge.methods", "'bogus'"], merge={"methods": ["varm", "bogus"]}),
    "unknown vocab map": recipe_case(
        ["align.vocab_map", "'nope' is not one of"], align={"vocab_map": "nope"}
    ),
    "learning rate as YAML text": recipe_case(
        ["train.learning_rate", "decimal point"], train={"learning_rate": "5e-6"}
    ),
    "no epochs and no steps": recipe_case(["train.epochs"], train={"epochs": 0.0}),
    "deepspeed config missing": recipe_case(
        ["train.deepspeed", "nope.json"], train={"deepspeed": "nope.json"}
    ),
    "evaluate.batch_tokens 0": recipe_case(["evaluate.batch_tokens"], evaluate={"batch_tokens": 0}),
    "train.loss_chunk_tokens 0": recipe_case(
        ["train.loss_chunk_tokens", "0 is not in the range x>=1"], train={"loss_chunk_tokens": 0}
    ),
    "missing data file": recipe_case(
        ["data.train", "missing.jsonl", "does not exist"],
        data={"train": "missing.jsonl", "heldout_fraction": 0.25},
    ),
    "data.limit 0": recipe_case(
        ["data.limit"], data={"train": "ws:chats.jsonl", "heldout_fraction": 0.5, "limit": 0}
    ),
    "per-source lm_weight -1": recipe_case(
        ["sources[0].settings.train.lm_weight", "-1"],
        sources=[{"name": "s", "path": "ws:m-source", "settings": {"train": {"lm_weight": -1}}}],
    ),
    "model name with a slash": recipe_case(
        ["sources[0].name", "a/b"], sources=[{"name": "a/b", "path": "ws:m-source"}]
    ),
    "a source named as a model the run makes": recipe_case(
        ["sources[0].name", "'clm-baseline' is the name of a model the run makes"],
        sources=[{"name": "clm-baseline", "path": "ws:m-source"}],
    ),
    "vLLM in launched ranks": recipe_case(
        ["resources.engine vllm runs in one process", "drop resources.nproc"],
        resources={"engine": "vllm", "nproc": 2},
    ),
    "sweep value out of range": recipe_case(
        ["--vary train.lm_weight=1.5", "train.lm_weight", "not in the range"], command="sweep"
    ),
    # evaluate
    "evaluate missing model": lambda ws, tmp: Case(
        "fusion-train",
        [
            "evaluate",
            "--data",
            str(ws / "chats.jsonl"),
            "--model",
            f"m={tmp / 'nowhere'}",
            "--out",
            str(tmp / "out"),
        ],
        ["--model", "no model directory", "nowhere"],
        [tmp / "out"],
    ),
    "evaluate unknown role": lambda ws, tmp: Case(
        "fusion-train",
        [
            "evaluate",
            "--data",
            str(ws / "chats.jsonl"),
            "--model",
            f"m={ws / 'model'}:pivto",
            "--out",
            str(tmp / "out"),
        ],
        ["unknown role 'pivto'", "pivot"],
        [tmp / "out"],
    ),
    "evaluate --compare-to unknown": lambda ws, tmp: Case(
        "fusion-train",
        [
            "evaluate",
            "--data",
            str(ws / "chats.jsonl"),
            "--model",
            f"m={ws / 'model'}",
            "--compare-to",
            "nobody",
            "--out",
            str(tmp / "out"),
        ],
        ["'nobody'"],
        [tmp / "out"],
    ),
    # stages
    "represent output folder of another run": lambda ws, tmp: Case(
        "fusion-train",
        [
            "represent",
            "--model",
            str(ws / "model"),
            "--data",
            str(ws / "chats.jsonl"),
            "--out",
            str(_file(tmp / "out", "manifest.json", '{"format": "other"}').parent),
        ],
        [
            "out holds the manifest.json of a different run, and no results yet",
            "its format is 'other'",
            "--out",
        ],
    ),
    **{
        f"{command} into a folder of other files": out_case(command)
        for command in ("represent", "sample", "evaluate")
    },
    "represent chat template missing": lambda ws, tmp: Case(
        "fusion-train",
        [
            "represent",
            "--model",
            str(ws / "model"),
            "--data",
            str(ws / "chats.jsonl"),
            "--out",
            str(tmp / "out"),
            "--chat-template",
            "nope.jinja",
        ],
        ["--chat-template 'nope.jinja'"],
        [tmp / "out"],
    ),
    "represent model without tokenizer": lambda ws, tmp: Case(
        "fusion-train",
        [
            "represent",
            "--model",
            str(ws / "m-pivot"),
            "--data",
            str(ws / "chats.jsonl"),
            "--out",
            str(tmp / "out"),
        ],
        ["m-pivot", "no tokenizer files"],
        [tmp / "out"],
    ),
    # merges
    "merge config names a missing model": merge_case(
        ["'runs/missing'", "does not exist"], varm("t1", "runs/missing")
    ),
    "merge config not YAML": merge_case(
        ["merge.yml, line 2", "not valid YAML", "flow sequence that began at line 1"],
        None,
        "merge_method: [varm\n",
    ),
    "merge config a list": merge_case(["merge.yml", "expected a YAML mapping"], ["varm"]),
    "merge config wrong shape": merge_case(["models", "valid list"], {**varm(), "models": 3}),
    "unknown merge_method": merge_case(
        ["merge_method 'bogus'", "varm"], {**varm("t1"), "merge_method": "bogus"}
    ),
    "unknown granularity": merge_case(
        ["'matrix', 'element', 'layer' or 'model'"], varm("t1", parameters={"granularity": "row"})
    ),
    "pickle-only model": merge_case(
        ["pickled", "pytorch_model.bin", "--allow-pickle"], varm("t1", "pickled")
    ),
    "NaN in a checkpoint": merge_case(["NaN or Inf", "nan"], varm("t1", "nan")),
    "merge output exists": merge_case(["merged: already exists"], varm("t1"), out_exists=True),
    "weights of a NaN model": lambda ws, tmp: Case(
        "varm-merge",
        ["weights", "--base", str(ws / "base"), "--model", str(ws / "nan"), "--out", str(tmp / "w")],
        ["NaN or Inf"],
        [tmp / "w"],
    ),
    "weights into a folder of other files": lambda ws, tmp: Case(
        "varm-merge",
        [
            "weights",
            "--base",
            str(ws / "base"),
            "--model",
            str(ws / "t1"),
            "--out",
            str(_file(tmp / "mine", "notes.txt", "mine").parent),
        ],
        ["mine holds files that are not an output of this command (notes.txt; no manifest.json)"],
    ),
    "weights of a pickle-only model": lambda ws, tmp: Case(
        "varm-merge",
        ["weights", "--base", str(ws / "base"), "--model", str(ws / "pickled"), "--out", str(tmp / "w")],
        ["pytorch_model.bin"],
        [tmp / "w"],
    ),
}


def invoke(cli: str, args: list[str]) -> Result:
    return CliRunner().invoke(CLIS[cli], args, catch_exceptions=True)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_naming_the_culprit(name: str, ws: Path, tmp_path: Path) -> None:
    case = CASES[name](ws, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(case.cli, case.args)
    assert result.exit_code != 0, result.output
    # Handled by click (an escaped exception would be the result's exception, with a traceback).
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for culprit in case.names:
        assert culprit in errors[0], (culprit, errors[0])
    for path in case.absent:
        assert not path.exists(), f"{path} left behind"
    # Nothing half-written beside the outputs either (temporary folders are removed).
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_debug_shows_the_traceback(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it for child processes
    recipe = write_recipe(ws, tmp_path, train={"lm_weight": 1.5})
    result = CliRunner().invoke(fusion_train, ["--debug", "run", str(recipe)])
    assert isinstance(result.exception, RecipeError) and "train.lm_weight" in str(result.exception)
    assert os.environ[DEBUG_ENV] == "1"
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(varm("missing")))
    result = CliRunner().invoke(varm_merge, ["run", str(config), str(tmp_path / "o")])
    assert isinstance(result.exception, UserError), result.output  # the environment variable alone


def test_bugs_keep_their_traceback(ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    result = CliRunner().invoke(fusion_train, ["run", str(write_recipe(ws, tmp_path))])
    assert isinstance(result.exception, ZeroDivisionError)
    assert "Error:" not in result.output


def test_environment_errors_name_the_path() -> None:
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/part-00001")
    assert user_message(full) == f"/runs/x/part-00001: {os.strerror(errno.ENOSPC)}."
    assert user_message(OSError("no errno, no file")) is None  # e.g. a library's own OSError: a bug report
    assert user_message(KeyError("x")) is None


@pytest.mark.parametrize(
    ("command", "args", "stream_culprit"),
    [
        ([sys.executable, "-m", "fusion_train", "run"], ["recipe.yaml"], "train.lm_weight"),
        ([sys.executable, "-m", "varm_merge"], ["merge.yml", "out"], "'missing' does not exist"),
    ],
)
def test_a_real_process_prints_one_line(ws: Path, tmp_path: Path, command, args, stream_culprit) -> None:
    """What a user sees: stderr is `Error: ...` only, exit status 1."""
    write_recipe(ws, tmp_path, train={"lm_weight": 1.5})
    (tmp_path / "merge.yml").write_text(yaml.safe_dump({**varm("missing"), "base_model": str(ws / "base")}))
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    proc = subprocess.run(
        [*command, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and stream_culprit in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipe_is_checked_before_any_stage(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: `lm_weight: 1.5` used to fail after represent, align and fuse had run."""
    ran: list[str] = []
    monkeypatch.setattr(explicit, "represent", lambda *a, **k: ran.append("represent"))
    monkeypatch.setattr(pipeline, "split_data", lambda *a, **k: ran.append("split"))
    recipe = write_recipe(ws, tmp_path, sources=[{"name": "s", "path": "ws:m-source",
                                                  "settings": {"train": {"lm_weight": 1.5}}}])  # fmt: skip
    result = CliRunner().invoke(fusion_train, ["run", str(recipe)])
    assert result.exit_code == 1 and "sources[0].settings.train.lm_weight" in result.output
    assert ran == [] and not (tmp_path / "run").exists()


def test_evaluate_model_directories_may_hold_colons(tmp_path: Path) -> None:
    odd = tmp_path / "run:2026-11-29" / "model"
    odd.mkdir(parents=True)
    literal = tmp_path / "models" / "x:pivot"  # a folder whose own name ends like a role
    literal.mkdir(parents=True)
    assert parse_model_option(f"a={odd}") == parse_model_option(f"a={odd}:model")
    spec = parse_model_option(f"a={odd}:pivot")
    assert (spec.name, spec.path, spec.role) == ("a", str(odd), "pivot")
    spec = parse_model_option(f"b={literal}")
    assert (spec.path, spec.role) == (str(literal), "model")
    spec = parse_model_option(f"b={literal}:merge")
    assert (spec.path, spec.role) == (str(literal), "merge")
    for bad in ("nodir", f"={odd}", f"c={odd}:pivto"):
        with pytest.raises(click.BadParameter):
            parse_model_option(bad)


def test_help_and_version_on_both_clis() -> None:
    for cli, name in ((fusion_train, "fusion-train"), (varm_merge, "varm-merge")):
        for flag in ("-h", "--help"):
            result = CliRunner().invoke(cli, [flag])
            assert result.exit_code == 0 and "Usage:" in result.output and "--debug" in result.output
        result = CliRunner().invoke(cli, ["--version"])
        assert result.exit_code == 0 and result.output.startswith(f"{name}, version ")
    result = CliRunner().invoke(varm_merge, ["run", "-h"])
    assert result.exit_code == 0 and "--allow-pickle" in result.output
    result = CliRunner().invoke(run_command, ["-h"])  # python -m varm_merge -h
    assert result.exit_code == 0 and "CONFIG_FILE OUT_PATH" in result.output
    result = CliRunner().invoke(fusion_train, ["represent", "-h"])
    assert "--chunk-size INTEGER RANGE" in result.output and "x>=1" in result.output


def test_pickle_only_model_merges_when_allowed(ws: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(
        yaml.safe_dump({**varm(str(ws / "t1"), str(ws / "pickled")), "base_model": str(ws / "base")})
    )
    result = CliRunner().invoke(
        varm_merge, ["run", str(config), str(tmp_path / "o"), "--quiet", "--allow-pickle"]
    )
    assert result.exit_code == 0, result.output
    assert "loading pickle weights" in result.output and (tmp_path / "o" / "model.safetensors").exists()


def test_readme_merge_runs_offline_with_relative_paths(ws: Path, tmp_path: Path) -> None:
    """The README's walk-through, `varm-merge config` then `varm-merge run`, with paths relative to
    the current folder and every hub call bound to fail at once (HF_HUB_OFFLINE unset): mergekit's
    model card used to ask the hub about `runs/pivot`, after writing the weights, and left a
    folder without a tokenizer. The output must be complete, its recorded paths absolute."""
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(ws / "base", runs / "pivot")
    shutil.copytree(ws / "t1", runs / "target-1")
    make_target(runs / "target-2", load_file(ws / "base" / "model.safetensors"), seed=7)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", DEBUG_ENV)
    }
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: any request fails
    varm_cli = [sys.executable, "-c", "from varm_merge.cli import main; main()"]
    config = [*varm_cli, "config", "varm", "--pivot", "runs/pivot", "--target", "runs/target-1",
              "--target", "runs/target-2", "-o", "varm.yml"]  # fmt: skip
    proc = subprocess.run(config, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    started = time.monotonic()
    proc = subprocess.run([*varm_cli, "run", "varm.yml", "runs/fused"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 120  # no network retries
    fused = runs / "fused"
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in fused.iterdir()
    }
    recorded = yaml.safe_load((fused / "mergekit_config.yml").read_text())
    assert recorded["base_model"] == str((runs / "pivot").resolve())
    assert "# fused" in (fused / "README.md").read_text()  # the card names the folder, not the staging one
    assert sorted(p.name for p in runs.iterdir()) == ["fused", "pivot", "target-1", "target-2"]
