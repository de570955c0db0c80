"""Bits per byte against a by-hand computation, and the evaluation report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model
from numeric import approx_at_scale
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_train import evaluate as evaluate_module
from fusion_train.cli import main
from fusion_train.evaluate import (
    ExampleLoss,
    ModelSpec,
    bits_per_byte,
    bits_per_byte_difference,
    evaluate,
    response_losses,
)

RECORDS = [
    {"instruction": "Greet", "output": "Hello there, friend! 👋", "dataset": "chat"},
    {"instruction": "Count", "output": "1, 2, 3 — done.\nNext line.", "dataset": "math"},
    {"instruction": "Again", "output": "Another answer here.", "dataset": "chat"},
]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "heldout.json"
    path.write_text(json.dumps(RECORDS, ensure_ascii=False))
    return path


def by_hand_bits_per_byte(model_dir: Path) -> float:
    """Render with the chat template, find the answer's characters in the text, take the tokens
    overlapping them from the tokenizer's offsets, sum their -log p over the real vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nats, num_bytes = 0.0, 0
    for record in RECORDS:
        messages = [
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["output"]},
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        start = text.rindex(record["output"])
        end = start + len(record["output"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[None]).logits[0, :, : len(tokenizer)].float(), dim=-1)
        for position, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and a < end and b > start:
                nats -= float(logprobs[position - 1, ids[position]])
        num_bytes += len(record["output"].encode("utf-8"))
    return nats / num_bytes / math.log(2)


@pytest.mark.parametrize("name", ["smollm2", "mistral"])
def test_bits_per_byte_equals_a_by_hand_computation(name: str, tiny_models: dict, heldout: Path) -> None:
    from fusion_train.chat import load_conversations

    losses = response_losses(tiny_models[name], load_conversations(heldout), progress=False)
    result = bits_per_byte(losses)
    assert result.value == approx_at_scale(by_hand_bits_per_byte(tiny_models[name]), dtype=torch.float32)
    assert result.low <= result.value <= result.high and result.examples == 3


def test_paired_difference_in_bits_per_byte() -> None:
    rng = np.random.default_rng(3)
    num_bytes = rng.integers(20, 400, size=40)
    base = [
        ExampleLoss(str(i), "", float(rng.uniform(0.3, 3.0) * n), int(n)) for i, n in enumerate(num_bytes)
    ]
    # Better by exactly 0.1 nats on every byte: the difference is -0.1/ln 2 bits whichever examples
    # are drawn, so the paired interval has no width, while the separate intervals are wide.
    better = [ExampleLoss(x.id, "", x.nll - 0.1 * x.num_bytes, x.num_bytes) for x in base]
    diff = bits_per_byte_difference(better, base)
    assert diff.value == pytest.approx(-0.1 / math.log(2)) and diff.examples == 40
    assert diff.high - diff.low == pytest.approx(0, abs=1e-12)
    assert bits_per_byte(base).high - bits_per_byte(base).low > 0.1
    # Noisy per-example changes: the value is the difference of the two by-hand ratios, the
    # interval holds it, and it is narrower than either model's own interval.
    noisy = [ExampleLoss(x.id, "", x.nll * rng.uniform(0.9, 1.0), x.num_bytes) for x in base]
    diff = bits_per_byte_difference(noisy, base)
    by_hand = (sum(x.nll for x in noisy) - sum(x.nll for x in base)) / num_bytes.sum() / math.log(2)
    assert diff.value == pytest.approx(by_hand) and diff.low <= diff.value <= diff.high < 0
    assert diff.high - diff.low < bits_per_byte(noisy).high - bits_per_byte(noisy).low
    with pytest.raises(ValueError, match="same examples"):
        bits_per_byte_difference(noisy[1:], base[:-1])


def test_report_caches_models_and_compares_them(
    tiny_models: dict, heldout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = [
        ModelSpec("pivot", str(tiny_models["smollm2"]), "pivot"),
        ModelSpec("src", str(tiny_models["qwen"]), "source"),
    ]
    report = evaluate(specs, heldout, tmp_path, progress=False)
    assert [r["name"] for r in report["models"]] == ["pivot", "src"]
    assert report["domains"] == ["chat", "math"] and report["examples"] == 3
    for row in report["models"]:
        chat = row["by_domain"]["chat"]
        assert chat["examples"] == 2 and chat["low"] <= chat["value"] <= chat["high"]
    table = (tmp_path / "report.md").read_text()
    assert "| pivot | pivot |" in table and "bits per UTF-8 byte" in table and "paired" not in table
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"

    scored = []
    real = evaluate_module.response_losses
    monkeypatch.setattr(
        evaluate_module, "response_losses", lambda path, *a, **k: scored.append(path) or real(path, *a, **k)
    )
    extra = [*specs, ModelSpec("other", str(tiny_models["mistral"]), "source")]
    again = evaluate(extra, heldout, tmp_path, progress=False)
    assert scored == [str(tiny_models["mistral"])]  # only the new model is scored
    assert again["models"][0]["bits_per_byte"] == report["models"][0]["bits_per_byte"]

    # Paired differences to one model: zero for itself, the difference of the two values otherwise.
    paired = evaluate(extra, heldout, tmp_path, compare_to="pivot", progress=False)
    rows = {r["name"]: r for r in paired["models"]}
    assert rows["pivot"]["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0, "examples": 3}
    assert rows["src"]["difference"]["value"] == pytest.approx(
        rows["src"]["bits_per_byte"]["value"] - rows["pivot"]["bits_per_byte"]["value"]
    )
    assert "minus pivot (paired 95% CI)" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="not one of the models"):
        evaluate(extra, heldout, tmp_path, compare_to="nobody", progress=False)


def test_a_model_replaced_at_the_same_path_is_scored_again(
    tokenizer_dirs: dict, heldout: Path, tmp_path: Path
) -> None:
    """Cached losses are keyed by the model's files, not its path: a model retrained into the same
    directory (same file names and sizes) gets its own score, not the old model's."""
    from conftest import build_tiny_model

    from fusion_train.chat import builtin_template, load_conversations

    model = build_tiny_model(tokenizer_dirs["smollm2"], tmp_path / "model", seed=0)
    spec = ModelSpec("m", str(model))

    def score(spec: ModelSpec) -> float:
        return evaluate([spec], heldout, tmp_path / "eval", progress=False)["models"][0]["bits_per_byte"][
            "value"
        ]

    first = score(spec)
    assert first == approx_at_scale(by_hand_bits_per_byte(model), dtype=torch.float32)
    build_tiny_model(tokenizer_dirs["smollm2"], model, seed=1)  # overwrites the same files
    second = score(spec)
    assert second == approx_at_scale(by_hand_bits_per_byte(model), dtype=torch.float32)
    assert second != pytest.approx(first, rel=1e-3)

    # A chat template given as a file: its text counts, so an edited template is scored again.
    template = tmp_path / "template.jinja"
    conversations = load_conversations(heldout)
    for text in (
        builtin_template("plain"),
        builtin_template("plain").replace("| capitalize }}:", "| upper }} says:"),
    ):
        template.write_text(text)
        direct = bits_per_byte(
            response_losses(model, conversations, chat_template=str(template), progress=False)
        )
        assert score(ModelSpec("m", str(model), chat_template=str(template))) == pytest.approx(direct.value)
    assert len(list((tmp_path / "eval" / "losses").iterdir())) == 4


def test_cached_losses_are_kept_per_max_length(
    heldout: Path, tokenizer_dirs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-length changes which tokens are scored, so losses cached at one length are never a
    model's losses at another. Scoring is replaced by losses of 1 bit per byte at the default
    length and 2 bits per byte at --max-length 64: the report shows which length was scored."""
    model = build_tiny_model(
        tokenizer_dirs["smollm2"], tmp_path / "model", hidden=16, layers=1
    )  # checked, not loaded
    scored = []

    def response_losses(path, conversations, *, max_length, **_):
        scored.append(max_length)
        bits = 1.0 if max_length == 2048 else 2.0
        return [
            ExampleLoss(c.id, c.domain, bits * math.log(2) * (10 + i), 10 + i)
            for i, c in enumerate(conversations)
        ]

    monkeypatch.setattr(evaluate_module, "response_losses", response_losses)
    out = tmp_path / "eval"

    def bits_per_byte_at(*max_length: str) -> float:
        args = ["evaluate", "--data", str(heldout), "--model", f"m={model}", "--out", str(out), *max_length]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return json.loads((out / "report.json").read_text())["models"][0]["bits_per_byte"]["value"]

    assert bits_per_byte_at() == pytest.approx(1.0, rel=1e-12) and scored == [2048]
    assert bits_per_byte_at("--max-length", "64") == pytest.approx(2.0, rel=1e-12) and scored == [2048, 64]
    # Both are cached now: neither length is scored again, and each keeps its own losses.
    assert bits_per_byte_at("--max-length", "2048") == pytest.approx(1.0, rel=1e-12)
    assert bits_per_byte_at("--max-length", "64") == pytest.approx(2.0, rel=1e-12)
    assert scored == [2048, 64] and len(list((out / "losses").iterdir())) == 2


def test_evaluate_command(tiny_models: dict, heldout: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--data",
            str(heldout),
            "--model",
            f"p={tiny_models['smollm2']}:pivot",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| p | pivot |" in result.output
    result = CliRunner().invoke(
        main, ["evaluate", "--data", str(heldout), "--model", "nodir", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "NAME=DIR" in result.output


def test_difference_panel_zooms_on_small_differences_and_labels_large_ones():
    """A source far ahead of the reference must not flatten the targets' small differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row(name: str, value: float, half_width: float) -> dict:
        return {
            "name": name,
            "difference": {"value": value, "low": value - half_width, "high": value + half_width},
        }

    rows = [row("source", -0.28, 0.03), row("target-a", -0.003, 0.0005), row("target-b", -0.002, 0.001),
            row("baseline", 0.0, 0.0), row("pivot", 0.2, 0.02)]  # fmt: skip
    fig, ax = plt.subplots()
    evaluate_module._plot_differences(ax, rows, "baseline", ["C0"] * len(rows))
    low, high = ax.get_xlim()
    assert -0.01 < low < -0.003 and 0.003 < high < 0.01  # the targets' scale, not the source's
    labels = sorted(text.get_text() for text in ax.texts)
    assert labels == [" reference", "+0.200 →", "← -0.280"]
    assert len(ax.lines) >= 2  # the two targets drawn as points
    plt.close(fig)
