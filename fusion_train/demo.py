"""The real-model demo: ``fusion-train demo [--quick]`` (what ``make demo`` runs).

Sources: SmolLM2-135M-Instruct (byte-level BPE, ChatML) and Gemma-3-270m (262k SentencePiece-
style vocabulary, a base model without a chat template), both from package-index packages.
Pivot: SmolLM2-135M-Instruct with 6 of its 30 decoder layers removed: a weaker model than its
sources, which is where fusion should help most, and one whose tokenizer is shared by one
source but not the other, so both the trivial and the cross-tokenizer path are exercised.
Data: the 805 instruction/response pairs of alpaca-eval 0.6.6's example outputs, split into
training and held-out records by a hash of their ids.

``--implicit``: the same models and data through implicit fusion (FuseChat-3.0, or WRPO with
``--mode wrpo``): the sources answer the training prompts, the `reference-overlap` verifier
scores the answers against alpaca-eval's reference outputs (offline: no reward model), the
pivot is fine-tuned on the best answers and preference-trained on pairs; every model then
answers the held-out prompts, rated against the pivot with the same verifier.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import yaml

from fusion_train.errors import Command
from fusion_train.merge_methods import DEFAULT_MERGE_METHODS
from fusion_train.pipeline import run_pipeline
from fusion_train.recipe import parse_recipe
from fusion_train.registry_assets import (
    ALPACA_EVAL_OUTPUTS,
    cache_dir,
    fetch,
    gemma3_270m_dir,
    smollm2_instruct_dir,
)

QUICK = {
    "data": {"limit": 12, "heldout_fraction": 0.01},
    "represent": {"top_k": 10, "max_length": 256, "batch_tokens": 2048},
    "train": {"max_steps": 3, "learning_rate": 2.0e-5, "warmup_ratio": 0.0},
    "evaluate": {"max_length": 256, "batch_tokens": 2048},
}
DEFAULT = {
    "data": {"limit": 160, "heldout_fraction": 0.1},
    "represent": {"top_k": 10, "max_length": 512, "batch_tokens": 4096},
    "train": {"epochs": 1.0, "learning_rate": 2.0e-5, "warmup_ratio": 0.03},
    "evaluate": {"max_length": 512, "batch_tokens": 4096},
}


# Spread out, away from the first and last layers. Measured on alpaca-eval responses (nats per
# token): all 30 layers 3.0; these 6 removed 4.3; every other layer removed 13.3; a block of 4
# consecutive layers removed 10.2. SmolLM2's thin layers do not survive heavier pruning.
DROPPED_LAYERS = (5, 9, 13, 17, 21, 25)
# Implicit fusion: prompts answered, responses per prompt and their length; SFT and DPO schedules.
# The papers' DPO learning rates (8e-7, 3e-7) barely move a model in the few steps of the quick
# run; the demo keeps each loss's beta and the papers' schedule shape otherwise.
IMPLICIT_QUICK = {  # a smoke test (CI): 3 of its 8 prompts give fusechat3 pairs (the 4:6 split), too few to
    # risk FuseChat-3.0's upper margin bound, set for ArmoRM's rewards, on reference-overlap's scale
    "data": {"limit": 8, "heldout_fraction": 0.01},
    "prefer": {"max_margin": "none"},
    "sample": {"num_samples": 2, "max_new_tokens": 24, "batch_size": 8},
    "sft": {"max_steps": 2, "learning_rate": 2.0e-5, "warmup_ratio": 0.0, "max_length": 512},
    "dpo": {"max_steps": 2, "learning_rate": 1.0e-6, "warmup_ratio": 0.0, "max_length": 512},
    "rate": {"max_new_tokens": 24, "batch_size": 8},
    "evaluate": {"max_length": 256, "batch_tokens": 2048},
}
IMPLICIT_DEFAULT = {  # sized for a 2-core CPU: about 20 minutes
    "data": {"limit": 48, "heldout_fraction": 0.05},
    "sample": {"num_samples": 4, "max_new_tokens": 48, "batch_size": 16},
    "sft": {"epochs": 1.0, "learning_rate": 2.0e-5, "warmup_ratio": 0.1, "max_length": 512},
    "dpo": {"epochs": 1.0, "learning_rate": 1.0e-6, "warmup_ratio": 0.1, "max_length": 512},
    "rate": {"max_new_tokens": 48, "batch_size": 16},
    "evaluate": {"max_length": 512, "batch_tokens": 4096},
}


def pruned_pivot() -> Path:
    """SmolLM2-135M-Instruct without the decoder layers in DROPPED_LAYERS (built once, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_instruct_dir()
    layers = json.loads((source / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    keep = [i for i in range(layers) if i not in DROPPED_LAYERS]
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{len(keep)}L"
    if (target / "config.json").exists():
        return target
    model = AutoModelForCausalLM.from_pretrained(source)
    model.model.layers = type(model.model.layers)([model.model.layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / target.name
        model.save_pretrained(staged)
        AutoTokenizer.from_pretrained(source).save_pretrained(staged)
        os.replace(staged, target)
    return target


def demo_models(out_dir: Path) -> dict:
    """The recipe keys both demos share: models, data (copied next to the recipe), run directory."""
    data = out_dir / "alpaca_eval_outputs.json"
    if not data.exists():
        records = json.loads(fetch(ALPACA_EVAL_OUTPUTS).read_text(encoding="utf-8"))
        data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {
        "pivot": {"name": "pivot-smollm2-24l", "path": str(pruned_pivot())},
        "sources": [
            {"name": "smollm2-135m", "path": str(smollm2_instruct_dir())},
            {"name": "gemma3-270m", "path": str(gemma3_270m_dir())},
        ],
        "data": {"train": data.name},
        "run_dir": ".",
    }


def demo_recipe(out_dir: Path, quick: bool, nproc: int = 1) -> dict:
    """The demo's recipe: written to ``OUT/recipe.yaml`` so it can be read, edited and re-run."""
    size = QUICK if quick else DEFAULT
    recipe = demo_models(out_dir)
    return {
        **recipe,
        "data": {**recipe["data"], **size["data"]},
        "represent": size["represent"],
        "align": {"token_align": "spans", "vocab_map": "exact"},
        "fuse": {"criterion": "min-ce", "ce_unit": "byte"},
        "train": {"deepspeed": "zero2", "lm_weight": 0.9, **size["train"]},
        "resources": {"nproc": nproc},
        "merge": {"methods": list(DEFAULT_MERGE_METHODS)},
        "evaluate": size["evaluate"],
    }


def implicit_demo_recipe(out_dir: Path, quick: bool, nproc: int = 1, mode: str = "fusechat3") -> dict:
    """The implicit demo's recipe (``method: implicit``), written to ``OUT/recipe.yaml`` as well."""
    size = IMPLICIT_QUICK if quick else IMPLICIT_DEFAULT
    recipe = demo_models(out_dir)
    return {
        "method": "implicit",
        **recipe,
        "data": {**recipe["data"], **size["data"]},
        "sample": {"temperature": 0.8, "top_p": 0.95, **size["sample"]},
        "score": {"verifiers": ["reference-overlap"]},
        "prefer": {"mode": mode, **size.get("prefer", {})},  # else the papers' split and margins
        "sft": {"deepspeed": "zero2", **size["sft"]},
        "dpo": {"deepspeed": "zero2", **size["dpo"]},
        "rate": size["rate"],
        "resources": {"nproc": nproc},
        "evaluate": size["evaluate"],
    }


@click.command("demo", cls=Command)
@click.option(
    "--quick", is_flag=True, help="A few records and steps: the whole pipeline in minutes (CI runs it)."
)
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Run directory. Default: runs/demo-quick or runs/demo.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="resources.nproc: represent, train and evaluate in N processes (GPUs, or CPU processes) each. "
    "Training's world size changes its batch, so its results differ from one process's.",
)
@click.option(
    "--implicit",
    is_flag=True,
    help="Implicit fusion (sample, score, prefer, sft, dpo) instead of the explicit pipeline; "
    "the reference-overlap verifier scores answers against alpaca-eval's outputs.",
)
@click.option(
    "--mode",
    type=click.Choice(["fusechat3", "wrpo"]),
    default="fusechat3",
    help="With --implicit: FuseChat-3.0's pairs and length-normalised DPO, or WRPO.",
)
def demo_command(quick: bool, out_dir: str | None, nproc: int, implicit: bool, mode: str) -> None:
    """Fuse SmolLM2-135M-Instruct and Gemma-3-270m into a pruned SmolLM2 on alpaca-eval data."""
    if mode != "fusechat3" and not implicit:
        raise click.UsageError("--mode is for --implicit")
    kind = f"demo-implicit-{mode}" if implicit else "demo"
    out = Path(out_dir or f"runs/{kind}{'-quick' if quick else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = implicit_demo_recipe(out, quick, nproc, mode) if implicit else demo_recipe(out, quick, nproc)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    click.echo(f"recipe: {out / 'recipe.yaml'}")
    run_pipeline(parse_recipe(recipe, base=out, default_run_dir=out, where=str(out / "recipe.yaml")))
    click.echo((out / "report.md").read_text(encoding="utf-8"))
