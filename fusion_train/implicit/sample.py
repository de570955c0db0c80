"""Implicit stage 1: every source answers every prompt several times.

The prompt of a record is every message before its last assistant turn (that turn is kept as the
record's reference answer, which verifiers compare against), or the whole conversation when it
ends with a user turn. Each model answers in its own chat template, with the generation prompt.

Reproducibility: the random draw of response ``j`` to record ``r`` comes from its own generator,
seeded by ``(--seed, r's id, j)``, one uniform number per generated token, turned into a token
by inverse-CDF sampling (see :func:`nucleus_draw`). Which other prompts share its batch, how many ranks run, and whether the
run was resumed do not change which numbers it gets; a rerun with the same settings and batch
size writes identical parts. Another batch size changes the logits only by floating-point
rounding (left padding changes the shapes of the matrix products), which moves a draw only when
its uniform number falls within that rounding of a token boundary.

Parts are chunks of records written atomically, as in ``represent``: a killed run resumes at the
first missing part, and ranks (RANK / WORLD_SIZE, or ``--shard i/n``) split the parts.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import click
import datasets
import torch

from fusion_train import options
from fusion_train.chat import Conversation, data_fingerprint, load_conversations, resolve_chat_template
from fusion_train.errors import Command, UserError
from fusion_train.inference import ENGINES, InferenceSettings, check_before_launch, vllm_engine
from fusion_train.launch import barrier, launch_if_asked, launch_options, process_group, resolve_device
from fusion_train.models import load_model, load_tokenizer, model_fingerprint, release_memory
from fusion_train.parts import all_part_stats, load_output, part_path, parts_bar, parts_to_do, write_part
from fusion_train.represent import parse_shard
from fusion_train.storage import MANIFEST, check_output, claim_output, read_json, write_json_atomic

log = logging.getLogger(__name__)

MODULE = "fusion_train.implicit.sample"  # what the launcher runs in every process
FORMAT = "fusion-train/samples@1"
SUMMARY = "summary.json"
# The plain template (models without a chat template, e.g. base models) marks the next turn with
# this text; a base model would otherwise go on to write the user's next message itself.
PLAIN_TEMPLATE_STOP = ("\n\nUser:",)


class SampleError(UserError, ValueError):
    """Prompts that cannot be answered, or sample directories that are missing or incomplete."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How responses are drawn: the settings a recipe's ``sample`` and ``rate`` sections share
    with ``fusion-train sample``."""

    num_samples: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("--num-samples and --max-new-tokens must be at least 1")
        if not self.temperature > 0:
            raise ValueError("--temperature must be above 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class SampleSettings(Sampling):
    """Everything that changes what ``sample`` writes (recorded in the manifest)."""

    chat_template: str | None = None  # built-in name or .jinja file; default: the tokenizer's own
    chunk_size: int = 64  # records per part
    dtype: str = "float32"
    stop: tuple[str, ...] = ()  # texts that end a response (not kept), besides the end-of-turn token
    engine: str = "hf"  # hf: transformers with RowSampler | vllm: vLLM's sampler, seeded per response

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 1:
            raise ValueError("--chunk-size must be at least 1")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine}: one of {', '.join(ENGINES)}")

    def record(self) -> dict[str, Any]:
        """The settings as a manifest (and a recipe's stage key) holds them: the engine only when
        it is not the default, so runs from before ``--engine`` keep their manifests and keys."""
        record = asdict(self)
        if self.engine == "hf":
            del record["engine"]
        return record

    @classmethod
    def drawing(cls, sampling: Sampling, **settings: Any) -> SampleSettings:
        """``sampling``'s draws (a recipe section's, say), with the other ``settings``."""
        return cls(**{f.name: getattr(sampling, f.name) for f in fields(Sampling)}, **settings)


@dataclass(frozen=True)
class Prompt:
    """What a model is asked, and the answer the data gave (None when the record ends with a user turn)."""

    id: str
    domain: str
    messages: tuple[dict[str, str], ...]
    reference: str | None


def prompt_of(conv: Conversation, where: str) -> Prompt:
    """The messages before the last assistant turn, or all of them when the last turn is the user's."""
    messages = conv.messages
    assistant = conv.assistant_indices
    if messages and messages[-1]["role"] == "user":
        prompt, reference = messages, None
    elif assistant:
        prompt, reference = messages[: assistant[-1]], messages[assistant[-1]]["content"]
    else:
        prompt, reference = messages, None
    if not any(m["role"] == "user" for m in prompt):
        raise SampleError(
            f"{where} (id {conv.id!r}): no user turn to answer; a prompt needs a user message "
            "before the last assistant turn, or a conversation ending with one."
        )
    return Prompt(conv.id, conv.domain, tuple(prompt), reference)


def prompts_of(conversations: list[Conversation], data_path: str | Path) -> list[Prompt]:
    """Every record's prompt; the first record without a user turn stops the stage, named by record."""
    return [prompt_of(conv, f"{data_path}, record {i}") for i, conv in enumerate(conversations)]


def sample_seed(seed: int, record_id: str, sample_index: int) -> int:
    """The seed of one response's generator: depends on nothing else (not batch, rank or part)."""
    digest = hashlib.sha256(f"{seed}\0{record_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are below 2**64; keep 63 bits


def nucleus_draw(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus, picked
    by inverse CDF with the row's uniform number in [0, 1).

    The nucleus holds the most likely tokens whose preceding mass (in descending probability) is
    below ``top_p``, so at least one token. The CDF runs in token-id order, not in probability
    order: logits computed in another batch differ by rounding, which can swap two tokens of
    near-equal probability; in probability order such a swap moves the draw whenever it involves
    the token at the uniform number, in id order only when that number lies within rounding of a
    boundary.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    in_nucleus = torch.zeros_like(probs, dtype=torch.bool).scatter_(
        1, order, sorted_probs.cumsum(-1) - sorted_probs < top_p
    )
    cumulative = (probs * in_nucleus).cumsum(-1)
    threshold = uniforms.double()[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, threshold, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)


class RowSampler:
    """A logits processor that samples each row with its own generator and leaves only the drawn
    token possible, so ``generate`` in greedy mode emits it (transformers' own sampling shares one
    random stream across the batch, which would tie a response to its batch-mates)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        tokens = nucleus_draw(scores, uniforms.to(scores.device), self.temperature, self.top_p)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, tokens[:, None], 0.0)


def features() -> datasets.Features:
    """The Arrow schema of sampled responses (one row per response)."""
    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "domain": text,
            "source": text,
            "sample_index": datasets.Value("int32"),
            "prompt": [{"role": text, "content": text}],
            "reference": text,  # the record's last assistant answer, null when it had none
            "response": text,
            "num_tokens": datasets.Value("int32"),  # generated tokens, the end-of-turn token not counted
            "finish_reason": text,  # "stop": the model ended its turn; "length": cut at --max-new-tokens
        }
    )


def generation_config(model_path: str | Path, trust_remote_code: bool = False) -> Any:
    """The model's generation config, as ``from_pretrained`` gives it to the model: its
    generation_config.json, else the defaults its config implies."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        return GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        )


def end_of_turn_ids(tokenizer: Any, config: Any) -> list[int]:
    """Tokens that end an answer: the tokenizer's end-of-sequence and the generation config's
    (Llama-3 and others end a chat turn with a token other than end-of-sequence)."""
    configured = config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


@dataclass
class ChatGenerator:
    """What both engines share: the prompt in the model's chat template, and where an answer ends.
    An engine's ``answer(texts, seeds)`` gives (response text, generated tokens, finish reason)
    for each rendered prompt, drawing response i's random numbers from ``seeds[i]`` alone."""

    tokenizer: Any
    template: str
    settings: SampleSettings
    stop_ids: list[int]
    schedules_itself: ClassVar[bool] = False  # True: give it a whole part, it batches on its own

    def render(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(
            list(prompt.messages), chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, text: str) -> list[int]:
        """A rendered prompt's tokens (the template already holds the special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, texts: list[str], seeds: list[int]) -> list[tuple[str, int, str]]:
        raise NotImplementedError

    def ending(self, generated: list[int], stopped: bool = False) -> tuple[str, int, str]:
        """(response text, generated tokens, finish reason) of what an engine generated after the
        prompt: cut before the first end-of-turn token, or after the tokens of the first stop text
        (whose text is dropped). ``stopped``: the engine says it stopped before the length limit."""
        end = next((i for i, token in enumerate(generated) if token in self.stop_ids), None)
        tokens = generated if end is None else generated[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = self.stop_at(text)
        if cut is not None:  # generation stopped at a stop text: keep what came before it
            tokens = tokens[: self.tokens_to_stop(tokens)]
            text, end = text[:cut], len(tokens)
        return text, len(tokens), "stop" if end is not None or stopped else "length"

    def stop_at(self, text: str) -> int | None:
        """Where the first stop text begins in ``text``, or None."""
        found = [i for i in (text.find(s) for s in self.settings.stop) if i >= 0]
        return min(found) if found else None

    def tokens_to_stop(self, tokens: list[int]) -> int:
        """The fewest leading tokens whose text holds a stop text (the stop text's own tokens are
        counted): found by bisection, since holding one only starts, never stops, as tokens are added."""
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if self.stop_at(self.tokenizer.decode(tokens[:middle], skip_special_tokens=True)) is None:
                low = middle + 1
            else:
                high = middle
        return low


@dataclass
class HfGenerator(ChatGenerator):
    """transformers' ``generate`` on batches of left-padded prompts, sampled by :class:`RowSampler`."""

    model: torch.nn.Module

    @torch.inference_mode()
    def answer(self, texts: list[str], seeds: list[int]) -> list[tuple[str, int, str]]:
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        config = GenerationConfig(
            do_sample=False,  # the drawn token is the only one RowSampler leaves possible
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(self.settings.stop) or None,
        )
        sampler = RowSampler(seeds, self.settings.temperature, self.settings.top_p)
        output = self.model.generate(
            **batch, generation_config=config, logits_processor=LogitsProcessorList([sampler]),
            tokenizer=self.tokenizer,
        )  # fmt: skip
        return [self.ending(row) for row in output[:, batch["input_ids"].shape[1] :].tolist()]


@dataclass
class VllmGenerator(ChatGenerator):
    """vLLM's own sampler (``--engine vllm``), one request per response with its own seed, so a
    response's draws do not depend on the requests scheduled with it. vLLM samples in probability
    order, the HF engine in token-id order (:func:`nucleus_draw`): both draw from the same
    distribution, but from other numbers, so the two engines write different responses."""

    llm: Any  # vllm.LLM
    schedules_itself: ClassVar[bool] = True

    def answer(self, texts: list[str], seeds: list[int]) -> list[tuple[str, int, str]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        prompts = [TokensPrompt(prompt_token_ids=self.prompt_ids(text)) for text in texts]
        params = [
            SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=seed,
                           stop=list(s.stop) or None, stop_token_ids=self.stop_ids, skip_special_tokens=True)
            for seed in seeds
        ]  # fmt: skip
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            self.ending(list(out.outputs[0].token_ids), stopped=out.outputs[0].finish_reason == "stop")
            for out in outputs
        ]


def engine_settings(settings: SampleSettings, tensor_parallel_size: int = 1) -> InferenceSettings:
    """Where ``settings.engine`` runs the model, to be checked before anything starts."""
    return InferenceSettings(
        dtype=settings.dtype, engine=settings.engine, tensor_parallel_size=tensor_parallel_size
    )


def load_generator(
    model_path: str | Path, plan: SamplingPlan, tensor_parallel_size: int = 1, trust_remote_code: bool = False
) -> ChatGenerator:
    """The engine ``plan.settings`` ask for, with the model loaded on this rank's device."""
    tokenizer, settings = plan.tokenizer, plan.settings
    stop_ids = end_of_turn_ids(tokenizer, generation_config(model_path, trust_remote_code))
    if settings.engine == "vllm":
        llm = vllm_engine(model_path, engine_settings(settings, tensor_parallel_size), trust_remote_code)
        return VllmGenerator(tokenizer, plan.template, settings, stop_ids, llm=llm)
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(model_path, dtype=settings.dtype, trust_remote_code=trust_remote_code)
    return HfGenerator(tokenizer, plan.template, settings, stop_ids, model=model.to(resolve_device("auto")))


@dataclass
class SampleSummary:
    records: int = 0
    responses: int = 0
    generated_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: dict[str, Any]) -> None:
        for key in ("records", "responses", "generated_tokens"):
            setattr(self, key, getattr(self, key) + other[key])
        self.finish_reasons = dict(Counter(self.finish_reasons) + Counter(other["finish_reasons"]))
        self.seconds += other["seconds"]


@dataclass(frozen=True)
class SamplingPlan:
    """What a ``sample`` run answers and records, worked out and checked before any model loads."""

    prompts: list[Prompt]
    tokenizer: Any
    template: str
    settings: SampleSettings
    manifest: dict[str, Any]


def plan_sampling(
    model_path: str | Path,
    data_path: str | Path,
    settings: SampleSettings = SampleSettings(),
    *,
    source_name: str | None = None,
    limit: int | None = None,
    trust_remote_code: bool = False,
) -> SamplingPlan:
    """The prompts, chat template and manifest of a run; bad data or a tokenizer that cannot be
    loaded stop it here, before a model is loaded (or, under ``--nproc``, before any rank starts)."""
    conversations = load_conversations(data_path)[:limit]
    prompts = prompts_of(conversations, data_path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    template, template_source = resolve_chat_template(tokenizer, settings.chat_template)
    if template_source == "builtin:plain" and not settings.stop:
        settings = replace(settings, stop=PLAIN_TEMPLATE_STOP)
    manifest = {
        "format": FORMAT,
        "source": source_name or Path(model_path).resolve().name,
        "model": {"path": str(Path(model_path).resolve()), "fingerprint": model_fingerprint(model_path)},
        "data": {"path": str(Path(data_path).resolve()), "fingerprint": data_fingerprint(conversations)},
        "num_records": len(prompts),
        "num_parts": -(-len(prompts) // settings.chunk_size),
        "chat_template": {
            "source": template_source,
            "sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
        },
        "settings": settings.record(),
    }
    return SamplingPlan(prompts, tokenizer, template, settings, manifest)


def sample(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    settings: SampleSettings = SampleSettings(),
    *,
    source_name: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    shard: tuple[int, int] | None = None,
    tensor_parallel_size: int = 1,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> SampleSummary | None:
    """Write ``settings.num_samples`` answers by the model at ``model_path`` to every prompt of
    ``data_path`` into ``out_dir``.

    In a launched job every rank takes every n-th part and the main rank writes the summary once
    all ranks are done; ``shard`` (i, n) splits the parts between independent processes instead.
    Returns the summary once every part exists (``None`` on other ranks, or while other shards'
    parts are still missing)."""
    out_dir = Path(out_dir)
    plan = plan_sampling(model_path, data_path, settings, source_name=source_name, limit=limit,
                         trust_remote_code=trust_remote_code)  # fmt: skip
    settings, manifest = plan.settings, plan.manifest
    engine_settings(settings, tensor_parallel_size).check()
    claim_output(out_dir, manifest)
    with process_group() as rank:
        mine = parts_to_do(out_dir, manifest["num_parts"], shard or rank.share)
        if mine:
            generator = load_generator(model_path, plan, tensor_parallel_size, trust_remote_code)
            bar = parts_bar(mine, f"sample {manifest['source']}", progress and rank.is_main)
            for chunk in bar:
                begin = chunk * settings.chunk_size
                chunk_prompts = plan.prompts[begin : begin + settings.chunk_size]
                _write_part(
                    generator, chunk_prompts, manifest["source"], batch_size, part_path(out_dir, chunk)
                )
            del generator
            release_memory()
        barrier()  # every rank's parts exist
    return finalize(out_dir) if rank.is_main else None


def _write_part(
    generator: ChatGenerator, prompts: list[Prompt], source: str, batch_size: int, target: Path
) -> None:
    """Answer one chunk of prompts, longest prompts batched together, rows in (record, sample) order."""
    started = time.perf_counter()
    settings = generator.settings
    texts = [generator.render(p) for p in prompts]
    jobs = [(r, j) for r in range(len(prompts)) for j in range(settings.num_samples)]
    lengths = [len(generator.prompt_ids(text)) for text in texts]
    ordered = sorted(jobs, key=lambda job: lengths[job[0]])
    if generator.schedules_itself:
        batch_size = len(ordered)
    answers: dict[tuple[int, int], tuple[str, int, str]] = {}
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        seeds = [sample_seed(settings.seed, prompts[r].id, j) for r, j in batch]
        for job, answer in zip(batch, generator.answer([texts[r] for r, _ in batch], seeds), strict=True):
            answers[job] = answer
    rows = []
    for r, j in jobs:
        response, num_tokens, finish = answers[r, j]
        p = prompts[r]
        rows.append({"id": p.id, "domain": p.domain, "source": source, "sample_index": j, "prompt": list(p.messages),
                     "reference": p.reference, "response": response, "num_tokens": num_tokens,
                     "finish_reason": finish})  # fmt: skip
    stats = {
        "records": len(prompts),
        "responses": len(rows),
        "generated_tokens": sum(row["num_tokens"] for row in rows),
        "finish_reasons": dict(Counter(row["finish_reason"] for row in rows)),
        "seconds": time.perf_counter() - started,
    }
    write_part(target, datasets.Dataset.from_list(rows, features=features()), stats)


def finalize(out_dir: Path) -> SampleSummary | None:
    """Write ``summary.json`` once every part is present; return the summary (or None)."""
    stats = all_part_stats(out_dir, read_json(out_dir / MANIFEST)["num_parts"])
    if stats is None:
        return None
    summary = SampleSummary()
    for part in stats:
        summary.add(part)
    write_json_atomic(out_dir / SUMMARY, asdict(summary))
    return summary


def load_samples(out_dir: str | Path) -> tuple[dict[str, Any], datasets.Dataset]:
    """The manifest and all responses of a finished ``sample`` run, in (record, sample) order."""
    return load_output(Path(out_dir), FORMAT, "sample", SampleError)


# --------------------------------------------------------------------------- command


@click.command("sample", cls=Command)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Local model directory (a source, or the target after SFT for WRPO).",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(exists=True),
    help="Prompts: chat data (JSON/JSONL/datasets; messages, conversations or alpaca). The prompt is every "
    "message before the last assistant turn, or the whole conversation when it ends with a user turn.",
)
@options.output_directory()
@click.option("--num-samples", type=options.POSITIVE_INT, default=5, help="Responses per prompt.")
@click.option("--temperature", type=options.POSITIVE_FLOAT, default=0.8, help="Sampling temperature.")
@click.option(
    "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95, help="Nucleus sampling mass."
)
@click.option(
    "--max-new-tokens", type=options.POSITIVE_INT, default=1024, help="Longest response, in tokens."
)
@click.option(
    "--seed",
    type=int,
    default=0,
    help="With the record id and sample index, decides each response's random draws.",
)
@click.option(
    "--batch-size",
    type=options.POSITIVE_INT,
    default=8,
    help="Responses generated together (left-padded prompts of similar length).",
)
@click.option(
    "--chunk-size",
    type=options.POSITIVE_INT,
    default=64,
    help="Records per part (the unit of resuming and sharding).",
)
@click.option("--limit", type=options.POSITIVE_INT, default=None, help="Use only the first N records.")
@click.option(
    "--source-name",
    default=None,
    help="The name responses are stored under. Default: the model directory's name.",
)
@click.option(
    "--chat-template",
    default=None,
    help="Built-in template (plain, chatml, llama2) or a .jinja file. Default: the tokenizer's own, "
    "else the plain fallback.",
)
@click.option("--dtype", type=options.MODEL_DTYPES, default="float32", help="Weights' dtype for generation.")
@click.option(
    "--stop",
    multiple=True,
    help="Repeatable: a text that ends a response (and is not kept). Default with the plain template: "
    "'\\n\\nUser:', where a model without a chat template would begin the next turn itself.",
)
@click.option(
    "--shard",
    default=None,
    help="i/n: process every n-th part starting at i. Default: RANK/WORLD_SIZE of the launcher, else everything.",
)
@options.engine_options("vLLM's sampler, one seeded request per response")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory.")
@launch_options
def sample_command(**params: Any) -> None:
    """Sample several responses per prompt from one model (implicit fusion, FuseChat-3.0 / WRPO).

    With --nproc N the parts are split between N processes (one per GPU, or CPU processes) under
    the deepspeed launcher; what is written does not change."""
    p = SimpleNamespace(**params)
    settings = SampleSettings(**{f.name: params[f.name] for f in fields(SampleSettings)})
    plan_options = {"source_name": p.source_name, "limit": p.limit, "trust_remote_code": p.trust_remote_code}

    def check() -> None:
        check_before_launch(engine_settings(settings, p.tensor_parallel_size))
        plan = plan_sampling(p.model_path, p.data_path, settings, **plan_options)
        check_output(Path(p.out_dir), plan.manifest)

    if launch_if_asked(MODULE, sample_command, params, check):
        return
    summary = sample(p.model_path, p.data_path, p.out_dir, settings, batch_size=p.batch_size, shard=parse_shard(p.shard),
                     tensor_parallel_size=p.tensor_parallel_size, **plan_options)  # fmt: skip
    if summary is None:
        if p.shard:
            click.echo(f"{p.out_dir}: this shard is done; other shards' parts are still missing.")
        return
    click.echo(
        f"{p.out_dir}: {summary.responses} responses to {summary.records} prompts, {summary.generated_tokens} "
        f"tokens, finish reasons {summary.finish_reasons}."
    )


if __name__ == "__main__":
    sample_command(prog_name="fusion-train sample")
