"""`fusion-train run`: recipe validation, and one end-to-end run on tiny models with two real
tokenizers and 2 DeepSpeed ranks: killed and resumed, re-run (nothing to do), a source added
(only its stages and the merges run) while the disk fills up, and a report that matches a direct
evaluation."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import click
import datasets
import pytest
import yaml
from click.testing import CliRunner
from numeric import approx_at_scale
from transformers import AutoModelForCausalLM

from fusion_train import explicit, pipeline
from fusion_train.chat import load_conversations
from fusion_train.errors import TrainInputError
from fusion_train.evaluate import bits_per_byte, response_losses
from fusion_train.pipeline import run_pipeline
from fusion_train.recipe import RecipeError, load_recipe, parse_recipe
from fusion_train.stages import StageError, train_in_stage
from fusion_train.sweep import parse_variation, sweep_command, variants


def write_recipe(root: Path, sources: list[str], **overrides) -> Path:
    recipe = {
        "pivot": {"name": "pivot", "path": "m-smollm2"},
        "sources": [{"name": s, "path": f"m-{s}"} for s in sources],
        "data": {"train": "chats.json", "heldout_fraction": 0.25},
        "run_dir": "run",
        "represent": {"top_k": 4, "max_length": 96},
        "train": {"max_steps": 2, "learning_rate": 1.0e-3, "warmup_ratio": 0.0},
        "merge": {"methods": ["varm", "task_arithmetic"]},
        "evaluate": {"max_length": 96},
        **overrides,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def workspace(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("pipeline")
    for seed, name in enumerate(("smollm2", "mistral", "qwen")):
        build_tiny_model(tokenizer_dirs[name], root / f"m-{name}", seed=seed, hidden=16)
    records = [
        {"instruction": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}." + " Indeed." * (i % 3),
         "dataset": ["math", "chat"][i % 2]}
        for i in range(16)
    ]  # fmt: skip
    (root / "chats.json").write_text(json.dumps(records))
    return root


def test_recipe_errors_name_the_problem(workspace: Path) -> None:
    base = yaml.safe_load(write_recipe(workspace, ["mistral"]).read_text())

    def fails(change: dict, message: str) -> None:
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, **change}, base=workspace, default_run_dir=workspace / "r")

    fails({"trian": {}}, "unknown key.*trian")
    fails({"train": {"lerning_rate": 1}}, r"train: unknown key\(s\) lerning_rate")
    fails({"sources": [{"name": "x", "path": "nowhere"}]}, "nowhere does not exist")
    fails({"sources": [{"name": "pivot", "path": "m-mistral"}]}, "used twice: pivot")
    fails({"sources": [{"name": "same", "path": "m-smollm2"}]}, "is the pivot itself")
    fails({"data": {"train": "chats.json"}}, "no `heldout` file and no `heldout_fraction`")
    fails({"sources": []}, "non-empty list")
    mistral = {"name": "mistral", "path": "m-mistral"}
    fails(
        {"sources": [{**mistral, "settings": {"train": {"learning_rate": 1}}}]},
        r"sources\[0\]: settings.train: learning_rate cannot be set per source \(only lm_weight, temperature\)",
    )
    fails(
        {"sources": [{**mistral, "settings": {"represent": {"top_k": 5}}}]},
        "settings.represent: not a per-source stage; one of align, fuse, train",
    )
    fails({"train": {"loss_chunk_tokens": 0}}, r"train.loss_chunk_tokens: 0 is not in the range x>=1")
    chunked = parse_recipe(
        {**base, "train": {"loss_chunk_tokens": 64}}, base=workspace, default_run_dir=workspace / "r"
    )
    assert chunked.train.loss_chunk_tokens == 64
    fails({"sources": [{**mistral, "settings": [0.5]}]}, "settings: expected a mapping")
    fails(
        {"pivot": {**base["pivot"], "settings": {"train": {"lm_weight": 0.5}}}},
        "pivot: `settings` are per source",
    )
    own = parse_recipe({**base, "sources": [{**mistral, "settings": {"train": {"lm_weight": 0.5}}}]},
                       base=workspace, default_run_dir=workspace / "r")  # fmt: skip
    align_settings, _, train_settings = own.stages_for(own.sources[0])
    assert train_settings == replace(own.train, lm_weight=0.5) and align_settings == own.align


def stage_log(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def test_end_to_end_resume_rerun_and_added_source(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, kept_by_stages: list
) -> None:
    recipe = load_recipe(write_recipe(workspace, ["mistral"]))
    run_dir = Path(recipe.run_dir)

    # Killed in the middle: fuse fails after represent and align finished.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(explicit, "fuse", killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(recipe, echo=lambda _: None)
    assert len(list((run_dir / "represent").glob("*/.done.json"))) == 2
    assert not (run_dir / "fuse").exists() or not list((run_dir / "fuse").glob("*/.done.json"))

    # Resumed: the finished stages are reused, the rest runs.
    report = run_pipeline(recipe, echo=lambda _: None)
    log = stage_log(run_dir)
    assert sorted(log["reused"]) == ["align/mistral", "data/split", "represent/mistral", "represent/pivot"]
    assert kept_by_stages == []  # training, merging and evaluating in this process keep nothing alive
    assert sorted(log["ran"]) == ["fuse/mistral", "merge/task_arithmetic", "merge/varm", "merge/varm-weights",
                                  "train/clm-baseline", "train/target-mistral"]  # fmt: skip
    for artefact in ("report.md", "report.png", "varm_weights.png", "evaluate/report.json"):
        assert (run_dir / artefact).exists(), artefact
    names = [row["name"] for row in report["models"]]
    assert names == [
        "pivot",
        "mistral",
        "target-mistral",
        "clm-baseline",
        "merge-varm",
        "merge-task_arithmetic",
    ]

    # The report's numbers are a direct evaluation of the same model on the held-out split.
    target_dir = next((run_dir / "train").glob("target-mistral-*")) / "model"
    AutoModelForCausalLM.from_pretrained(target_dir)  # a normal HF directory
    assert not list(target_dir.parent.glob("model.work/checkpoint-*"))  # finished: checkpoints removed
    heldout = next((run_dir / "data").glob("split-*")) / "heldout.jsonl"
    direct = bits_per_byte(
        response_losses(target_dir, load_conversations(heldout), max_length=96, progress=False)
    )
    row = next(r for r in report["models"] if r["name"] == "target-mistral")
    assert row["bits_per_byte"]["value"] == approx_at_scale(direct.value, dtype="float32")
    assert row["bits_per_byte"]["examples"] == direct.examples == len(load_conversations(heldout))

    # A second run has nothing to do.
    run_pipeline(recipe, echo=lambda _: None)
    assert stage_log(run_dir)["ran"] == []

    # A third model, and the disk fills up while its fused data is being written: the command
    # fails with an error that says what happened and what to do, and nothing is lost.
    recipe_path = write_recipe(workspace, ["mistral", "qwen"])
    report_before = (run_dir / "report.md").read_text()
    save_to_disk = datasets.Dataset.save_to_disk

    def disk_fills_up(self, path, *args, **kwargs):
        if f"{os.sep}fuse{os.sep}qwen-" not in str(path):
            return save_to_disk(self, path, *args, **kwargs)
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"\0" * 4096)  # a partial write
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "save_to_disk", disk_fills_up)
        result = CliRunner().invoke(pipeline.run_command, [str(recipe_path)])
    assert result.exit_code == 1, result.output
    assert "Error: fuse/qwen: the disk holding" in result.output
    assert "run the same command again" in result.output
    assert (run_dir / "report.md").read_text() == report_before  # the last finished report stands
    for stage in ("represent", "align"):
        assert len(list((run_dir / stage).glob("qwen-*/.done.json"))) == 1
    (fuse_dir,) = (run_dir / "fuse").glob("qwen-*")
    assert sorted(p.name for p in fuse_dir.iterdir()) == ["manifest.json"]  # no partial data left

    # After the fix, the rerun finishes: over both runs only the new source's stages and the
    # merges ran.
    run_pipeline(load_recipe(recipe_path), echo=lambda _: None)
    log = stage_log(run_dir)
    assert sorted(log["ran"]) == ["fuse/qwen", "merge/task_arithmetic", "merge/varm", "merge/varm-weights",
                                  "train/target-qwen"]  # fmt: skip
    assert {"represent/qwen", "align/qwen", "train/clm-baseline", "represent/pivot"} <= set(log["reused"])

    # A changed fusion setting retrains a target, not the CLM-only baseline that ignores it; and a
    # source's own setting wins over the recipe's: the recipe's lm_weight goes to 0.5 while mistral
    # keeps 0.9 as its own, so only qwen's target is trained again (mistral's, trained with 0.9
    # above, is reused); the merges run, as this pair of targets is new.
    per_source = yaml.safe_load(recipe_path.read_text())
    per_source["train"]["lm_weight"] = 0.5
    per_source["sources"][0]["settings"] = {"train": {"lm_weight": 0.9}}
    per_source_path = recipe_path.with_name("per-source.yaml")
    per_source_path.write_text(yaml.safe_dump(per_source))
    report = run_pipeline(load_recipe(per_source_path), echo=lambda _: None)
    log = stage_log(run_dir)
    assert sorted(log["ran"]) == [
        "merge/task_arithmetic",
        "merge/varm",
        "merge/varm-weights",
        "train/target-qwen",
    ]
    assert {"train/target-mistral", "train/clm-baseline"} <= set(log["reused"])
    paths = {row["name"]: Path(row["path"]) for row in report["models"]}
    for name, weight in (("mistral", 0.9), ("qwen", 0.5)):
        summary = json.loads((paths[f"target-{name}"] / "training_summary.json").read_text())
        assert summary["config"]["lm_weight"] == weight, name

    # A sweep of qwen's lm_weight: the recipe as written (0.5, as the per-source recipe gave it)
    # and back to 0.9: both variants were trained above, so nothing runs; the summary puts each
    # target next to its baseline.
    result = CliRunner().invoke(
        sweep_command, [str(per_source_path), "--vary", "train.lm_weight=0.9", "--source", "qwen"]
    )
    assert result.exit_code == 0, result.output
    sweep_dir = run_dir / "sweep"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["variant"], r["target"]) for r in summary["rows"]] == [
        ("recipe as written", "target-qwen"),
        ("train.lm_weight=0.9", "target-qwen"),
    ]
    for row, folder in zip(summary["rows"], ("recipe_as_written", "train.lm_weight=0.9"), strict=True):
        assert stage_log(sweep_dir / folder)["ran"] == []
        models = {
            m["name"]: m
            for m in json.loads((sweep_dir / folder / "evaluate" / "report.json").read_text())["models"]
        }
        assert row["minus_baseline"]["value"] == pytest.approx(
            models["target-qwen"]["bits_per_byte"]["value"] - models["clm-baseline"]["bits_per_byte"]["value"]
        )
    assert summary["rows"][0]["bits_per_byte"] != summary["rows"][1]["bits_per_byte"]  # two different models
    assert "| train.lm_weight=0.9 | target-qwen |" in result.output
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert kept_by_stages == []  # nor did any stage run since


def test_a_training_stage_that_fails_is_one_error_line_after_its_log(tmp_path: Path, capsys) -> None:
    """Training in the recipe's own process (a world of one) or under the launcher: a crash is
    printed with its traceback, as a failed rank prints it, then one line says how to go on; an
    error that says what to do itself (a user error, a full disk) is passed on as it is."""

    def raising(error: Exception):
        def start(out: Path, resume: bool) -> int:
            raise error

        return start

    with pytest.raises(StageError) as caught:
        train_in_stage("training target-x", tmp_path, raising(RuntimeError("CUDA out of memory")))
    assert str(caught.value).startswith("training target-x failed (RuntimeError: CUDA out of memory; ")
    assert str(caught.value).endswith(
        "see the log above, then rerun the recipe to resume from the last checkpoint"
    )
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(StageError, match=r"^training target-x failed \(exit code 3; [0-9.]+ GB free"):
        train_in_stage("training target-x", tmp_path, lambda out, resume: 3)
    for error in (TrainInputError("--epochs must be positive"), OSError(errno.ENOSPC, "No space left", "x")):
        with pytest.raises(type(error)):
            train_in_stage("training target-x", tmp_path, raising(error))
    assert "Traceback" not in capsys.readouterr().err


def test_sweep_settings_are_checked() -> None:
    assert parse_variation("train.lm_weight=0.5,0") == ("train", "lm_weight", [0.5, 0])
    assert parse_variation("align.vocab_map=mined") == ("align", "vocab_map", ["mined"])
    for bad, message in (("lm_weight=0.5", "STAGE.KEY=VALUE"), ("train.lm_wieght=1", "not a recipe setting"),
                         ("merge.methods=varm", "not a recipe setting")):  # fmt: skip
        with pytest.raises(click.BadParameter, match=message):
            parse_variation(bad)
    raw = {"train": {"lm_weight": 0.9, "epochs": 1}, "merge": {"methods": ["varm"]}}
    found = variants(raw, [("train", "lm_weight", [0.5, 0.0])])
    assert list(found) == ["recipe as written", "train.lm_weight=0.5", "train.lm_weight=0.0"]
    assert found["train.lm_weight=0.0"]["train"] == {"lm_weight": 0.0, "epochs": 1}
    assert all(v["merge"]["methods"] == [] for v in found.values()) and raw["merge"]["methods"] == ["varm"]
