"""The GPU check's figures, measured side by side in one run: part 2 of bench/gpu_check.sh.

    python -m bench.gpu_figures OUT.json [--dry-run] [--budget-s 200]

Models: SmolLM2-135M-, Llama-3.2-1B- and Gemma-3-270m-shaped, built from configs with random
weights (no weights travel), on a real tokenizer from the cache where it has one (the check
carries it; a smaller tokenizer leaves the model's extra rows unused, as a padded vocabulary).
Data: synthetic chats (nothing to download). Each figure reuses the project's own code and runs
in its own try block, so a failure is reported and the others still run:

- ``dtype_auto``: the dtype ``--dtype auto`` and an unset ``--bf16`` choose here (bf16 on a GPU);
- ``chunked_head``: the LM head and loss alone (``losses.head_loss_sums``) against the loss on the
  whole logits, at a 262,144-row vocabulary: peak CUDA memory above the inputs against the
  budget (the head's weight gradients plus 1/8 of the float32 logits) and step time;
- ``training_step``: ``FusionTrainer`` steps, fusion loss against CLM-only on the same batches;
- ``represent``: supervised tokens/s of ``represent`` against a plain forward pass, dtype auto;
- ``sample``: generated tokens/s of ``sample`` against ``model.generate`` with the same settings;
- ``varm``: ``varm-merge run --cuda`` of VaRM against mergekit's task_arithmetic.

``--dry-run``: the same figures on the CPU at tiny shapes, in seconds (CI runs it, so the script
cannot rot). OUT.json is rewritten after each figure: a run stopped at its time cap keeps what
it measured; a figure not started within ``--budget-s`` says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.gpu_report import SECTIONS
from bench.merge import PRESETS, build_models, run_case, write_configs
from bench.represent import peak_gpu_gib, plain_forward_seconds, synchronize
from bench.train import alternating_steps, head_problem, head_step, random_fused_rows
from fusion_train.chat import builtin_template
from fusion_train.implicit.sample import SampleSettings, load_generator, plan_sampling, sample
from fusion_train.inference import InferenceSettings
from fusion_train.launch import resolve_device, resolve_dtype
from fusion_train.models import release_memory
from fusion_train.registry_assets import cached_tokenizer_dir
from fusion_train.represent import RepresentSettings, represent
from fusion_train.storage import atomic_write_text
from fusion_train.train import FusionCollator, FusionTrainer
from fusion_train.training import resolve_bf16


@dataclass(frozen=True)
class Shape:
    label: str
    model_type: str  # transformers' config type
    sizes: dict[str, Any]
    tokenizer: str  # the real tokenizer it runs on where the cache has it (registry_assets)


SHAPES = [
    Shape("SmolLM2-135M", "llama", PRESETS["smollm2"], "smollm2"),
    # https://huggingface.co/meta-llama/Llama-3.2-1B config.json
    Shape(
        "Llama-3.2-1B",
        "llama",
        dict(
            vocab_size=128_256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            tie_word_embeddings=True,
        ),
        "smollm2",
    ),
    # https://huggingface.co/google/gemma-3-270m config.json
    Shape(
        "Gemma-3-270m",
        "gemma3_text",
        dict(
            vocab_size=262_144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            tie_word_embeddings=True,
        ),
        "qwen",
    ),
]
# The dry run's shapes: the same architectures, a few small layers, a small vocabulary.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # fmt: skip


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the GPU's, or the dry run's on the CPU."""

    shapes: list[Shape]
    chats: int  # synthetic chats for represent and sample
    answer_words: int
    max_length: int
    batch_tokens: int
    top_k: int
    head: tuple[int, int, int]  # N supervised positions, V rows, H hidden
    head_chunks: tuple[int, ...]  # --loss-chunk-tokens sizes
    head_repeats: int
    train_batch: tuple[int, int]  # sequences x tokens per micro-batch
    train_steps: int  # step pairs after a warm-up pair
    prompts: int
    num_samples: int
    max_new_tokens: int
    sample_batch: int
    merge_preset: str  # bench/merge.py's
    merge_repeats: int
    real_tokenizers: bool


GPU = Scale(SHAPES, chats=128, answer_words=220, max_length=1024, batch_tokens=16_384, top_k=10,
            head=(8192, 262_144, 640), head_chunks=(256, 2048), head_repeats=3, train_batch=(4, 1024),
            train_steps=4, prompts=16, num_samples=4, max_new_tokens=64, sample_batch=32,
            merge_preset="smollm2", merge_repeats=2, real_tokenizers=True)  # fmt: skip
DRY_RUN = Scale([replace(s, sizes={**s.sizes, **TINY}) for s in SHAPES], chats=6, answer_words=24,
                max_length=256, batch_tokens=1024, top_k=4, head=(256, 4096, 64), head_chunks=(32, 128),
                head_repeats=1, train_batch=(2, 64), train_steps=1, prompts=2, num_samples=2,
                max_new_tokens=4, sample_batch=4, merge_preset="small", merge_repeats=1,
                real_tokenizers=False)  # fmt: skip
TEXT = (
    "the model answers each question with care and a short list of steps fusion merges knowledge of "
    "several sources into one pivot tokens bytes vocabulary naïve café 東京 😀 2026 3.14 def f(x): return"
)


@dataclass
class Figure:
    """One figure's section of the report: rows of numbers, notes, what was left out and why."""

    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Run:
    """What the figures share: sizes, device, the dtype ``auto`` gives, data and models."""

    scale: Scale
    root: Path
    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    models: dict[str, Path] = field(default_factory=dict)
    tokenizers: dict[str, tuple[Any, str]] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype("auto", self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def data(self) -> Path:
        path = self.root / "chats.jsonl"
        if not path.exists():
            write_chats(path, self.scale.chats, self.scale.answer_words)
        return path

    def tokenizer(self, shape: Shape) -> tuple[Any, str]:
        """The shape's real tokenizer from the cache, else a byte-level stand-in; and its description."""
        from transformers import AutoTokenizer

        if shape.label not in self.tokenizers:
            cached = cached_tokenizer_dir(shape.tokenizer) if self.scale.real_tokenizers else None
            tokenizer = AutoTokenizer.from_pretrained(cached) if cached else byte_tokenizer()
            name = shape.tokenizer if cached else "byte-level stand-in"
            self.tokenizers[shape.label] = tokenizer, f"{name} ({len(tokenizer):,} ids)"
        return self.tokenizers[shape.label]

    def model_dir(self, shape: Shape) -> Path:
        """The shape's random model in this run's dtype, saved once with its tokenizer."""
        if shape.label not in self.models:
            tokenizer, _ = self.tokenizer(shape)
            out = self.root / "models" / shape.label
            model = random_model(shape, tokenizer, self.device, self.dtype)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            del model
            release_memory()
            self.models[shape.label] = out
        return self.models[shape.label]


def byte_tokenizer() -> Any:
    """A byte-level BPE without merges (every byte one token) with ChatML's special tokens: the
    kind of tokenizer SmolLM2's and Qwen's are, small enough for the dry run's tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=builtin_template("chatml"))  # fmt: skip


def random_model(shape: Shape, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The shape's model with random weights, made on ``device`` (a 1B model in seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if len(tokenizer) > shape.sizes["vocab_size"]:
        raise ValueError(
            f"{shape.label}: {len(tokenizer)} token ids do not fit its {shape.sizes['vocab_size']} rows"
        )
    config = AutoConfig.for_model(shape.model_type, **shape.sizes, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def write_chats(path: Path, records: int, answer_words: int) -> None:
    """Synthetic chats: a short question and an answer of ``answer_words / 2`` to ``answer_words`` words."""
    rng, words = random.Random(0), TEXT.split()
    rows = [
        {"messages": [
            {"role": "user", "content": f"Question {i}: {' '.join(rng.choices(words, k=12))}?"},
            {"role": "assistant",
             "content": " ".join(rng.choices(words, k=rng.randint(answer_words // 2, answer_words))) + "."},
        ]}
        for i in range(records)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """The time of what runs inside (the device synchronised), and on a GPU its peak allocated
    memory: ``peak_mib`` in all and ``extra_mib`` above what was allocated at the start."""
    result: dict[str, Any] = {"peak_mib": None, "extra_mib": None}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    yield result
    synchronize(device)
    result["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mib=peak / 2**20, extra_mib=(peak - base) / 2**20)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def per_shape(run: Run, figure: Figure, measure: Callable[[Shape], dict[str, Any]]) -> None:
    """A row per model shape; a shape that fails gets its error in its row, the others still run."""
    for shape in run.scale.shapes:
        try:
            figure.rows.append({"model": shape.label, **measure(shape)})
        except Exception as error:  # reported in the figure, the traceback in the log
            traceback.print_exc()
            figure.rows.append({"model": shape.label, "error": one_line(error)})
        release_memory()


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:2000]


# --------------------------------------------------------------------------- the figures


def dtype_auto(run: Run, figure: Figure) -> None:
    """What ``--dtype auto`` (inference stages) and an unset ``--bf16`` (training) resolve to here."""
    bf16 = resolve_bf16(None)
    for what, dtype in (("represent, evaluate, score: --dtype auto", run.dtype),
                        ("train, sft, dpo: --bf16 unset", torch.bfloat16 if bf16 else torch.float32)):  # fmt: skip
        figure.rows.append({"what": what, "device": str(run.device), "dtype": str(dtype).removeprefix("torch."),
                            "bits": torch.finfo(dtype).bits})  # fmt: skip
    if not run.on_gpu:
        figure.notes.append("no GPU here: auto is float32 (bf16 on GPUs that support it)")


def chunked_head(run: Run, figure: Figure) -> None:
    """The chunked head against the loss on the whole logits (bench/train.py's ``sparse`` way, the
    previous training path), forward + backward from hidden states [N, H] and a head [V, H]."""
    n, vocab, hidden = run.scale.head
    problem = head_problem(n, vocab, hidden, run.scale.top_k, device=run.device, dtype=run.dtype)
    itemsize = torch.finfo(run.dtype).bits // 8
    logits_mib = n * vocab * 4 / 2**20
    # every way ends with the head's gradient in the weights' dtype; the chunked head also holds
    # a float32 one from forward to backward
    gradients_mib = vocab * hidden * (4 + (itemsize if itemsize != 4 else 0)) / 2**20
    budget_mib = gradients_mib + logits_mib / 8
    figure.notes.append(
        f"N = {n:,} positions, V = {vocab:,} rows, H = {hidden}, top-{run.scale.top_k}, {run.dtype_name}; "
        f"float32 logits [N, V] = {logits_mib:,.0f} MiB; budget = the head's weight gradients "
        f"({gradients_mib:,.0f} MiB) + 1/8 of the float32 logits = {budget_mib:,.0f} MiB"
    )
    ways = [("chunked", tokens) for tokens in run.scale.head_chunks] + [("sparse", 0)]
    times: dict[tuple[str, int], float] = {}
    for way, tokens in ways:
        results = []
        for _ in range(run.scale.head_repeats + 1):  # the first warms up
            problem[0].grad = problem[1].grad = None
            with measured(run.device) as result:
                result["loss"] = head_step(way, *problem, chunk_tokens=tokens)  # the logits way ignores it
            results.append(result)
        times[way, tokens] = statistics.median(r["seconds"] for r in results[1:]) * 1000
        extra = results[-1]["extra_mib"]
        figure.rows.append({
            "way": f"chunked head, {tokens}-token chunks" if tokens else "loss on the whole logits",
            "extra MiB": extra, "beyond gradients MiB": None if extra is None else extra - gradients_mib,
            "budget MiB": budget_mib, "within budget": None if extra is None else extra <= budget_mib,
            "step ms": times[way, tokens], "loss": results[-1]["loss"],
        })  # fmt: skip
    for row, way in zip(figure.rows, ways, strict=True):
        row["time vs logits"] = ratio(times[way], times["sparse", 0])
    if not run.on_gpu:
        figure.skipped.append(
            "peak memory: torch.cuda.max_memory_allocated needs a GPU (the dry run times the ways)"
        )


def training_step(run: Run, figure: Figure) -> None:
    """``FusionTrainer.compute_loss`` + backward + AdamW, lm weight 0.9 (fusion) against 1.0 (CLM
    only) on the same random micro-batches, back to back (bench/train.py's ``alternating_steps``)."""
    from transformers import TrainingArguments

    sequences, length = run.scale.train_batch
    figure.notes.append(
        f"micro-batch {sequences} x {length} tokens, all supervised, top-{run.scale.top_k} targets; weights in "
        f"{run.dtype_name}, plain AdamW (DeepSpeed's fp32 master weights left out: the same for both modes); "
        f"medians over {run.scale.train_steps} step pairs after a warm-up pair; goal <= 1.10x"
    )

    def measure(shape: Shape) -> dict[str, Any]:
        tokenizer, _ = run.tokenizer(shape)
        vocab = shape.sizes["vocab_size"]
        model = random_model(shape, tokenizer, run.device, run.dtype).train()
        args = TrainingArguments(output_dir=str(run.root / "trainer"), report_to=[], use_cpu=not run.on_gpu)
        trainer = FusionTrainer(model=model, args=args, lm_weight=0.9, temperature=1.0, tokenizer_size=vocab)
        collate = FusionCollator(0)
        batches = [
            {k: v.to(run.device) for k, v in collate(random_fused_rows(vocab, sequences, length,
                                                                      run.scale.top_k, seed=i)).items()}
            for i in range(run.scale.train_steps + 1)
        ]  # fmt: skip
        results = alternating_steps(trainer, model, batches, lambda: measured(run.device))
        del model, trainer
        clm, fusion = results[1.0], results[0.9]
        clm_ms, fusion_ms = (statistics.median(r["seconds"] for r in rs) * 1000 for rs in (clm, fusion))
        peaks = [
            None if rs[0]["peak_mib"] is None else max(r["peak_mib"] for r in rs) / 1024
            for rs in (clm, fusion)
        ]
        return {
            "CLM-only ms": clm_ms, "fusion ms": fusion_ms,
            "time ratio": statistics.median(f["seconds"] / c["seconds"] for c, f in zip(clm, fusion, strict=True)),
            "fusion tokens/s": sequences * (length - 1) / fusion_ms * 1000,
            "CLM-only peak GiB": peaks[0], "fusion peak GiB": peaks[1], "memory ratio": ratio(peaks[1], peaks[0]),
        }  # fmt: skip

    per_shape(run, figure, measure)
    if not run.on_gpu:
        figure.skipped.append("peak memory: measured on a GPU only")


def represent_figure(run: Run, figure: Figure) -> None:
    """``represent`` (encoding, scoring, writing: its parts' own timers) against a plain batched
    forward pass over the same batches (bench/represent.py), both with ``--dtype auto``."""
    settings = RepresentSettings(top_k=run.scale.top_k, max_length=run.scale.max_length, chunk_size=64)
    inference = InferenceSettings(device="auto", dtype="auto")
    figure.notes.append(
        f"{run.scale.chats} synthetic chats, --max-length {run.scale.max_length}, top-{run.scale.top_k}, "
        f"--batch-tokens {run.scale.batch_tokens:,}; goal ratio >= 0.85"
    )

    def measure(shape: Shape) -> dict[str, Any]:
        model_dir = run.model_dir(shape)
        peak_gpu_gib()  # resets the peak
        plain = plain_forward_seconds(model_dir, run.data, settings, run.scale.batch_tokens, inference)
        plain_peak = peak_gpu_gib()
        summary = represent(model_dir, run.data, run.root / "represent" / shape.label, settings, inference=inference,
                            batch_tokens=run.scale.batch_tokens, progress=False)  # fmt: skip
        if summary is None:
            raise RuntimeError("represent returned no summary")
        tokens = summary.supervised_tokens
        return {
            "tokenizer": run.tokenizer(shape)[1], "dtype": summary.placement["dtype"], "supervised tokens": tokens,
            "represent tokens/s": tokens / summary.seconds, "plain forward tokens/s": tokens / plain,
            "ratio": plain / summary.seconds, "represent peak GiB": peak_gpu_gib(), "plain peak GiB": plain_peak,
        }  # fmt: skip

    per_shape(run, figure, measure)
    if not run.on_gpu:
        figure.skipped.append("peak memory: measured on a GPU only")


def sample_figure(run: Run, figure: Figure) -> None:
    """``sample`` (its own RowSampler, seeded per response) against ``model.generate``'s own
    sampling, same prompts, batch size, temperature, top-p and length; tokens counted the same way."""
    from transformers import GenerationConfig

    s = run.scale
    settings = SampleSettings(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, chunk_size=s.prompts,
                              dtype=run.dtype_name)  # fmt: skip
    figure.notes.append(
        f"{s.prompts} prompts x {s.num_samples} samples, batch {s.sample_batch}, up to {s.max_new_tokens} new "
        f"tokens, temperature {settings.temperature}, top-p {settings.top_p}; sample runs first (its warm-up counts)"
    )

    def measure(shape: Shape) -> dict[str, Any]:
        model_dir = run.model_dir(shape)
        ours = sample(model_dir, run.data, run.root / "sample" / shape.label, settings, batch_size=s.sample_batch,
                      limit=s.prompts, progress=False)  # fmt: skip
        if ours is None:
            raise RuntimeError("sample returned no summary")
        plan = plan_sampling(model_dir, run.data, settings, limit=s.prompts)
        generator = load_generator(model_dir, plan)
        tokenizer, model = generator.tokenizer, generator.model
        config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                  max_new_tokens=settings.max_new_tokens, eos_token_id=generator.end_ids,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        prompts = sorted((generator.render(p) for p in plan.prompts for _ in range(s.num_samples)), key=len)
        tokens = 0
        with measured(run.device) as result, torch.inference_mode():
            for start in range(0, len(prompts), s.sample_batch):
                batch = tokenizer(prompts[start : start + s.sample_batch], add_special_tokens=False,
                                  padding=True, return_tensors="pt").to(run.device)  # fmt: skip
                output = model.generate(**batch, generation_config=config)
                tokens += sum(
                    generator.ending(row)[1] for row in output[:, batch["input_ids"].shape[1] :].tolist()
                )
        del generator, model
        return {
            "dtype": settings.dtype, "sample tokens/s": ours.generated_tokens / ours.seconds,
            "generate tokens/s": tokens / result["seconds"],
            "ratio": ours.generated_tokens / ours.seconds / (tokens / result["seconds"]),
            "sample tokens": ours.generated_tokens, "generate tokens": tokens,
        }  # fmt: skip

    per_shape(run, figure, measure)


def varm_figure(run: Run, figure: Figure) -> None:
    """``varm-merge run`` of VaRM and of mergekit's task_arithmetic on the same three random
    checkpoints (bench/merge.py: each run a fresh process, imports not timed), ``--cuda`` on a GPU."""
    workdir = run.root / "varm"
    workdir.mkdir()
    build_models(workdir, run.scale.merge_preset)
    write_configs(workdir)
    options = ("--cuda",) if run.on_gpu else ()
    cases = ("varm", "task_arithmetic")
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(run.scale.merge_repeats):
        for case in cases:  # interleaved
            runs[case].append(run_case(case, workdir, None, options))
    best = {case: min(r["seconds"] for r in rs) for case, rs in runs.items()}
    for case, rs in runs.items():
        gpu = [r.get("gpu_peak_mb") for r in rs]
        figure.rows.append({
            "case": f"{case} {' '.join(options)}".strip(), "wall s": best[case],
            "vs task_arithmetic": best[case] / best["task_arithmetic"],
            "CPU s": statistics.median(r["cpu_seconds"] for r in rs), "peak RSS MiB": max(r["peak_mb"] for r in rs),
            "peak GPU MiB": None if None in gpu else max(gpu),
        })  # fmt: skip
    size = PRESETS[run.scale.merge_preset]
    figure.notes.append(
        f"three random Llama checkpoints ({run.scale.merge_preset}: hidden {size['hidden_size']}, "
        f"{size['num_hidden_layers']} layers, {size['vocab_size']:,} rows), bf16; best wall time of "
        f"{run.scale.merge_repeats}"
    )
    if not run.on_gpu:
        figure.skipped.append("--cuda: no GPU here, both merged on the CPU")


FIGURES: dict[str, tuple[str, Callable[[Run, Figure], None]]] = {
    "dtype_auto": ("dtype chosen under --dtype auto", dtype_auto),
    "chunked_head": (
        "Chunked LM head: peak CUDA memory and step time against the whole logits",
        chunked_head,
    ),
    "training_step": ("A training step: fusion loss against CLM-only", training_step),
    "represent": ("represent against a plain forward pass", represent_figure),
    "sample": ("sample against model.generate", sample_figure),
    "varm": ("VaRM against task arithmetic, varm-merge run", varm_figure),
}


def run_figures(out: Path, scale: Scale, budget_s: float) -> dict[str, Any]:
    """Every figure in order, each in its own try block, ``out`` rewritten after each."""
    started = time.monotonic()
    report: dict[str, Any] = {"dry_run": scale is DRY_RUN, "figures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(scale, Path(tmp))
        report["device"] = torch.cuda.get_device_name(run.device) if run.on_gpu else "cpu"
        for key in SECTIONS:
            title, make = FIGURES[key]
            figure, elapsed = Figure(title), time.monotonic() - started
            if elapsed > budget_s:
                figure.skipped.append(
                    f"not started: {elapsed:.0f} s of the figures' {budget_s:.0f} s budget spent"
                )
            else:
                print(f"--- {key}", flush=True)
                try:
                    make(run, figure)
                except Exception as error:  # one figure's failure is reported, the next one runs
                    traceback.print_exc()
                    figure.error = one_line(error)
                release_memory()
                figure.seconds = time.monotonic() - started - elapsed
            report["figures"][key] = asdict(figure)
            atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")  # rows in order
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the figures' JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="start no figure after this many seconds"
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_figures: no CUDA GPU here; pass --dry-run for the CPU form")
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()  # the log keeps the figures' own lines and tracebacks
    transformers_logging.disable_progress_bar()
    report = run_figures(args.out, DRY_RUN if args.dry_run else GPU, args.budget_s)
    failed = [key for key, section in report["figures"].items() if section.get("error")]
    print(f"figures written to {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
