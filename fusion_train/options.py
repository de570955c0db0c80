"""Command-line options that several stage commands share, declared once."""

from __future__ import annotations

import click

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
max_length = click.option(
    "--max-length", default=2048, help="Longest tokenized conversation, in each model's tokens."
)
batch_tokens = click.option(
    "--batch-tokens", default=4096, help="Padded tokens per forward batch (length-sorted)."
)


def output_directory(help: str = "Output directory; rerunning with the same arguments reuses or resumes it."):
    return click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help=help)
