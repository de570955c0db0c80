"""`represent` against independent computations: a plain forward pass with torch.topk, the
model's own loss, the conversation text itself; plus resuming, sharding and bad input."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from byte_reference import BYTE_LEVEL, content_place, reference_places
from click.testing import CliRunner
from conftest import TRICKY_ANSWERS
from numeric import DEFAULT_ULPS, approx_at_scale, assert_stored_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_train import inference as inference_module
from fusion_train import represent as represent_module
from fusion_train.align import align
from fusion_train.chat import ChatDataError, load_conversations, resolve_chat_template
from fusion_train.cli import main
from fusion_train.inference import InferenceSettings, InferenceSettingsError, load_scorer
from fusion_train.models import ModelLoadError
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import RepresentationError, example_arrays, load_representation
from fusion_train.storage import OutputMismatchError


def supervised_positions(arrays: dict) -> list[int]:
    return [
        p
        for start, n in zip(arrays["run_start"], arrays["run_length"], strict=True)
        for p in range(start, start + n)
    ]


def supervised_messages(arrays: dict) -> list[int]:
    return [m for m, n in zip(arrays["run_message"], arrays["run_length"], strict=True) for _ in range(n)]


@pytest.mark.parametrize("name", ["smollm2", "mistral", "qwen"])
def test_topk_and_nll_match_a_plain_forward_pass(name: str, tiny_models: dict, represented: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_models[name]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    data = load_representation(represented[name])
    assert len(data) == len(TRICKY_ANSWERS) + 2
    for index in range(len(data)):
        arrays = example_arrays(data, index)
        ids = torch.tensor(arrays["input_ids"], dtype=torch.long)[None]
        positions = torch.tensor(supervised_positions(arrays))
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        logprobs = torch.log_softmax(logits[:, : len(tokenizer)], dim=-1)[positions - 1]
        values, indices = torch.topk(logprobs, 5, dim=-1)
        assert (torch.tensor(arrays["topk_ids"]).long() == indices).all()
        assert_stored_close(
            arrays["topk_logprobs"], values, stored="float16", computed="float32", ulps=DEFAULT_ULPS
        )
        target = logprobs.gather(1, ids[0, positions][:, None])[:, 0]
        assert_stored_close(
            arrays["target_logprob"], target, stored="float16", computed="float32", ulps=DEFAULT_ULPS
        )

        assert arrays["num_target_tokens"] == len(positions)
        real_vocab_ce = torch.nn.functional.cross_entropy(
            logits[positions - 1, : len(tokenizer)], ids[0, positions], reduction="sum"
        )
        assert arrays["nll"] == approx_at_scale(float(real_vocab_ce), dtype=torch.float32)
        if model.config.vocab_size == len(tokenizer):  # the model's own loss, where no padding rows exist
            labels = torch.full_like(ids, -100)
            labels[0, positions] = ids[0, positions]
            with torch.no_grad():
                loss = model(ids, labels=labels).loss
            assert arrays["nll"] == approx_at_scale(float(loss) * len(positions), dtype=torch.float32)


def test_padded_vocabulary_rows_are_never_reported(tiny_models: dict, chats: Path, tmp_path: Path) -> None:
    """Qwen-style padded embeddings: make the padding rows win every argmax; they must not appear."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen"])
    assert model.config.vocab_size > len(tokenizer)
    with torch.no_grad():  # padding rows = +-100 x real rows: one of each pair has a huge logit
        head = model.get_output_embeddings().weight
        extra = head.shape[0] - len(tokenizer)
        signs = torch.tensor([1.0, -1.0]).repeat((extra + 1) // 2)[:extra, None]
        head[len(tokenizer) :] = 100 * signs * head[: (extra + 1) // 2].repeat_interleave(2, dim=0)[:extra]
        assert model(torch.tensor([[1, 2, 3]])).logits[0].argmax(-1).min() >= len(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    represent(tmp_path / "model", chats, tmp_path / "out", RepresentSettings(top_k=8), progress=False)
    data = load_representation(tmp_path / "out")
    for index in range(len(data)):
        arrays = example_arrays(data, index)
        assert arrays["topk_ids"].max() < len(tokenizer)
        # A real distribution over the tokenizer's ids: the kept mass is a probability, not 0 or NaN.
        mass = torch.tensor(arrays["topk_logprobs"]).float().exp().sum(-1)
        assert torch.isfinite(mass).all() and (mass <= 1.01).all()


@pytest.mark.parametrize("name", ["smollm2", "mistral", "qwen"])
def test_byte_spans_are_where_the_tokens_bytes_lie(
    name: str, tiny_models: dict, represented: dict, chats: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    template, _ = resolve_chat_template(tokenizer, None)
    conversations = {c.id: c for c in load_conversations(chats)}
    data = load_representation(represented[name])
    for index in range(len(data)):
        arrays = example_arrays(data, index)
        conv = conversations[data[index]["id"]]
        text = tokenizer.apply_chat_template(list(conv.messages), chat_template=template, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert arrays["input_ids"].tolist() == ids
        places = reference_places(tokenizer, ids, text, BYTE_LEVEL[name])
        messages, positions = supervised_messages(arrays), supervised_positions(arrays)
        assert sorted(set(messages)) == conv.assistant_indices
        after, byte_total = 0, 0
        for m, message in enumerate(conv.messages):
            base, verbatim_start, verbatim_end = content_place(text, message["content"], after)
            after = verbatim_end
            if message["role"] != "assistant":
                continue
            rows = [i for i, msg in enumerate(messages) if msg == m]
            overlapping = [
                p for p, place in enumerate(places)
                if place.end > max(place.start, verbatim_start) and place.start < verbatim_end
            ]  # fmt: skip
            # Supervised: exactly the tokens overlapping the answer's bytes, then one end-of-turn token.
            assert [positions[i] for i in rows[:-1]] == overlapping
            for i in rows[:-1]:
                place = places[positions[i]]
                assert (arrays["byte_start"][i], arrays["byte_end"][i]) == (
                    place.start - base,
                    place.end - base,
                )
            end_of_turn = places[positions[rows[-1]]]
            content_bytes = len(message["content"].encode("utf-8"))
            assert end_of_turn.special is not None
            assert (arrays["byte_start"][rows[-1]], arrays["byte_end"][rows[-1]]) == (
                content_bytes,
                content_bytes,
            )
            byte_total += verbatim_end - verbatim_start
        assert arrays["num_target_bytes"] == byte_total


def test_template_that_strips_content_gives_spans_in_the_original_text(
    tiny_models: dict, tmp_path: Path
) -> None:
    template = tmp_path / "strip.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    )
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps([{"instruction": "Hi", "output": "  padded answer \n"}]))
    represent(tiny_models["qwen"], data_path, tmp_path / "out", RepresentSettings(chat_template=str(template)),
              progress=False)  # fmt: skip
    arrays = example_arrays(load_representation(tmp_path / "out"), 0)
    content_spans = [(a, b) for a, b in zip(arrays["byte_start"], arrays["byte_end"], strict=True) if b > a]
    assert content_spans[0][0] == 2 and content_spans[-1][1] == 2 + len("padded answer")
    assert arrays["num_target_bytes"] == len("padded answer")


@pytest.mark.parametrize(
    ("closing", "ends_with_special"),
    [("<|im_end|>\n", True), ("\nEND OF ANSWER<|im_end|>\n", False), ("\n\n", False)],
)
def test_one_special_end_of_turn_token_per_answer(
    closing: str, ends_with_special: bool, tiny_models: dict, tmp_path: Path
) -> None:
    """A turn ends with a supervised token only where a special token closes it; plain template
    text after the answer is never taken for one."""
    template = tmp_path / "closing.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}" + closing.replace("\n", "\\n")
        + "{% endfor %}"
    )  # fmt: skip
    records = [{"messages": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "One."},
                             {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Two and 2."}]}]  # fmt: skip
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps(records))
    represent(tiny_models["qwen"], data_path, tmp_path / "out", RepresentSettings(chat_template=str(template)),
              progress=False)  # fmt: skip
    arrays = example_arrays(load_representation(tmp_path / "out"), 0)
    special = set(AutoTokenizer.from_pretrained(tiny_models["qwen"]).all_special_ids)
    messages, positions = supervised_messages(arrays), supervised_positions(arrays)
    for m, content in ((1, "One."), (3, "Two and 2.")):
        rows = [i for i, msg in enumerate(messages) if msg == m]
        zero_width = [i for i in rows if arrays["byte_start"][i] == arrays["byte_end"][i]]
        if ends_with_special:
            assert zero_width == [rows[-1]]
            assert int(arrays["input_ids"][positions[rows[-1]]]) in special
            assert arrays["byte_start"][rows[-1]] == len(content)
        else:
            assert zero_width == []
        text_rows = rows[:-1] if ends_with_special else rows
        assert all(arrays["byte_start"][i] < len(content) for i in text_rows)  # no template text


def test_kill_and_resume_gives_identical_output(
    tiny_models: dict, chats: Path, represented: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = RepresentSettings(top_k=5, chunk_size=3)
    real_write_part = represent_module._write_part
    calls = {"n": 0}

    def dies_on_second_part(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in the middle of writing part 2
        return real_write_part(*args, **kwargs)

    monkeypatch.setattr(represent_module, "_write_part", dies_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        represent(tiny_models["mistral"], chats, tmp_path, settings, batch_tokens=256, progress=False)
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert parts == ["part-00000"]  # nothing half-written looks complete
    with pytest.raises(RepresentationError, match="missing"):
        load_representation(tmp_path)

    monkeypatch.setattr(represent_module, "_write_part", real_write_part)
    represent(tiny_models["mistral"], chats, tmp_path, settings, batch_tokens=256, progress=False)
    assert load_representation(tmp_path).to_dict() == load_representation(represented["mistral"]).to_dict()


def test_two_shards_combine_into_the_single_run(
    tiny_models: dict, chats: Path, represented: dict, tmp_path: Path
) -> None:
    settings = RepresentSettings(top_k=5, chunk_size=3)
    first = represent(
        tiny_models["smollm2"], chats, tmp_path, settings, batch_tokens=256, shard=(0, 2), progress=False
    )
    assert first is None  # shard 1's parts are still missing
    second = represent(tiny_models["smollm2"], chats, tmp_path, settings, batch_tokens=256, shard=(1, 2),
                       progress=False)  # fmt: skip
    assert second is not None and second.represented == len(TRICKY_ANSWERS) + 2
    assert load_representation(tmp_path).to_dict() == load_representation(represented["smollm2"]).to_dict()


def test_skips_and_truncation_are_counted(tiny_models: dict, tmp_path: Path) -> None:
    records = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},
        {"instruction": "long", "output": "word " * 200},
        {"instruction": "short", "output": "fine"},
    ]
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps(records))
    summary = represent(tiny_models["smollm2"], data_path, tmp_path / "trunc", RepresentSettings(max_length=64),
                        progress=False)  # fmt: skip
    assert summary.skipped == {"no assistant message": 1, "empty assistant message": 1}
    assert summary.truncated == 1 and summary.represented == 2
    data = load_representation(tmp_path / "trunc")
    assert max(len(ids) for ids in data["input_ids"]) == 64
    skipped = represent(tiny_models["smollm2"], data_path, tmp_path / "skip",
                        RepresentSettings(max_length=64, overflow="skip"), progress=False)  # fmt: skip
    assert skipped.represented == 1 and skipped.truncated == 0
    assert any(reason.startswith("longer than --max-length") for reason in skipped.skipped)
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["represented"] == 1


def test_bad_input_gives_clear_errors(tiny_models: dict, chats: Path, tmp_path: Path) -> None:
    represent(
        tiny_models["smollm2"], chats, tmp_path / "out", RepresentSettings(chunk_size=3), progress=False
    )
    with pytest.raises(OutputMismatchError, match="model"):
        represent(
            tiny_models["qwen"], chats, tmp_path / "out", RepresentSettings(chunk_size=3), progress=False
        )

    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_models["qwen"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        represent(no_tokenizer, chats, tmp_path / "o2", progress=False)

    dropping = tmp_path / "drop.jinja"
    dropping.write_text("{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}")
    with pytest.raises(ChatDataError, match="does not reproduce the content"):
        represent(tiny_models["qwen"], chats, tmp_path / "o3", RepresentSettings(chat_template=str(dropping)),
                  progress=False)  # fmt: skip

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(ChatDataError, match=r"bad.jsonl, record 1: unknown record shape"):
        represent(tiny_models["qwen"], bad, tmp_path / "o4", progress=False)


def test_inference_settings_are_checked_once_per_run_and_by_load_scorer(
    tiny_models: dict, chats: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """represent checks its inference settings before it starts, and loading with them (load_scorer,
    Scorer.load) does not check them again; a library caller's load_scorer still checks."""
    monkeypatch.setattr(inference_module, "_CHECKED", weakref.WeakSet())  # none checked yet
    checked = []
    real = InferenceSettings._check
    monkeypatch.setattr(InferenceSettings, "_check", lambda self: checked.append(self) or real(self))
    represent(tiny_models["smollm2"], chats, tmp_path / "out", inference=InferenceSettings(device="cpu"), limit=1,
              progress=False)  # fmt: skip
    assert checked == [InferenceSettings(device="cpu")]
    with pytest.raises(InferenceSettingsError, match="--device-map auto spreads the model"):
        load_scorer(tiny_models["smollm2"], InferenceSettings(device="cpu", device_map="auto"), top_k=1)


def test_command_line(tiny_models: dict, chats: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["represent", "--help"])
    assert result.exit_code == 0 and "--top-k" in result.output and "--shard" in result.output
    args = ["represent", "--model", str(tiny_models["qwen"]), "--data", str(chats), "--out", str(tmp_path / "o"),
            "--top-k", "3", "--limit", "2"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2/2 examples" in result.output
    data = load_representation(tmp_path / "o")
    assert len(data) == 2 and example_arrays(data, 0)["topk_ids"].shape[1] == 3
    result = runner.invoke(main, [*args[:-2], "--limit", "2", "--shard", "3/2"])
    assert result.exit_code != 0 and "shard index" in result.output


@pytest.mark.slow
def test_real_smollm2_matches_its_own_forward_pass(chats: Path, tmp_path: Path) -> None:
    from fusion_train.registry_assets import smollm2_instruct_dir

    model_dir = smollm2_instruct_dir()
    represent(model_dir, chats, tmp_path, RepresentSettings(top_k=10), limit=3, progress=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = load_representation(tmp_path)
    for index in range(len(data)):
        arrays = example_arrays(data, index)
        ids = torch.tensor(arrays["input_ids"], dtype=torch.long)[None]
        positions = torch.tensor(supervised_positions(arrays))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[positions - 1]
        values, indices = torch.topk(logprobs, 10, dim=-1)
        agree = (torch.tensor(arrays["topk_ids"]).long() == indices).float().mean()
        assert agree > 0.99  # near-ties between neighbours may swap under different batching
        torch.testing.assert_close(
            torch.tensor(arrays["topk_logprobs"]).float(), values, atol=3e-2, rtol=3e-3
        )


@pytest.mark.slow
def test_gguf_file_loads_like_its_converted_directory(chats: Path, tmp_path: Path) -> None:
    """--gguf-file: the dequantised GGUF model records what its converted HF directory records."""
    from fusion_train.registry_assets import SMOLLM2_135M_INSTRUCT_GGUF, fetch, smollm2_instruct_dir

    gguf = fetch(SMOLLM2_135M_INSTRUCT_GGUF)
    settings = RepresentSettings(top_k=5)
    represent(gguf.parent, chats, tmp_path / "gguf", settings, gguf_file=gguf.name, limit=2, progress=False)
    represent(smollm2_instruct_dir(), chats, tmp_path / "dir", settings, limit=2, progress=False)
    from_gguf, from_dir = load_representation(tmp_path / "gguf"), load_representation(tmp_path / "dir")
    manifest = json.loads((tmp_path / "gguf" / "manifest.json").read_text())
    assert manifest["model"]["gguf_file"] == gguf.name
    for index in range(2):
        a, b = example_arrays(from_gguf, index), example_arrays(from_dir, index)
        assert a["input_ids"].tolist() == b["input_ids"].tolist()
        assert (a["topk_ids"] == b["topk_ids"]).mean() > 0.99
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-4)


def test_parts_without_rows_are_valid_and_unreadable_parts_are_named(
    tiny_models: dict, tmp_path: Path
) -> None:
    # Chunks of one record: the second holds only a conversation without an assistant reply,
    # the third one whose reply is blank. Both parts have no rows; align still reads the rest.
    records = [{"instruction": "a", "output": "one"},
               {"messages": [{"role": "user", "content": "no reply"}]},
               {"instruction": "c", "output": "   "},
               {"instruction": "d", "output": "four"}]  # fmt: skip
    data_path = tmp_path / "d.json"
    data_path.write_text(json.dumps(records))
    settings = RepresentSettings(top_k=3, chunk_size=1)
    for name in ("smollm2", "qwen"):
        represent(tiny_models[name], data_path, tmp_path / name, settings, progress=False)
    assert len(load_representation(tmp_path / "qwen")) == 2
    report = align(tmp_path / "smollm2", tmp_path / "qwen", tmp_path / "aligned", progress=False)
    assert report["examples_aligned"] == 2 and report["missing_in_source"]["count"] == 0

    # A truncated Arrow file: the error names the part and says how to recover.
    arrow = next((tmp_path / "qwen" / "parts" / "part-00003" / "data").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(RepresentationError, match=r"part-00003.*delete this part and rerun"):
        load_representation(tmp_path / "qwen")

    # Nothing representable at all: represent fails, naming the data and the reasons.
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps(records[1:3]))
    with pytest.raises(RepresentationError, match="none of the 2 records could be represented"):
        represent(tiny_models["qwen"], nothing, tmp_path / "none", settings, progress=False)
