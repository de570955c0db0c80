"""`rate`: mean scores and win rates against a baseline, worked out by hand on answers scored by the
real `score` stage; the bootstrap intervals' properties and, on a large sample, their width against
the normal-approximation formula; bad input through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
from click.testing import CliRunner
from test_implicit_prefer import write_scored

from fusion_train import parts
from fusion_train.cli import main
from fusion_train.implicit import sample
from fusion_train.implicit.rate import RateSettings, rate
from fusion_train.storage import write_json_atomic

UNJUDGED = "?"


def number_verifier(response: str, reference: str | None, prompt: list) -> float | None:
    """The score is the number the answer is; "?" cannot be judged. Used by import path below."""
    return None if response == UNJUDGED else float(response)


def write_samples(out: Path, source: str, answers: dict[str, list[str]]) -> Path:
    """A `sample` output directory of ``source`` whose answers to prompt ``key`` are ``answers[key]``."""
    rows = [
        {"id": key, "domain": "", "source": source, "sample_index": j,
         "prompt": [{"role": "user", "content": f"Question {key}?"}], "reference": None, "response": text,
         "num_tokens": 1, "finish_reason": "stop"}
        for key, texts in answers.items() for j, text in enumerate(texts)
    ]  # fmt: skip
    datasets.Dataset.from_list(rows, features=sample.features()).save_to_disk(
        str(parts.part_path(out, 0) / "data")
    )
    data = {"path": "/prompts.jsonl", "fingerprint": ",".join(answers)}  # the same prompts, the same data
    write_json_atomic(out / "manifest.json", {"format": sample.FORMAT, "source": source, "num_parts": 1,
                                              "data": data, "num_records": len(answers)})  # fmt: skip
    return out


# Three models' answers to five held-out prompts; each answer is its own score ("?": not judged).
ANSWERS = {
    "A": {"q1": ["0.5"], "q2": ["0.2"], "q3": ["0.9"], "q4": ["?"], "q5": ["0.4"]},
    "B": {"q1": ["0.7", "0.1"], "q2": ["0.2"], "q3": ["1.0"], "q4": ["0.3"], "q5": ["?", "0.6"]},
    "C": {"q1": ["0.5"], "q2": ["?"], "q3": ["0.1"], "q4": ["0.9"], "q5": ["0.4"]},
}
# By hand, against baseline A (per prompt, a model's judged answers averaged first):
#   B: q1 .4 < .5 loss | q2 .2 = .2 tie | q3 1.0 > .9 win | q4 A not judged, left out | q5 .6 > .4 win
#      -> 2 wins, 1 tie, 1 loss: (2 + 0.5) / 4 = 0.625; mean score (.4+.2+1+.3+.6)/5 = 0.5
#   C: q1 tie | q2 C not judged | q3 .1 < .9 loss | q4 left out | q5 tie -> 0 / 2 / 1: 1/3; mean 1.9/4
#   A: mean (.5+.2+.9+.4)/4 = 0.5 over 4 prompts, one not judged
NAME = "test_implicit_rate:number_verifier"


def invoke(*arguments: object) -> object:
    return CliRunner().invoke(main, [str(a) for a in arguments])


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    """ANSWERS, scored by the real `score` stage with the number verifier."""
    samples = [write_samples(tmp_path / f"samples-{m}", m, answers) for m, answers in ANSWERS.items()]
    result = invoke("score", *(a for s in samples for a in ("--samples", s)), "--verifier", NAME,
                    "--out", tmp_path / "scored")  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path / "scored"


def test_win_rates_and_means_by_hand(scored: Path, tmp_path: Path) -> None:
    result = invoke("rate", "--scored", scored, "--out", tmp_path / "rates", "--baseline", "A", "--seed", 3)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rates" / "report.json").read_text())
    assert report["scorer"] == NAME and report["baseline"] == "A" and report["prompts"] == 5
    models = {m["name"]: m for m in report["models"]}
    assert [m["name"] for m in report["models"]] == ["A", "B", "C"]

    b = models["B"]["win_rate"]
    assert (b["wins"], b["ties"], b["losses"], b["prompts"], b["prompts_left_out"]) == (2, 1, 1, 4, 1)
    assert b["value"] == pytest.approx(0.625)
    c = models["C"]["win_rate"]
    assert (c["wins"], c["ties"], c["losses"], c["prompts"], c["prompts_left_out"]) == (0, 2, 1, 3, 2)
    assert c["value"] == pytest.approx(1 / 3)
    assert models["A"]["win_rate"] is None and models["A"]["baseline"]

    means = {name: m["mean_score"]["value"] for name, m in models.items()}
    assert means == pytest.approx({"A": 0.5, "B": 0.5, "C": 1.9 / 4})
    counts = {name: (m["prompts"], m["prompts_not_judged"], m["responses"], m["responses_not_judged"])
              for name, m in models.items()}  # fmt: skip
    assert counts == {"A": (4, 1, 5, 1), "B": (5, 0, 7, 1), "C": (4, 1, 5, 1)}
    for model in models.values():
        for stat in (model["mean_score"], model["win_rate"]):
            if stat is not None:
                assert stat["low"] <= stat["value"] <= stat["high"]
                assert stat["low"] < stat["high"]  # the outcomes vary, so the resampled rates do

    # the table: best win rate first, the baseline at one half
    markdown = (tmp_path / "rates" / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| B", "| A", "| C"]
    assert "| 2 / 1 / 1 | 4 |" in rows[0] and "baseline" in rows[1]
    assert (tmp_path / "rates" / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "rates" / "manifest.json").read_text())
    assert manifest["settings"] == {"baseline": "A", "scorer": NAME, "resamples": 1000, "confidence": 0.95,
                                    "seed": 3}  # fmt: skip

    # the library function gives the same report; another seed moves the intervals, not the estimates
    again = rate(scored, tmp_path / "again", RateSettings(baseline="A", seed=3))
    assert again == report
    other = rate(scored, tmp_path / "other", RateSettings(baseline="A", seed=4))
    assert [m["win_rate"] and m["win_rate"]["value"] for m in other["models"]] == [
        None,
        0.625,
        pytest.approx(1 / 3),
    ]
    assert [m["mean_score"] for m in other["models"]] != [m["mean_score"] for m in report["models"]]
    # a rerun with other settings into the same directory is refused, not mixed
    result = invoke("rate", "--scored", scored, "--out", tmp_path / "rates", "--baseline", "A", "--seed", 4)
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: {tmp_path / 'rates'} already holds results of a different run (rates.png, report.json, "
        "report.md): differs in: settings.seed: 3 -> 4. Use another --out directory, or delete this one to start "
        "over."
    )


def synthetic(out: Path, base: np.ndarray, other: np.ndarray, none_at: tuple[int, ...] = ()) -> Path:
    """A score output of two models, "base" and "other", one answer each per prompt."""
    table = {
        f"p{i}": {
            "base": [("x", None if i in none_at else float(b), "stop")],
            "other": [("y", float(o), "stop")],
        }
        for i, (b, o) in enumerate(zip(base, other, strict=True))
    }
    return write_scored(out, table)


def width(stat: dict) -> float:
    return stat["high"] - stat["low"]


def test_interval_widths_follow_the_normal_approximation(tmp_path: Path) -> None:
    """With n = 3000 prompts the percentile interval of a mean is close to the normal one,
    2 z sd / sqrt(n), z = 1.96 at 95% and 1.645 at 90%; for the win rate sd = sqrt(p (1 - p))."""
    rng = np.random.default_rng(11)
    n = 3000
    base = rng.normal(0.0, 1.0, n)
    other = base + rng.normal(0.3, 1.0, n)  # wins with probability about 0.62
    scored = synthetic(tmp_path / "scored", base, other)
    for confidence, z in ((0.95, 1.959964), (0.9, 1.644854)):
        report = rate(
            scored,
            tmp_path / f"out-{confidence}",
            RateSettings(baseline="base", confidence=confidence, seed=1),
        )
        model = report["models"][1]
        assert model["name"] == "other"
        assert model["mean_score"]["value"] == pytest.approx(other.mean())
        expected = 2 * z * other.std() / math.sqrt(n)
        assert width(model["mean_score"]) == pytest.approx(expected, rel=0.1)
        p = float((other > base).mean())
        assert model["win_rate"]["value"] == pytest.approx(p)
        assert width(model["win_rate"]) == pytest.approx(2 * z * math.sqrt(p * (1 - p) / n), rel=0.1)


def test_intervals_shrink_with_more_prompts_and_all_wins_is_certain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    base, other = rng.normal(0, 1, 800), rng.normal(0.2, 1, 800)
    small = rate(
        synthetic(tmp_path / "s", base[:50], other[:50]), tmp_path / "rs", RateSettings(baseline="base")
    )
    large = rate(synthetic(tmp_path / "l", base, other), tmp_path / "rl", RateSettings(baseline="base"))
    # resampling in blocks (bounded memory for many prompts) draws the same resamples
    monkeypatch.setattr("fusion_train.implicit.rate.DRAWS_PER_BLOCK", 800 * 7)
    assert (
        rate(tmp_path / "l", tmp_path / "rl-blocks", RateSettings(baseline="base"))["models"]
        == large["models"]
    )
    small, large = small["models"][1], large["models"][1]
    # 16 times the prompts: a quarter of the width, give or take sampling noise
    assert width(large["win_rate"]) < width(small["win_rate"]) / 2.5
    assert width(large["mean_score"]) < width(small["mean_score"]) / 2.5

    # always better: every resample is all wins; a left-out prompt (base not judged) is counted
    report = rate(
        synthetic(tmp_path / "w", base[:40], base[:40] + 1, none_at=(7,)),
        tmp_path / "rw",
        RateSettings(baseline="base"),
    )
    wins = report["models"][1]["win_rate"]
    assert (wins["value"], wins["low"], wins["high"]) == (1.0, 1.0, 1.0)
    assert (wins["wins"], wins["ties"], wins["losses"], wins["prompts"], wins["prompts_left_out"]) == (
        39,
        0,
        0,
        39,
        1,
    )
    assert report["models"][0]["prompts"] == 39 and report["models"][0]["responses_not_judged"] == 1


def cli_error(*arguments: object) -> str:
    result = invoke("rate", *arguments)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    (line,) = result.output.strip().splitlines()
    return line


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    two = write_scored(tmp_path / "two", {"q1": {"A": [("a", 0.1, "stop")], "B": [("b", 0.2, "stop")]}},
                       scorers=("s", "t"))  # fmt: skip
    out = tmp_path / "out"
    assert cli_error("--scored", two, "--out", out, "--baseline", "Z", "--scorer", "s") == (
        f"Error: --baseline 'Z': not one of the models scored in {two}: A, B."
    )
    assert cli_error("--scored", two, "--out", out, "--baseline", "A") == (
        "Error: the responses have several scores (s, t); pick one with --scorer."
    )
    unjudged = synthetic(tmp_path / "unjudged", rng.normal(size=3), rng.normal(size=3), none_at=(0, 1, 2))
    assert cli_error("--scored", unjudged, "--out", out, "--baseline", "base") == (
        "Error: --baseline 'base': none of its 3 responses was judged by s, so nothing can be compared with it; "
        "pick another baseline or scorer."
    )
    assert not out.exists()
    result = invoke("rate", "--scored", two, "--out", out, "--baseline", "A", "--confidence", 1)
    assert result.exit_code == 2 and "--confidence" in result.output
    # with --scorer, the same data rates fine
    assert invoke("rate", "--scored", two, "--out", out, "--baseline", "A", "--scorer", "t").exit_code == 0


def test_a_samples_folder_is_named_as_one(tmp_path: Path) -> None:
    samples = write_samples(tmp_path / "samples", "A", ANSWERS["A"])
    assert cli_error("--scored", samples, "--out", tmp_path / "out", "--baseline", "A") == (
        f"Error: {samples}: holds samples (format 'fusion-train/samples@1'), not the output of `fusion-train score` "
        "('fusion-train/scored@1') that is needed here; pass the --out directory of `fusion-train score`."
    )


@pytest.mark.parametrize("command", ["score", "prefer", "rate"])
def test_an_out_holding_other_files_is_refused_and_left_as_it_is(tmp_path: Path, command: str) -> None:
    """One rule for every command's --out: new, empty, or the command's own earlier output."""
    samples = write_samples(tmp_path / "samples", "A", ANSWERS["A"])
    scored = write_scored(tmp_path / "scored", {"q1": {"A": [("a", 0.9, "stop"), ("b", 0.1, "stop")]}})
    arguments = {
        "score": ["--samples", samples, "--verifier", NAME],
        "prefer": ["--scored", scored, "--mode", "fusechat3", "--sft-share", "all", "--max-margin", "none"],
        "rate": ["--scored", scored, "--baseline", "A"],
    }[command]
    out = tmp_path / "mine"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("keep me")
    (out / "thesis.tex").write_text("keep me too")
    result = invoke(command, *arguments, "--out", out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.strip() == (
        f"Error: {out} holds files that are not an output of this command (notes/, thesis.tex; no manifest.json). "
        "Pass a new or empty --out directory."
    )
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "notes",
        "notes/todo.txt",
        "thesis.tex",
    ]
    # an empty folder is fine, and so is a rerun into the command's own output
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        result = invoke(command, *arguments, "--out", tmp_path / "empty")
        assert result.exit_code == 0, result.output


def test_a_folder_with_another_runs_manifest_but_no_results_says_so(scored: Path, tmp_path: Path) -> None:
    """What a run killed right after recording its manifest leaves: not "already holds results"."""
    out = tmp_path / "rates"
    assert invoke("rate", "--scored", scored, "--out", out, "--baseline", "A").exit_code == 0
    for name in ("report.json", "report.md", "rates.png"):
        (out / name).unlink()
    assert cli_error("--scored", scored, "--out", out, "--baseline", "B") == (
        f"Error: {out} holds the manifest.json of a different run, and no results yet: differs in: "
        'settings.baseline: "A" -> "B". Use another --out directory, or delete this one to start over.'
    )
