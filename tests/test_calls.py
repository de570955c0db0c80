"""`fusion_train.calls`: a stage's function called in every launched rank with the arguments a
recipe or a command gave it, through a JSON call file (no flags rebuilt, no pickle)."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import fields
from pathlib import Path

import pytest

from fusion_train import calls
from fusion_train.calls import StageCall
from fusion_train.errors import read_yaml
from fusion_train.evaluate import ModelSpec
from fusion_train.implicit.dpo import DPOSettings
from fusion_train.implicit.sample import SampleSettings
from fusion_train.implicit.score import RewardModel
from fusion_train.implicit.sft import SFTSettings
from fusion_train.inference import InferenceSettings
from fusion_train.represent import RepresentSettings, report_represented
from fusion_train.storage import read_json, write_json_atomic
from fusion_train.train import TrainConfig


def through_a_file(value: object) -> object:
    """What a rank gets back: encoded, written as strict JSON text, read, decoded."""
    return calls.decode(json.loads(json.dumps(calls.encode(value), allow_nan=False)))


def differing_from_defaults(cls: type, **required: object) -> object:
    """An instance whose every field with a default holds another value than its default, so a
    field lost on the way (or read back as its default) shows."""
    values: dict[str, object] = dict(required)
    default = cls(**required)
    for f in fields(cls):
        if f.name in values or not f.init:
            continue
        current = getattr(default, f.name)
        if isinstance(current, bool):
            values[f.name] = not current
        elif isinstance(current, int):
            values[f.name] = current + 3
        elif isinstance(current, float):
            values[f.name] = current / 3 + 0.125
    return cls(**values)


@pytest.mark.parametrize(
    "settings",
    [
        differing_from_defaults(TrainConfig, model="m", fused="f", out="o"),
        differing_from_defaults(SFTSettings, model="m", prefs="p", out="o"),
        differing_from_defaults(DPOSettings, model="m", prefs="p", out="o", loss="wrpo", alpha_max=0.3),
        differing_from_defaults(SampleSettings, stop=("\nUser:", "</s>")),
        differing_from_defaults(RepresentSettings, chat_template="chatml"),
        InferenceSettings(device="cpu", dtype="bfloat16", deepspeed="zero3", engine="hf"),
    ],
    ids=lambda s: type(s).__name__,
)
def test_a_stages_settings_reach_the_rank_whole(settings: object) -> None:
    """Every field, flag or not, comes back with its value and type (floats to the last bit)."""
    back = through_a_file(settings)
    assert type(back) is type(settings)
    for f in fields(settings):
        mine, theirs = getattr(settings, f.name), getattr(back, f.name)
        assert type(theirs) is type(mine) and theirs == mine, f.name


def test_arguments_keep_their_containers_and_paths() -> None:
    arguments = {
        "models": [ModelSpec("pivot", "/m/p", "pivot", "chatml"), ModelSpec("src", "/m/s", "source")],
        "reward_model": RewardModel("/m/r", 1, "helpful", 2, output="score"),
        "out_dir": Path("/runs/x"),
        "verifiers": ("numeric-answer", "reference-overlap"),
        "nested": {"a": [1, 2.5, None, True], "b": {"c": "d"}},
        "absent": None,
    }
    back = through_a_file(arguments)
    assert back == arguments
    assert isinstance(back["out_dir"], Path) and isinstance(back["verifiers"], tuple)
    assert isinstance(back["models"], list) and isinstance(back["models"][0], ModelSpec)


def test_a_call_file_names_only_this_packages_functions_and_classes(tmp_path: Path) -> None:
    path = tmp_path / ".out.call.json"
    call = StageCall(
        write_json_atomic, {"path": tmp_path / "x.json", "payload": {"k": 1}}, tmp_path, read_json
    )
    call.write(path)
    assert StageCall.read(path) == call
    popen = {"dataclass": "subprocess:Popen", "fields": {}}
    for planted in (
        {"function": "os:system"},
        {"report": "builtins:print"},
        {"arguments": {"dict": {"x": popen}}},
    ):
        planted_call = {**json.loads(path.read_text()), **planted}
        path.write_text(json.dumps(planted_call))
        with pytest.raises(ValueError, match="is not part of fusion_train"):
            StageCall.read(path)


def test_values_json_cannot_hold_are_refused_when_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StageCall(write_json_atomic, {"payload": math.nan}, tmp_path).write(tmp_path / "c.json")
    with pytest.raises(TypeError, match="a set cannot be passed to a launched rank"):
        calls.encode({"x": {1, 2}})


def test_one_process_calls_here_and_two_call_in_every_launched_rank(tmp_path: Path, capfd) -> None:
    """With one process the function runs here (no call file); with two, both ranks run it from
    the call file, which is removed afterwards, and only the main rank prints the result (here
    with represent's report, which prints a line for a result of None); a user error in a rank is
    one line and a non-zero exit status."""
    payload = {"written by": "a rank", "steps": [1, 2, 3]}
    here = tmp_path / "here.json"
    assert StageCall(write_json_atomic, {"path": here, "payload": payload}, here).in_ranks(1, None) == 0
    assert json.loads(here.read_text()) == payload

    ranks = tmp_path / "ranks.json"
    capfd.readouterr()
    call = StageCall(write_json_atomic, {"path": ranks, "payload": payload}, ranks, report_represented)
    environment, handlers = dict(os.environ), {s: signal.getsignal(s) for s in signal.valid_signals()}
    assert call.in_ranks(2, None) == 0
    # the launcher (torch's elastic agent, in this process) left this process as it found it
    assert dict(os.environ) == environment
    assert {s: signal.getsignal(s) for s in signal.valid_signals()} == handlers
    assert json.loads(ranks.read_text()) == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.json", "ranks.json"]  # no call file left
    assert capfd.readouterr().out.count(f"{ranks}: this shard is done") == 1

    missing = tmp_path / "missing.yaml"
    assert StageCall(read_yaml, {"path": missing}, tmp_path / "out").in_ranks(2, None) != 0
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "Error (rank" in line]
    # Each rank that got that far says it in one line (once one fails, the others are ended).
    assert errors and all(str(missing) in line for line in errors), err
    assert "Traceback" not in err
