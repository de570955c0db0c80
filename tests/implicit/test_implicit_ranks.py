"""`sample` and `score` on several ranks: 2 CPU processes started by `--nproc 2` (gloo), against
the single-process run of the same inputs; bad input with --nproc fails once, before any rank starts.

What would make these fail: a rank skipping or repeating a part, a response's random draws that
depend on the rank or on which parts a process takes, rank 0 writing the summary before the other
rank's parts exist (the resume tests give rank 0 nothing to do, so it would finish first), options
lost on the way to the ranks, an input checked only inside the ranks (one error per rank, and an
output directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_tiny_model
from implicit_fixtures import build_reward_model, build_stopper, write_jsonl
from test_ranks import run_cli
from test_resume import assert_same_output

import fusion_train.calls
from fusion_train.cli import main
from fusion_train.implicit.sample import SampleSettings, load_samples, sample
from fusion_train.implicit.score import RewardModel, load_scored, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources (a random model; one that ends its turn with probability 0.3 at each token, so
    that responses end both ways), 7 prompts, a reward model."""
    root = tmp_path_factory.mktemp("ranks")
    build_tiny_model(tokenizer_dirs["smollm2"], root / "alpha", hidden=16, layers=1)
    build_stopper(tokenizer_dirs["smollm2"], root / "beta", 0.3)
    build_reward_model(tokenizer_dirs["smollm2"], root / "rm")
    records = [{"instruction": f"Add {i} and {i}.", "output": f"The sum is {2 * i}."} for i in range(7)]
    write_jsonl(root / "prompts.jsonl", records)
    return root


# In-process runs and their command lines (--nproc 2), with the same settings. 7 records in parts of
# 2: rank 0 writes parts 0 and 2, rank 1 parts 1 and 3.
SETTINGS = SampleSettings(num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=7, chunk_size=2)
BATCH = 4


def sample_arguments(ws: Path, source: str, out: Path) -> list[str]:
    return ["sample", "--model", str(ws / source), "--data", str(ws / "prompts.jsonl"), "--out", str(out),
            "--num-samples", "3", "--max-new-tokens", "5", "--temperature", "1", "--top-p", "1",
            "--chunk-size", "2", "--batch-size", str(BATCH), "--seed", "7"]  # fmt: skip


def sample_here(ws: Path, source: str, out: Path, shard: tuple[int, int] | None = None) -> None:
    sample(ws / source, ws / "prompts.jsonl", out, SETTINGS, batch_size=BATCH, shard=shard, progress=False)


@pytest.fixture(scope="module")
def one_process(ws: Path) -> dict[str, Path]:
    """Every source's samples by one process."""
    for source in ("alpha", "beta"):
        sample_here(ws, source, ws / f"{source}-one")
    return {source: ws / f"{source}-one" for source in ("alpha", "beta")}


def test_sample_on_two_ranks_writes_what_one_process_writes(
    ws: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "beta"
    result = run_cli(*sample_arguments(ws, "beta", out), "--nproc", "2")
    assert_same_output(out, one_process["beta"])  # rows, part stats, manifest, summary (less timings)
    assert result.stdout.count("21 responses to 7 prompts") == 1  # the main rank's line, once
    summary = json.loads((out / "summary.json").read_text())
    # the stopper's responses end both ways, so token counts and finish reasons are really compared
    assert summary["responses"] == 21 and set(summary["finish_reasons"]) == {"stop", "length"}
    assert len(set(load_samples(out)[1]["response"])) > 10


def test_sample_ranks_resume_and_the_main_rank_waits_for_the_others(
    ws: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    """Parts 0 and 2 written before (shard 0/2): under --nproc 2 rank 0 has nothing left to do,
    rank 1 writes parts 1 and 3 (with the random model, whose tokens depend on the context), and
    rank 0 writes the summary only after them."""
    out = tmp_path / "resumed"
    sample_here(ws, "alpha", out, shard=(0, 2))
    assert not (out / "summary.json").exists()
    run_cli(*sample_arguments(ws, "alpha", out), "--nproc", "2")
    assert_same_output(out, one_process["alpha"])
    assert len(set(load_samples(out)[1]["response"])) > 10


SCORERS = {"verifiers": ("reference-overlap",), "chunk_size": 10, "batch_size": 4}


def score_arguments(one_process: dict[str, Path], ws: Path, out: Path) -> list[str]:
    # 42 responses in parts of 10: rank 0 scores parts 0, 2 and 4, rank 1 parts 1 and 3
    return ["score", "--samples", str(one_process["alpha"]), "--samples", str(one_process["beta"]),
            "--out", str(out), "--reward-model", str(ws / "rm"), "--verifier", "reference-overlap",
            "--chunk-size", "10", "--batch-size", "4"]  # fmt: skip


def score_here(
    one_process: dict[str, Path], ws: Path, out: Path, shard: tuple[int, int] | None = None
) -> None:
    reward = RewardModel(str(ws / "rm"), 0, "LABEL_0", 1)
    score([one_process["alpha"], one_process["beta"]], out, reward_model=reward, shard=shard, progress=False,
          **SCORERS)  # fmt: skip


def test_score_on_two_ranks_gives_the_same_scores_and_summary(
    ws: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    score_here(one_process, ws, tmp_path / "one")
    result = run_cli(*score_arguments(one_process, ws, tmp_path / "two"), "--nproc", "2")
    assert_same_output(tmp_path / "two", tmp_path / "one")
    assert result.stdout.count("reward:rm: mean") == 1
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["responses"] == 42 and summary["scorers"]["reward:rm"]["judged"] == 42
    assert set(summary["scorers"]["reward:rm"]["by_source"]) == {"alpha", "beta"}
    scores = [r["reward:rm"] for r in load_scored(tmp_path / "two")[1]["scores"]]
    assert len(set(scores)) > 1  # real reward-model outputs, not a constant

    # resumed: rank 0's parts exist, so it only waits for rank 1's before the summary
    resumed = tmp_path / "resumed"
    score_here(one_process, ws, resumed, shard=(0, 2))
    assert not (resumed / "summary.json").exists()
    run_cli(*score_arguments(one_process, ws, resumed), "--nproc", "2")
    assert_same_output(resumed, tmp_path / "one")


# --------------------------------------------------------------------------- bad input, checked once


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the launcher was started")

    monkeypatch.setattr(fusion_train.calls, "launch", refuse)


def one_line_error(arguments: list[str]) -> str:
    result = CliRunner().invoke(main, [*arguments, "--nproc", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_bad_input_fails_once_before_any_rank_starts(
    ws: Path, one_process: dict[str, Path], tmp_path: Path, no_launch: None
) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "Hi."}]}])
    out = tmp_path / "out"
    arguments = sample_arguments(ws, "alpha", out)
    bad_data = [*arguments[:4], str(data), *arguments[5:]]
    error = one_line_error(bad_data)
    assert error.startswith(f"Error: {data}, record 0 (id ") and "no user turn to answer" in error
    result = CliRunner().invoke(main, [*arguments, "--shard", "0/2", "--nproc", "2"])
    assert (
        result.exit_code == 2
        and "Error: --shard splits the work between processes you start" in result.output
    )
    # an output directory of another run: refused before the ranks, each of which would refuse it
    other = [*sample_arguments(ws, "alpha", one_process["alpha"]), "--temperature", "0.5"]
    assert "differs in: settings" in one_line_error(other)

    scoring = score_arguments(one_process, ws, out)
    same_source = [*scoring, "--samples", str(one_process["alpha"])]
    assert "both hold samples of source 'alpha'" in one_line_error(same_source)
    assert "--verifier 'bleu': unknown" in one_line_error([*scoring, "--verifier", "bleu"])
    assert "no scorer" in one_line_error(scoring[: scoring.index("--reward-model")])
    assert "already holds results of a different run" in one_line_error(
        score_arguments(one_process, ws, one_process["alpha"])  # a sample output, not a score output
    )
    assert not out.exists()
