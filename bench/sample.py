"""Benchmark `fusion-train sample` against a plain `model.generate` sampling the same prompts.

    .venv/bin/python bench/sample.py [--prompts 8] [--num-samples 1] [--batch-size 8]
        [--max-new-tokens 48] [--repeats 5] [--dtype auto]

Model: SmolLM2-135M-Instruct (the demo's size, from the package index, converted once), in its own
chat template. Prompts: the first N alpaca-eval 0.6.6 instructions. Both sides answer every prompt
``--num-samples`` times at temperature 0.8, top-p 0.95 (top-k off), in the same batches (prompts
ordered by length, as `sample` orders them), with the same end-of-turn tokens, dtype and threads:

- sample: a whole `sample()` call (loading the model, rendering, generating with reproducible
  per-response draws, writing the parts), and the parts' own timers (the same without the
  loading);
- plain: `model.generate(do_sample=True, ...)` on the already loaded model, nothing else.

The two run back to back, ``--repeats`` times (alternating which goes first). Reported: each
side's best run (on a shared machine other jobs only ever add time): wall seconds, CPU seconds of
this process (all its threads), generated tokens (draws differ, so lengths may); and the ratios
sample / plain (goal: <= 1.0) of the wall times, per run and per generated token, as the median
over the back-to-back pairs (a load that comes and goes hits both of a pair alike) and of the
best runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from fusion_train.implicit.sample import SampleSettings, load_generator, plan_sampling, sample
from fusion_train.registry_assets import ALPACA_EVAL_OUTPUTS, fetch, smollm2_instruct_dir


def plain_generate(generator: object, texts: list[str], batch_size: int, settings: SampleSettings) -> int:
    """``generate``'s own sampling over ``texts`` in batches; the tokens it generated."""
    tokenizer, model = generator.tokenizer, generator.model
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                              max_new_tokens=settings.max_new_tokens, eos_token_id=generator.end_ids,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], add_special_tokens=False, padding=True,
                              return_tensors="pt").to(model.device)  # fmt: skip
            output = model.generate(**batch, generation_config=config)
            tokens += sum(
                generator.ending(row).num_tokens for row in output[:, batch["input_ids"].shape[1] :].tolist()
            )
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    model_dir = smollm2_instruct_dir()
    records = json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text())[: args.prompts]
    settings = SampleSettings(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                              chunk_size=args.prompts, dtype=args.dtype)  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"whole": [], "parts": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.json"
        data.write_text(
            json.dumps([{"instruction": r["instruction"], "output": r["output"]} for r in records])
        )
        plan = plan_sampling(model_dir, data, settings)
        generator = load_generator(model_dir, plan)
        rendered = [generator.render(p) for p in plan.prompts]
        lengths = [len(generator.prompt_ids(text)) for text in rendered]
        jobs = sorted(((r, j) for r in range(len(rendered)) for j in range(args.num_samples)),
                      key=lambda job: lengths[job[0]])  # fmt: skip
        texts = [rendered[r] for r, _ in jobs]  # the batches `sample` makes
        plain_generate(generator, texts[:1], 1, SampleSettings(max_new_tokens=4))  # warm-up
        for repeat in range(args.repeats):
            for side in ("sample", "plain") if repeat % 2 == 0 else ("plain", "sample"):
                wall, cpu = time.perf_counter(), time.process_time()
                if side == "plain":
                    tokens = plain_generate(generator, texts, args.batch_size, settings)
                else:
                    summary = sample(model_dir, data, Path(tmp) / f"out{repeat}", settings, batch_size=args.batch_size,
                                     progress=False)  # fmt: skip
                    tokens = summary.generated_tokens
                    runs["parts"].append({"wall": summary.seconds, "cpu": float("nan"), "tokens": tokens})
                measured = {
                    "wall": time.perf_counter() - wall,
                    "cpu": time.process_time() - cpu,
                    "tokens": tokens,
                }
                runs["whole" if side == "sample" else "plain"].append(measured)

    print(
        f"SmolLM2-135M-Instruct, {args.prompts} prompts x {args.num_samples} samples, batch {args.batch_size}, up to "
        f"{args.max_new_tokens} new tokens, temperature 0.8, top-p 0.95, {plan.manifest['dtype']}, device "
        f"{generator.model.device}, threads {torch.get_num_threads()}, best of {args.repeats}"
    )
    best = {side: min(rs, key=lambda r: r["wall"]) for side, rs in runs.items()}
    cpu = {side: min(r["cpu"] for r in rs) for side, rs in runs.items()}
    labels = {"whole": "sample (whole call)", "parts": "sample (its parts)", "plain": "model.generate"}
    for side, label in labels.items():
        b = best[side]
        print(f"{label:20} wall {b['wall']:7.2f} s  CPU {cpu[side]:7.2f} s  {b['tokens']:6.0f} tokens  "
              f"{1000 * b['wall'] / b['tokens']:7.1f} ms/token")  # fmt: skip

    def ratio(ours: dict[str, float], plain: dict[str, float], per_token: bool) -> float:
        if per_token:
            return ours["wall"] / ours["tokens"] / (plain["wall"] / plain["tokens"])
        return ours["wall"] / plain["wall"]

    for side in ("whole", "parts"):
        for per_token in (False, True):
            pairs = statistics.median(
                ratio(o, p, per_token) for o, p in zip(runs[side], runs["plain"], strict=True)
            )
            print(f"ratio {labels[side]:20} {'per token' if per_token else 'wall     '}  median of pairs "
                  f"{pairs:5.2f}  best runs {ratio(best[side], best['plain'], per_token):5.2f}  (goal <= 1.0)")  # fmt: skip
    print(f"ratio CPU time, whole call / plain  {cpu['whole'] / cpu['plain']:5.2f} (best runs)")


if __name__ == "__main__":
    main()
