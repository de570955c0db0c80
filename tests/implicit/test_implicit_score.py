"""`score`: the verifiers against by-hand results (LCS by a dynamic-programming table, ROUGE-L on
strings worked out on paper, last numbers), a reward model's batched scores against unbatched
forward passes, label selection, pluggable verifiers, and bad input through the CLI."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model
from implicit_fixtures import build_gated_reward_model, build_reward_model, write_jsonl
from numeric import approx_at_scale
from test_resume import SAVE, assert_same_output, run_killed
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fusion_train.cli import main
from fusion_train.errors import DEBUG_ENV
from fusion_train.implicit.sample import SampleSettings, load_samples, sample
from fusion_train.implicit.score import RewardModel, RewardScorer, ScoreError, load_scored, score
from fusion_train.implicit.verifiers import lcs_length, numeric_answer, reference_overlap


def length_verifier(response: str, reference: str | None, prompt: list) -> float:
    """A user's own verifier, used by import path in a test below."""
    return float(len(response))


def broken_verifier(response: str, reference: str | None, prompt: list) -> str:
    return "good"


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources' samples (3 answers to 4 prompts each) and two reward models."""
    root = tmp_path_factory.mktemp("score")
    records = [{"instruction": f"Add {i} and {i}.", "output": f"The sum is {2 * i}."} for i in range(4)]
    write_jsonl(root / "prompts.jsonl", records)
    settings = SampleSettings(num_samples=3, max_new_tokens=6)
    for seed, name in enumerate(("alpha", "beta")):
        build_tiny_model(tokenizer_dirs["smollm2"], root / name, seed=seed, hidden=16, layers=1)
        sample(root / name, root / "prompts.jsonl", root / f"{name}-samples", settings, progress=False)
    build_reward_model(tokenizer_dirs["smollm2"], root / "rm")
    build_reward_model(tokenizer_dirs["smollm2"], root / "rm2", labels=["helpfulness", "safety"], seed=1)
    return root


def invoke(*arguments: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in arguments])


# --------------------------------------------------------------------------- verifiers


def lcs_by_table(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_length_matches_the_dynamic_programming_table() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randrange(0, 70))]  # beyond 64 bits too
        b = [rng.choice("abcd") for _ in range(rng.randrange(0, 70))]
        assert lcs_length(a, b) == lcs_by_table(a, b)
    assert (
        lcs_length(["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "is", "on", "the", "mat"]) == 5
    )


def test_reference_overlap_is_rouge_l_by_hand() -> None:
    # LCS "the cat on the mat": 5 of 6 words on both sides, so precision = recall = F = 5/6
    assert reference_overlap("The cat sat on the mat.", "the cat is on the mat", []) == pytest.approx(5 / 6)
    # LCS 1 of 3 response words and of 2 reference words: P = 1/3, R = 1/2, F = 2PR/(P+R) = 0.4
    assert reference_overlap("a b c", "c a", []) == pytest.approx(0.4)
    assert reference_overlap("", "c a", []) == 0.0
    assert reference_overlap("anything", None, []) is None  # no reference: cannot judge


def test_numeric_answer_compares_last_numbers() -> None:
    assert numeric_answer("First 3, so the answer is 42.", "#### 42", []) == 1.0
    assert numeric_answer("That makes 1,234.5 apples", "1234.50", []) == 1.0
    assert numeric_answer("-7", "The result is -7.0", []) == 1.0
    assert numeric_answer("42, or maybe 41", "42", []) == 0.0
    assert numeric_answer("no idea", "42", []) == 0.0
    assert numeric_answer("42", "no number here", []) is None
    assert numeric_answer("42", None, []) is None


# --------------------------------------------------------------------------- reward models


def unbatched_rewards(model_dir: Path, rows: list[dict], label: int) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rewards = []
    for row in rows:
        conversation = [*row["prompt"], {"role": "assistant", "content": row["response"]}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            rewards.append(float(model(ids).logits[0, label]))
    return rewards


def test_reward_model_and_verifier_scores_per_response(ws: Path, tmp_path: Path) -> None:
    out = tmp_path / "scored"
    result = invoke("score", "--samples", ws / "alpha-samples", "--samples", ws / "beta-samples", "--out", out,
                    "--reward-model", ws / "rm", "--verifier", "reference-overlap", "--batch-size", 5)  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest, data = load_scored(out)
    rows = data.to_list()
    assert len(rows) == 24 and [r["source"] for r in rows] == ["alpha"] * 12 + ["beta"] * 12
    assert [s["name"] for s in manifest["scorers"]] == ["reward:rm", "reference-overlap"]
    got = [r["scores"]["reward:rm"] for r in rows]
    assert got == approx_at_scale(unbatched_rewards(ws / "rm", rows, 0), dtype="float32")
    assert len(set(got)) > 12  # the responses differ, and so do their rewards
    for r in rows:
        assert r["scores"]["reference-overlap"] == reference_overlap(r["response"], r["reference"], [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorers"]["reward:rm"]["by_source"]["beta"]["mean"] == pytest.approx(sum(got[12:]) / 12)


def test_non_finite_rewards_are_counted_per_source_with_ids_and_left_out_of_the_mean(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reward model that outputs NaN or infinity (here: rows 1 and 4 of every part of 12, so
    record 0 and record 1, sample 1 of each source) is counted per source, with ids, in the
    summary, which stays valid JSON; the mean is over the finite rewards."""
    real = RewardScorer.__call__

    def broken(self: RewardScorer, conversations: list) -> list[float]:
        rewards = real(self, conversations)
        rewards[1], rewards[4] = math.nan, -math.inf
        return rewards

    monkeypatch.setattr(RewardScorer, "__call__", broken)
    out = tmp_path / "scored"
    result = invoke("score", "--samples", ws / "alpha-samples", "--samples", ws / "beta-samples", "--out", out,
                    "--reward-model", ws / "rm", "--chunk-size", 12)  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = load_scored(out)[1].to_list()
    ids = list(dict.fromkeys(r["id"] for r in rows))
    summary = json.loads((out / "summary.json").read_text(), parse_constant=pytest.fail)
    stats = summary["scorers"]["reward:rm"]
    assert (stats["judged"], stats["not_judged"], stats["non_finite"]) == (20, 0, 4)
    for source, part in (("alpha", rows[:12]), ("beta", rows[12:])):
        finite = [r["scores"]["reward:rm"] for i, r in enumerate(part) if i not in (1, 4)]
        assert stats["by_source"][source] == {
            "judged": 10, "not_judged": 0, "non_finite": 2, "non_finite_examples": [f"{ids[0]}#1", f"{ids[1]}#1"],
            "mean": pytest.approx(sum(finite) / 10),
        }  # fmt: skip
        assert f"  {source}: 2 non-finite scores (NaN or infinite), left out of the mean" in result.output


def test_a_reward_model_with_several_outputs_needs_a_label(ws: Path, tmp_path: Path) -> None:
    arguments = ["score", "--samples", ws / "alpha-samples", "--reward-model", ws / "rm2"]
    result = invoke(*arguments, "--out", tmp_path / "a")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (f"Error: {ws / 'rm2'}: the reward model has 2 outputs (helpfulness, safety); "
                                     "say which one is the reward with --reward-label NAME|INDEX.")  # fmt: skip
    assert not (tmp_path / "a").exists()
    result = invoke(*arguments, "--out", tmp_path / "a", "--reward-label", "7")
    assert result.exit_code == 1 and "0 (helpfulness), 1 (safety)" in result.output

    for label in ("safety", "1"):
        assert invoke(*arguments, "--out", tmp_path / label, "--reward-label", label).exit_code == 0
        rows = load_scored(tmp_path / label)[1].to_list()
        got = [r["scores"]["reward:rm2/safety"] for r in rows]
        assert got == approx_at_scale(unbatched_rewards(ws / "rm2", rows, 1), dtype="float32")


def test_scoring_resumes_after_a_kill_and_splits_between_shards(ws: Path, tmp_path: Path) -> None:
    """24 responses in parts of 10: killed after part 0, the rerun writes parts 1 and 2 and equals
    an uninterrupted run; two shards' runs into one directory equal it too."""
    arguments = ["--samples", ws / "alpha-samples", "--samples", ws / "beta-samples", "--reward-model", ws / "rm",
                 "--verifier", "reference-overlap", "--chunk-size", 10, "--batch-size", 4]  # fmt: skip
    whole = tmp_path / "whole"
    assert invoke("score", "--out", whole, *arguments).exit_code == 0
    killed = tmp_path / "killed"
    run_killed("after", SAVE, 2, ["score", "--out", killed, *arguments])  # part 0 renamed; part 1 saved
    assert sorted(p.name for p in (killed / "parts").iterdir() if not p.name.startswith(".")) == [
        "part-00000"
    ]
    result = invoke("score", "--out", killed, *arguments)
    assert result.exit_code == 0, result.output
    assert_same_output(killed, whole)

    sharded = tmp_path / "sharded"
    spec = RewardModel(str(ws / "rm"), 0, "LABEL_0", 1)
    common = {"reward_model": spec, "verifiers": ("reference-overlap",), "chunk_size": 10, "batch_size": 4}
    samples = [ws / "alpha-samples", ws / "beta-samples"]
    assert score(samples, sharded, shard=(1, 2), progress=False, **common) is None
    assert sorted(p.name for p in (sharded / "parts").iterdir()) == ["part-00001"]
    assert score(samples, sharded, shard=(0, 2), progress=False, **common) is not None
    assert_same_output(sharded, whole)


# --------------------------------------------------------------------------- verifiers by import path, errors


def test_a_verifier_by_import_path(ws: Path, tmp_path: Path) -> None:
    name = "test_implicit_score:length_verifier"
    result = invoke("score", "--samples", ws / "beta-samples", "--out", tmp_path / "s", "--verifier", name)
    assert result.exit_code == 0, result.output
    rows = load_scored(tmp_path / "s")[1].to_list()
    assert [r["scores"][name] for r in rows] == [float(len(r["response"])) for r in rows]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no scorer: give --reward-model DIR and/or --verifier NAME."),
        (
            ["--verifier", "bleu"],
            "--verifier 'bleu': unknown; built in: numeric-answer, reference-overlap, or give "
            "package.module:function.",
        ),
        (
            ["--verifier", "test_implicit_score:broken_verifier"],
            "--verifier 'test_implicit_score:broken_verifier' returned 'good' for record",
        ),
        (
            ["--verifier", "numeric-answer", "--samples", "{ws}/alpha-samples"],
            "both hold samples of source 'alpha'",
        ),
    ],
)
def test_bad_scoring_input_is_one_line(ws: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    extra = [e.format(ws=ws) for e in extra]
    result = invoke("score", "--samples", ws / "alpha-samples", "--out", tmp_path / "out", *extra)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.output.strip().splitlines()[-1]  # (a progress bar may come before it)
    assert error.startswith("Error: ") and message in error
    assert not (tmp_path / "out" / "parts").exists()


def test_a_reward_label_without_a_reward_model_is_a_usage_error(ws: Path, tmp_path: Path) -> None:
    result = invoke(
        "score", "--samples", ws / "alpha-samples", "--out", tmp_path / "out", "--reward-label", "0"
    )
    assert result.exit_code == 2 and "Invalid value for --reward-label: needs --reward-model" in result.output


# --------------------------------------------------------------------------- reward in .score (ArmoRM-style)


LABELS = ["helpfulness", "correctness", "verbosity"]


@pytest.fixture(scope="module")
def gated(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ArmoRM-like reward models with their own code: .score of shape [batch] (armo) and [batch, 1]
    (armo-keepdim); one whose forward declares no output type; one only ever run untrusted."""
    root = tmp_path_factory.mktemp("gated")
    smollm2 = tokenizer_dirs["smollm2"]
    build_gated_reward_model(smollm2, root / "armo", LABELS, seed=2)
    build_gated_reward_model(smollm2, root / "armo-keepdim", LABELS, seed=3, score_keepdim=True)
    build_gated_reward_model(smollm2, root / "armo-undeclared", LABELS, seed=4, declared=False)
    build_gated_reward_model(smollm2, root / "armo-untrusted", LABELS, seed=5)
    return root


def gated_by_hand(model_dir: Path, rows: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Each conversation alone: the trunk's last hidden state h, rewards r = W_reg h, gate
    g = softmax(W_gate h), score = sum(g * r); the model's own forward is not used."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    scores, rewards = [], []
    for row in rows:
        conversation = [*row["prompt"], {"role": "assistant", "content": row["response"]}]
        ids = torch.tensor([tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False),
                                      add_special_tokens=False)["input_ids"]])  # fmt: skip
        with torch.no_grad():
            h = model.model(ids).last_hidden_state[0, -1]
            r = model.regression_layer.weight @ h
            g = torch.softmax(model.gating.weight @ h, dim=0)
        scores.append(float((g * r).sum()))
        rewards.append(r.tolist())
    return scores, rewards


@pytest.mark.parametrize("name", ["armo", "armo-keepdim"])
def test_a_reward_in_score_is_read_from_score(ws: Path, gated: Path, tmp_path: Path, name: str) -> None:
    arguments = ["score", "--samples", ws / "alpha-samples", "--samples", ws / "beta-samples",
                 "--reward-model", gated / name, "--trust-remote-code", "--batch-size", 5]  # fmt: skip
    result = invoke(*arguments, "--out", tmp_path / "auto")  # three logits, yet no --reward-label needed
    assert result.exit_code == 0, result.output
    manifest, data = load_scored(tmp_path / "auto")
    rows = data.to_list()
    (scorer,) = manifest["scorers"]
    assert (scorer["name"], scorer["output"], scorer["label"]) == (f"reward:{name}", "score", None)
    got = [r["scores"][f"reward:{name}"] for r in rows]
    expected, rewards = gated_by_hand(gated / name, rows)
    assert got == approx_at_scale(expected, dtype="float32")
    for column in range(len(LABELS)):  # not any one objective's logit
        assert got != pytest.approx([r[column] for r in rewards], abs=1e-3)

    # a column of .logits instead, when asked for explicitly
    result = invoke(*arguments, "--out", tmp_path / "logits", "--reward-output", "logits", "--reward-label",
                    "correctness")  # fmt: skip
    assert result.exit_code == 0, result.output
    got = [r["scores"][f"reward:{name}/correctness"] for r in load_scored(tmp_path / "logits")[1]]
    assert got == approx_at_scale([r[1] for r in rewards], dtype="float32")

    result = invoke(*arguments, "--out", tmp_path / "both", "--reward-label", "correctness")
    assert result.exit_code == 1 and result.output.strip() == (
        "Error: --reward-label 'correctness': the reward is the model's .score, one number per response; drop "
        "--reward-label, or pass --reward-output logits to read a column of its .logits instead."
    )
    assert not (tmp_path / "both").exists()


def test_a_reward_model_with_its_own_code_is_never_run_untrusted(
    ws: Path, gated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("GATED_RM_MARKER", str(marker))
    model = gated / "armo-untrusted"
    for extra in ([], ["--reward-output", "logits", "--reward-label", "0"]):
        result = invoke("score", "--samples", ws / "alpha-samples", "--out", tmp_path / "out", "--reward-model",
                        model, *extra)  # fmt: skip
        assert result.exit_code == 1 and result.output.strip() == (
            f"Error: {model}: the reward model runs its own code (modeling_gated.GatedRewardModel, auto_map in "
            "config.json); read it, then pass --trust-remote-code to run it."
        )
    # the library's scorer refuses too, rather than load transformers' Llama classifier in its place
    with pytest.raises(ScoreError, match="pass --trust-remote-code"):
        RewardScorer(RewardModel(str(model), 0, "helpfulness", 3))
    assert not marker.exists() and not (tmp_path / "out").exists()
    # trusted, its code runs (so the marker would have told)
    assert invoke("score", "--samples", ws / "alpha-samples", "--out", tmp_path / "ok", "--reward-model", model,
                  "--trust-remote-code").exit_code == 0  # fmt: skip
    assert marker.exists()


def test_which_output_is_the_reward_must_be_known(ws: Path, gated: Path, tmp_path: Path) -> None:
    model = gated / "armo-undeclared"
    arguments = ["score", "--samples", ws / "beta-samples", "--reward-model", model, "--trust-remote-code"]
    result = invoke(*arguments, "--out", tmp_path / "a")
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: {model}: modeling_gated.GatedRewardModel.forward declares no output type, so which output is the "
        "reward is unknown; pass --reward-output score (its .score) or logits (a column of its .logits)."
    )
    result = invoke(*arguments, "--out", tmp_path / "b", "--reward-output", "score")
    assert result.exit_code == 0, result.output
    rows = load_scored(tmp_path / "b")[1].to_list()
    assert [r["scores"]["reward:armo-undeclared"] for r in rows] == pytest.approx(
        gated_by_hand(model, rows)[0], abs=1e-5
    )
    # code written for an older transformers (ArmoRM's imports LLAMA_INPUTS_DOCSTRING, gone in 5.x)
    old = tmp_path / "armo-old"
    shutil.copytree(gated / "armo", old)
    code = old / "modeling_gated.py"
    code.write_text(code.read_text(encoding="utf-8").replace(
        "import torch\n", "import torch\nfrom transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING\n"
    ), encoding="utf-8")  # fmt: skip
    result = invoke("score", "--samples", ws / "beta-samples", "--reward-model", old, "--trust-remote-code",
                    "--reward-output", "score", "--out", tmp_path / "d")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: {old}: its code (modeling_gated.GatedRewardModel) does not import with "
                           "transformers ") and "LLAMA_INPUTS_DOCSTRING" in line  # fmt: skip
    assert not (tmp_path / "d").exists()
    # transformers' own classifiers have no .score
    result = invoke("score", "--samples", ws / "beta-samples", "--reward-model", ws / "rm", "--out", tmp_path / "c",
                    "--reward-output", "score")  # fmt: skip
    assert (
        result.exit_code == 1 and "is a transformers class (LlamaForSequenceClassification)" in result.output
    )


# --------------------------------------------------------------------------- a user's verifier that fails


def raising_verifier(response: str, reference: str | None, prompt: list) -> float:
    raise ValueError("no number in the answer")


def two_argument_verifier(response: str, reference: str | None) -> float:
    return 0.0


def error_line(result: object) -> str:
    """The one line a failed command prints (besides progress bars): exit status 1, no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if "Error" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_verifier_that_raises_is_one_line_naming_it_the_record_and_the_exception(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test: --debug sets it
    name = "test_implicit_score:raising_verifier"
    first = load_samples(ws / "beta-samples")[1][0]
    arguments = ["score", "--samples", ws / "beta-samples", "--out", tmp_path / "out", "--verifier", name]
    assert error_line(invoke(*arguments)) == (
        f"Error: --verifier {name!r} raised on record {first['id']!r} (source 'beta', sample 0): ValueError: no "
        "number in the answer. Fix the verifier; `fusion-train --debug score ...` shows the traceback."
    )
    assert not (tmp_path / "out" / "parts" / "part-00000").exists()
    result = invoke("--debug", *arguments)  # the traceback, down to the verifier's own line
    assert isinstance(result.exception, ScoreError) and isinstance(result.exception.__cause__, ValueError)


def test_a_verifier_with_the_wrong_signature_is_refused_before_anything_runs(
    ws: Path, tmp_path: Path
) -> None:
    name = "test_implicit_score:two_argument_verifier"
    line = error_line(
        invoke("score", "--samples", ws / "beta-samples", "--out", tmp_path / "out", "--verifier", name)
    )
    assert line.startswith(f"Error: --verifier {name!r}: two_argument_verifier(response")
    assert "cannot be called as two_argument_verifier(response, reference, prompt)" in line
    assert not (tmp_path / "out").exists()


def test_a_verifier_module_in_the_working_directory_is_found(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `fusion-train` script does not put the working directory on the import path (`python -m`
    does): a verifier module there is found all the same, and the error for one that is nowhere
    says where it was looked for."""
    module = "cwd_word_counter"
    (tmp_path / f"{module}.py").write_text(
        "def words(response, reference, prompt):\n    return float(len(response.split()))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        result = invoke(
            "score", "--samples", ws / "beta-samples", "--out", "out", "--verifier", f"{module}:words"
        )
        assert result.exit_code == 0, result.output
    finally:
        sys.modules.pop(module, None)
    rows = load_scored(tmp_path / "out")[1].to_list()
    assert [r["scores"][f"{module}:words"] for r in rows] == [float(len(r["response"].split())) for r in rows]
    assert str(tmp_path) not in sys.path  # on it only while the module was imported

    result = invoke(
        "score", "--samples", ws / "beta-samples", "--out", "o2", "--verifier", "nowhere_to_find:f"
    )
    assert error_line(result) == (
        "Error: --verifier 'nowhere_to_find:f': no module 'nowhere_to_find' on the import path (PYTHONPATH) or "
        f"in the current directory {tmp_path}; run from the folder holding it, or add that folder to PYTHONPATH."
    )


def test_samples_of_different_prompts_are_refused(ws: Path, tmp_path: Path) -> None:
    """Only `prefer` used to notice (and only prompts under the same id); `score` refuses up front."""
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    sample(ws / "beta", other, tmp_path / "beta-other", SampleSettings(num_samples=1, max_new_tokens=2),
           progress=False)  # fmt: skip
    result = invoke("score", "--samples", ws / "alpha-samples", "--samples", tmp_path / "beta-other",
                    "--verifier", "reference-overlap", "--out", tmp_path / "out")  # fmt: skip
    assert error_line(result) == (
        f"Error: {ws / 'alpha-samples'} and {tmp_path / 'beta-other'} hold answers to different prompts: "
        f"{ws / 'alpha-samples'} to 4 records of {ws / 'prompts.jsonl'}, {tmp_path / 'beta-other'} to 1 records "
        f"of {other}; score together only samples of the same prompts (every source sampled with the same --data "
        "and --limit)."
    )
    assert not (tmp_path / "out").exists()
