"""The output of ``fusion-train prefer`` as the training stages read it: ``sft/`` (prompt and
completion, for ``sft``) and ``pairs/`` (prompt, chosen, rejected and for WRPO chosen_source, for
``dpo``), Arrow data sets in TRL's conversational format, beside a manifest of this format.
``prefer`` writes it; sft, dpo and a recipe's runner read it from here, not from the stage."""

from __future__ import annotations

from pathlib import Path

import datasets

FORMAT = "fusion-train/preferences@1"
SFT_DIR, PAIRS_DIR = "sft", "pairs"


def count_examples(prefs: str | Path, split: str) -> int:
    """Rows of ``prefs/split`` (``sft`` or ``pairs``), memory-mapped, not read."""
    return datasets.load_from_disk(str(Path(prefs) / split)).num_rows
