"""Time and coverage of vocabulary maps between real tokenizers.

Usage: ``python bench/vocab.py`` (needs the real tokenizers of tests/conftest.py in the cache;
run the test suite once to build them). Maps are computed without the disk cache.
"""

from __future__ import annotations

import time

from transformers import AutoTokenizer

from fusion_train import registry_assets
from fusion_train.vocab import map_vocabularies, token_bytes

PAIRS = [("smollm2", "qwen"), ("mistral", "smollm2"), ("mistral", "qwen"), ("qwen", "smollm2")]


def main() -> None:
    root = registry_assets.cache_dir() / "tokenizers"
    tables = {}
    for name in sorted({n for pair in PAIRS for n in pair}):
        start = time.perf_counter()
        tables[name] = token_bytes(AutoTokenizer.from_pretrained(root / name))
        print(f"token_bytes({name}): {len(tables[name])} ids in {time.perf_counter() - start:.2f} s")
    print(f"{'source -> pivot':<20} {'method':<6} {'seconds':>8} {'mapped':>8}  counts")
    for source, pivot in PAIRS:
        for method in ("exact", "mined"):
            start = time.perf_counter()
            vocab_map = map_vocabularies(tables[source], tables[pivot], method)
            seconds = time.perf_counter() - start
            print(
                f"{source + ' -> ' + pivot:<20} {method:<6} {seconds:8.2f} {vocab_map.mapped_share():8.1%}  "
                f"{vocab_map.counts}"
            )


if __name__ == "__main__":
    main()
