"""`sample`: the prompt rule, the sampler against by-hand inverse-CDF draws and against the
probabilities of a model whose next-token distribution is known, reproducibility across batch
sizes, shards and a SIGKILL, a real chat model's turn ending, the vLLM engine (its adapter on
the CPU, the engine itself on a GPU), and bad input through the CLI."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import math
import sys
import types
import weakref
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model
from implicit_fixtures import build_scripted, build_stopper, write_jsonl
from test_resume import SAVE, assert_same_output, run_killed
from transformers import AutoTokenizer

from fusion_train import inference
from fusion_train import registry_assets as assets
from fusion_train.chat import Conversation, TurnOpening, resolve_chat_template, user_turn_opening
from fusion_train.cli import main
from fusion_train.implicit import sample as sample_module
from fusion_train.implicit.sample import (
    ChatGenerator,
    NextTurnStop,
    RowSampler,
    SampleError,
    SampleSettings,
    load_generator,
    load_samples,
    nucleus_draw,
    plan_sampling,
    prompt_of,
    sample,
)
from fusion_train.inference import InferenceSettings

STOP = 0.3  # the stopper model's end-of-turn probability at temperature 1


def records(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i}.", "output": f"The sum is {2 * i}."} for i in range(n)]


@pytest.fixture(scope="module")
def ws(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    build_tiny_model(tokenizer_dirs["smollm2"], root / "model", hidden=16, layers=1)
    build_stopper(tokenizer_dirs["smollm2"], root / "stopper", STOP)
    write_jsonl(root / "prompts.jsonl", records(7))
    write_jsonl(root / "many.jsonl", records(80))
    return root


def rows(out: Path) -> list[dict]:
    return load_samples(out)[1].to_list()


# --------------------------------------------------------------------------- the prompt rule


def test_prompt_is_everything_before_the_last_assistant_turn() -> None:
    system = {"role": "system", "content": "Be brief."}
    user1, bot1 = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    user2, bot2 = {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}

    p = prompt_of(Conversation("a", (system, user1, bot1, user2, bot2)), "x")
    assert p.messages == (system, user1, bot1, user2) and p.reference == "Bye."
    p = prompt_of(Conversation("b", (system, user1, bot1, user2)), "x")  # ends with the user: all of it
    assert p.messages == (system, user1, bot1, user2) and p.reference is None
    with pytest.raises(SampleError, match=r"data.jsonl, record 3 \(id 'c'\): no user turn"):
        prompt_of(Conversation("c", (system, bot1)), "data.jsonl, record 3")


def test_a_record_without_a_user_turn_is_one_line_naming_file_and_record(ws: Path, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "bad.jsonl", [*records(2), {"messages": [{"role": "assistant", "content": "Hi."}]}]
    )
    result = CliRunner().invoke(main, ["sample", "--model", str(ws / "model"), "--data", str(data),
                                       "--out", str(tmp_path / "out"), "--max-new-tokens", "2"])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {data}, record 2 (id '{_id(data, 2)}'): no user turn to "
        "answer; a prompt needs a user message before the last assistant turn, or a conversation ending with one."]  # fmt: skip
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def _id(data: Path, index: int) -> str:
    from fusion_train.chat import load_conversations

    return load_conversations(data)[index].id


# --------------------------------------------------------------------------- the sampler


def test_nucleus_draw_is_the_inverse_cdf_of_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))  # CDF in token-id order: 0.2, 0.7, 1.0

    def draw(u: float, temperature: float = 1.0, top_p: float = 1.0) -> int:
        return int(nucleus_draw(logits, torch.tensor([u]), temperature, top_p))

    assert [draw(u) for u in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999)] == [0, 0, 1, 1, 2, 2]
    # top-p 0.7: tokens 1 (mass before it 0) and 2 (0.5 < 0.7) stay, token 0 (0.8) goes; CDF 0.5/0.8, 1
    assert [draw(u, top_p=0.7) for u in (0.0, 0.62, 0.63, 0.999)] == [1, 1, 2, 2]
    assert [draw(u, top_p=0.5) for u in (0.0, 0.999)] == [1, 1]  # the most likely token always stays
    # temperature 2: probabilities proportional to sqrt(p)
    roots = [math.sqrt(0.2), math.sqrt(0.5), math.sqrt(0.3)]
    first = roots[0] / sum(roots)
    assert draw(first - 1e-6, temperature=2.0) == 0 and draw(first + 1e-6, temperature=2.0) == 1
    rows = nucleus_draw(
        logits.repeat(3, 1), torch.tensor([0.1, 0.5, 0.9]), 1.0, 1.0
    )  # each row its own number
    assert rows.tolist() == [0, 1, 2]


def sorted_nucleus(row: torch.Tensor, temperature: float, top_p: float) -> tuple[list[float], list[int]]:
    """A row's probabilities and its nucleus in id order, the slow way: sort every probability and
    keep the tokens whose preceding mass is below top_p."""
    probs = torch.softmax(row.double() / temperature, dim=-1).tolist()
    kept, before = [], 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if before >= top_p:
            break
        kept.append(i)
        before += probs[i]
    return probs, sorted(kept)


def sorted_nucleus_draw(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> list:
    """Per row, the first nucleus token (in id order) whose cumulative mass exceeds u x the nucleus's."""
    drawn = []
    for row, u in zip(logits, uniforms.tolist(), strict=True):
        probs, nucleus = sorted_nucleus(row, temperature, top_p)
        total, cumulative = sum(probs[i] for i in nucleus), 0.0
        drawn.append(nucleus[-1])
        for i in nucleus:
            cumulative += probs[i]
            if cumulative > u * total:
                drawn[-1] = i
                break
    return drawn


def test_nucleus_draw_looks_far_enough_down_the_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the nucleus is looked for among the top 64, then the top 1,024, then everything:
    rows whose nucleus holds one token, dozens, hundreds, thousands or tens of thousands of the
    49,152 all draw what the sorted rule draws, and what the whole-vocabulary path (a GPU's) draws."""
    generator = torch.Generator().manual_seed(0)
    vocab, n = 49152, 40
    logits = torch.randn(n, vocab, generator=generator)
    for row in range(n):  # a head of `size` tokens far above the rest: nuclei of every size
        size = [1, 20, 60, 100, 900, 1500, 5000, 0][row % 8]
        logits[row, torch.randperm(vocab, generator=generator)[:size]] += 12.0 + row % 3
    uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    sizes = [len(sorted_nucleus(row, 0.8, 0.95)[1]) for row in logits]
    for low, high in [(1, 1), (2, 64), (65, 1024), (1025, 20000), (20001, vocab)]:
        assert any(low <= s <= high for s in sizes), (low, high, sizes)
    for temperature, top_p in [(0.8, 0.95), (1.0, 0.5), (1.5, 0.99)]:
        expected = sorted_nucleus_draw(logits, uniforms, temperature, top_p)
        assert nucleus_draw(logits, uniforms, temperature, top_p).tolist() == expected
        with monkeypatch.context() as patch:
            patch.setattr(sample_module, "CANDIDATES", ())
            assert nucleus_draw(logits, uniforms, temperature, top_p).tolist() == expected


def nucleus_stop_probability(temperature: float, top_p: float, vocab: int) -> float:
    """The stopper's end-of-turn probability after temperature and top-p, worked out on paper: the
    end-of-turn token leads with p; each of the V - 1 others has q; the nucleus keeps the others
    whose preceding mass p + i q is below top_p."""
    logit = math.log(STOP * (vocab - 1) / (1 - STOP)) / temperature
    p = 1 / (1 + (vocab - 1) * math.exp(-logit))
    q = (1 - p) / (vocab - 1)
    kept_others = min(vocab - 1, max(0, math.ceil((top_p - p) / q)))
    return p / (p + kept_others * q)


@pytest.mark.parametrize(("temperature", "top_p", "steps"), [(1.0, 1.0, 3), (0.8, 0.95, 1), (1.0, 0.2, 2)])
def test_stop_frequency_matches_the_models_probabilities(ws: Path, tmp_path: Path, temperature: float,
                                                         top_p: float, steps: int) -> None:  # fmt: skip
    """400 answers from a model that ends its turn with a known probability at every step: the
    share that stop within ``steps`` tokens is 1 - (1 - p)^steps, p after temperature and top-p."""
    settings = SampleSettings(
        num_samples=5, temperature=temperature, top_p=top_p, max_new_tokens=steps, seed=3
    )
    sample(ws / "stopper", ws / "many.jsonl", tmp_path / "out", settings, batch_size=100, progress=False)
    got = rows(tmp_path / "out")
    assert len(got) == 400
    p = nucleus_stop_probability(temperature, top_p, len(AutoTokenizer.from_pretrained(ws / "stopper")))
    expected = 1 - (1 - p) ** steps
    stopped = [r for r in got if r["finish_reason"] == "stop"]
    tolerance = 4 * math.sqrt(expected * (1 - expected) / len(got)) + 1e-9
    assert abs(len(stopped) / len(got) - expected) <= tolerance
    assert all(r["num_tokens"] < steps for r in stopped)
    assert all(r["num_tokens"] == steps for r in got if r["finish_reason"] == "length")
    if top_p == 0.2:  # only the end-of-turn token is in the nucleus: every answer is empty
        assert all(r["response"] == "" and r["num_tokens"] == 0 for r in got)


# --------------------------------------------------------------------------- reproducibility


def test_responses_do_not_depend_on_batch_size_or_shards(ws: Path, tmp_path: Path) -> None:
    settings = SampleSettings(num_samples=3, max_new_tokens=6, seed=11, chunk_size=2)
    whole = tmp_path / "whole"
    summary = sample(ws / "model", ws / "prompts.jsonl", whole, settings, batch_size=1, progress=False)
    assert summary is not None and summary.records == 7 and summary.responses == 21
    expected = rows(whole)
    assert [(r["sample_index"]) for r in expected[:4]] == [0, 1, 2, 0]
    assert len({r["response"] for r in expected}) == 21  # different draws for every (record, sample)

    sharded = tmp_path / "sharded"
    assert sample(ws / "model", ws / "prompts.jsonl", sharded, settings, batch_size=5, shard=(1, 2),
                  progress=False) is None  # fmt: skip
    assert sorted(p.name for p in (sharded / "parts").iterdir()) == ["part-00001", "part-00003"]
    sample(ws / "model", ws / "prompts.jsonl", sharded, settings, batch_size=4, shard=(0, 2), progress=False)
    assert rows(sharded) == expected

    other_seed = SampleSettings(num_samples=3, max_new_tokens=6, seed=12, chunk_size=2)
    sample(ws / "model", ws / "prompts.jsonl", tmp_path / "seed12", other_seed, batch_size=4, progress=False)
    assert all(
        a["response"] != b["response"] for a, b in zip(rows(tmp_path / "seed12"), expected, strict=True)
    )


def test_killed_after_a_part_resumes_to_the_same_output(ws: Path, tmp_path: Path) -> None:
    arguments = ["--model", ws / "model", "--data", ws / "prompts.jsonl", "--num-samples", 2, "--max-new-tokens", 5,
                 "--seed", 5, "--chunk-size", 3, "--batch-size", 4]  # fmt: skip
    out = tmp_path / "killed"
    run_killed(
        "after", SAVE, 2, ["sample", "--out", out, *arguments]
    )  # part 0 renamed; part 1 saved, not renamed
    assert sorted(p.name for p in (out / "parts").iterdir() if not p.name.startswith(".")) == ["part-00000"]
    assert not (out / "summary.json").exists()
    result = CliRunner().invoke(main, ["sample", "--out", str(out), *map(str, arguments)])
    assert result.exit_code == 0, result.output
    assert "14 responses to 7 prompts" in result.output

    fresh = tmp_path / "fresh"
    assert CliRunner().invoke(main, ["sample", "--out", str(fresh), *map(str, arguments)]).exit_code == 0
    assert_same_output(out, fresh)


def test_stop_texts_end_responses_where_they_begin(ws: Path, tmp_path: Path) -> None:
    """Each response's draws do not depend on its batch-mates or on when they stop, so with a stop
    text a response is the one sampled without it, cut where the stop text first begins."""
    settings = SampleSettings(num_samples=2, max_new_tokens=8, seed=4)
    sample(ws / "model", ws / "prompts.jsonl", tmp_path / "free", settings, batch_size=4, progress=False)
    free = rows(tmp_path / "free")
    stop = free[3]["response"][6:10]
    stopped_settings = SampleSettings(num_samples=2, max_new_tokens=8, seed=4, stop=(stop,))
    sample(
        ws / "model", ws / "prompts.jsonl", tmp_path / "stop", stopped_settings, batch_size=4, progress=False
    )
    for before, after in zip(free, rows(tmp_path / "stop"), strict=True):
        if stop in before["response"]:
            assert after["response"] == before["response"][: before["response"].index(stop)]
            assert after["finish_reason"] == "stop" and after["num_tokens"] <= before["num_tokens"]
        else:
            assert after == before
    assert load_samples(tmp_path / "stop")[0]["settings"]["stop"] == [stop]


def test_a_response_cut_at_a_stop_text_counts_the_stop_texts_tokens(tokenizer_dirs: dict) -> None:
    """num_tokens counts what was generated up to the end of the stop text (its tokens included,
    the end-of-turn token not): the transformers engine halts on the token that completes a stop
    text, so that token is usually the last one, followed only by padding in a batch."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])
    end_of_turn = [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def ending(stop: str, *tokens: str) -> tuple[str, int, str, bool]:
        generator = ChatGenerator(tokenizer, "", SampleSettings(stop=(stop,)), end_of_turn)
        return generator.ending(tokenizer.convert_tokens_to_ids(list(tokens)))

    # "Hello" " world" "\n\n" "User" ":": the fifth token completes "\n\nUser:".
    user = "\n\nUser:"
    assert ending(user, "Hello", "Ġworld", "ĊĊ", "User", ":") == ("Hello world", 5, "stop", False)
    assert ending(user, "Hello", "Ġworld", "ĊĊ", "User", ":", "<|im_end|>", "<|im_end|>") == (
        "Hello world",
        5,
        "stop",
        False,
    )
    assert ending(user, "Hello", "Ġworld", "ĊĊ", "User", ":", "Ġhi") == ("Hello world", 5, "stop", False)
    assert ending(user, "ĊĊ", "User", ":") == ("", 3, "stop", False)
    # "wor" ends inside " world": the second token completes it; the text stops before it.
    assert ending("wor", "Hello", "Ġworld", "!") == ("Hello ", 2, "stop", False)
    assert ending("wor", "Hello", "Ġworld") == ("Hello ", 2, "stop", False)
    # No stop text: up to the end-of-turn token (not counted), or every token at the length limit.
    assert ending(user, "Hello", "!", "<|im_end|>", "Ġhi") == ("Hello!", 2, "stop", False)
    assert ending(user, "Hello", "!") == ("Hello!", 2, "length", False)


# --------------------------------------------------------------------------- the user's next turn

TURN_TEMPLATES = {
    "hashes": "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}",
    "bare": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",  # nothing opens a turn
}


@pytest.fixture(scope="module")
def gemma3() -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(assets.gemma3_270m_dir())


@pytest.mark.parametrize(
    ("tokenizer_name", "template", "expected"),
    [
        # The plain template renders "...Assistant: Two.<eos>\nUser: And two plus two?": after the
        # answer, "<eos>\n" closes the turn (it also ends a conversation) and "User: " opens the next.
        ("gemma3", "plain", TurnOpening("User:", after_line_break=True)),
        ("smollm2", "plain", TurnOpening("User:", after_line_break=True)),
        # SmolLM2's own: "Two.<|im_end|>\n<|im_start|>user\nAnd two..."; the closing "<|im_end|>\n" is shared.
        ("smollm2", None, TurnOpening("<|im_start|>user", after_line_break=True)),
        ("qwen", "chatml", TurnOpening("<|im_start|>user", after_line_break=True)),
        # Llama-2: "[INST] ... [/INST] Two.</s>[INST] And two...": no line break before "[INST]".
        ("mistral", None, TurnOpening("[INST]", after_line_break=False)),
        ("smollm2", "hashes", TurnOpening("### User:", after_line_break=True)),
        ("smollm2", "bare", None),
    ],
)
def test_the_next_turns_opening_is_read_from_the_template(
    tokenizer_dirs: dict, gemma3: AutoTokenizer, tmp_path: Path, tokenizer_name: str, template: str | None,
    expected: TurnOpening | None,
) -> None:  # fmt: skip
    tokenizer = (
        gemma3
        if tokenizer_name == "gemma3"
        else AutoTokenizer.from_pretrained(tokenizer_dirs[tokenizer_name])
    )
    if template in TURN_TEMPLATES:
        (tmp_path / "t.jinja").write_text(TURN_TEMPLATES[template])
        template = str(tmp_path / "t.jinja")
    text, _ = resolve_chat_template(tokenizer, template)
    assert user_turn_opening(tokenizer, text) == expected
    stop = NextTurnStop.of(tokenizer, text)
    if expected is None:
        assert stop is None
    elif expected.text.startswith("<|im_start|>"):  # a token the text never shows: a stop token
        assert stop.token_id == tokenizer.convert_tokens_to_ids("<|im_start|>") and stop.pattern is None
    else:
        assert (
            stop.token_id is None
            and stop.engine_stop == ("\n" if expected.after_line_break else "") + expected.text
        )


def ending_of(
    tokenizer: object, template: str | None, tokens: list[str], stop: tuple[str, ...] = ()
) -> tuple:
    """``ChatGenerator.ending`` of the given tokens under ``template`` (None: the tokenizer's own)."""
    text, _ = resolve_chat_template(tokenizer, template)
    generator = ChatGenerator(tokenizer, text, SampleSettings(stop=stop), [tokenizer.eos_token_id],
                              next_turn=NextTurnStop.of(tokenizer, text))  # fmt: skip
    return generator.ending(tokenizer.convert_tokens_to_ids(tokens))


def test_a_response_ends_where_the_model_opens_the_users_next_turn(
    gemma3: AutoTokenizer, tokenizer_dirs: dict
) -> None:
    """Gemma-3 in the plain template: "User:" at the start of the response or of a line, whatever
    the whitespace before it, ends the response; the whitespace goes, the opening's tokens count
    (as a stop text's do). Elsewhere in a line it is text. Llama-2's "[INST]" ends it anywhere,
    ChatML's <|im_start|> token as an end-of-turn token does (not counted)."""
    cases = [
        (["Sure", ".", "\n", "User", ":", "▁hi"], ("Sure.", 5, "stop", True)),
        (["Sure", ".", "\n\n", "User", ":", "▁hi"], ("Sure.", 5, "stop", True)),
        (["Sure", ".", "\n", "▁▁", "User", ":"], ("Sure.", 6, "stop", True)),  # "\n  User:"
        (["Sure", ".", "▁", "\n", "User", ":"], ("Sure. ", 6, "stop", True)),  # its own line's end stays
        (["User", ":", "▁hi"], ("", 2, "stop", True)),  # the response opens with it
        (["▁▁", "User", ":"], ("", 3, "stop", True)),
        (["The", "▁User", ":", "▁field"], ("The User: field", 4, "length", False)),  # inside a line
        (["Sure", ".", "\n", "Users", ":"], ("Sure.\nUsers:", 5, "length", False)),  # another word
        (["Sure", ".", "\n", "User"], ("Sure.\nUser", 4, "length", False)),  # not complete yet
        (["Sure", ".", "<eos>", "\n", "User", ":"], ("Sure.", 2, "stop", False)),  # the turn ended first
    ]
    for tokens, expected in cases:
        assert ending_of(gemma3, "plain", tokens) == expected, tokens
    # a --stop text that begins before the opening wins, and is not a next turn
    stopped = ending_of(gemma3, "plain", ["Sure", ".", "\n", "User", ":"], stop=(".",))
    assert stopped == ("Sure", 2, "stop", False)

    mistral = AutoTokenizer.from_pretrained(tokenizer_dirs["mistral"])  # Llama-2: "[INST]" anywhere
    smollm2 = AutoTokenizer.from_pretrained(tokenizer_dirs["smollm2"])  # ChatML: the <|im_start|> token
    cases = [
        (mistral, ["▁D", "one", ".", "▁[", "INST", "]", "▁hi"], ("Done.", 6, "stop", True)),
        (mistral, ["▁D", "one", ".", "▁[", "INST"], ("Done. [INST", 5, "length", False)),
        (smollm2, ["Hi", "<|im_start|>", "user", "Ċ"], ("Hi", 1, "stop", True)),
        (smollm2, ["Hi", "<|im_end|>", "<|im_start|>", "user"], ("Hi", 1, "stop", False)),
        (smollm2, ["Hi", "Ġuser", ":"], ("Hi user:", 3, "length", False)),
    ]
    for tokenizer, tokens, expected in cases:
        assert ending_of(tokenizer, None, tokens) == expected, tokens


@pytest.fixture(scope="module")
def scripted(gemma3: AutoTokenizer, tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models that always answer the same: Gemma-3 in the plain template (its prompt ends with the
    token "▁" of "Assistant: ") says "Sure.\nUser: hi\nUser: hi..." (``plain``) or "Sure.\n  User:
    hi\n  User: hi..." (``spaced``); SmolLM2 in its ChatML (prompt ending "assistant\n") says "Hi"
    and opens a turn with <|im_start|> (``chatml``)."""
    root = tmp_path_factory.mktemp("scripted")
    gemma3_dir = assets.gemma3_270m_dir()
    build_scripted(gemma3_dir, root / "plain", {"▁": "Sure", "Sure": ".", ".": "\n", "\n": "User", "User": ":",
                                                ":": "▁hi", "▁hi": "\n"})  # fmt: skip
    build_scripted(gemma3_dir, root / "spaced", {"▁": "Sure", "Sure": ".", ".": "\n", "\n": "▁▁", "▁▁": "User",
                                                 "User": ":", ":": "▁hi", "▁hi": "\n"})  # fmt: skip
    build_scripted(tokenizer_dirs["smollm2"], root / "chatml", {"Ċ": "Hi", "Hi": "<|im_start|>"})
    write_jsonl(root / "prompts.jsonl", records(3))
    return root


@pytest.mark.parametrize(
    ("model", "template", "expected"),
    [("plain", "plain", ("Sure.", 5)), ("spaced", "plain", ("Sure.", 6)), ("chatml", None, ("Hi", 1))],
)
def test_invented_turns_are_cut_and_counted(scripted: Path, tmp_path: Path, model: str, template: str | None,
                                            expected: tuple[str, int]) -> None:  # fmt: skip
    """Every answer of a scripted model goes on to open the user's next turn: each is cut there,
    ends with "stop", and the summary and the command count them. "\n  User:" is not the engine's
    literal stop text "\nUser:": that model runs to the length limit and is cut afterwards."""
    arguments = ["sample", "--model", str(scripted / model), "--data", str(scripted / "prompts.jsonl"), "--out",
                 str(tmp_path / "out"), "--num-samples", "2", "--max-new-tokens", "12"]  # fmt: skip
    result = CliRunner().invoke(main, [*arguments, *(["--chat-template", template] if template else [])])
    assert result.exit_code == 0, result.output
    assert "6 responses to 3 prompts" in result.output
    assert "6 cut where the model began the user's next turn itself." in result.output
    got = rows(tmp_path / "out")
    assert [(r["response"], r["num_tokens"], r["finish_reason"]) for r in got] == [(*expected, "stop")] * 6
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["next_turn_stops"] == 6 and summary["finish_reasons"] == {"stop": 6}
    opening = load_samples(tmp_path / "out")[0]["chat_template"]["next_turn"]
    assert opening == ({"text": "<|im_start|>user", "after_line_break": True, "token": True} if model == "chatml"
                       else {"text": "User:", "after_line_break": True, "token": False})  # fmt: skip


def test_generation_stops_at_the_opening(scripted: Path) -> None:
    """The transformers engine stops generating once "\nUser:" is complete (transformers' stop
    strings): five forward passes for "Sure" "." "\n" "User" ":", not the 40 allowed."""
    settings = SampleSettings(max_new_tokens=40, chat_template="plain")
    plan = plan_sampling(scripted / "plain", scripted / "prompts.jsonl", settings)
    generator = load_generator(scripted / "plain", plan)
    forward = generator.model.forward
    calls = []
    generator.model.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    texts = [generator.render(p) for p in plan.prompts]
    assert generator.answer(texts, [1, 2, 3]) == [("Sure.", 5, "stop", True)] * 3
    assert len(calls) == 5


def test_shards_split_the_parts(ws: Path, tmp_path: Path) -> None:
    """--shard i/n chooses the parts a process writes; the last shard to finish writes the summary.
    (Launched ranks: tests/implicit/test_implicit_ranks.py.)"""
    arguments = ["sample", "--model", str(ws / "model"), "--data", str(ws / "prompts.jsonl"), "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "2", "--num-samples", "1", "--chunk-size", "2"]  # fmt: skip
    result = CliRunner().invoke(main, [*arguments, "--shard", "1/2"])
    assert (
        result.exit_code == 0 and "this shard is done; other shards' parts are still missing" in result.output
    )
    assert sorted(p.name for p in (tmp_path / "out" / "parts").iterdir()) == ["part-00001", "part-00003"]
    assert not (tmp_path / "out" / "summary.json").exists()
    result = CliRunner().invoke(main, [*arguments, "--shard", "0/2"])
    assert result.exit_code == 0 and "7 responses to 7 prompts" in result.output


def test_a_rerun_with_other_settings_is_refused(ws: Path, tmp_path: Path) -> None:
    arguments = ["sample", "--model", str(ws / "model"), "--data", str(ws / "prompts.jsonl"), "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "2", "--num-samples", "1"]  # fmt: skip
    assert CliRunner().invoke(main, arguments).exit_code == 0
    result = CliRunner().invoke(main, [*arguments, "--temperature", "0.5"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"Error: {tmp_path / 'out'} already holds results of a different run (parts/, summary.json): differs in: "
        "settings.temperature: 0.8 -> 0.5. Use another --out directory, or delete this one to start over."
    )


def test_dtype_auto_resolves_as_represents(ws: Path, tmp_path: Path) -> None:
    """``--dtype`` defaults to auto, read as represent reads it (bfloat16 on GPUs that support it,
    float32 elsewhere), not as the checkpoint's dtype: a model saved in bfloat16 samples in float32
    on a CPU, and the manifest records what auto became."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    AutoTokenizer.from_pretrained(ws / "model").save_pretrained(tmp_path / "bf16")
    expected = InferenceSettings(dtype="auto").resolved_dtype()
    assert expected == (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )
    plan = plan_sampling(tmp_path / "bf16", ws / "prompts.jsonl", SampleSettings(max_new_tokens=1))
    assert plan.settings.dtype == "auto" and plan.manifest["dtype"] == str(expected).removeprefix("torch.")
    assert load_generator(tmp_path / "bf16", plan).model.dtype == expected
    arguments = ["sample", "--model", str(ws / "model"), "--data", str(ws / "prompts.jsonl"), "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "1", "--num-samples", "1"]  # fmt: skip
    assert CliRunner().invoke(main, arguments).exit_code == 0
    assert load_samples(tmp_path / "out")[0]["settings"]["dtype"] == "auto"
    from fusion_train.implicit.sections import SampleStage

    assert SampleStage().dtype == "auto"


# --------------------------------------------------------------------------- a real chat model


@pytest.mark.slow
def test_a_real_chat_model_ends_its_turn(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct in its own ChatML template: short answers end with <|im_end|>, which is
    not part of the text, and the manifest names the model by its files."""
    model = assets.smollm2_instruct_dir()
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Say hello in one word."}]}]
    )
    settings = SampleSettings(num_samples=3, max_new_tokens=24, temperature=0.7, seed=0)
    sample(model, data, tmp_path / "out", settings, source_name="smol", progress=False)
    manifest, data_set = load_samples(tmp_path / "out")
    assert manifest["source"] == "smol" and manifest["settings"]["temperature"] == 0.7
    assert manifest["chat_template"]["source"] == "tokenizer"
    got = data_set.to_list()
    assert [r["finish_reason"] for r in got].count("stop") >= 1
    for r in got:
        assert (
            r["prompt"] == [{"role": "user", "content": "Say hello in one word."}] and r["reference"] is None
        )
        assert "<|im_end|>" not in r["response"] and r["response"].strip()
        assert r["num_tokens"] < 24 if r["finish_reason"] == "stop" else r["num_tokens"] == 24


# --------------------------------------------------------------------------- the vLLM engine


class TransformersAsVllm:
    """``vllm.LLM`` as ``--engine vllm`` drives it (token prompts, one SamplingParams per request,
    its ``token_ids`` holding the end-of-turn token it stopped at, its finish reason), answered by
    transformers one request at a time with the HF engine's sampler seeded by the request's seed.
    The vLLM adapter must then write what the HF engine writes: this checks the adapter (prompt
    tokens, which seed goes with which response, where an answer ends) where no GPU is; vLLM
    itself is compared with the HF engine by the GPU test below."""

    created: ClassVar[list[dict]] = []  # engine arguments, per LLM made
    calls: ClassVar[list[int]] = []  # requests, per generate call
    params: ClassVar[list] = []  # every request's SamplingParams

    def __init__(self, model: str, **engine_args: object) -> None:
        from transformers import AutoModelForCausalLM

        TransformersAsVllm.created.append({"model": model, **engine_args})
        self.model = AutoModelForCausalLM.from_pretrained(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def generate(self, prompts: list[dict], params: list, use_tqdm: bool) -> list:
        from transformers import GenerationConfig, LogitsProcessorList

        TransformersAsVllm.calls.append(len(prompts))
        TransformersAsVllm.params.extend(params)
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            config = GenerationConfig(do_sample=False, max_new_tokens=p.max_tokens, eos_token_id=p.stop_token_ids,
                                      pad_token_id=self.tokenizer.eos_token_id, stop_strings=p.stop)  # fmt: skip
            sampler = RowSampler([p.seed], p.temperature, p.top_p, p.max_tokens)
            new = self.model.generate(ids, generation_config=config, tokenizer=self.tokenizer,
                                      logits_processor=LogitsProcessorList([sampler]))[0, ids.shape[1] :].tolist()  # fmt: skip
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            stopped = (bool(new) and new[-1] in p.stop_token_ids) or any(
                stop in text for stop in p.stop or ()
            )
            completion = types.SimpleNamespace(token_ids=new, finish_reason="stop" if stopped else "length")
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    """The fields of ``vllm.SamplingParams`` (vLLM >= 0.10) that the adapter may set; a misspelled
    or unknown one is a TypeError, as in vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


@pytest.fixture
def transformers_as_vllm(monkeypatch: pytest.MonkeyPatch) -> type[TransformersAsVllm]:
    """The ``vllm`` module, with :class:`TransformersAsVllm` as its engine, and its GPU check passed."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM = TransformersAsVllm
    vllm.SamplingParams = SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(InferenceSettings, "_check_vllm", lambda self: None)
    monkeypatch.setattr(inference, "_CHECKED", weakref.WeakSet())  # what passed here is forgotten after
    monkeypatch.setattr(TransformersAsVllm, "created", [])
    monkeypatch.setattr(TransformersAsVllm, "calls", [])
    monkeypatch.setattr(TransformersAsVllm, "params", [])
    return TransformersAsVllm


def test_the_vllm_adapter_writes_what_the_hf_engine_writes(
    ws: Path, tmp_path: Path, transformers_as_vllm: type[TransformersAsVllm]
) -> None:
    """The stopper model ends about a third of its answers with its end-of-turn token; then a stop
    text taken from one answer ends others early."""
    for name, stop in [("free", ()), ("stop", None)]:
        if stop is None:
            stop = (next(r["response"] for r in rows(tmp_path / "hf-free") if len(r["response"]) > 6)[2:5],)
        runs = {}
        for engine in ("hf", "vllm"):
            settings = SampleSettings(
                num_samples=3,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=4,
                seed=2,
                chunk_size=4,
                stop=stop,
                engine=engine,
            )
            sample(ws / "stopper", ws / "prompts.jsonl", tmp_path / f"{engine}-{name}", settings, batch_size=5,
                   tensor_parallel_size=2 if engine == "vllm" else 1, progress=False)  # fmt: skip
            runs[engine] = rows(tmp_path / f"{engine}-{name}")
        assert runs["vllm"] == runs["hf"]
        reasons = {r["finish_reason"] for r in runs["hf"]}
        assert reasons == {"stop", "length"}, reasons
    assert any(stop[0] in r["response"] for r in rows(tmp_path / "hf-free"))
    assert load_samples(tmp_path / "vllm-stop")[0]["settings"]["engine"] == "vllm"
    assert "engine" not in load_samples(tmp_path / "hf-stop")[0]["settings"]  # as before --engine existed
    assert transformers_as_vllm.calls == [12, 9] * 2  # a whole part per call: vLLM batches on its own
    tokenizer = AutoTokenizer.from_pretrained(ws / "stopper")
    end_of_turn = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]  # and a next turn
    for i, params in enumerate(transformers_as_vllm.params):  # vLLM ends answers where they end, not later
        assert (params.stop_token_ids, params.stop) == (end_of_turn, None if i < 21 else list(stop))
        assert (params.temperature, params.top_p, params.max_tokens) == (1.0, 1.0, 4)
    assert transformers_as_vllm.created[0] == {
        "model": str(ws / "stopper"), "tokenizer": str(ws / "stopper"), "dtype": "float32",
        "tensor_parallel_size": 2, "seed": 0, "trust_remote_code": False,
    }  # fmt: skip


def test_engine_flags_are_refused_where_they_cannot_run(ws: Path, tmp_path: Path) -> None:
    arguments = ["sample", "--model", str(ws / "model"), "--data", str(ws / "prompts.jsonl"), "--out",
                 str(tmp_path / "out"), "--max-new-tokens", "2"]  # fmt: skip
    cases = [(["--tensor-parallel-size", "2"], "Error: --tensor-parallel-size is vLLM's; add --engine vllm or drop it."),
             (["--engine", "vllm", "--nproc", "2"], "Error: --engine vllm runs in one process that drives its GPUs; "
              "drop --nproc, use --tensor-parallel-size.")]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(
            (["--engine", "vllm"], "Error: --engine vllm needs a CUDA GPU; use the default engine (hf) here.")
        )
    for flags, message in cases:
        result = CliRunner().invoke(main, [*arguments, *flags])
        assert result.exit_code == 1 and result.output.strip().splitlines() == [message], (
            flags,
            result.output,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs a CUDA GPU and vLLM",
)
def test_vllm_sampling_agrees_with_the_hf_engine(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct in float32 on 24 alpaca-eval prompts. With a nucleus of one token
    both engines answer greedily and must agree; sampled answers must not depend on how vLLM
    batched them (a part per call: chunk sizes 24 and 5; only kernels' rounding may move a rare
    draw), and end at the model's turn end."""
    from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, smollm2_instruct_dir

    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[:24]))
    model = smollm2_instruct_dir()
    greedy = {"num_samples": 1, "top_p": 1e-9, "max_new_tokens": 32}
    for engine in ("hf", "vllm"):
        sample(
            model,
            data,
            tmp_path / f"greedy-{engine}",
            SampleSettings(**greedy, engine=engine),
            progress=False,
        )
    hf, vllm = rows(tmp_path / "greedy-hf"), rows(tmp_path / "greedy-vllm")
    same = sum(a["response"] == b["response"] for a, b in zip(hf, vllm, strict=True))
    assert same >= 0.9 * len(hf), f"{same} of {len(hf)} greedy answers agree"

    sampled = {
        "num_samples": 3,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 48,
        "seed": 4,
        "engine": "vllm",
    }
    for chunk in (24, 5):
        sample(
            model,
            data,
            tmp_path / f"chunk{chunk}",
            SampleSettings(**sampled, chunk_size=chunk),
            progress=False,
        )
    first, second = rows(tmp_path / "chunk24"), rows(tmp_path / "chunk5")
    same = sum(a["response"] == b["response"] for a, b in zip(first, second, strict=True))
    assert same >= 0.9 * len(first), f"{same} of {len(first)} answers the same in other batches"
    assert len({r["response"] for r in first}) > len(first) // 2  # sampled, not greedy
    assert any(r["finish_reason"] == "stop" for r in first)
    for r in first:
        assert "<|im_end|>" not in r["response"]
        assert r["num_tokens"] < 48 if r["finish_reason"] == "stop" else r["num_tokens"] == 48
