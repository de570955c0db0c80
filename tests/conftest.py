"""Shared fixtures: real tokenizers from package-registry packages and tiny random models.

The tokenizers are the real ones users meet (SmolLM2's byte-level BPE, Mistral/Llama-2's
SentencePiece with byte fallback, Qwen's tiktoken BPE, whose models pad the embedding), see
``fusion_train.registry_assets.real_tokenizer_dir``. Models on top of them are tiny and random:
what the stages compute is checked against independent computations, not against quality.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fusion_train import calls, pipeline
from fusion_train import registry_assets as assets
from fusion_train.calls import StageCall
from fusion_train.represent import RepresentSettings, represent
from fusion_train.stages import Stages
from fusion_train.vocab import CACHE_ENV

QWEN_PADDED_VOCAB = 151936  # Qwen's embedding has more rows than its 151,851 tokens


# The files that take longest (minutes: launched ranks, whole recipes, the README walk-through),
# longest first as `--durations=0` measured them, run first: under `make test`'s workers
# (pytest-xdist, a file per worker at a time, `--no-loadscope-reorder`) the last file to finish is
# then a short one. Only the order changes; a file missing here runs after these.
LONGEST_FILES = (
    "test_train_deepspeed.py", "test_resume.py", "test_implicit_tune.py", "test_readme.py", "test_ranks.py",
    "test_pipeline.py", "test_align_bytes.py", "test_implicit_recipe.py", "test_implicit_ranks.py",
    "test_train.py", "test_implicit_sample.py", "test_represent.py", "test_gpu_check.py", "test_errors.py",
    "test_align.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the files of ``LONGEST_FILES`` first, in that order, each file's tests kept together."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def vocab_map_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Vocabulary maps never go to the user's cache (~/.cache/fusion-train/vocab-maps): session-
    and module-scoped fixtures write into this temporary directory (the environment variable also
    reaches subprocesses). The asset cache (real tokenizers, models) is left where it is."""
    root = tmp_path_factory.mktemp("vocab-maps")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root / "shared"))
        yield root


_test_number = itertools.count()


@pytest.fixture(autouse=True)
def vocab_map_cache(vocab_map_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own (not yet created) vocabulary-map cache, so no test sees another's maps."""
    path = vocab_map_cache_root / f"test-{next(_test_number)}"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


def build_tiny_model(tokenizer_dir: Path, out: Path, seed: int = 0, vocab_size: int | None = None,
                     layers: int = 2, hidden: int = 32) -> Path:  # fmt: skip
    """A random Llama-architecture model on a real tokenizer, saved with it as a HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so top-k orders are not near-ties
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dirs() -> dict[str, Path]:
    return {name: assets.real_tokenizer_dir(name) for name in assets.REAL_TOKENIZERS}


@pytest.fixture(scope="session")
def tiny_models(tokenizer_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per real tokenizer; the Qwen one has a padded vocabulary."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        name: build_tiny_model(
            path, root / name, seed=i, vocab_size=QWEN_PADDED_VOCAB if name == "qwen" else None
        )
        for i, (name, path) in enumerate(tokenizer_dirs.items())
    }


TRICKY_ANSWERS = [
    "Hello  world 👋 你好！\n\tcode()  end",
    "```python\ndef f(x):\n\treturn x  # tab\n```\n\nDone. 🎉🎉",
    "日本語のテキスト、そして emoji 😀 mixed with   spaces.",
    " Leading and trailing spaces ",
    "Sure.",
]


def write_chats(path: Path) -> Path:
    records = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}],
         "dataset": "tricky"}
        for i, answer in enumerate(TRICKY_ANSWERS)
    ]  # fmt: skip
    records.append(
        {"conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Two turns?"},
            {"from": "gpt", "value": "Yes, two."}, {"from": "human", "value": "And?"},
            {"from": "gpt", "value": "Second answer\nwith a newline."}]}
    )  # fmt: skip
    records.append({"instruction": "Add the numbers.", "input": "1 + 1", "output": "1 + 1 = 2"})
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl")


@pytest.fixture(scope="session")
def represented(tiny_models: dict[str, Path], chats: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repr")
    settings = RepresentSettings(top_k=5, chunk_size=3)
    for name, model in tiny_models.items():
        represent(model, chats, root / name, settings, batch_tokens=256, progress=False)
    return {name: root / name for name in tiny_models}


@pytest.fixture
def kept_by_stages(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Each stage of a recipe run in the test (and its evaluation) must leave the process as it
    found it: the list collects, per stage, the models, Trainers and DeepSpeed engines it created
    that are still alive once the garbage is collected after it.

    Creations are recorded by these classes' ``__init__`` (every model, trainer and engine calls
    it) into weak sets, one per stage running: no scan of every object in the process."""
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel, Trainer

    running: list[weakref.WeakSet] = []

    def recorded(init: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(init)
        def record(self: object, *args: object, **kwargs: object) -> None:
            init(self, *args, **kwargs)
            for created in running:
                created.add(self)

        return record

    for heavy in (PreTrainedModel, Trainer, DeepSpeedEngine):
        monkeypatch.setattr(heavy, "__init__", recorded(heavy.__init__))
    kept: list[tuple[str, list[str]]] = []

    def checked(label: Callable[..., str], function: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(function)
        def run(*args: object, **kwargs: object) -> object:
            created: weakref.WeakSet = weakref.WeakSet()
            running.append(created)
            try:
                return function(*args, **kwargs)
            finally:
                running.pop()  # this one: stages nest, the innermost ends first
                gc.collect()
                if left := sorted(type(o).__name__ for o in created):
                    kept.append((label(*args, **kwargs), left))

        return run

    run_stage = Stages.run

    def run_checked(self: Stages, stage: str, name: str, inputs: dict, work: Callable[[Path], object]):
        # Only a stage that runs is checked: a stage done before does no work.
        return run_stage(self, stage, name, inputs, checked(lambda *_: f"{stage}/{name}", work))

    monkeypatch.setattr(Stages, "run", run_checked)
    monkeypatch.setattr(pipeline, "evaluate", checked(lambda *a, **k: "evaluate", pipeline.evaluate))
    return kept


@dataclass(frozen=True)
class Launched:
    """One start of the ranks that ``launched_calls`` stood in for."""

    call: StageCall  # read back from the call file, as every rank reads it
    nproc: int | None
    hostfile: str | None
    master_port: int | None


@pytest.fixture
def launched_calls(monkeypatch: pytest.MonkeyPatch) -> list[Launched]:
    """Stands in for the launcher of ``fusion_train.calls``: records what every rank
    would have been given (the call file, read back) and succeeds without starting a process."""
    started: list[Launched] = []

    def launch(module: str, arguments: list[str], nproc, hostfile, master_port) -> int:
        assert module == calls.MODULE
        started.append(Launched(StageCall.read(arguments[0]), nproc, hostfile, master_port))
        return 0

    monkeypatch.setattr(calls, "launch", launch)
    return started
