"""Stages that claim to resume, killed at chosen points and run again: the rerun finishes, and its
outputs equal an uninterrupted run's. Each kill is a real SIGKILL of a real ``fusion-train``
process (tests/kill_driver.py patches the call to die at, inside that process only)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from click.testing import CliRunner
from train_fixtures import build_fused

from fusion_train.align import align
from fusion_train.errors import TrainInputError
from fusion_train.fuse import fuse
from fusion_train.pipeline import run_pipeline
from fusion_train.recipe import load_recipe
from fusion_train.represent import RepresentSettings, represent
from fusion_train.storage import TRAINING_SUMMARY as SUMMARY
from fusion_train.train import TrainConfig, prepare
from fusion_train.training import checkpoints, work_dir

KILL_DRIVER = Path(__file__).with_name("kill_driver.py")
SAVE = "datasets:Dataset.save_to_disk"  # writes a part's or an output's data into its temporary folder


def run_killed(when: str, target: str, n: int, arguments: list[str]) -> subprocess.CompletedProcess:
    """``fusion-train ARGUMENTS`` in a subprocess, SIGKILLed at the planned call (and nowhere else).

    It gets this process's environment (thread counts, visible devices), so that what it computes
    is bit for bit what the same stage computes here."""
    command = [sys.executable, str(KILL_DRIVER), when, target, str(n), *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-5000:]
    assert f"SIGKILL {when} call {n} of {target}" in result.stderr
    return result


TIMINGS = {"seconds", "wall_time_s", "train_runtime_s"}  # JSON keys that differ in every run


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def assert_same_output(got: Path, expected: Path, ignore: tuple[str, ...] = ()) -> None:
    """The same files (temporaries left by a kill and ``ignore``d paths aside), data sets with the
    same rows, JSON equal but for timings, other files byte for byte."""

    def listing(root: Path) -> list[Path]:
        paths = (p.relative_to(root) for p in root.rglob("*"))
        return sorted(p for p in paths if not any(_temporary(part) for part in p.parts) and
                      not any(p.is_relative_to(i) for i in ignore))  # fmt: skip

    assert listing(got) == listing(expected)
    data_sets = [p.parent for p in listing(expected) if p.name == "state.json"]
    for relative in data_sets:
        a, b = datasets.load_from_disk(str(got / relative)), datasets.load_from_disk(str(expected / relative))
        assert a.features == b.features and a.to_dict() == b.to_dict(), relative
    for relative in listing(expected):
        if (expected / relative).is_dir() or any(relative.is_relative_to(d) for d in data_sets):
            continue  # data set files: compared by content above (their state.json holds a random fingerprint)
        a, b = got / relative, expected / relative
        if relative.name.endswith(".json"):
            assert _without_timings(json.loads(a.read_text())) == _without_timings(
                json.loads(b.read_text())
            ), relative
        else:
            assert a.read_bytes() == b.read_bytes(), relative


def _temporary(name: str) -> bool:
    """A temporary file or folder of storage.py's atomic writes (a kill leaves it behind)."""
    return name.startswith(".") and name.endswith(".tmp")


def _checkpoint(work: Path, step: int, state: str | None) -> Path:
    """A checkpoint directory whose trainer_state.json holds ``state`` (None: not written yet)."""
    path = work / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_checkpoints_killed_while_being_written_are_ignored(tiny_models, tmp_path, caplog):
    pivot = tiny_models["mistral"]
    fused = build_fused(pivot, tmp_path / "fused")
    config = TrainConfig(model=str(pivot), fused=str(fused), out=str(tmp_path / "target"), resume=True)
    work = work_dir(config.out)
    prepare(config, world_size=1)  # a run records its manifest before its first checkpoint
    caplog.clear()
    complete = json.dumps({"global_step": 2})
    _checkpoint(work, 2, complete)
    _checkpoint(work, 10, complete)  # later than checkpoint-2 by step, earlier by name
    _checkpoint(work, 12, None)  # killed before its trainer_state.json
    _checkpoint(work, 14, complete[:7])  # killed while writing it
    assert checkpoints(work) == (work / "checkpoint-10", [work / "checkpoint-12", work / "checkpoint-14"])

    with caplog.at_level(logging.WARNING):
        assert prepare(config, world_size=1).resume_from == str(work / "checkpoint-10")
    assert (
        "ignoring checkpoint-12, checkpoint-14 (killed while being written); resuming from checkpoint-10"
        in caplog.text
    )

    for step in (2, 10):
        (work / f"checkpoint-{step}" / "trainer_state.json").unlink()
    assert prepare(config, world_size=1).resume_from is None  # from the beginning, said so
    assert "resuming from the beginning" in caplog.text
    with pytest.raises(TrainInputError, match=r"earlier run \(checkpoint-14\); pass --resume"):
        prepare(TrainConfig(**{**config.__dict__, "resume": False}), world_size=1)


# --------------------------------------------------------------------------- represent, align, fuse


def test_represent_killed_while_writing_a_part_resumes(tiny_models, chats, represented, tmp_path):
    """SIGKILL while part 1 is being written (its data saved in the temporary folder, not renamed):
    the rerun keeps part 0, writes parts 1 and 2, and equals the uninterrupted representation."""
    out = tmp_path / "repr"
    options = ["--model", tiny_models["mistral"], "--data", chats, "--out", out, "--top-k", 5, "--chunk-size", 3,
               "--batch-tokens", 256]  # fmt: skip
    run_killed("after", SAVE, 2, ["represent", *options])
    assert sorted(p.name for p in (out / "parts").iterdir() if not p.name.startswith(".")) == ["part-00000"]
    assert not (out / "summary.json").exists()

    summary = represent(tiny_models["mistral"], chats, out, RepresentSettings(top_k=5, chunk_size=3),
                        batch_tokens=256, progress=False)  # fmt: skip
    assert summary is not None and summary.examples == 7
    assert_same_output(out, represented["mistral"])


@pytest.fixture(scope="module")
def aligned(represented, tmp_path_factory) -> Path:
    """mistral's representation aligned to smollm2's, uninterrupted."""
    out = tmp_path_factory.mktemp("aligned") / "aligned"
    align(represented["smollm2"], represented["mistral"], out, progress=False)
    return out


@pytest.fixture(scope="module")
def fused(represented, aligned, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "fused"
    fuse(represented["smollm2"], [aligned], out, progress=False)
    return out


# Where an align or fuse run dies: while its data is written (before the rename into place), or
# after the data is in place but before report.json.
KILL_POINTS = {"writing data": ("after", SAVE), "before the report": ("before", "{module}:write_json_atomic")}
POINTS = ["writing data", "before the report"]


@pytest.mark.parametrize("point", POINTS)
def test_align_killed_mid_write_resumes(represented, aligned, tmp_path, point):
    out = tmp_path / "aligned"
    when, target = KILL_POINTS[point]
    run_killed(when, target.format(module="fusion_train.align"), 1,
               ["align", "--pivot", represented["smollm2"], "--source", represented["mistral"], "--out", out])  # fmt: skip
    assert not (out / "report.json").exists()

    report = align(represented["smollm2"], represented["mistral"], out, progress=False)
    assert report["examples_aligned"] == 7
    assert_same_output(out, aligned)


@pytest.mark.parametrize("point", POINTS)
def test_fuse_killed_mid_write_resumes(represented, aligned, fused, tmp_path, point):
    out = tmp_path / "fused"
    when, target = KILL_POINTS[point]
    run_killed(when, target.format(module="fusion_train.fuse"), 1,
               ["fuse", "--pivot", represented["smollm2"], "--aligned", aligned, "--out", out])  # fmt: skip
    assert not (out / "report.json").exists()

    report = fuse(represented["smollm2"], [aligned], out, progress=False)
    assert report["examples"] == 7
    assert_same_output(out, fused)


# --------------------------------------------------------------------------- a recipe


def write_recipe(root: Path) -> Path:
    """The smallest whole run: one source, two training steps in one process, one merge."""
    recipe = {
        "pivot": {"name": "pivot", "path": "m-smollm2"},
        "sources": [{"name": "mistral", "path": "m-mistral"}],
        "data": {"train": "chats.json", "heldout_fraction": 0.25},
        "run_dir": "run",
        "represent": {"top_k": 4, "max_length": 96},
        "train": {
            "max_steps": 2,
            "learning_rate": 1.0e-3,
            "warmup_ratio": 0.0,
            "clm_baseline": False,
        },
        "merge": {"methods": ["task_arithmetic"]},
        "evaluate": {"max_length": 96},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def recipe(tokenizer_dirs, tmp_path_factory) -> Path:
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("recipe")
    for seed, name in enumerate(("smollm2", "mistral")):
        build_tiny_model(tokenizer_dirs[name], root / f"m-{name}", seed=seed, hidden=16)
    records = [{"instruction": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}." + " Indeed." * (i % 3)}
               for i in range(12)]  # fmt: skip
    (root / "chats.json").write_text(json.dumps(records))
    return write_recipe(root)


@pytest.fixture(scope="module")
def uninterrupted_run(recipe) -> Path:
    """The recipe run without a kill, moved aside so that killed runs use the same paths."""
    run_pipeline(load_recipe(recipe), echo=lambda _: None)
    reference = recipe.parent / "uninterrupted"
    (recipe.parent / "run").rename(reference)
    return reference


def assert_same_run(got: Path, expected: Path) -> None:
    """Every stage's output equal. Aside: pipeline.json, the log of what the last invocation ran,
    and the names of cached losses (keyed by the models' file times, which differ between runs)."""

    def losses(run: Path) -> list[str]:
        return sorted(path.read_text() for path in (run / "evaluate" / "losses").iterdir())

    assert losses(got) == losses(expected)
    assert_same_output(got, expected, ignore=("pipeline.json", "evaluate/losses"))


@pytest.mark.slow
def test_recipe_killed_mid_stage_resumes(recipe, uninterrupted_run):
    """`fusion-train run` SIGKILLed three times, each rerun going on from where the last one died:
    while the source's representation part was being written; after training published the target
    but before the stage was marked done (its checkpoints not yet removed: the rerun must neither
    train again, which would find the published model in its way, nor keep them); after evaluation
    had cached its first model's losses. The fourth run finishes, and every stage's output and the
    report equal the uninterrupted run's."""
    run = recipe.parent / "run"
    shutil.rmtree(run, ignore_errors=True)
    run_killed("after", SAVE, 2, ["run", recipe])  # 1: the pivot's part, 2: the source's
    assert len(list((run / "represent").glob("pivot-*/.done.json"))) == 1
    assert not list((run / "represent").glob("mistral-*/.done.json"))
    assert not (run / "train").exists()

    run_killed("after", "fusion_train.explicit:train", 1, ["run", recipe])
    (target,) = (run / "train").glob("target-mistral-*")
    assert (target / "model" / SUMMARY).exists() and not (target / ".done.json").exists()
    assert list((target / "model.work").glob("checkpoint-*"))

    run_killed("after", "fusion_train.evaluate:write_json_atomic", 1, ["run", recipe])
    assert (target / ".done.json").exists() and not list((target / "model.work").glob("checkpoint-*"))
    assert len(list((run / "evaluate" / "losses").iterdir())) == 1
    assert not (run / "report.md").exists()

    report = run_pipeline(load_recipe(recipe), echo=lambda _: None)
    assert json.loads((run / "pipeline.json").read_text())["ran"] == []  # only the evaluation was left
    assert [r["name"] for r in report["models"]] == [
        "pivot",
        "mistral",
        "target-mistral",
        "merge-task_arithmetic",
    ]
    assert_same_run(run, uninterrupted_run)


@pytest.mark.slow
def test_merge_killed_mid_write_resumes(tmp_path: Path) -> None:
    """`varm-merge run` SIGKILLed once mergekit has written the weights, before the tokenizer and
    the rename: no output folder appears, and the rerun writes what an uninterrupted merge writes.
    (The config and the uninterrupted merge are made in this process: only the kill and the rerun
    need a process of their own.)"""
    from varm_fixtures import make_base, make_target

    from varm_merge.cli import main as varm_merge

    base = make_base(tmp_path / "pivot")
    make_target(tmp_path / "target-1", base, seed=1)
    make_target(tmp_path / "target-2", base, seed=2)
    config = tmp_path / "varm.yml"
    for arguments in (
        ["config", "varm", "--pivot", tmp_path / "pivot", "--target", tmp_path / "target-1", "--target",
         tmp_path / "target-2", "-o", config],
        ["run", config, tmp_path / "reference", "--quiet"],
    ):  # fmt: skip
        result = CliRunner().invoke(varm_merge, [str(a) for a in arguments])
        assert result.exit_code == 0, result.output
    merge = [str(Path(sys.executable).with_name("varm-merge"))]

    run_killed("after", "safetensors.torch:save_file", 1, ["varm-merge", "run", config, tmp_path / "merged"])
    assert not (tmp_path / "merged").exists()  # complete or absent
    subprocess.run([*merge, "run", config, tmp_path / "merged"], check=True, capture_output=True)
    # The model card lists the merged models in set order, which differs between processes.
    assert_same_output(tmp_path / "merged", tmp_path / "reference", ignore=(Path("README.md"),))
    card = (tmp_path / "merged" / "README.md").read_text()
    assert str(tmp_path / "target-1") in card and str(tmp_path / "target-2") in card


def test_recipe_on_two_ranks_matches_one_process(recipe, uninterrupted_run, tmp_path):
    """`resources: {nproc: 2}` runs represent, train and evaluate on 2 CPU ranks under the deepspeed
    launcher: the representations equal one process's, training ran as a world of 2 (the only
    stage whose result depends on it: its key holds the world size), and the pivot's figures
    (a model no rank trained) equal one process's."""
    raw = yaml.safe_load(recipe.read_text())
    # No merge: it runs in one process whatever the resources (what it writes from a target
    # trained on 2 ranks proves nothing the target does not).
    raw.update(run_dir=str(tmp_path / "run"), resources={"nproc": 2}, merge={"methods": []})
    two_ranks = tmp_path / "recipe.yaml"
    two_ranks.write_text(yaml.safe_dump(raw))
    for name in ("m-smollm2", "m-mistral", "chats.json"):
        (tmp_path / name).symlink_to(recipe.parent / name)
    report = run_pipeline(load_recipe(two_ranks), echo=lambda _: None)

    run = tmp_path / "run"
    for folder in (run / "represent").iterdir():
        assert json.loads((folder / "summary.json").read_text())["placement"]["world_size"] == 2
        assert_same_output(
            folder,
            uninterrupted_run / "represent" / folder.name,
            ignore=("summary.json", ".done.json", "manifest.json"),
        )
    (trained,) = (run / "train").glob("target-mistral-*/model")
    assert json.loads((trained / "training_summary.json").read_text())["world_size"] == 2
    assert not (uninterrupted_run / "train" / trained.parent.name).exists()  # another key than one rank's
    reference = json.loads((uninterrupted_run / "evaluate" / "report.json").read_text())
    pivot = next(r for r in report["models"] if r["name"] == "pivot")
    assert (
        pivot["bits_per_byte"]
        == next(r for r in reference["models"] if r["name"] == "pivot")["bits_per_byte"]
    )
