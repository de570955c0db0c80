"""Vocabulary mapping between tokenizers: which pivot token id a source token id means.

Three parts, each its own module: ``pieces`` reads the raw bytes every token id stands for (and
the special tokens' roles); ``edit_distance`` finds the closest pivot token for a source token
no pivot token equals; ``maps`` builds, applies and caches the map. What the other stages use is
importable from here.
"""

from fusion_train.vocab.edit_distance import mined_matches
from fusion_train.vocab.maps import (
    CACHE_ENV,
    COUNT_KEYS,
    VOCAB_MAPS,
    MappedTopK,
    VocabMap,
    build_vocab_map,
    canonical_ids,
    default_cache_dir,
    map_vocabularies,
    merge_rows,
    vocab_map_path,
)
from fusion_train.vocab.pieces import (
    MATCHED_ROLES,
    OTHER_SPECIAL,
    SpecialToken,
    TokenBytes,
    end_of_turn_token,
    token_bytes,
)

__all__ = [
    "CACHE_ENV",
    "COUNT_KEYS",
    "MATCHED_ROLES",
    "OTHER_SPECIAL",
    "VOCAB_MAPS",
    "MappedTopK",
    "SpecialToken",
    "TokenBytes",
    "VocabMap",
    "build_vocab_map",
    "canonical_ids",
    "default_cache_dir",
    "end_of_turn_token",
    "map_vocabularies",
    "merge_rows",
    "mined_matches",
    "token_bytes",
    "vocab_map_path",
]
