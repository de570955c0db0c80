"""Benchmark `fusion-train train`: fusion against CLM-only training, sparse against dense-target loss.

    .venv/bin/python bench/train.py [--records 48] [--max-length 384] [--steps 12] [--batch 2]

Model: SmolLM2-135M-Instruct (from the package index, converted once). Data: the first N
records of alpaca-eval 0.6.6's example outputs, represented by the model itself and stored as
fused targets (the pivot as the winning candidate: real top-10 distributions). Figures:
- training step time and peak memory of fusion training (lm weight 0.9) against CLM-only
  training (lm weight 1.0): ``FusionTrainer.compute_loss`` + backward + AdamW, both modes on
  the same batches, alternating, in one process (goal: at most 1.10x each). DeepSpeed is left
  out: its per-step work is the same for both modes;
- the LM head and loss alone (``--head-only`` runs just this part): one forward + backward from
  hidden states [N, H] and a head [V, H] to the loss, on the same batch, three ways: the chunked
  head that training uses (``losses.head_loss_sums``: no [N, V] logits), the sparse loss on the
  whole logits (``supervised_loss_sums``, the previous training path) and the reference code's
  dense-target loss (a [N, V] target and a full log-softmax), at V = 49,152 (SmolLM2) and 262,144
  (Gemma-3) and N = 2,048 and 8,192: peak RSS above the inputs (each measurement in a fresh
  process, so no freed-but-kept heap of another one hides memory) and step time. A way whose
  estimated memory does not fit in the machine's available memory is skipped. The chunked head
  runs once per ``--head-chunk-tokens`` size; step times are also compared back to back in one
  process (``--head-rounds``), the only comparison that holds on a machine shared with other jobs;
- a training step's memory per vocabulary (``--vocab-memory`` runs just this): a 2-layer
  Llama-style model with 8,192 and 262,144 rows, ``FusionTrainer`` + backward + AdamW on one
  micro-batch (``--vocab-batch`` 4x512), peak RSS above the model and its AdamW states, each in
  a fresh process, against a quarter of the micro-batch's float32 logits (issue 15's test).

    .venv/bin/python bench/train.py --head-only [--head-hidden 576] [--head-positions 2048,8192]
    .venv/bin/python bench/train.py --vocab-memory [--vocab-batch 4x512] [--head-chunk-tokens 256]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import torch

from fusion_train.fused import load_fused
from fusion_train.losses import CHUNK_TOKENS, fused_weights, head_loss_sums
from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, smollm2_instruct_dir
from fusion_train.represent import RepresentSettings, represent
from fusion_train.representation import load_representation
from fusion_train.storage import read_json, write_json_atomic
from fusion_train.train import FusionCollator, FusionTrainer

GEMMA3_VOCAB = 262_144

# The losses on whole logits, the previous training path measured against the chunked head, are
# the tests' reference (tests/logits_losses.py); this script reads them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from logits_losses import logits_loss_sums, supervised_loss_sums  # noqa: E402


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- data


def build_fused(model_dir: Path, records: int, max_length: int, top_k: int, root: Path) -> Path:
    """Fused targets in the documented format: the model's own representation, the pivot winning."""
    data = root / "chats.json"
    data.write_text(json.dumps(json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[:records]))
    settings = RepresentSettings(top_k=top_k, max_length=max_length, chunk_size=64)
    represent(model_dir, data, root / "repr", settings, progress=False)
    table = load_representation(root / "repr")
    columns = [
        "id",
        "domain",
        "input_ids",
        "run_message",
        "run_start",
        "run_length",
        "topk_ids",
        "topk_logprobs",
    ]
    fused = table.select_columns(columns)
    fused = fused.add_column("winner", [0] * len(fused))
    out = root / "fused"
    fused.save_to_disk(str(out / "data"))
    pivot = read_json(root / "repr" / "manifest.json")["model"]
    manifest = {"format": "fusion-train/fused@1", "pivot": pivot, "top_k": top_k, "criterion": "pivot only"}
    write_json_atomic(out / "manifest.json", {**manifest, "sources": []})
    return out


def trainable_copy(model_dir: Path, root: Path) -> Path:
    """The model directory without the ``quantization_config`` its GGUF conversion left in config.json.

    The weights are dequantised float32, but transformers' Trainer refuses a model whose config
    names a quantization; the copy links the weights and drops that entry.
    """
    copy = root / model_dir.name
    copy.mkdir()
    for item in model_dir.iterdir():
        (copy / item.name).symlink_to(item)
    config = read_json(model_dir / "config.json")
    config.pop("quantization_config", None)
    (copy / "config.json").unlink()
    write_json_atomic(copy / "config.json", config)
    return copy


# --------------------------------------------------------------------------- training steps


@contextmanager
def rss_step() -> Iterator[dict]:
    """The time and peak RSS (``peak_mib``, from a reset high-water mark) of what runs inside."""
    measured: dict = {}
    reset_peak()
    started = time.perf_counter()
    yield measured
    measured.update(seconds=time.perf_counter() - started, peak_mib=rss_kib("VmHWM") / 1024)


def alternating_steps(
    trainer: FusionTrainer,
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    measure: Callable[[], AbstractContextManager[dict]] = rss_step,
) -> dict[float, list[dict]]:
    """Training steps of both modes (lm weight 1.0: CLM-only, 0.9: fusion) on the same batches.

    Each batch is trained as CLM-only, then as fusion (the order flips every batch), each a full
    step: forward, loss, backward, AdamW update, measured by ``measure``. On a machine shared with
    other jobs, timing the two modes back to back on the same batch is what keeps their ratio
    meaningful. The first batch warms up and is not counted.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    results: dict[float, list[dict]] = {1.0: [], 0.9: []}
    for index, inputs in enumerate(batches):
        for lm_weight in (1.0, 0.9) if index % 2 == 0 else (0.9, 1.0):
            trainer.lm_weight = lm_weight
            with measure() as measured:
                trainer.compute_loss(model, inputs).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if index:
                results[lm_weight].append(measured)
    return results


def paired_steps(model_dir: Path, fused: Path, root: Path, steps: int, batch: int) -> dict[float, list[dict]]:
    """``alternating_steps`` of the model on ``steps`` + 1 batches of its fused data, in float32 on the
    CPU, with the peak RSS of each step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_fused(fused, tokenizer).data
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    trainer = FusionTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(root / "trainer"), report_to=[], use_cpu=True),
        lm_weight=0.9,
        temperature=1.0,
        tokenizer_size=len(tokenizer),
    )
    collate = FusionCollator(tokenizer.pad_token_id)
    batches = [
        collate([data[(index * batch + i) % len(data)] for i in range(batch)]) for index in range(steps + 1)
    ]
    return alternating_steps(trainer, model, batches)


# --------------------------------------------------------------------------- loss memory


def dense_target_loss(logits, labels, topk_ids, topk_logprobs, lm_weight: float) -> torch.Tensor:
    """The reference code's way: a dense [N, vocab] target distribution and a full log-softmax."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.zeros_like(log_probs)
    target.scatter_add_(1, topk_ids.clamp(min=0), fused_weights(topk_ids, topk_logprobs, 1.0))
    fusion = -(target * log_probs).sum(-1).mean()
    clm = torch.nn.functional.nll_loss(log_probs, labels)
    return lm_weight * clm + (1 - lm_weight) * fusion


def sparse_loss(logits, labels, topk_ids, topk_logprobs, lm_weight: float) -> torch.Tensor:
    sums = supervised_loss_sums(logits, labels, logits.shape[1], topk_ids, topk_logprobs)
    return (lm_weight * sums.clm + (1 - lm_weight) * sums.fusion) / len(labels)


HEAD_WAYS = ("chunked", "sparse", "dense")


def head_problem(
    positions: int, vocab: int, hidden: int, top_k: int, seed: int = 0,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> tuple:  # fmt: skip
    """Hidden states [N, H] and a head [V, H] (both trainable, in ``dtype``), labels and top-k
    targets, on ``device`` (drawn on the CPU, so every device gets the same problem)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(positions, hidden, generator=generator).to(device, dtype).requires_grad_()
    w = (
        (torch.randn(vocab, hidden, generator=generator) * (4 / hidden**0.5))
        .to(device, dtype)
        .requires_grad_()
    )
    labels = torch.randint(0, vocab, (positions,), generator=generator).to(device)
    topk_ids = torch.randint(0, vocab, (positions, top_k), generator=generator).to(device)
    topk_logprobs = torch.log_softmax(torch.randn(positions, top_k, generator=generator), -1).to(device)
    return h, w, labels, topk_ids, topk_logprobs


def head_step(
    way: str, h, w, labels, topk_ids, topk_logprobs, lm_weight: float = 0.9, chunk_tokens: int = CHUNK_TOKENS
) -> float:
    """One forward + backward from the hidden states to the loss; returns the loss."""
    if way == "chunked":
        fused = fused_weights(topk_ids, topk_logprobs, 1.0)
        loss, _, _ = head_loss_sums(h, w, None, labels, w.shape[0], topk_ids, fused, clm_weight=lm_weight,
                                    fusion_weight=1 - lm_weight, chunk_tokens=chunk_tokens)  # fmt: skip
        loss = loss / len(labels)
    else:
        logits = torch.nn.functional.linear(h, w)
        loss = (sparse_loss if way == "sparse" else dense_target_loss)(
            logits, labels, topk_ids, topk_logprobs, lm_weight
        )
        del logits
    loss.backward()
    return loss.item()


def measure_head(way: str, positions: int, vocab: int, hidden: int, top_k: int, chunk_tokens: int) -> dict:
    """In this (fresh) process: peak RSS above the inputs during one step, and its time."""
    head_step(way, *head_problem(64, vocab, hidden, top_k, seed=1), chunk_tokens=32)  # kernels, thread pools
    problem = head_problem(positions, vocab, hidden, top_k)
    gc.collect()
    reset_peak()
    base = rss_kib("VmRSS")
    started = time.perf_counter()
    loss = head_step(way, *problem, chunk_tokens=chunk_tokens)
    seconds = time.perf_counter() - started
    return {"extra_mib": (rss_kib("VmHWM") - base) / 1024, "seconds": seconds, "loss": loss}


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def head_comparison(
    positions: list[int], vocabs: list[int], hidden: int, top_k: int, ways: list[str], chunk_tokens: list[int]
) -> None:
    """The table: each (N, V, way) measured in its own process, the ways on the same batch; the
    chunked head once per chunk size (``chunked@TOKENS``)."""
    print(f"\nLM head + loss, forward + backward from hidden states [N, {hidden}], top-{top_k}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    ways = [f"chunked@{t}" for t in chunk_tokens if "chunked" in ways] + [w for w in ways if w != "chunked"]
    print("extra: peak RSS above the inputs (hidden states, head weight, targets); it includes the")
    print("head's weight gradient [V, H] (every way makes it) and, for the logits ways, the logits")
    header = f"{'N':>6} {'V':>8} {'logits f32':>11} {'head grad':>10} |"
    print(header + "".join(f" {way + ' extra':>15} {way + ' s':>11}" for way in ways))
    for vocab in vocabs:
        for n in positions:
            losses_seen: list[float] = []
            logits_mib = n * vocab * 4 / 2**20
            need = {"sparse": 2.5 * logits_mib, "dense": 6 * logits_mib}
            row = f"{n:>6} {vocab:>8} {logits_mib:>8.0f} MiB {vocab * hidden * 4 / 2**20:>6.0f} MiB |"
            for way in ways:
                if need.get(way, 0.0) + vocab * hidden * 12 / 2**20 > 0.8 * available_mib():
                    row += f" {'(no memory)':>15} {'':>11}"
                    continue
                name, _, tokens = way.partition("@")
                command = [sys.executable, __file__, "--measure-head", name, str(n), str(vocab), str(hidden),
                           str(top_k), tokens or "0"]  # fmt: skip
                child = subprocess.run(command, check=False, capture_output=True, text=True)
                if child.returncode != 0:  # e.g. killed for memory by the OS
                    row += f" {'(failed: ' + str(child.returncode) + ')':>15} {'':>11}"
                    continue
                result = json.loads(child.stdout.strip().splitlines()[-1])
                losses_seen.append(result["loss"])
                row += f" {result['extra_mib']:>11.0f} MiB {result['seconds']:>9.1f} s"
            spread = (max(losses_seen) - min(losses_seen)) / abs(losses_seen[0]) if losses_seen else 0.0
            print(f"{row}  losses agree to {spread:.0e}", flush=True)


def head_time_ratios(
    positions: list[int], vocabs: list[int], hidden: int, top_k: int, chunk_tokens: list[int], pairs: int
) -> None:
    """Step time of the chunked head over the sparse loss on the logits, on the same batch, back to
    back in this process (order rotating), the median over ``pairs`` rounds after a warm-up: on a
    machine shared with other jobs, only timings taken side by side compare."""
    print(f"\nstep time, chunked head / sparse loss on the logits: median over {pairs} back-to-back rounds")
    print(
        f"{'N':>6} {'V':>8} |" + "".join(f" {'chunked@' + str(t):>14}" for t in chunk_tokens) + "  sparse s"
    )
    for vocab in vocabs:
        for n in positions:
            if 2.5 * n * vocab * 4 / 2**20 + vocab * hidden * 12 / 2**20 > 0.8 * available_mib():
                print(f"{n:>6} {vocab:>8} | (the logits do not fit)")
                continue
            problem = head_problem(n, vocab, hidden, top_k)
            ways = [("sparse", 0)] + [("chunked", t) for t in chunk_tokens]
            seconds: dict[tuple[str, int], list[float]] = {way: [] for way in ways}
            for round_ in range(pairs + 1):
                shift = round_ % len(ways)
                for way in ways[shift:] + ways[:shift]:
                    problem[0].grad = problem[1].grad = None
                    started = time.perf_counter()
                    head_step(way[0], *problem, chunk_tokens=way[1])
                    if round_:
                        seconds[way].append(time.perf_counter() - started)
            sparse = seconds[("sparse", 0)]
            ratios = [
                statistics.median(c / s for c, s in zip(seconds[way], sparse, strict=True))
                for way in ways[1:]
            ]
            print(f"{n:>6} {vocab:>8} |" + "".join(f" {r:>13.2f}x" for r in ratios)
                  + f"  {statistics.median(sparse):7.1f}", flush=True)  # fmt: skip
            del problem


def head_timing(head_args: tuple, rounds: int) -> None:
    positions, vocabs, hidden, top_k, _, chunk_tokens = head_args
    if rounds > 0:
        head_time_ratios(positions, vocabs, hidden, top_k, chunk_tokens, rounds)


# --------------------------------------------------------------------------- vocabulary and memory


def random_fused_rows(vocab: int, sequences: int, length: int, top_k: int, seed: int = 0) -> list[dict]:
    """Fused rows as the collator receives them: random tokens, every token after the first
    supervised, random top-k targets (a training step's cost does not depend on their values)."""
    generator = np.random.default_rng(seed)
    return [
        {
            "input_ids": generator.integers(0, vocab, length),
            "run_start": np.array([1]),
            "run_length": np.array([length - 1]),
            "topk_ids": generator.integers(0, vocab, (length - 1, top_k)),
            "topk_logprobs": np.log(generator.dirichlet(np.ones(top_k), length - 1)).astype(np.float16),
        }
        for _ in range(sequences)
    ]


def vocab_step_memory(
    vocab: int, sequences: int, length: int, hidden: int, top_k: int, chunk_tokens: int, logits: int
) -> dict:
    """In this (fresh) process: a tiny Llama-style model (2 layers, untied embedding and head) with
    ``vocab`` rows, trained by ``FusionTrainer.compute_loss`` + backward + AdamW on ``sequences``
    x ``length`` tokens, all supervised, with top-k fused targets (``logits``: the previous path).
    The first step creates the AdamW states; the figures are the peak RSS of the next two steps
    above the RSS before them (the model, its AdamW states, the batch): of the loss's forward and
    backward, and of the whole step (AdamW's update makes temporaries the size of a parameter)."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from fusion_train import train as train_module

    if logits:
        train_module.head_loss_sums = logits_loss_sums
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=2, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 192, max_position_embeddings=length,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True)
        trainer = FusionTrainer(model=model, args=args, lm_weight=0.9, temperature=1.0, tokenizer_size=vocab,
                                loss_chunk_tokens=chunk_tokens)  # fmt: skip
    inputs = FusionCollator(0)(random_fused_rows(vocab, sequences, length, top_k))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_peaks, step_peaks = [], []
    for _ in range(3):  # the first step creates the AdamW states
        gc.collect()
        reset_peak()
        base = rss_kib("VmRSS")
        trainer.compute_loss(model, inputs).backward()
        loss_peaks.append((rss_kib("VmHWM") - base) / 1024)
        reset_peak()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_peaks.append(max(loss_peaks[-1], (rss_kib("VmHWM") - base) / 1024))
    return {"forward_backward_mib": max(loss_peaks[1:]), "step_mib": max(step_peaks[1:])}


def vocabulary_memory(
    vocabs: list[int], sequences: int, length: int, hidden: int, top_k: int, chunk_tokens: int, logits: bool
) -> None:
    """Issue 15's test: a training step's extra memory at each vocabulary, each in a fresh process,
    against a quarter of one micro-batch's float32 logits [N, V]; ``logits``: the previous path too."""
    n = sequences * (length - 1)
    print(f"\ntraining step (FusionTrainer + backward + AdamW), 2-layer Llama-style model, hidden {hidden}, "
          f"untied head, N = {n} supervised tokens per micro-batch, top-{top_k}, --loss-chunk-tokens "
          f"{chunk_tokens}: peak RSS above the model, its AdamW states and the batch")  # fmt: skip
    small, large = min(vocabs), max(vocabs)
    quarter = n * large * 4 / 2**20 / 4
    grads = 2 * (large - small) * hidden * 4 / 2**20  # the embedding's and the head's gradients, float32
    print(f"a quarter of the float32 logits [{n}, {large}]: {quarter:.0f} MiB; the two [V, H] gradients "
          f"(embedding, head) differ by {grads:.0f} MiB")  # fmt: skip
    for path in ("chunked head", "logits (before)") if logits else ("chunked head",):
        extra = {}
        for vocab in vocabs:
            sizes = (vocab, sequences, length, hidden, top_k, chunk_tokens, int(path != "chunked head"))
            command = [sys.executable, __file__, "--measure-vocab", *map(str, sizes)]
            child = subprocess.run(command, check=True, capture_output=True, text=True)
            extra[vocab] = json.loads(child.stdout.strip().splitlines()[-1])
        for part, key in (("forward + backward", "forward_backward_mib"), ("whole step", "step_mib")):
            difference = extra[large][key] - extra[small][key]
            print(f"{path:>16}, {part:>18}: " + ", ".join(f"V = {v}: {extra[v][key]:.0f} MiB" for v in vocabs)
                  + f"; difference {difference:.0f} MiB, {difference - grads:.0f} MiB without the [V, H] "
                  "gradients", flush=True)  # fmt: skip


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--head-only", action="store_true", help="only the LM head + loss comparison")
    parser.add_argument("--head-positions", default="2048,8192")
    parser.add_argument("--head-vocabs", default=f"49152,{GEMMA3_VOCAB}")
    parser.add_argument("--head-hidden", type=int, default=576)  # SmolLM2-135M's
    parser.add_argument("--head-ways", default=",".join(HEAD_WAYS))
    parser.add_argument(
        "--head-chunk-tokens",
        default=str(CHUNK_TOKENS),
        help="the chunked head's chunk sizes, comma-separated",
    )
    parser.add_argument(
        "--head-rounds", type=int, default=3, help="rounds of the step-time comparison (0: none)"
    )
    parser.add_argument(
        "--vocab-memory", action="store_true", help="only the training step's memory per vocabulary"
    )
    parser.add_argument("--vocab-sizes", default=f"8192,{GEMMA3_VOCAB}")
    parser.add_argument("--vocab-batch", default="4x512", help="sequences x tokens per micro-batch")
    parser.add_argument("--measure-head", nargs=6, help=argparse.SUPPRESS)  # WAY N V H K CHUNK, in a child
    parser.add_argument("--vocab-logits", action="store_true", help="also measure the previous (logits) path")
    parser.add_argument(
        "--measure-vocab", nargs=7, type=int, help=argparse.SUPPRESS
    )  # V B L H K CHUNK LOGITS
    args = parser.parse_args()
    if args.measure_vocab:
        print(json.dumps(vocab_step_memory(*args.measure_vocab)))
        return
    sequences, length = map(int, args.vocab_batch.split("x"))
    vocab_args = ([int(x) for x in args.vocab_sizes.split(",")], sequences, length, args.head_hidden,
                  args.top_k, int(args.head_chunk_tokens.split(",")[0]), args.vocab_logits)  # fmt: skip
    if args.vocab_memory:
        vocabulary_memory(*vocab_args)
        return
    if args.measure_head:
        way, *sizes = args.measure_head
        print(json.dumps(measure_head(way, *map(int, sizes))))
        return
    head_args = (
        [int(x) for x in args.head_positions.split(",")],
        [int(x) for x in args.head_vocabs.split(",")],
        args.head_hidden,
        args.top_k,
        args.head_ways.split(","),
        [int(x) for x in args.head_chunk_tokens.split(",")],
    )
    if args.head_only:
        head_comparison(*head_args)
        head_timing(head_args, args.head_rounds)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = trainable_copy(smollm2_instruct_dir(), root)
        fused = build_fused(model_dir, args.records, args.max_length, args.top_k, root)
        results = paired_steps(model_dir, fused, root, args.steps, args.batch)
        tokens = sum(len(t) for t in load_representation(root / "repr")["topk_ids"])

    clm, fusion = results[1.0], results[0.9]
    time_ratio = statistics.median(f["seconds"] / c["seconds"] for c, f in zip(clm, fusion, strict=True))
    print(
        f"SmolLM2-135M-Instruct, {args.records} chats (<= {args.max_length} tokens), {tokens} supervised tokens,"
    )
    print(
        f"batch {args.batch}, {args.steps} step pairs (after one warm-up pair), {torch.get_num_threads()} threads"
    )
    print(f"{'':22}{'median step s':>14}{'peak RSS MiB':>14}")
    for name, runs in (("CLM only (lm 1.0)", clm), ("fusion (lm 0.9)", fusion)):
        median = statistics.median(r["seconds"] for r in runs)
        print(f"{name:22}{median:14.2f}{max(r['peak_mib'] for r in runs):14.0f}")
    peak_ratio = max(r["peak_mib"] for r in fusion) / max(r["peak_mib"] for r in clm)
    print(f"{'ratio fusion / CLM':22}{time_ratio:14.3f}{peak_ratio:14.3f}  (goal <= 1.10)")
    print("(time ratio: median over batches of fusion / CLM on the same batch, timed back to back)")
    head_comparison(*head_args)
    head_timing(head_args, args.head_rounds)
    vocabulary_memory(*vocab_args)


if __name__ == "__main__":
    main()
