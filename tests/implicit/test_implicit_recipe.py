"""`fusion-train run` with `method: implicit` on tiny random models: both papers' flows run end to
end with the stages wired to each other's outputs, a rerun reuses everything, a changed setting
reruns only what depends on it, and the recipe's implicit keys are checked before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("trl")

from fusion_train.cli import main
from fusion_train.evaluate import ModelSpec
from fusion_train.explicit import ExplicitRun
from fusion_train.implicit.sample import load_samples
from fusion_train.pipeline import run_pipeline
from fusion_train.recipe import RecipeError, load_recipe, parse_recipe

QUICK_TRAINING = {"max_steps": 2, "warmup_ratio": 0.0, "per_device_batch_size": 2}


def recipe_of(mode: str, **overrides: object) -> dict:
    return {
        "method": "implicit",
        "pivot": {"name": "pivot", "path": "m-pivot"},
        "sources": [{"name": "a", "path": "m-a"}, {"name": "b", "path": "m-b"}],
        "data": {"train": "train.jsonl", "heldout": "heldout.jsonl"},
        "run_dir": f"run-{mode}",
        "sample": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_size": 4},
        "score": {"verifiers": ["reference-overlap"]},
        "prefer": {"mode": mode, "margin": 0.0},
        "sft": {**QUICK_TRAINING, "learning_rate": 1.0e-3, "max_length": 128},
        "dpo": {**QUICK_TRAINING, "max_length": 128},
        "rate": {"max_new_tokens": 6, "resamples": 200},
        "evaluate": {"max_length": 96},
        **overrides,
    }


@pytest.fixture(scope="module")
def workspace(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("implicit-recipe")
    build_tiny_model(tokenizer_dirs["smollm2"], root / "m-pivot", seed=0, hidden=16, layers=1)
    build_tiny_model(tokenizer_dirs["smollm2"], root / "m-a", seed=1, hidden=16, layers=1)
    build_tiny_model(tokenizer_dirs["mistral"], root / "m-b", seed=2, hidden=16, layers=1)
    words = ["red", "blue", "green", "seven", "Paris", "hello", "four", "tea"]

    def record(i: int) -> dict:
        return {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}: say {words[i % 8]}."},
                                            {"role": "assistant", "content": f"I say {words[i % 8]} {words[(i + 3) % 8]}."}]}  # fmt: skip

    (root / "train.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(6)))
    (root / "heldout.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(6, 9)))
    return root


def run(workspace: Path, recipe: dict, name: str = "recipe.yaml") -> tuple[dict, dict]:
    path = workspace / name
    path.write_text(yaml.safe_dump(recipe))
    report = run_pipeline(load_recipe(path), echo=lambda _: None)
    log = json.loads((workspace / recipe["run_dir"] / "pipeline.json").read_text())
    return report, log


def stage_dir(run_dir: Path, stage: str, name: str) -> Path:
    (found,) = [p for p in (run_dir / stage).glob(f"{name}-*") if p.name.rsplit("-", 1)[0] == name]
    return found


def summary(run_dir: Path, stage: str, name: str) -> dict:
    return json.loads((stage_dir(run_dir, stage, name) / "model" / "training_summary.json").read_text())


def test_fusechat3_recipe_end_to_end_rerun_and_a_changed_setting(
    workspace: Path, kept_by_stages: list
) -> None:
    recipe = recipe_of("fusechat3")
    report, log = run(workspace, recipe)
    assert kept_by_stages == []  # sampling, scoring, SFT, DPO and evaluating keep nothing alive
    run_dir = workspace / "run-fusechat3"
    names = {row["name"]: row["role"] for row in report["models"]}
    assert names == {"pivot": "pivot", "a": "source", "b": "source", "implicit-sft": "implicit",
                     "implicit-dpo-norm": "implicit"}  # fmt: skip
    assert sorted(log["ran"]) == sorted(["data/split", "sample/a", "sample/b", "score/sources", "prefer/fusechat3",
                                         "sft/implicit-sft", "dpo/implicit-dpo-norm", *(f"answer/{n}" for n in names),
                                         "score/answers", "rate/answers"])  # fmt: skip
    # The wiring: sft trains the pivot on prefer's SFT set, built from the sources' scored samples;
    # dpo trains the SFT model on the same prefer output's pairs, with the mode's loss.
    prefs = stage_dir(run_dir, "prefer", "fusechat3")
    sft_run, dpo_run = summary(run_dir, "sft", "implicit-sft"), summary(run_dir, "dpo", "implicit-dpo-norm")
    assert sft_run["model"]["path"] == str(workspace / "m-pivot") and sft_run["data"]["path"] == str(prefs)
    assert dpo_run["model"]["path"] == str(stage_dir(run_dir, "sft", "implicit-sft") / "model")
    assert dpo_run["data"]["path"] == str(prefs) and dpo_run["settings"]["loss"] == "sigmoid_norm"
    assert sft_run["steps"] == dpo_run["steps"] == 2
    # FuseChat-3.0's SFT epochs; the papers' global batch of 128, capped at an eighth of the (at
    # most 6) examples: one example of 2 per step, so accumulation 1 (uncapped it would be 64).
    assert sft_run["settings"]["epochs"] == 3.0 and sft_run["data"]["examples"] <= 6
    assert sft_run["settings"]["grad_accumulation"] == dpo_run["settings"]["grad_accumulation"] == 1
    sampled = {  # every response of the sources, by (id, source, text)
        (row["id"], row["source"], row["response"])
        for s in ("a", "b")
        for row in datasets.load_from_disk(
            str(next(stage_dir(run_dir, "sample", s).glob("parts/*/data")))
        ).to_list()
    }
    for example in datasets.load_from_disk(str(prefs / "sft")).to_list():
        assert (example["id"], example["source"], example["completion"][0]["content"]) in sampled
    # FuseChat-3.0's split (4:6 by a hash of the id): r3 alone falls in the SFT set (bucket 2574 < 4000)
    sft_ids = {e["id"] for e in datasets.load_from_disk(str(prefs / "sft"))}
    pair_ids = {e["id"] for e in datasets.load_from_disk(str(prefs / "pairs"))}
    assert sft_ids == {"r3"} and pair_ids and not sft_ids & pair_ids
    # Every model answered the held-out prompts; the rating compares them with the pivot.
    rated = json.loads((stage_dir(run_dir, "rate", "answers") / "report.json").read_text())
    assert rated["baseline"] == "pivot" and rated["prompts"] == 3
    assert {m["name"]: m["responses"] for m in rated["models"]} == dict.fromkeys(names, 3)
    text = (run_dir / "report.md").read_text()
    assert "Answers to the held-out prompts" in text and (run_dir / "rates.png").stat().st_size > 0

    _, again = run(workspace, recipe)
    assert again["ran"] == [] and sorted(again["reused"]) == sorted(log["ran"])

    _, changed = run(workspace, recipe_of("fusechat3", dpo={**recipe["dpo"], "beta": 1.0}))
    assert sorted(changed["ran"]) == ["answer/implicit-dpo-norm", "dpo/implicit-dpo-norm", "rate/answers",
                                      "score/answers"]  # fmt: skip
    assert kept_by_stages == []  # nor did the stages the changed setting ran


def test_wrpo_recipe_samples_the_sft_model_and_trains_on_its_own_pairs(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # method both: the explicit pipeline's models (stood in for by a copy of the pivot, so that
    # this test does not train explicit targets) join the implicit ones in one report and rating.
    stand_in = workspace / "m-explicit-target"
    if not stand_in.exists():
        shutil.copytree(workspace / "m-pivot", stand_in)
    explicit = [ModelSpec("target-a", str(stand_in), "target")]
    monkeypatch.setattr(ExplicitRun, "models", lambda self: (explicit, []))
    report, log = run(workspace, recipe_of("wrpo", method="both"), "wrpo.yaml")
    run_dir = workspace / "run-wrpo"
    assert {"prefer/sft", "sft/implicit-sft", "sample/implicit-sft", "score/sources-and-target", "prefer/wrpo",
            "dpo/implicit-wrpo", "answer/target-a"} <= set(log["ran"])  # fmt: skip
    names = {"pivot", "a", "b", "target-a", "implicit-sft", "implicit-wrpo"}
    assert {row["name"] for row in report["models"]} == names
    rated = json.loads((stage_dir(run_dir, "rate", "answers") / "report.json").read_text())
    assert {m["name"] for m in rated["models"]} == names
    sft_model = stage_dir(run_dir, "sft", "implicit-sft") / "model"
    own = json.loads((stage_dir(run_dir, "sample", "implicit-sft") / "manifest.json").read_text())
    assert own["model"]["path"] == str(sft_model) and own["source"] == "implicit-sft"
    pairs = datasets.load_from_disk(str(stage_dir(run_dir, "prefer", "wrpo") / "pairs")).to_list()
    assert pairs and all(p["source"] in ("a", "b") and p["chosen_source"] for p in pairs)
    target_ids = {row["id"] for row in load_samples(stage_dir(run_dir, "sample", "implicit-sft"))[1]}
    assert {p["id"] for p in pairs} <= target_ids
    dpo_run = summary(run_dir, "dpo", "implicit-wrpo")
    assert dpo_run["settings"]["loss"] == "wrpo" and dpo_run["model"]["path"] == str(sft_model)
    assert summary(run_dir, "sft", "implicit-sft")["settings"]["epochs"] == 1.0  # WRPO's SFT
    assert not (stage_dir(run_dir, "prefer", "sft") / "pairs").exists()
    # WRPO's split (1:2): the SFT model was not trained on the prompts of its own pairs
    sft_ids = {e["id"] for e in datasets.load_from_disk(str(stage_dir(run_dir, "prefer", "sft") / "sft"))}
    assert sft_ids == {"r3"} and not sft_ids & {p["id"] for p in pairs}


def test_implicit_keys_are_checked_before_anything_runs(workspace: Path) -> None:
    base = recipe_of("fusechat3")

    def fails(change: dict, message: str) -> None:
        with pytest.raises(RecipeError, match=message):
            parse_recipe({**base, **change}, base=workspace, default_run_dir=workspace / "r")

    fails({"method": "implicitt"}, "method: 'implicitt': use one of explicit, implicit, both")
    fails({"train": {"max_steps": 1}}, "train: only method explicit .or both. has this stage")
    fails({"method": "explicit"}, "sample: only method implicit .or both. has this stage")
    fails({"score": {}}, "score: give reward_model and/or verifiers")
    fails({"score": {"verifiers": ["no-such"]}}, "score.verifiers: .*no-such")
    fails(
        {"score": {"reward_model": "nowhere"}}, "score.reward_model: model directory .*nowhere does not exist"
    )
    fails(
        {"dpo": {"loss": "wrpo"}}, "dpo.loss: wrpo needs the pairs of prefer.mode wrpo; set prefer.mode: wrpo"
    )
    fails({"dpo": {"alpha_max": 0.2}}, "dpo.alpha_max: WRPO's; drop it or use dpo.loss: wrpo")
    fails({"dpo": {"loss": "ipo", "alpha_max": 0.2}}, "dpo.alpha_max: WRPO's")
    fails(
        {"dpo": {"loss": "kto"}},
        "dpo.loss: 'kto' is not one of 'sigmoid', 'sigmoid_norm', 'wrpo', 'ipo', 'hinge'",
    )
    # a loss of the registry parses (its beta and learning rate: DPOSettings resolves them by loss)
    ipo = parse_recipe({**base, "dpo": {"loss": "ipo"}}, base=workspace, default_run_dir=workspace / "r")
    assert (ipo.dpo.loss, ipo.dpo.beta, ipo.dpo.alpha_max) == ("ipo", None, None)
    fails({"prefer": {"mode": "sft"}}, "prefer.mode")
    fails({"prefer": {"gate": "numeric-answer"}},
          r"prefer.gate: 'numeric-answer' is not a verifier of the score section \(reference-overlap\)")  # fmt: skip
    fails(
        {"prefer": {"gate": "reference-overlap"}}, "prefer.gate: 'reference-overlap' also ranks the responses"
    )
    fails({"prefer": {"sft_share": 0}}, "prefer.sft_share: 0 leaves sft no prompt, and a recipe runs both")
    fails({"prefer": {"mode": "wrpo", "sft_share": 1.0}}, "prefer.sft_share: 1 leaves dpo no prompt")
    fails({"prefer": {"sft_share": 1.5}}, "prefer.sft_share: 1.5: expected a fraction from 0 to 1, or all")
    fails(
        {"prefer": {"sft_share": "half"}}, "prefer.sft_share: 'half': expected a fraction from 0 to 1, or all"
    )
    fails(
        {"prefer": {"margin": 0.2}},
        r"prefer.margin 0.2 is above prefer.max_margin 0.1: no pair could be kept$",
    )
    fails(
        {"prefer": {"max_margin": "wide"}},
        "prefer.max_margin: 'wide': expected a non-negative number, or none",
    )
    # the paper's values, resolved per run: what runs is what the stage key holds
    settings = parse_recipe({**base, "prefer": {"mode": "wrpo"}}, base=workspace,
                            default_run_dir=workspace / "r").prefer.settings("sft", None)  # fmt: skip
    assert (settings["sft_share"], settings["margin"], settings["max_margin"]) == (1 / 3, 0.0, "none")
    fails({"rate": {"baseline": "c"}}, r"rate.baseline: 'c' is not a model of the recipe \(pivot, a, b\)")
    fails({"rate": {"confidence": 1.5}}, "rate.confidence")
    fails({"sample": {"num_samples": 0}}, "sample.num_samples")
    fails({"sources": [{"name": "a", "path": "m-a", "settings": {"train": {"lm_weight": 0.5}}}]},
          "per-source `settings` are for the explicit stages")  # fmt: skip
    both = parse_recipe({**base, "method": "both", "train": {"max_steps": 1, "warmup_ratio": 0.0}}, base=workspace,
                        default_run_dir=workspace / "r")  # fmt: skip
    assert both.explicit and both.implicit and both.train.max_steps == 1 and both.dpo.max_steps == 2


@pytest.fixture(scope="module")
def bad_inputs(workspace: Path) -> Path:
    """A pivot without a chat template, a folder without a tokenizer, a ZeRO config for another
    batch size, and training data with a record that is no prompt."""
    plain = workspace / "m-plain"
    if not plain.exists():
        shutil.copytree(workspace / "m-pivot", plain)
        (plain / "chat_template.jinja").unlink()
    (workspace / "m-empty").mkdir(exist_ok=True)
    (workspace / "ds-micro4.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    records = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]},
               {"messages": [{"role": "assistant", "content": "Nobody asked."}]}]  # fmt: skip
    (workspace / "no-question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return workspace


TRAINING = {**QUICK_TRAINING, "max_length": 128}


@pytest.mark.parametrize(
    ("change", "names"),
    [
        pytest.param({"pivot": {"name": "pivot", "path": "m-plain"}},
                     ["recipe.yaml: pivot: ", "m-plain: the tokenizer has no chat template",
                      "pivot.chat_template is for sampling and evaluation only"], id="pivot without chat template"),
        pytest.param({"prefer": {"mode": "fusechat3", "scorer": "reward:rm"}},
                     ["prefer.scorer: 'reward:rm' is not a score the score section gives (reference-overlap)"],
                     id="scorer that score does not give"),
        pytest.param({"sources": [{"name": "implicit-sft", "path": "m-a"}]},
                     ["sources[0].name: 'implicit-sft' is the name of a model the run makes"],
                     id="source named as the SFT model"),
        pytest.param({"sources": [{"name": "a", "path": "m-a"}, {"name": "e", "path": "m-empty"}]},
                     ["sources[1].path: ", "m-empty: no tokenizer files"], id="source without tokenizer"),
        pytest.param({"dpo": {**TRAINING, "deepspeed": "ds-micro4.json"}},
                     ["recipe.yaml: dpo.deepspeed ", "ds-micro4.json contradicts", "train_micro_batch_size_per_gpu"],
                     id="ZeRO config against the batch size"),
        pytest.param({"data": {"train": "no-question.jsonl", "heldout": "heldout.jsonl"}},
                     ["no-question.jsonl, record 1 (id ", "no user turn to answer"], id="record that is no prompt"),
    ],
)  # fmt: skip
def test_what_a_stage_would_refuse_is_refused_before_any_model_runs(
    bad_inputs: Path, tmp_path: Path, change: dict, names: list[str]
) -> None:
    """Every requirement of a later stage, checked before the first stage runs a model, as one line
    naming the recipe key (or the data file and record)."""
    path = bad_inputs / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_of("fusechat3", run_dir=str(tmp_path / "run"), **change)))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    *stages, line = result.output.strip().splitlines()
    assert line.startswith("Error: ") and stages in ([], ["> data/split ..."]), result.output
    for name in names:
        assert name in line, (name, line)
    assert not any((tmp_path / "run").glob("*/*/.done.json")) and not (tmp_path / "run" / "sample").exists()


def test_a_models_chat_template_is_the_one_it_samples_with(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sources[i].chat_template`` reaches the sampler (it was in the stage key only)."""
    from fusion_train.implicit import sample

    seen: dict[str, str | None] = {}

    class Stop(Exception):
        pass

    def recorded(model_path, data_path, out_dir, settings, *, source_name, **kwargs):
        seen[source_name] = settings.chat_template
        if len(seen) == 2:
            raise Stop

    monkeypatch.setattr(sample, "sample", recorded)
    recipe = recipe_of("fusechat3", run_dir="run-templates",
                       sources=[{"name": "a", "path": "m-a"}, {"name": "b", "path": "m-b", "chat_template": "chatml"}])  # fmt: skip
    path = workspace / "templates.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(Stop):
        run_pipeline(load_recipe(path), echo=lambda _: None)
    assert seen == {"a": None, "b": "chatml"}
