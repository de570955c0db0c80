"""`prefer`: the SFT set and both papers' pairing rules on a hand-built scored set whose expected
output is worked out below, the report, and bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner

from fusion_train import parts
from fusion_train.cli import main
from fusion_train.implicit import sample, score
from fusion_train.storage import write_json_atomic

# Responses per prompt and source: (text, score or None, finish reason). T is the target's own.
# Expected, worked out by hand (margin 0.05, target T):
#   SFT (best of A and B):   q1 -> B "b0" .95 | q2 -> A "a0" .30 (tie: first) | q3 -> A "a0" .80 | q4 -> A "same" .40
#   fusechat3 (best overall vs the worst other response of its source):
#     q1 B "b0" .95 vs "b1" .94: margin .01, dropped | q2 A "a0" .30 vs "a1" .30: dropped
#     q3 A "a0" .80 vs "a1" .10: kept (.70)           | q4 A "same" vs "same": identical, dropped
#   wrpo (target's best vs worst, y_ws = best source response):
#     q1 T "t0" .60 vs "t1" .10: kept, y_ws B "b0"   | q2 T has one response | q3 no T | q4 T identical
SCORED = {
    "q1": {"A": [("a0", 0.9, "stop"), ("a1", 0.2, "stop"), ("a2", 0.5, "stop")],
           "B": [("b0", 0.95, "stop"), ("b1", 0.94, "stop")],
           "T": [("t0", 0.6, "stop"), ("t1", 0.1, "stop")]},
    "q2": {"A": [("a0", 0.3, "stop"), ("a1", 0.3, "stop")], "B": [("b0", None, "stop")], "T": [("t0", 0.5, "stop")]},
    "q3": {"A": [("a0", 0.8, "stop"), ("a1", 0.1, "length")], "B": [("b0", 0.2, "stop")]},
    "q4": {"A": [("same", 0.4, "stop"), ("same", 0.4, "stop")], "T": [("t", 0.7, "stop"), ("t", 0.7, "stop")]},
}  # fmt: skip


def prompt(key: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question {key}?"}]


def write_scored(
    out: Path, scored: dict = SCORED, scorers: tuple[str, ...] = ("s",), prompts: dict | None = None
) -> Path:
    """A `score` output directory holding exactly the responses of ``scored``."""
    sources = list(dict.fromkeys(src for per_source in scored.values() for src in per_source))
    rows = [
        {"id": key, "domain": "", "source": src, "sample_index": j, "prompt": (prompts or {}).get((key, src), prompt(key)),
         "reference": None, "response": text, "num_tokens": 1, "finish_reason": finish,
         "scores": {name: value for name in scorers}}
        for src in sources for key, per_source in scored.items()
        for j, (text, value, finish) in enumerate(per_source.get(src, []))
    ]  # fmt: skip
    features = sample.features().copy()
    features["scores"] = datasets.Features({name: datasets.Value("float64") for name in scorers})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(parts.part_path(out, 0) / "data"))
    write_json_atomic(out / "manifest.json", {
        "format": score.FORMAT, "samples": [{"path": f"/samples/{s}", "source": s, "fingerprint": s} for s in sources],
        "scorers": [{"name": name, "kind": "verifier"} for name in scorers], "num_parts": 1,
    })  # fmt: skip
    return out


def invoke(*arguments: object) -> object:
    return CliRunner().invoke(main, ["prefer", *map(str, arguments)])


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_sft_set_and_fusechat3_pairs(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0.05,
                    "--target-source", "T")  # fmt: skip
    assert result.exit_code == 0, result.output
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert [(r["id"], r["source"], r["completion"], r["score"]) for r in sft] == [
        ("q1", "B", assistant("b0"), 0.95), ("q2", "A", assistant("a0"), 0.3),
        ("q3", "A", assistant("a0"), 0.8), ("q4", "A", assistant("same"), 0.4),
    ]  # fmt: skip
    assert sft[0]["prompt"] == prompt("q1")
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert pairs == [{"id": "q3", "prompt": prompt("q3"), "chosen": assistant("a0"), "rejected": assistant("a1"),
                      "source": "A", "chosen_score": 0.8, "rejected_score": 0.1, "margin": pytest.approx(0.7)}]  # fmt: skip
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pairs"] == 1 and report["sft_examples"] == 4 and report["prompts"] == 4
    assert report["pairs_dropped"] == {"below margin": 2, "identical responses": 1}
    assert report["responses_excluded"] == {"not judged": 1}
    assert report["by_source"] == {
        "A": {"sft": 3, "pairs": 1, "dropped: below margin": 1, "dropped: identical responses": 1},
        "B": {"sft": 1, "dropped: below margin": 1},
    }
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| A | 3 | 1 | 1 | 1 |" in markdown and "| B | 1 | 0 | 1 | 0 |" in markdown

    # margin 0: equal scores make a pair; identical texts still do not; truncated responses can be left out
    invoke(
        "--scored",
        scored,
        "--out",
        tmp_path / "m0",
        "--mode",
        "fusechat3",
        "--margin",
        0,
        "--target-source",
        "T",
    )
    assert [p["id"] for p in datasets.load_from_disk(str(tmp_path / "m0" / "pairs"))] == ["q1", "q2", "q3"]
    result = invoke("--scored", scored, "--out", tmp_path / "dt", "--mode", "fusechat3", "--margin", 0,
                    "--target-source", "T", "--drop-truncated")  # fmt: skip
    assert json.loads((tmp_path / "dt" / "report.json").read_text())["pairs_dropped"] == {
        "one response": 1, "identical responses": 1}  # fmt: skip


def test_fusechat3_without_a_target_counts_its_samples_as_a_source(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored", {"q1": SCORED["q1"]})
    assert (
        invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0).exit_code
        == 0
    )
    (sft,) = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert sft["source"] == "B"  # still the best; T's 0.6 would win over A's 0.5 among the rest
    (pair,) = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert (pair["chosen"], pair["rejected"]) == (assistant("b0"), assistant("b1"))


def test_wrpo_pairs(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "wrpo", "--margin", 0.05,
                    "--target-source", "T")  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert pairs == [{"id": "q1", "prompt": prompt("q1"), "chosen": assistant("t0"), "rejected": assistant("t1"),
                      "source": "B", "chosen_score": 0.6, "rejected_score": 0.1, "margin": pytest.approx(0.5),
                      "chosen_source": assistant("b0"), "chosen_source_score": 0.95}]  # fmt: skip
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pairs_dropped"] == {"one response": 1, "no target response": 1, "identical responses": 1}
    assert report["sft_examples"] == 4  # the SFT set never holds the target's own responses
    assert "WRPO pairs" in (tmp_path / "out" / "report.md").read_text()


def test_sft_mode_writes_the_sft_set_alone_even_where_no_pair_would_be_kept(tmp_path: Path) -> None:
    # With margin 0.9 no pair of either mode is kept (see the error test below); WRPO's first step
    # still needs the SFT set, the same as the other modes build, and no pairs directory.
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "sft", "--margin", 0.9,
                    "--target-source", "T")  # fmt: skip
    assert result.exit_code == 0, result.output
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert [(r["id"], r["source"], r["completion"]) for r in sft] == [
        ("q1", "B", assistant("b0")), ("q2", "A", assistant("a0")), ("q3", "A", assistant("a0")),
        ("q4", "A", assistant("same")),
    ]  # fmt: skip
    assert not (tmp_path / "out" / "pairs").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["sft_examples"], report["pairs"], report["pairs_dropped"]) == (4, 0, {})
    assert str(tmp_path / "out" / "pairs") not in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mode", "fusechat3", "--margin", 0.9],  # without a target, T is a source: q2's best is T's one answer
         "no preference pair kept (4 prompts; dropped: {'below margin': 2, 'one response': 1, 'identical "
         "responses': 1}). Lower --margin (the largest margin was 0.7). Sample more responses per prompt"),
        (["--mode", "wrpo"], "--mode wrpo needs --target-source: the source name of the target's own samples."),
        (["--mode", "wrpo", "--target-source", "Z"], "--target-source 'Z': no such source among A, B, T."),
    ],
)  # fmt: skip
def test_bad_requests_are_one_line_and_write_nothing(tmp_path: Path, arguments: list, message: str) -> None:
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", *arguments)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_several_scores_need_a_choice_and_prompts_must_agree(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "two", scorers=("r", "v"))
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3")
    assert result.exit_code == 1 and "several scores (r, v); pick one with --scorer" in result.output
    assert (
        invoke(
            "--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--scorer", "v"
        ).exit_code
        == 0
    )

    other = {("q2", "B"): [{"role": "user", "content": "Something else?"}]}
    scored = write_scored(tmp_path / "mixed", prompts=other)
    result = invoke("--scored", scored, "--out", tmp_path / "out2", "--mode", "fusechat3")
    assert result.exit_code == 1
    assert "record 'q2': sources 'A' and 'B' were given different prompts under the same id" in result.output


def test_sample_score_prefer_through_the_cli(tokenizer_dirs: dict, tmp_path: Path) -> None:
    """The three commands chained on tiny models: two sources and the target's own samples, scored
    by reference overlap, give WRPO pairs whose texts are the sampled responses."""
    from conftest import build_tiny_model
    from implicit_fixtures import write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"Name {i} things.", "output": "one two three"}
                                              for i in range(3)])  # fmt: skip
    for seed, name in enumerate(("src1", "src2", "target")):
        build_tiny_model(tokenizer_dirs["smollm2"], tmp_path / name, seed=seed, hidden=16, layers=1)
        result = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / name), "--data", str(data), "--out",
                                           str(tmp_path / f"{name}-s"), "--num-samples", "4", "--max-new-tokens", "8"])  # fmt: skip
        assert result.exit_code == 0, result.output
    samples = [a for name in ("src1", "src2", "target") for a in ("--samples", str(tmp_path / f"{name}-s"))]
    result = CliRunner().invoke(main, ["score", *samples, "--out", str(tmp_path / "scored"), "--verifier",
                                       "reference-overlap"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke("--scored", tmp_path / "scored", "--out", tmp_path / "out", "--mode", "wrpo", "--margin", 0,
                    "--target-source", "target")  # fmt: skip
    assert result.exit_code == 0, result.output
    responses = score.load_scored(tmp_path / "scored")[1].to_list()
    by_text = {(r["source"], r["response"]) for r in responses}
    for pair in datasets.load_from_disk(str(tmp_path / "out" / "pairs")):
        assert ("target", pair["chosen"][0]["content"]) in by_text
        assert ("target", pair["rejected"][0]["content"]) in by_text
        assert (pair["source"], pair["chosen_source"][0]["content"]) in by_text
        assert pair["source"] in ("src1", "src2")


def test_advice_when_no_pair_is_kept_is_advice_that_helps(tmp_path: Path) -> None:
    """Every score ties: no margin can be met, so "lower --margin" would not help. In fusechat3 mode
    (no target), a prompt whose responses were all left unjudged needs a scorer that judges them,
    not WRPO's advice to score the sources with the target."""
    ties = write_scored(tmp_path / "ties", {"q1": {"A": [("a0", 0.5, "stop"), ("a1", 0.5, "stop")]},
                                            "q2": {"A": [("b0", 0.2, "stop"), ("b1", 0.2, "stop")]}})  # fmt: skip
    result = invoke("--scored", ties, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0.1)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.strip() == (
        f"Error: {ties}: no preference pair kept (2 prompts; dropped: {{'below margin': 2}}). Every pair's scores "
        "tie, so no pair can have a margin: rank with another scorer (--scorer, or score with a reward model), or "
        "sample more, more varied responses (--num-samples, --temperature)."
    )
    unjudged = write_scored(tmp_path / "unjudged", {"q1": {"A": [("a0", None, "stop"), ("a1", None, "stop")]},
                                                    "q2": {"A": [("b0", 0.2, "stop")]}})  # fmt: skip
    result = invoke("--scored", unjudged, "--out", tmp_path / "out", "--mode", "fusechat3")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.strip() == (
        f"Error: {unjudged}: no preference pair kept (2 prompts; dropped: {{'no source response': 1, 'one "
        "response': 1}). Some prompts' responses were all left unjudged: use a scorer that judges them (the "
        "built-in verifiers need a reference answer in the data). Sample more responses per prompt "
        "(--num-samples), or keep more of them scored."
    )
    assert not (tmp_path / "out").exists()
