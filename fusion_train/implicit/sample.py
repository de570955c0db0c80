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
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, NamedTuple

import click
import datasets
import torch

from fusion_train import options
from fusion_train.calls import StageCall
from fusion_train.chat import (
    Conversation,
    TurnOpening,
    data_fingerprint,
    load_conversations,
    resolve_chat_template,
    user_turn_opening,
)
from fusion_train.errors import Command, UserError
from fusion_train.inference import ENGINES, InferenceSettings, check_before_launch, vllm_engine
from fusion_train.launch import barrier, launch_options, process_group, resolve_device
from fusion_train.models import (
    check_model_directory,
    load_model,
    load_tokenizer,
    model_fingerprint,
    release_memory,
)
from fusion_train.parts import (
    all_part_stats,
    echo_shard_done,
    load_output,
    parse_shard,
    part_path,
    parts_bar,
    parts_to_do,
    write_part,
)
from fusion_train.settings import options_from, setting, settings_from
from fusion_train.storage import MANIFEST, check_output, claim_output, read_json, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "fusion-train/samples@1"
SUMMARY = "summary.json"
# How many of the most likely tokens nucleus_draw looks at first, and then for the rows whose
# nucleus is larger, on a CPU (the rest take the whole vocabulary, sorted). SmolLM2-135M-Instruct's
# top-p 0.95 nucleus at temperature 0.8 held a median of 8 tokens over 512 draws, 11% held more
# than 64, none more than 1024; sorting all 49,152 costs 30x a top-64.
CANDIDATES = (64, 1024)


class SampleError(UserError, ValueError):
    """Prompts that cannot be answered, or sample directories that are missing or incomplete."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How responses are drawn: the settings a recipe's ``sample`` and ``rate`` sections share
    with ``fusion-train sample``."""

    num_samples: int = setting(5, type=options.POSITIVE_INT, help="Responses per prompt.")
    temperature: float = setting(0.8, type=options.POSITIVE_FLOAT, help="Sampling temperature.")
    top_p: float = setting(
        0.95, type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling mass."
    )
    max_new_tokens: int = setting(1024, type=options.POSITIVE_INT, help="Longest response, in tokens.")
    seed: int = setting(0, help="With the record id and sample index, decides each response's random draws.")

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("--num-samples and --max-new-tokens must be at least 1")
        if not self.temperature > 0:
            raise ValueError("--temperature must be above 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")


@dataclass(frozen=True)
class SampleBatch:
    """How many responses are generated at once: memory and speed, not what is drawn."""

    batch_size: int = setting(
        8,
        type=options.POSITIVE_INT,
        help="Responses generated together (left-padded prompts of similar length).",
    )


@dataclass(frozen=True, kw_only=True)
class SampleSettings(Sampling):
    """Everything that changes what ``sample`` writes (recorded in the manifest)."""

    chat_template: str | None = setting(
        None,
        help="Built-in template (plain, chatml, llama2) or a .jinja file. Default: the tokenizer's own, "
        "else the plain fallback.",
    )
    chunk_size: int = setting(
        64, type=options.POSITIVE_INT, help="Records per part (the unit of resuming and sharding)."
    )
    dtype: str = setting(
        "auto",
        type=options.MODEL_DTYPES,
        help="Weights' dtype for generation: auto is bfloat16 on GPUs that support it, float32 elsewhere "
        "(as represent's).",
    )
    stop: tuple[str, ...] = setting(
        (),
        help="Repeatable: a text that ends a response (and is not kept). Besides these, a response always "
        "ends where the model begins the user's next turn as the chat template writes it (e.g. 'User:' at "
        "the start of a line in the plain template, whatever the spacing); the summary counts those.",
    )
    engine: str = setting(
        "hf",
        type=click.Choice(ENGINES),
        help="hf: transformers, the reference. vllm: vLLM's sampler, one seeded request per response "
        "(extra [vllm], a GPU, one process).",
    )

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
    below ``top_p``, so at least one token (every token at ``top_p`` 1). The CDF runs in token-id
    order, not in probability order: logits computed in another batch differ by rounding, which
    can swap two tokens of near-equal probability; in probability order such a swap moves the draw
    whenever it involves the token at the uniform number, in id order only when that number lies
    within rounding of a boundary.

    On a CPU the nucleus is looked for among the top ``CANDIDATES`` first (sorting the whole
    vocabulary is what made sampling slower than ``generate``'s own); on a GPU the whole vocabulary
    is sorted at once, since choosing rows by their nucleus would wait for the GPU at every step.
    """
    scaled = logits.double() / temperature  # double: the probabilities as exact as the logits
    log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    if top_p >= 1:
        return _inverse_cdf((scaled - log_total).exp(), uniforms.double())
    vocab = scaled.shape[-1]
    tokens = torch.empty(len(scaled), dtype=torch.long, device=scaled.device)
    rows = torch.arange(len(scaled), device=scaled.device)
    sizes = [k for k in CANDIDATES if k < vocab] if scaled.device.type == "cpu" else []
    for k in [*sizes, vocab]:
        candidates = logits[rows]  # ranked in the logits' own precision (float32: half the work)
        ids = candidates.topk(k, dim=-1).indices if k < vocab else candidates.argsort(dim=-1, descending=True)
        probs = (scaled[rows].gather(1, ids) - log_total[rows]).exp()
        in_nucleus = probs.cumsum(-1) - probs < top_p
        if k == vocab:  # every row left: the nucleus in id order is the whole vocabulary, masked
            masses = torch.zeros_like(probs).scatter_(1, ids, probs * in_nucleus)
            tokens[rows] = _inverse_cdf(masses, uniforms[rows].double())
            break
        complete = probs.sum(-1) >= top_p  # the (k + 1)-th token is outside the nucleus
        by_id, order = ids.sort(dim=-1)
        masses = (probs * in_nucleus).gather(1, order)
        picked = _inverse_cdf(masses, uniforms[rows].double())
        tokens[rows[complete]] = by_id.gather(1, picked[:, None])[complete, 0]
        rows = rows[~complete]
        if not len(rows):
            break
    return tokens


def _inverse_cdf(masses: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the index at which the cumulative ``masses`` first exceed the row's uniform number
    times their total (an index of zero mass is never picked)."""
    cumulative = masses.cumsum(-1)
    threshold = uniforms[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, threshold, right=True)[:, 0].clamp(max=masses.shape[-1] - 1)


class RowSampler:
    """A logits processor that samples each row with its own random numbers and leaves only the
    drawn token possible, so ``generate`` in greedy mode emits it (transformers' own sampling shares
    one random stream across the batch, which would tie a response to its batch-mates). Row i's
    numbers come from a generator seeded with ``seeds[i]``, one per generated token, drawn at once."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, max_new_tokens: int) -> None:
        self.uniforms = torch.stack(
            [
                torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                for s in seeds
            ]
        )
        self.temperature = temperature
        self.top_p = top_p
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.uniforms.device != scores.device:  # once: the numbers wait on the model's device
            self.uniforms = self.uniforms.to(scores.device)
        tokens = nucleus_draw(scores, self.uniforms[:, self.step], self.temperature, self.top_p)
        self.step += 1
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


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


@dataclass(frozen=True)
class NextTurnStop:
    """Where a response ends because the model began the user's next turn itself: at the opening
    the chat template writes for that turn (:func:`fusion_train.chat.user_turn_opening`), whatever
    whitespace comes before it.

    An opening that starts with a token the response text never shows (``<|im_start|>``,
    ``<start_of_turn>``) stops generation at that token, like an end-of-turn token. Any other
    (``User:``) is looked for in the text: at the start of the response or of a line when the
    template breaks the line before it, anywhere otherwise."""

    opening: TurnOpening
    token_id: int | None  # the opening's hidden first token, or None: the opening is looked for in the text

    @classmethod
    def of(cls, tokenizer: Any, template: str) -> NextTurnStop | None:
        opening = user_turn_opening(tokenizer, template)
        if opening is None:
            return None
        first = tokenizer(opening.text, add_special_tokens=False)["input_ids"][0]
        hidden = tokenizer.decode([first], skip_special_tokens=True) == ""
        return cls(opening, first if hidden else None)

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """The opening in a response's text, with the whitespace before it (None for a token)."""
        if self.token_id is not None:
            return None
        return re.compile(
            (r"(?:\A|\n)\s*" if self.opening.after_line_break else r"\s*") + re.escape(self.opening.text)
        )

    @property
    def engine_stop(self) -> str | None:
        """A literal stop text for the engines' own stop-string matching, which ends generation
        early on the usual spacing (a line break right before the opening); the response is cut
        at the exact rule afterwards (:meth:`ChatGenerator.ending`)."""
        if self.token_id is not None:
            return None
        return ("\n" if self.opening.after_line_break else "") + self.opening.text

    def record(self) -> dict[str, Any]:
        """What the manifest holds: the opening, and whether it stops as a token."""
        return {**asdict(self.opening), "token": self.token_id is not None}


class Ending(NamedTuple):
    """A response as written: its text, its generated tokens (the end-of-turn token not counted),
    why it ended, and whether it ended where the model began the user's next turn."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" | "length"
    next_turn: bool


@dataclass
class ChatGenerator:
    """What both engines share: the prompt in the model's chat template, and where an answer ends.
    An engine's ``answer(texts, seeds)`` gives an :class:`Ending` for each rendered prompt, drawing
    response i's random numbers from ``seeds[i]`` alone."""

    tokenizer: Any
    template: str
    settings: SampleSettings
    stop_ids: list[int]
    next_turn: NextTurnStop | None = field(default=None, kw_only=True)
    schedules_itself: ClassVar[bool] = False  # True: give it a whole part, it batches on its own

    def render(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(
            list(prompt.messages), chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def prompt_ids(self, text: str) -> list[int]:
        """A rendered prompt's tokens (the template already holds the special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer(self, texts: list[str], seeds: list[int]) -> list[Ending]:
        raise NotImplementedError

    @property
    def end_ids(self) -> list[int]:
        """Tokens at which generation ends: the end-of-turn tokens, and a next turn's opening token."""
        turn = self.next_turn.token_id if self.next_turn else None
        return self.stop_ids if turn is None or turn in self.stop_ids else [*self.stop_ids, turn]

    @property
    def engine_stops(self) -> list[str]:
        """Stop texts for the engine: ``--stop``'s, and the literal form of a next turn's opening."""
        turn = self.next_turn.engine_stop if self.next_turn else None
        return [*self.settings.stop, *([turn] if turn else [])]

    def ending(self, generated: list[int], stopped: bool = False) -> Ending:
        """The response in what an engine generated after the prompt: cut before the first
        end-of-turn token (or a next turn's opening token), or after the tokens of the first stop
        text or next turn's opening in the text (whose text is dropped, with the whitespace before
        an opening). ``stopped``: the engine says it stopped before the length limit."""
        end = next((i for i, token in enumerate(generated) if token in self.end_ids), None)
        tokens = generated if end is None else generated[:end]
        next_turn = end is not None and generated[end] not in self.stop_ids
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        found = self.stop_at(text)
        if found is not None:  # a stop text or the next turn: keep what came before it
            tokens = tokens[: self.tokens_to_stop(tokens)]
            (cut, next_turn), end = found, len(tokens)
            text = text[:cut]
        return Ending(text, len(tokens), "stop" if end is not None or stopped else "length", next_turn)

    def stop_at(self, text: str) -> tuple[int, bool] | None:
        """Where the first stop text or next turn's opening begins in ``text``, and whether it is
        the opening; None when neither is there."""
        found = [(i, False) for i in (text.find(s) for s in self.settings.stop) if i >= 0]
        pattern = self.next_turn.pattern if self.next_turn else None
        match = pattern.search(text) if pattern else None
        if match:
            found.append((match.start(), True))
        return min(found) if found else None

    def tokens_to_stop(self, tokens: list[int]) -> int:
        """The fewest leading tokens whose text holds a stop text or a next turn's opening (their own
        tokens are counted): found by bisection, since holding one only starts, never stops, as
        tokens are added."""
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

    model: torch.nn.Module = field(kw_only=True)

    @torch.inference_mode()
    def answer(self, texts: list[str], seeds: list[int]) -> list[Ending]:
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        config = GenerationConfig(
            do_sample=False,  # the drawn token is the only one RowSampler leaves possible
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=self.engine_stops or None,
        )
        s = self.settings
        sampler = RowSampler(seeds, s.temperature, s.top_p, s.max_new_tokens)
        output = self.model.generate(
            **batch,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            tokenizer=self.tokenizer,
        )
        return [self.ending(row) for row in output[:, batch["input_ids"].shape[1] :].tolist()]


@dataclass
class VllmGenerator(ChatGenerator):
    """vLLM's own sampler (``--engine vllm``), one request per response with its own seed, so a
    response's draws do not depend on the requests scheduled with it. vLLM samples in probability
    order, the HF engine in token-id order (:func:`nucleus_draw`): both draw from the same
    distribution, but from other numbers, so the two engines write different responses."""

    llm: Any = field(kw_only=True)  # vllm.LLM
    schedules_itself: ClassVar[bool] = True

    def answer(self, texts: list[str], seeds: list[int]) -> list[Ending]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.settings
        prompts = [TokensPrompt(prompt_token_ids=self.prompt_ids(text)) for text in texts]
        params = [
            SamplingParams(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                seed=seed,
                stop=self.engine_stops or None,
                stop_token_ids=self.end_ids,
                skip_special_tokens=True,
            )
            for seed in seeds
        ]
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
    shared = {"next_turn": plan.next_turn}
    if settings.engine == "vllm":
        llm = vllm_engine(model_path, engine_settings(settings, tensor_parallel_size), trust_remote_code)
        return VllmGenerator(tokenizer, plan.template, settings, stop_ids, llm=llm, **shared)
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inference = engine_settings(settings)
    model = load_model(model_path, dtype=inference.resolved_dtype(), trust_remote_code=trust_remote_code)
    return HfGenerator(
        tokenizer, plan.template, settings, stop_ids, model=model.to(resolve_device("auto")), **shared
    )


@dataclass
class SampleSummary:
    records: int = 0
    responses: int = 0
    generated_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    next_turn_stops: int = 0  # responses cut where the model began the user's next turn itself
    seconds: float = 0.0

    def add(self, other: dict[str, Any]) -> None:
        for key in ("records", "responses", "generated_tokens", "next_turn_stops"):
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
    next_turn: NextTurnStop | None


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
    check_model_directory(model_path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    template, template_source = resolve_chat_template(tokenizer, settings.chat_template)
    next_turn = NextTurnStop.of(tokenizer, template)
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
            "next_turn": next_turn.record() if next_turn else None,
        },
        "settings": settings.record(),
        "dtype": str(engine_settings(settings).resolved_dtype()).removeprefix("torch."),
    }
    return SamplingPlan(prompts, tokenizer, template, settings, manifest, next_turn)


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
    plan = plan_sampling(
        model_path,
        data_path,
        settings,
        source_name=source_name,
        limit=limit,
        trust_remote_code=trust_remote_code,
    )
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
    answers: dict[tuple[int, int], Ending] = {}
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        seeds = [sample_seed(settings.seed, prompts[r].id, j) for r, j in batch]
        for job, answer in zip(batch, generator.answer([texts[r] for r, _ in batch], seeds), strict=True):
            answers[job] = answer
    rows = []
    for r, j in jobs:
        answer, p = answers[r, j], prompts[r]
        rows.append(
            {
                "id": p.id,
                "domain": p.domain,
                "source": source,
                "sample_index": j,
                "prompt": list(p.messages),
                "reference": p.reference,
                "response": answer.text,
                "num_tokens": answer.num_tokens,
                "finish_reason": answer.finish_reason,
            }
        )
    stats = {
        "records": len(prompts),
        "responses": len(rows),
        "generated_tokens": sum(row["num_tokens"] for row in rows),
        "finish_reasons": dict(Counter(row["finish_reason"] for row in rows)),
        "next_turn_stops": sum(answer.next_turn for answer in answers.values()),
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
@options_from(SampleBatch)
@click.option("--limit", type=options.POSITIVE_INT, default=None, help="Use only the first N records.")
@click.option(
    "--source-name",
    default=None,
    help="The name responses are stored under. Default: the model directory's name.",
)
@click.option(
    "--shard",
    default=None,
    help="i/n: process every n-th part starting at i. Default: RANK/WORLD_SIZE of the launcher, else everything.",
)
@options_from(SampleSettings)
@options_from(InferenceSettings, ["tensor_parallel_size"])
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model directory.")
@launch_options
def sample_command(**params: Any) -> None:
    """Sample several responses per prompt from one model (implicit fusion, FuseChat-3.0 / WRPO).

    With --nproc N the parts are split between N processes (one per GPU, or CPU processes; with
    --hostfile, on every node); what is written does not change."""
    p = SimpleNamespace(**params)
    settings = settings_from(SampleSettings, params)
    plan_options = {"source_name": p.source_name, "limit": p.limit, "trust_remote_code": p.trust_remote_code}

    def check() -> None:
        check_before_launch(engine_settings(settings, p.tensor_parallel_size))
        plan = plan_sampling(p.model_path, p.data_path, settings, **plan_options)
        check_output(Path(p.out_dir), plan.manifest)

    arguments = {
        "model_path": p.model_path,
        "data_path": p.data_path,
        "out_dir": p.out_dir,
        "settings": settings,
        "batch_size": p.batch_size,
        "shard": parse_shard(p.shard),
        "tensor_parallel_size": p.tensor_parallel_size,
        **plan_options,
    }
    StageCall(sample, arguments, Path(p.out_dir), report_sampled).from_command(params, check)


def report_sampled(out: Path, summary: SampleSummary | None) -> None:
    """What `sample` prints at the end: the counts, or that only this shard's parts are done."""
    if summary is None:
        echo_shard_done(out)
        return
    click.echo(
        f"{out}: {summary.responses} responses to {summary.records} prompts, {summary.generated_tokens} "
        f"tokens, finish reasons {summary.finish_reasons}; {summary.next_turn_stops} cut where the model began "
        "the user's next turn itself."
    )


if __name__ == "__main__":
    sample_command(prog_name="fusion-train sample")
