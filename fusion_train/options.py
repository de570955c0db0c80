"""Command-line options that several stage commands share, declared once.

The value types (ranges, choices) are also what recipes are checked against, so a setting
accepts the same values as a flag or as a recipe key, and ``--help`` shows the range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

POSITIVE_INT = click.IntRange(min=1)
MAX_LENGTH = click.IntRange(min=2)  # a prompt token and one supervised token
FRACTION = click.FloatRange(0.0, 1.0)
POSITIVE_FLOAT = click.FloatRange(min=0.0, min_open=True)
NON_NEGATIVE_FLOAT = click.FloatRange(min=0.0)
MODEL_DTYPES = click.Choice(["float32", "bfloat16", "float16", "auto"])

ATTENTION_KERNELS = click.Choice(["auto", "sdpa", "eager", "flash_attention_2"])
ATTENTION_HELP = (
    "Attention kernel: auto is FlashAttention-2 on GPUs in 16-bit where flash-attn is installed, "
    "else transformers' default (SDPA where the model has it)."
)

pivot_representation = click.option(
    "--pivot",
    "pivot_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The pivot's representation (output of `fusion-train represent`).",
)
chat_data = click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(exists=True),
    help="Chat data: JSON/JSONL file or a datasets directory (messages / conversations / alpaca).",
)


def output_directory(
    help: str = "Output directory; rerunning with the same arguments reuses or resumes it.",
) -> Callable[[Any], Any]:
    return click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help=help)
