"""`prefer`: the SFT set and both papers' pairing rules on a hand-built scored set whose expected
output is worked out below, the report, and bad input through the CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import datasets
import pytest
from click.testing import CliRunner

from fusion_train import parts
from fusion_train.cli import main
from fusion_train.implicit import prefer, sample, score
from fusion_train.storage import write_json_atomic

# Responses per prompt and source: (text, score or None, finish reason). T is the target's own.
# The tests on SCORED check the pairing rules alone: every prompt feeds both sets (--sft-share all)
# and no margin is too wide (--max-margin none). Expected, worked out by hand (margin 0.05, target T):
#   SFT (best of A and B):   q1 -> B "b0" .95 | q2 -> A "a0" .30 (tie: first) | q3 -> A "a0" .80 | q4 -> A "same" .40
#   fusechat3 (per source, its best vs its worst other response; of the kept pairs, the highest chosen):
#     q1 A "a0" .9 vs "a1" .2: .70 kept; B .95 vs .94: .01 below -> A's | q2 A .30 vs .30: below (B unjudged)
#     q3 A "a0" .80 vs "a1" .10: kept (.70); B one response -> A's       | q4 A "same" vs "same": identical
#   wrpo (target's best vs worst, y_ws = best source response):
#     q1 T "t0" .60 vs "t1" .10: kept, y_ws B "b0"   | q2 T has one response | q3 no T | q4 T identical
RULES_ONLY = ("--sft-share", "all", "--max-margin", "none")
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
    out: Path,
    scored: dict = SCORED,
    scorers: tuple[str, ...] = ("s",),
    prompts: dict | None = None,
    kinds: dict | None = None,
) -> Path:
    """A `score` output directory holding exactly the responses of ``scored``; a response's score
    is one value for every scorer, or a mapping scorer -> value; ``kinds``: scorer -> kind
    (default verifier)."""
    sources = list(dict.fromkeys(src for per_source in scored.values() for src in per_source))
    rows = [
        {"id": key, "domain": "", "source": src, "sample_index": j, "prompt": (prompts or {}).get((key, src), prompt(key)),
         "reference": None, "response": text, "num_tokens": 1, "finish_reason": finish,
         "scores": value if isinstance(value, dict) else dict.fromkeys(scorers, value)}
        for src in sources for key, per_source in scored.items()
        for j, (text, value, finish) in enumerate(per_source.get(src, []))
    ]  # fmt: skip
    features = sample.features().copy()
    features["scores"] = datasets.Features({name: datasets.Value("float64") for name in scorers})
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(parts.part_path(out, 0) / "data"))
    write_json_atomic(out / "manifest.json", {
        "format": score.FORMAT, "samples": [{"path": f"/samples/{s}", "source": s, "fingerprint": s} for s in sources],
        "scorers": [{"name": name, "kind": (kinds or {}).get(name, "verifier")} for name in scorers], "num_parts": 1,
    })  # fmt: skip
    return out


def invoke(*arguments: object) -> object:
    return CliRunner().invoke(main, ["prefer", *map(str, arguments)])


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_sft_set_and_fusechat3_pairs(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0.05,
                    "--target-source", "T", *RULES_ONLY)  # fmt: skip
    assert result.exit_code == 0, result.output
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert [(r["id"], r["source"], r["completion"], r["score"]) for r in sft] == [
        ("q1", "B", assistant("b0"), 0.95), ("q2", "A", assistant("a0"), 0.3),
        ("q3", "A", assistant("a0"), 0.8), ("q4", "A", assistant("same"), 0.4),
    ]  # fmt: skip
    assert sft[0]["prompt"] == prompt("q1")
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert pairs == [
        {"id": "q1", "prompt": prompt("q1"), "chosen": assistant("a0"), "rejected": assistant("a1"), "source": "A",
         "chosen_score": 0.9, "rejected_score": 0.2, "margin": pytest.approx(0.7)},
        {"id": "q3", "prompt": prompt("q3"), "chosen": assistant("a0"), "rejected": assistant("a1"), "source": "A",
         "chosen_score": 0.8, "rejected_score": 0.1, "margin": pytest.approx(0.7)},
    ]  # fmt: skip
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pairs"] == 2 and report["sft_examples"] == 4 and report["prompts"] == 4
    assert report["pairs_dropped"] == {"below margin": 1, "identical responses": 1}
    assert report["responses_excluded"] == {"not judged": 1}
    assert report["by_source"] == {
        "A": {"sft": 3, "pairs": 2, "dropped: below margin": 1, "dropped: identical responses": 1},
        "B": {"sft": 1},
    }
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| A | 3 | 2 | 1 | 1 |" in markdown and "| B | 1 | 0 | 0 | 0 |" in markdown

    # margin 0: equal scores make a pair (q2), and in q1 B's pair (.01) is kept too, its chosen (.95) above
    # A's (.9); identical texts still make none; truncated responses can be left out
    result = invoke("--scored", scored, "--out", tmp_path / "m0", "--mode", "fusechat3", "--margin", 0,
                    "--target-source", "T", *RULES_ONLY)  # fmt: skip
    pairs = datasets.load_from_disk(str(tmp_path / "m0" / "pairs")).to_list()
    assert [(p["id"], p["source"], p["chosen"][0]["content"]) for p in pairs] == [
        ("q1", "B", "b0"), ("q2", "A", "a0"), ("q3", "A", "a0")]  # fmt: skip
    result = invoke("--scored", scored, "--out", tmp_path / "dt", "--mode", "fusechat3", "--margin", 0,
                    "--target-source", "T", "--drop-truncated", *RULES_ONLY)  # fmt: skip
    assert json.loads((tmp_path / "dt" / "report.json").read_text())["pairs_dropped"] == {
        "one response": 1, "identical responses": 1}  # fmt: skip


def test_fusechat3_without_a_target_counts_its_samples_as_a_source(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored", {"q1": SCORED["q1"]})
    # FuseChat-3.0's window (0 to 0.1 here): A's .9 vs .2 and T's .6 vs .1 are too wide; B's .01 fits
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0,
                    "--sft-share", "all")  # fmt: skip
    assert result.exit_code == 0, result.output
    (sft,) = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert sft["source"] == "B"  # still the best; T's 0.6 would win over A's 0.5 among the rest
    (pair,) = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert (pair["chosen"], pair["rejected"]) == (assistant("b0"), assistant("b1"))


def test_wrpo_pairs(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "wrpo", "--margin", 0.05,
                    "--target-source", "T", "--sft-share", "all")  # fmt: skip
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
                    "--target-source", "T", *RULES_ONLY)  # fmt: skip
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
        ([*RULES_ONLY, "--mode", "fusechat3", "--margin", 0.9],  # no target: T is a source; q2's best is T's one answer
         "no preference pair kept (4 of 4 prompts in the preference set; dropped: {'below margin': 2, 'one response': "
         "1, 'identical responses': 1}). Lower --margin (the largest margin was 0.7). Sample more responses per "
         "prompt"),
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
            "--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--scorer", "v", *RULES_ONLY
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
    result = invoke("--scored", tmp_path / "scored", "--out", tmp_path / "out", "--mode", "wrpo",
                    "--target-source", "target", "--sft-share", "all")  # fmt: skip
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
    result = invoke("--scored", ties, "--out", tmp_path / "out", "--mode", "fusechat3", "--margin", 0.1,
                    "--sft-share", "all")  # fmt: skip
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.strip() == (
        f"Error: {ties}: no preference pair kept (2 of 2 prompts in the preference set; dropped: {{'below margin': "
        "2}). Every pair's scores "
        "tie, so no pair can have a margin: rank with another scorer (--scorer, or score with a reward model), or "
        "sample more, more varied responses (--num-samples, --temperature)."
    )
    unjudged = write_scored(tmp_path / "unjudged", {"q1": {"A": [("a0", None, "stop"), ("a1", None, "stop")]},
                                                    "q2": {"A": [("b0", 0.2, "stop")]}})  # fmt: skip
    result = invoke(
        "--scored", unjudged, "--out", tmp_path / "out", "--mode", "fusechat3", "--sft-share", "all"
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.strip() == (
        f"Error: {unjudged}: no preference pair kept (2 of 2 prompts in the preference set; dropped: {{'no source "
        "response': 1, 'one response': 1}). Some prompts' responses were all left unjudged: use a scorer that judges them (the "
        "built-in verifiers need a reference answer in the data). Sample more responses per prompt "
        "(--num-samples), or keep more of them scored."
    )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the papers' rules

NAN = math.nan
# By the split (sha256 of "fusion-train/prefer-split:" + id, mod 10000; see the test below): q1 1838,
# q4 3498, q6 2909 are below 4000 (FuseChat-3.0's SFT share 0.4), q1 and q6 below 3333 (WRPO's 1/3);
# q2, q3, q5, q7 are above both. So fusechat3 trains SFT on q1, q4, q6 and pairs on the rest; wrpo
# trains SFT on q1, q6 and pairs on q2, q3, q4, q5, q7.
PAPERS = {
    "q1": {"A": [("a0", 0.9, "stop"), ("a1", 0.2, "stop")], "B": [("b0", 0.95, "stop"), ("b1", 0.94, "stop")]},
    "q2": {"A": [("a0", 0.5, "stop"), ("a1", 0.45, "stop")], "B": [("b0", 0.7, "stop"), ("b1", 0.5, "stop")],
           "T": [("t0", 0.9, "stop"), ("t1", 0.1, "stop")]},
    "q3": {"A": [("a0", 0.8, "stop"), ("a1", 0.1, "stop")], "B": [("b0", 0.3, "stop")],
           "T": [("t0", 0.5, "stop"), ("t1", 0.5, "stop")]},
    "q4": {"A": [("a0", NAN, "stop"), ("a1", 0.6, "stop"), ("   ", 0.99, "stop")], "B": [("b0", 0.5, "stop")],
           "T": [("same", 0.7, "stop"), ("same", 0.2, "stop")]},
    "q5": {"A": [("a0", 0.3, "stop"), ("a1", 0.3, "stop")], "B": [("b0", 0.3, "stop")]},
    "q6": {"A": [], "B": [("b0", 0.4, "stop"), ("", 0.9, "stop")]},
    "q7": {"A": [("a0", 0.6, "stop"), ("a1", 0.55, "stop")], "B": [("b0", 0.6, "stop"), ("b1", 0.58, "stop")],
           "T": [("t0", 0.4, "stop"), ("t1", NAN, "stop")]},
}  # fmt: skip
# Left out of everything: q4 A "a0" (NaN: first in order, max() over it kept it as the best) and
# q7 T "t1" (NaN), q4 A "   " and q6 B "" (empty, the first one scored highest of its prompt).


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def texts(rows: list[dict], *columns: str) -> list[tuple]:
    return [(r["id"], r["source"], *(r[c][0]["content"] for c in columns)) for r in rows]


def test_the_split_is_a_salted_hash_of_the_id_at_the_papers_shares() -> None:
    def bucket(key: str, salt: str = "fusion-train/prefer-split:") -> int:
        return int(hashlib.sha256((salt + key).encode()).hexdigest(), 16) % 10_000

    assert [bucket(k) for k in ("q1", "q2", "q3", "q4", "q5", "q6", "q7")] == [1838, 6011, 5137, 3498, 7160, 2909,
                                                                                9082]  # fmt: skip
    assert [prefer.in_sft_set(k, 0.4) for k in ("q1", "q4", "q2")] == [True, True, False]
    assert [prefer.in_sft_set(k, 1 / 3) for k in ("q1", "q4", "q2")] == [True, False, False]
    ids = [f"record-{i}" for i in range(20_000)]
    for share in (0.4, 1 / 3):
        assert sum(prefer.in_sft_set(k, share) for k in ids) / len(ids) == pytest.approx(share, abs=0.01)
    # independent of the held-out split (unsalted hash < 1000 at heldout_fraction 0.1): the training
    # records still split 4:6, where an unsalted hash would put 3000 of 9000 (1/3) in the SFT set
    training = [k for k in ids if bucket(k, "") >= 1000]
    assert sum(prefer.in_sft_set(k, 0.4) for k in training) / len(training) == pytest.approx(0.4, abs=0.015)
    assert not any(prefer.in_sft_set(k, 0.0) for k in ids[:500]) and all(
        prefer.in_sft_set(k, 1.0) for k in ids[:500]
    )


def test_fusechat3_by_the_paper_split_window_and_best_valid_source(tmp_path: Path) -> None:
    """q2: B holds the best response (.7) but its pair is too wide (.2); A's (.05) fits, so A gives
    the pair. q7: A's and B's chosen tie at .6: the earlier source, A. q3: A's .7 is above 0.1, B
    has one response: dropped (A's reason: A holds the best). q5: every score ties: below 0.01."""
    scored = write_scored(tmp_path / "scored", PAPERS)
    result = invoke(
        "--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", "--target-source", "T"
    )
    assert result.exit_code == 0, result.output
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert [(r["id"], r["source"], r["completion"][0]["content"], r["score"]) for r in sft] == [
        ("q1", "B", "b0", 0.95), ("q4", "A", "a1", 0.6), ("q6", "B", "b0", 0.4)]  # fmt: skip
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert [(*t, p["margin"]) for t, p in zip(texts(pairs, "chosen", "rejected"), pairs, strict=True)] == [
        ("q2", "A", "a0", "a1", pytest.approx(0.05)), ("q7", "A", "a0", "a1", pytest.approx(0.05))]  # fmt: skip
    report = strict_json(tmp_path / "out" / "report.json")
    assert (report["sft_share"], report["margin"], report["max_margin"]) == (0.4, 0.01, 0.1)
    assert (report["sft_prompts"], report["preference_prompts"]) == (3, 4)
    assert (
        report["pairs_dropped"] == {"above max margin": 1, "below margin": 1} and report["sft_dropped"] == {}
    )
    assert report["responses_excluded"] == {"non-finite score": 2, "empty response": 2}
    assert report["non_finite"] == {"s": {"A": {"responses": 1, "examples": ["q4#0"]},
                                          "T": {"responses": 1, "examples": ["q7#1"]}}}  # fmt: skip
    assert report["by_source"] == {
        "A": {"sft": 1, "pairs": 2, "dropped: above max margin": 1, "dropped: below margin": 1},
        "B": {"sft": 2, "dropped: one response": 2},
    }
    assert report["largest_margin"] == pytest.approx(0.7)
    settings = strict_json(tmp_path / "out" / "manifest.json")["settings"]
    assert settings == {"mode": "fusechat3", "scorer": "s", "gate": None, "gate_pass": 1.0, "margin": 0.01,
                        "max_margin": 0.1, "sft_share": 0.4, "target_source": "T", "drop_truncated": False}  # fmt: skip
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert (
        "--sft-share 0.4: 3 SFT, 4 preference" in markdown
        and "Non-finite s scores of A: 1, e.g. q4#0" in markdown
    )

    # no upper bound: q3's .7 is kept; another share moves q4 (bucket 3498) to the preference set
    invoke("--scored", scored, "--out", tmp_path / "wide", "--mode", "fusechat3", "--target-source", "T",
           "--max-margin", "none")  # fmt: skip
    assert [p["id"] for p in datasets.load_from_disk(str(tmp_path / "wide" / "pairs"))] == ["q2", "q3", "q7"]
    invoke("--scored", scored, "--out", tmp_path / "third", "--mode", "fusechat3", "--target-source", "T",
           "--sft-share", 1 / 3)  # fmt: skip
    assert [r["id"] for r in datasets.load_from_disk(str(tmp_path / "third" / "sft"))] == ["q1", "q6"]


def test_wrpo_by_the_paper_no_margin_filter_only_identical_texts_dropped(tmp_path: Path) -> None:
    """q2: the target's .9 vs .1 is kept (no upper bound); q3: its tie (.5, .5) is kept (no lower
    bound); q4: identical texts are dropped whatever their scores; q5: no target response; q7: the
    target's NaN response is left out, leaving one."""
    scored = write_scored(tmp_path / "scored", PAPERS)
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "wrpo", "--target-source", "T")
    assert result.exit_code == 0, result.output
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert texts(pairs, "chosen", "rejected", "chosen_source") == [
        ("q2", "B", "t0", "t1", "b0"), ("q3", "A", "t0", "t1", "a0")]  # fmt: skip
    assert [p["margin"] for p in pairs] == [pytest.approx(0.8), 0.0]
    report = strict_json(tmp_path / "out" / "report.json")
    assert (report["sft_share"], report["margin"], report["max_margin"]) == (
        pytest.approx(1 / 3),
        0.0,
        "none",
    )
    assert (report["sft_prompts"], report["preference_prompts"], report["sft_examples"]) == (2, 5, 2)
    assert report["pairs_dropped"] == {"identical responses": 1, "no target response": 1, "one response": 1}
    assert report["by_source"] == {
        "A": {"pairs": 1, "dropped: identical responses": 1, "dropped: no target response": 1,
              "dropped: one response": 1},
        "B": {"sft": 2, "pairs": 1},
    }  # fmt: skip
    # WRPO's first step splits the same way: the SFT model never trains on a preference prompt
    result = invoke("--scored", scored, "--out", tmp_path / "sft", "--mode", "sft", "--target-source", "T")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in datasets.load_from_disk(str(tmp_path / "sft" / "sft"))] == ["q1", "q6"]
    assert strict_json(tmp_path / "sft" / "report.json")["preference_prompts"] == 0


def test_share_zero_writes_pairs_alone_and_all_feeds_both_sets(tmp_path: Path) -> None:
    scored = write_scored(tmp_path / "scored", PAPERS)
    result = invoke("--scored", scored, "--out", tmp_path / "zero", "--mode", "fusechat3", "--target-source", "T",
                    "--sft-share", 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "zero" / "sft").exists() and str(tmp_path / "zero" / "sft") not in result.output
    assert [p["id"] for p in datasets.load_from_disk(str(tmp_path / "zero" / "pairs"))] == ["q1", "q2", "q7"]
    invoke("--scored", scored, "--out", tmp_path / "all", "--mode", "fusechat3", "--target-source", "T",
           "--sft-share", "all")  # fmt: skip
    report = strict_json(tmp_path / "all" / "report.json")
    assert (report["sft_prompts"], report["preference_prompts"], report["sft_examples"]) == (7, 7, 7)
    assert report["sft_share"] == "all"


S = dict[str, float | None]


def gated(reward: float, correct: float | None) -> S:
    return {"reward:rm": reward, "numeric-answer": correct}


# Ranked by reward, gated by numeric-answer (1 right, 0 wrong, None: no reference). Expected by hand:
#   q1: SFT B "b0" (.8, the best correct; A "a0" .9 is wrong); pairs A a1/a2 and B b0/b1 (b2 unjudged by
#       the gate, left out; b3 is right, so never rejected, though its reward is the lowest): B's chosen is
#       higher -> B b0 vs b1, margin .7 (no window: correctness decides)
#   q2: every source response wrong (T's right one is no source): left out of SFT and pairs
#   q3: no reference: ranked alone, window applies: SFT A a0; pair A a0 vs a1 (.05)
#   q4: SFT A a0 (a2's NaN never wins); pair: no incorrect response
#   q5: SFT A a0 (.4; B's b0 .9 is wrong); pair B b1 (.3, right) vs b0 (.9, wrong): margin -.6, kept
GATED = {
    "q1": {"A": [("a0", gated(0.9, 0), "stop"), ("a1", gated(0.5, 1), "stop"), ("a2", gated(0.2, 0), "stop")],
           "B": [("b0", gated(0.8, 1), "stop"), ("b1", gated(0.1, 0), "stop"), ("b2", gated(0.99, None), "stop"),
                 ("b3", gated(0.05, 1), "stop")],
           "T": [("t0", gated(0.9, 0), "stop"), ("t1", gated(0.6, 1), "stop"), ("t2", gated(0.2, 0), "stop")]},
    "q2": {"A": [("a0", gated(0.9, 0), "stop"), ("a1", gated(0.4, 0), "stop")], "B": [("b0", gated(0.6, 0), "stop")],
           "T": [("t0", gated(0.5, 1), "stop")]},
    "q3": {"A": [("a0", gated(0.55, None), "stop"), ("a1", gated(0.5, None), "stop")],
           "B": [("b0", gated(0.3, None), "stop")]},
    "q4": {"A": [("a0", gated(0.7, 1), "stop"), ("a1", gated(0.6, 1), "stop"), ("a2", gated(NAN, 1), "stop")]},
    "q5": {"A": [("a0", gated(0.4, 1), "stop")], "B": [("b0", gated(0.9, 0), "stop"), ("b1", gated(0.3, 1), "stop")]},
}  # fmt: skip
GATE = ("--scorer", "reward:rm", "--target-source", "T", "--sft-share", "all")


def write_gated(
    out: Path, scored: dict = GATED, scorers: tuple[str, ...] = ("reward:rm", "numeric-answer")
) -> Path:
    return write_scored(out, scored, scorers, kinds={"reward:rm": "reward-model"})


def test_correctness_before_reward(tmp_path: Path) -> None:
    scored = write_gated(tmp_path / "scored")
    result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", *GATE, "--gate",
                    "numeric-answer")  # fmt: skip
    assert result.exit_code == 0, result.output
    sft = datasets.load_from_disk(str(tmp_path / "out" / "sft")).to_list()
    assert texts(sft, "completion") == [
        ("q1", "B", "b0"),
        ("q3", "A", "a0"),
        ("q4", "A", "a0"),
        ("q5", "A", "a0"),
    ]
    pairs = datasets.load_from_disk(str(tmp_path / "out" / "pairs")).to_list()
    assert texts(pairs, "chosen", "rejected") == [("q1", "B", "b0", "b1"), ("q3", "A", "a0", "a1"),
                                                  ("q5", "B", "b1", "b0")]  # fmt: skip
    assert [p["margin"] for p in pairs] == [pytest.approx(0.7), pytest.approx(0.05), pytest.approx(-0.6)]
    report = strict_json(tmp_path / "out" / "report.json")
    assert report["sft_dropped"] == {"nothing correct": 1}
    assert report["pairs_dropped"] == {"nothing correct": 1, "no incorrect response": 1}
    assert report["gate_prompts"] == {
        "with a reference": 4,
        "ranked alone (no reference)": 1,
        "nothing correct": 1,
    }
    assert report["responses_excluded"] == {"not judged by the gate": 1, "non-finite score": 1}
    assert report["by_source"] == {"A": {"sft": 3, "pairs": 1, "dropped: no incorrect response": 1},
                                   "B": {"sft": 1, "pairs": 2}}  # fmt: skip
    assert "Prompts by --gate numeric-answer" in (tmp_path / "out" / "report.md").read_text()

    # WRPO: y_ws the best correct source response, y_wt the target's best correct, y_l its worst incorrect
    result = invoke("--scored", scored, "--out", tmp_path / "wrpo", "--mode", "wrpo", *GATE, "--gate",
                    "numeric-answer")  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = datasets.load_from_disk(str(tmp_path / "wrpo" / "pairs")).to_list()
    assert texts(pairs, "chosen", "rejected", "chosen_source") == [("q1", "B", "t1", "t2", "b0")]
    assert strict_json(tmp_path / "wrpo" / "report.json")["pairs_dropped"] == {
        "nothing correct": 1, "no target response": 3}  # fmt: skip

    # without the gate the reward alone ranks: q1's SFT target is B's unjudged b2 (.99)
    invoke("--scored", scored, "--out", tmp_path / "ungated", "--mode", "fusechat3", *GATE)
    sft = datasets.load_from_disk(str(tmp_path / "ungated" / "sft")).to_list()
    assert texts(sft, "completion")[0] == ("q1", "B", "b2")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--gate", "reference-overlap"], "--gate 'reference-overlap': not a verifier of these scores (verifiers: "
                                          "numeric-answer)."),
        (["--gate", "reward:rm"], "--gate 'reward:rm': not a verifier of these scores (verifiers: numeric-answer)."),
        (["--gate", "numeric-answer", "--scorer", "numeric-answer"],
         "--gate 'numeric-answer' is also --scorer; rank with another score"),
        (["--scorer", "reward:rm", "--margin", 0.2], "--margin 0.2 is above --max-margin 0.1: no pair could be kept."),
        (["--scorer", "reward:rm", "--margin", "nan"], "--margin nan: give a non-negative number."),
        (["--scorer", "reward:rm", "--sft-share", 1],
         "no preference pair: 0 of 5 prompts in the preference set (--sft-share 1); lower --sft-share, or use "
         "--sft-share all."),
        (["--scorer", "reward:rm", "--mode", "sft", "--sft-share", 0],
         "no SFT example: 0 of 5 prompts in the SFT set (--sft-share 0); raise --sft-share, or use --sft-share all."),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_and_write_nothing(tmp_path: Path, arguments: list, message: str) -> None:
    scored = write_gated(tmp_path / "scored")
    mode = [] if "--mode" in arguments else ["--mode", "fusechat3"]
    result = invoke("--scored", scored, "--out", tmp_path / "out", *mode, *arguments)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_gate_needs_a_ranking_score_and_bad_values_are_usage_errors(tmp_path: Path) -> None:
    only = write_gated(tmp_path / "only", scorers=("numeric-answer",))
    result = invoke(
        "--scored", only, "--out", tmp_path / "out", "--mode", "fusechat3", "--gate", "numeric-answer"
    )
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert (
        "--gate 'numeric-answer' is the only score of these responses; rank them with another"
        in result.output
    )
    scored = write_gated(tmp_path / "scored")
    for flag, value, expected in (("--sft-share", "1.5", "expected a fraction from 0 to 1, or all"),
                                  ("--max-margin", "nan", "expected a non-negative number, or none")):  # fmt: skip
        result = invoke("--scored", scored, "--out", tmp_path / "out", "--mode", "fusechat3", flag, value)
        assert (
            result.exit_code == 2
            and f"'{value}': {expected}" in result.output
            and "Traceback" not in result.output
        )
    assert not (tmp_path / "out").exists()


def test_help_names_the_papers_defaults() -> None:
    text = " ".join(CliRunner().invoke(main, ["prefer", "--help"]).output.split())
    assert "--sft-share SHARE|all" in text and "--max-margin FLOAT|none" in text  # words as typed
    for said in ("fusechat3 0.4 (FuseChat-3.0's 4:6), wrpo and sft 1/3 (WRPO's)",
                 "fusechat3 0.01 (FuseChat-3.0), wrpo 0 (WRPO has no margin filter)",
                 "fusechat3 0.1 (FuseChat-3.0), wrpo none (WRPO)", "FuseChat-3.0's rule for maths and code"):  # fmt: skip
        assert said in text, said
