"""A model ready to score on this rank, for represent and evaluate: device, dtype, attention,
ZeRO-3 partitioning or a device map, and the scoring of supervised positions.

Where the weights live:
- ``device``: the whole model on this rank's device (``auto``: its GPU if it has one, else the
  CPU), the usual case and the reference.
- ``deepspeed="zero3"``: every rank holds 1/N of the parameters (ZeRO-3 partitioned inference,
  as transformers documents it: ``HfDeepSpeedConfig`` before loading, ``deepspeed.initialize``
  without an optimizer), for models larger than one GPU. Each forward pass gathers the layers'
  weights from all ranks, so every rank must run as many forward passes as the others: a rank
  out of data joins the others' passes with a one-token batch (:meth:`Scorer.finish`).
- ``device_map="auto"``: accelerate spreads the model over the GPUs of this one process.

Log-softmax always runs in float32, whatever the weights' dtype.
"""

from __future__ import annotations

import contextlib
import importlib.util
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F

from fusion_train import options
from fusion_train.encoding import EncodedExample
from fusion_train.errors import UserError
from fusion_train.launch import Rank, any_rank, parameters_held, resolve_device, resolve_dtype
from fusion_train.models import attention_implementation, load_model, output_rows, release_memory
from fusion_train.settings import setting, settings_from

LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits materialised at once when scoring
ENGINES = ("hf", "vllm")
# vLLM reports log-probabilities over every row of the output embedding; asking for a few more
# than k leaves k after the padded rows (ids >= len(tokenizer)) are dropped.
VLLM_EXTRA_LOGPROBS = 8
PARTITIONED = ("zero3", "zero3-offload")


class InferenceSettingsError(UserError, ValueError):
    """Options that cannot place the model as asked."""


@dataclass(frozen=True)
class InferenceSettings:
    """Where and how a model runs; these change speed and memory, not what is computed (within
    the float precision of ``dtype``, which is recorded with the results)."""

    device: str = setting(
        "auto",
        help="auto (this rank's GPU if there is one, else the CPU), cpu, cuda (this rank's GPU) or cuda:N.",
    )
    dtype: str = setting(
        "auto",
        type=options.MODEL_DTYPES,
        help="Weights' dtype: auto is bfloat16 on GPUs that support it, float32 elsewhere. Log-softmax "
        "always runs in float32.",
    )
    attn_implementation: str = setting("auto", type=options.ATTENTION_KERNELS, help=options.ATTENTION_HELP)
    deepspeed: str | None = setting(
        None,
        type=click.Choice(PARTITIONED),
        help="ZeRO-3 partitioned inference for models larger than one GPU: each of the --nproc ranks holds "
        "1/N of the weights (zero3-offload: in CPU memory) and scores its own share.",
    )
    device_map: str | None = setting(
        None,
        type=click.Choice(["auto"]),
        help="Spread the model over the GPUs of one process (accelerate's big-model placement).",
    )
    engine: str = setting(
        "hf",
        type=click.Choice(ENGINES),
        help="hf: transformers, the reference. vllm: vLLM's prompt log-probabilities (extra [vllm], a GPU, "
        "one process).",
    )
    tensor_parallel_size: int = setting(
        1, type=options.POSITIVE_INT, help="--engine vllm: GPUs each model is split over."
    )

    def check(self) -> None:
        """Refuse settings that cannot place a model here. Settings that passed are not checked
        again in this process (a stage checks its settings before it starts anything, then
        ``load_scorer`` and ``Scorer.load`` are handed the same ones; for a library caller they
        are the check)."""
        if self in _CHECKED:
            return
        self._check()
        _CHECKED.add(self)

    def _check(self) -> None:
        if self.engine not in ENGINES:
            raise InferenceSettingsError(f"--engine {self.engine}: one of {', '.join(ENGINES)}.")
        if self.engine == "vllm":
            self._check_vllm()
        elif self.tensor_parallel_size != 1:
            raise InferenceSettingsError("--tensor-parallel-size is vLLM's; add --engine vllm or drop it.")
        if self.deepspeed is not None and self.deepspeed not in PARTITIONED:
            raise InferenceSettingsError(
                f"--deepspeed {self.deepspeed}: inference takes {' or '.join(PARTITIONED)} (ZeRO-3 partitions "
                "the weights; ZeRO-1/2 only partition optimizer states and gradients, which inference has not)."
            )
        if self.device_map is not None and self.device_map != "auto":
            raise InferenceSettingsError(f"--device-map {self.device_map}: only auto is supported.")
        if self.device_map and self.deepspeed:
            raise InferenceSettingsError(
                "--device-map and --deepspeed place the weights two ways; choose one."
            )
        if self.device_map and self.device not in ("auto", "cuda"):
            raise InferenceSettingsError(
                f"--device-map auto spreads the model over every visible GPU; drop --device {self.device}."
            )

    def _check_vllm(self) -> None:
        if self.deepspeed or self.device_map:
            raise InferenceSettingsError(
                "--engine vllm places the model itself (--tensor-parallel-size); drop --deepspeed/--device-map."
            )
        if Rank.of_this_process().world_size > 1:
            raise InferenceSettingsError(
                "--engine vllm runs in one process that drives its GPUs; drop --nproc, use --tensor-parallel-size."
            )
        if self.device == "cpu" or not torch.cuda.is_available():
            raise InferenceSettingsError("--engine vllm needs a CUDA GPU; use the default engine (hf) here.")
        if importlib.util.find_spec("vllm") is None:
            raise InferenceSettingsError(
                "--engine vllm: vLLM is not installed; pip install 'fusechat-toolkit[vllm]'."
            )

    def resolved_dtype(self, rank: Rank | None = None) -> torch.dtype:
        """The dtype the weights get on this rank's device."""
        return resolve_dtype(self.dtype, resolve_device(self.device, rank))


# Settings whose check() passed in this process: what they are checked against (the devices, the
# process's rank, vLLM's presence) stays as it is for the process's life.
@dataclass(frozen=True)
class Batching:
    """How many tokens one forward pass takes (represent, evaluate): memory and speed, not what
    is computed."""

    batch_tokens: int = setting(
        4096, type=options.POSITIVE_INT, help="Padded tokens per forward batch (length-sorted)."
    )


_CHECKED: weakref.WeakSet[InferenceSettings] = weakref.WeakSet()


def inference_settings(params: dict[str, Any]) -> InferenceSettings:
    """The :class:`InferenceSettings` of a command's parsed parameters."""
    return settings_from(InferenceSettings, params)


def check_before_launch(settings: InferenceSettings) -> None:
    """What a command checks once before it starts ``--nproc`` ranks, instead of failing in each."""
    if settings.engine == "vllm":
        raise InferenceSettingsError(
            "--engine vllm runs in one process that drives its GPUs; drop --nproc, use --tensor-parallel-size."
        )
    settings.check()


def vllm_dtype(settings: InferenceSettings) -> str:
    """The weights' dtype name vLLM is given (``auto``: bf16 on GPUs that support it)."""
    return str(resolve_dtype(settings.dtype, torch.device("cuda"))).removeprefix("torch.")


def vllm_engine(
    path: str | Path, settings: InferenceSettings, trust_remote_code: bool, **engine_args: Any
) -> Any:
    """A ``vllm.LLM`` for the model at ``path`` with its own tokenizer, in ``settings``' dtype over
    ``tensor_parallel_size`` GPUs (checked settings: vLLM is installed and a GPU is there)."""
    from vllm import LLM

    release_memory()  # vLLM starts only with its share of the GPU's memory free
    return LLM(
        model=str(path),
        tokenizer=str(path),
        dtype=vllm_dtype(settings),
        tensor_parallel_size=settings.tensor_parallel_size,
        seed=0,
        trust_remote_code=trust_remote_code,
        **engine_args,
    )


def inference_zero3_config(dtype: torch.dtype, offload: bool) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO-3 inference: parameters partitioned, no optimizer."""
    zero: dict[str, Any] = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
    }


def batches_by_length(
    examples: Sequence[EncodedExample], batch_tokens: int
) -> Iterator[list[EncodedExample]]:
    """Group length-sorted examples so that each padded batch holds at most ``batch_tokens``."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    batch: list[EncodedExample] = []
    for example in ordered:
        longest = len(example.input_ids)  # sorted, so the newest is the longest
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


@dataclass
class ScoredExample:
    example: EncodedExample
    topk_ids: np.ndarray  # [n, k] int32
    topk_logprobs: np.ndarray  # [n, k] float32
    target_logprob: np.ndarray  # [n] float32


class Scorer:
    """A causal LM placed as ``InferenceSettings`` ask, scoring batches on this rank."""

    def __init__(self, model: torch.nn.Module, device: torch.device, zero: Any = None) -> None:
        """``zero``: DeepSpeed's ZeRO-3 parameter manager when the weights are partitioned."""
        self.model, self.device, self.zero = model, device, zero

    @property
    def partitioned(self) -> bool:
        return self.zero is not None

    @property
    def dtype_name(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @classmethod
    def load(
        cls,
        path: str | Path,
        settings: InferenceSettings,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> Scorer:
        settings.check()
        rank = Rank.of_this_process()
        device = resolve_device(settings.device, rank)
        dtype = resolve_dtype(settings.dtype, device)
        attention = attention_implementation(settings.attn_implementation, device, dtype)
        if settings.deepspeed:
            return cls._load_partitioned(
                path, settings, device, dtype, attention, gguf_file, trust_remote_code
            )
        if settings.device_map:
            model = load_model(
                path, gguf_file, dtype, trust_remote_code, attn_implementation=attention, device_map="auto"
            )
            return cls(model, model.get_input_embeddings().weight.device)
        device_map = {"": device} if device.type != "cpu" else None  # straight onto the GPU
        model = load_model(
            path, gguf_file, dtype, trust_remote_code, attn_implementation=attention, device_map=device_map
        )
        return cls(model, device)

    @classmethod
    def _load_partitioned(
        cls,
        path: str | Path,
        settings: InferenceSettings,
        device: torch.device,
        dtype: torch.dtype,
        attention: str | None,
        gguf_file: str | None,
        trust_remote_code: bool,
    ) -> Scorer:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        if not torch.distributed.is_initialized():
            raise InferenceSettingsError(
                "--deepspeed zero3 needs the process group; start the stage with it."
            )
        config = inference_zero3_config(dtype, settings.deepspeed == "zero3-offload")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        hf_config = HfDeepSpeedConfig(config)  # while it lives, from_pretrained loads each rank's share only
        model = load_model(path, gguf_file, dtype, trust_remote_code, attn_implementation=attention)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        del hf_config
        return cls(engine.module.eval(), device, zero=engine.optimizer)

    def parameters(self) -> dict[str, Any]:
        """Parameter elements in the model and held by each rank (call on every rank together)."""
        return parameters_held(self.model)

    @property
    def vocab_size(self) -> int:
        return output_rows(self.model)

    def batches(self, encoded: Sequence[EncodedExample], batch_tokens: int) -> list[list[EncodedExample]]:
        """Length-sorted batches of at most ``batch_tokens`` padded tokens."""
        return list(batches_by_length(encoded, batch_tokens))

    @torch.inference_mode()
    def score(
        self, batch: Sequence[EncodedExample], top_k: int, tokenizer_size: int, pad_id: int
    ) -> list[ScoredExample]:
        """Top-k log-probabilities at the supervised positions of one batch.

        Only the hidden states that predict supervised tokens go through the LM head, a slice at
        a time, so memory stays O(rows x vocab) for a bounded number of rows, whatever the batch.
        The log-softmax runs over the tokenizer's ids only: padded embedding rows are never reported.
        """
        self._start_forward(has_data=True)
        longest = max(len(e.input_ids) for e in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, example in enumerate(batch):
            input_ids[b, : len(example.input_ids)] = torch.tensor(example.input_ids)
            attention[b, : len(example.input_ids)] = 1
            rows += [b] * len(example.positions)
            cols += [p - 1 for p in example.positions]
            targets += [example.input_ids[p] for p in example.positions]
        hidden = self.model.base_model(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
        ).last_hidden_state
        with self._head() as (weight, bias):
            selected = hidden[
                torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)
            ]
            selected = selected.to(weight.device)
            target_ids = torch.tensor(targets, device=weight.device)
            slice_rows = max(1, LOGITS_BUDGET_BYTES // (4 * tokenizer_size))
            k = min(top_k, tokenizer_size)
            top_values, top_indices, target_values = [], [], []
            for start in range(0, selected.shape[0], slice_rows):
                logits = self._logits(selected[start : start + slice_rows], weight, bias)[:, :tokenizer_size]
                logprobs = torch.log_softmax(logits, dim=-1)
                values, indices = torch.topk(logprobs, k, dim=-1)
                top_values.append(values)
                top_indices.append(indices)
                target_values.append(logprobs.gather(1, target_ids[start : start + slice_rows, None])[:, 0])
        all_values = torch.cat(top_values).cpu().numpy()
        all_indices = torch.cat(top_indices).cpu().numpy().astype(np.int32)
        all_targets = torch.cat(target_values).cpu().numpy()

        scored, offset = [], 0
        for example in batch:
            n = len(example.positions)
            scored.append(
                ScoredExample(
                    example,
                    all_indices[offset : offset + n],
                    all_values[offset : offset + n],
                    all_targets[offset : offset + n],
                )
            )
            offset += n
        return scored

    def finish(self) -> None:
        """Under ZeRO-3, join the forward passes of the ranks that still have data until none has
        (every rank calls this once its own batches are done); otherwise nothing to do."""
        if not self.partitioned:
            return
        with torch.inference_mode():
            while self._start_forward(has_data=False):
                one_token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
                self.model.base_model(input_ids=one_token, attention_mask=torch.ones_like(one_token))
                with self._head():
                    pass

    def _start_forward(self, has_data: bool) -> bool:
        """Under ZeRO-3: whether any rank has data (then all run a forward pass together), and
        the start of that pass for DeepSpeed, whose hook on the whole model's forward does this
        (we run only the base model and the head)."""
        if not self.partitioned:
            return has_data
        if not any_rank(has_data):
            return False
        self.zero.get_param_coordinator().reset_step()
        return True

    @contextlib.contextmanager
    def _head(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The LM head's weight and bias, whole: under ZeRO-3 gathered once per batch (not once per
        slice of rows, whose number differs between ranks)."""
        head = self.model.get_output_embeddings()
        params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
        if self.partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                yield head.weight, getattr(head, "bias", None)
        else:
            yield head.weight, getattr(head, "bias", None)

    def _logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The LM head (and the final soft-capping some architectures use), in float32."""
        logits = F.linear(hidden, weight, bias).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits


class VllmScorer:
    """The same scores from vLLM (``--engine vllm``): the prompt log-probabilities of the token ids
    the HF engine would score, in one pass over a part (vLLM batches and schedules itself).

    ``prompt_logprobs=k`` with ``logprobs_mode="raw_logprobs"``: log-softmax of the model's own
    logits, before any logits processor. vLLM normalises over every row of the output
    embedding, the HF engine over the tokenizer's ids only: for models whose embedding is padded
    the two differ by the padded rows' probability mass (near zero in trained models), and
    padded ids are dropped from the top-k. Runs in one process; ``tensor_parallel_size`` GPUs.
    """

    def __init__(self, llm: Any, vocab_size: int, dtype_name: str, top_k: int) -> None:
        self.llm, self.vocab_size, self.dtype_name, self.top_k = llm, vocab_size, dtype_name, top_k
        self.device = torch.device("cuda")

    @classmethod
    def load(
        cls, path: str | Path, settings: InferenceSettings, top_k: int, trust_remote_code: bool
    ) -> VllmScorer:
        llm = vllm_engine(
            path,
            settings,
            trust_remote_code,
            max_logprobs=top_k + VLLM_EXTRA_LOGPROBS,
            logprobs_mode="raw_logprobs",
        )
        vocab_size = llm.llm_engine.model_config.get_vocab_size()
        return cls(llm, vocab_size, vllm_dtype(settings), top_k)

    def batches(self, encoded: Sequence[EncodedExample], batch_tokens: int) -> list[list[EncodedExample]]:
        return [list(encoded)] if encoded else []

    def score(
        self, batch: Sequence[EncodedExample], top_k: int, tokenizer_size: int, pad_id: int
    ) -> list[ScoredExample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        asked = top_k + VLLM_EXTRA_LOGPROBS
        params = SamplingParams(max_tokens=1, prompt_logprobs=asked, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(e.input_ids)) for e in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scored = []
        for example, output in zip(batch, outputs, strict=True):
            k = min(top_k, tokenizer_size)
            ids = np.zeros((len(example.positions), k), dtype=np.int32)
            values = np.zeros((len(example.positions), k), dtype=np.float32)
            targets = np.zeros(len(example.positions), dtype=np.float32)
            for row, position in enumerate(example.positions):
                entries = output.prompt_logprobs[
                    position
                ]  # id -> Logprob, the top `asked` and the token itself
                ranked = sorted(
                    (entry.rank, token, entry.logprob)
                    for token, entry in entries.items()
                    if entry.rank is not None and entry.rank <= asked and token < tokenizer_size
                )[:k]
                ids[row], values[row] = [t for _, t, _ in ranked], [v for _, _, v in ranked]
                targets[row] = entries[example.input_ids[position]].logprob
            scored.append(ScoredExample(example, ids, values, targets))
        return scored

    def finish(self) -> None:
        """Nothing to wait for: one process."""

    def parameters(self) -> dict[str, Any]:
        return {}


AnyScorer = Scorer | VllmScorer


def load_scorer(
    path: str | Path,
    settings: InferenceSettings,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    *,
    top_k: int,
) -> AnyScorer:
    """The engine ``settings`` ask for, loaded for this rank."""
    settings.check()
    if settings.engine == "vllm":
        if gguf_file:
            raise InferenceSettingsError(
                "--engine vllm reads model directories, not --gguf-file; use the hf engine."
            )
        return VllmScorer.load(path, settings, top_k, trust_remote_code)
    return Scorer.load(path, settings, gguf_file, trust_remote_code)
