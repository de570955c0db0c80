"""Benchmark VaRM against mergekit's task_arithmetic on the same real-size checkpoints.

Builds a pivot and two targets with random weights (SmolLM2-135M's Llama config by default),
then merges them in fresh child processes, one per run, so each run's peak memory (ru_maxrss)
is its own: `varm` (matrix, element, layer) and `task_arithmetic` through `varm-merge run`
(mergekit's planner), and VaRM done by loading all three models into memory at once.

    .venv/bin/python bench/merge.py                   # SmolLM2-135M size, bf16
    .venv/bin/python bench/merge.py --preset small    # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PRESETS = {
    # SmolLM2-135M's shape (https://huggingface.co/HuggingFaceTB/SmolLM2-135M config.json).
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
CASES = ("varm", "task_arithmetic", "varm_element", "varm_layer", "in_memory")
MODELS = ("base", "t1", "t2")


def build_models(workdir: Path, preset: str) -> None:
    """Pivot with random weights, and two targets = pivot + noise at a random scale per matrix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = workdir / f"models-{preset}.done"
    if marker.exists():
        return
    config = LlamaConfig(max_position_embeddings=2048, **PRESETS[preset])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(workdir / "base", safe_serialization=True)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for seed, name in enumerate(MODELS[1:], start=1):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                scale = 10 ** (-4 + 2 * torch.rand((), generator=gen).item())
                noise = (
                    torch.randn(param.shape, generator=gen) * scale * base[key].float().std().clamp_min(1e-3)
                )
                param.copy_((base[key].float() + noise).to(param.dtype))
        model.save_pretrained(workdir / name, safe_serialization=True)
    marker.touch()


def write_configs(workdir: Path) -> dict[str, Path]:
    import yaml

    def config(method: str, **parameters: object) -> dict:
        return {
            "merge_method": method,
            "base_model": str(workdir / "base"),
            "models": [{"model": str(workdir / m), "parameters": {"weight": 0.5}} for m in MODELS[1:]],
            "parameters": parameters or None,
            "dtype": "bfloat16",
        }

    configs = {
        "varm": config("varm"),
        "task_arithmetic": config("task_arithmetic"),
        "varm_element": config("varm", granularity="element"),
        "varm_layer": config("varm", granularity="layer"),
    }
    paths = {}
    for case, data in configs.items():
        paths[case] = workdir / f"{case}.yml"
        paths[case].write_text(yaml.safe_dump(data), encoding="utf-8")
    return paths


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, RssAnon, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak(threading.Thread):
    """Samples RssAnon every few ms. ru_maxrss also counts the memory-mapped input files, which the
    kernel can drop at will; anonymous memory is what really has to fit in RAM."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, status_mb("RssAnon"))
            self.done.wait(0.005)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, status_mb("RssAnon"))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def in_memory_varm(workdir: Path, out: Path) -> None:
    """The naive way: every model's full state dict in memory, then VaRM tensor by tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    states = [load_file(workdir / m / "model.safetensors") for m in MODELS]
    base, targets = states[0], states[1:]
    merged = {}
    for name, b in base.items():
        b32 = b.float()
        deltas = [t[name].float() - b32 for t in targets]
        scores = torch.stack([d.square().mean() for d in deltas])
        weights = scores / scores.sum() if scores.sum() > 0 else torch.full_like(scores, 1 / len(scores))
        merged[name] = (b32 + sum(w * d for w, d in zip(weights, deltas, strict=True))).to(b.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})


def child(case: str, workdir: Path, out: Path, options: list[str]) -> None:
    """One measured run (``options``: more `varm-merge run` options); prints a JSON line. Imports
    happen before the clock and baseline RSS."""
    import matplotlib.pyplot  # noqa: F401  (the layer case's heatmap; imported before the clock)
    import mergekit.merge  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    from click.testing import CliRunner

    from varm_merge.cli import main

    baseline = status_mb("VmRSS")
    anon = AnonPeak()
    anon.start()
    cpu_start, start = cpu_seconds(), time.perf_counter()
    if case == "in_memory":
        in_memory_varm(workdir, out)
    else:
        config = workdir / f"{case}.yml"
        args = [
            "run",
            str(config),
            str(out),
            "--quiet",
            "--no-copy-tokenizer",
            "--no-write-model-card",
            *options,
        ]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        if result.exit_code != 0:
            raise SystemExit(result.output)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    anon_peak = anon.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    print(
        json.dumps(
            {
                "case": case,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_mb": peak,
                "anon_peak_mb": anon_peak,
                "baseline_mb": baseline,
                "gpu_peak_mb": gpu_peak,
            }
        )
    )


def run_case(case: str, workdir: Path, threads: int | None, options: tuple[str, ...] = ()) -> dict:
    """One case in a fresh child process; ``options``: more `varm-merge run` options (``--cuda``)."""
    out = workdir / f"out-{case}"
    cmd = [sys.executable, __file__, "--child", case, "--workdir", str(workdir), "--out", str(out)]
    cmd += [f"--merge-option={option}" for option in options]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/varm-bench"))
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, interleaved; median time")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS for every run (steadier figures on a shared machine)"
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--cuda", action="store_true", help="merge on the GPU (mergekit's --cuda; in_memory stays on the CPU)"
    )
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--merge-option", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.child, args.workdir, args.out, args.merge_option)
        return

    workdir = args.workdir / args.preset
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_models(workdir, args.preset)
    write_configs(workdir)
    size_mb = sum(f.stat().st_size for f in (workdir / "base").glob("*.safetensors")) / 2**20
    print(f"models ready in {time.perf_counter() - t0:.0f}s: 3 x {size_mb:.0f} MiB ({args.preset}, bf16)")

    runs: dict[str, list[dict]] = {case: [] for case in args.cases}
    for _ in range(args.repeats):
        for case in args.cases:  # interleaved, so drift in machine load hits every case alike
            runs[case].append(run_case(case, workdir, args.threads, ("--cuda",) if args.cuda else ()))

    rows = {
        case: {
            "seconds": min(r["seconds"] for r in rs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
            "peak_mb": max(r["peak_mb"] for r in rs),
            "anon_peak_mb": max(r["anon_peak_mb"] for r in rs),
        }
        for case, rs in runs.items()
    }
    (workdir / "results.json").write_text(
        json.dumps({"preset": args.preset, "rows": rows, "runs": runs}, indent=1)
    )
    print_table(rows, args.repeats)


def print_table(rows: dict[str, dict[str, float]], repeats: int) -> None:
    """A Markdown table, with ratios to task_arithmetic when it was measured."""
    columns = {
        "seconds": f"wall s (min of {repeats})",
        "cpu_seconds": "CPU s (median)",
        "peak_mb": "peak RSS MiB",
        "anon_peak_mb": "peak anonymous MiB",
    }
    ref = rows.get("task_arithmetic")
    print("\n| case | " + " | ".join(columns.values()) + " |")
    print("|---|" + "---|" * len(columns))
    for case, row in rows.items():
        cells = []
        for key in columns:
            cell = f"{row[key]:.2f}" if "seconds" in key else f"{row[key]:.0f}"
            if ref and case != "task_arithmetic":
                cell += f" ({row[key] / ref[key]:.2f}x)"
            cells.append(cell)
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
