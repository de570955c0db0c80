"""An independent reading of which bytes of a rendered conversation every token covers.

Tests build their expectations here, not with the code under test (``fusion_train.vocab`` and
``encoding.token_byte_spans``): a token's bytes come from transformers' own GPT-2
``bytes_to_unicode`` table (byte-level vocabularies) or from the SentencePiece conventions
(``▁`` is a space, ``<0xNN>`` one byte), and the tokens' bytes, laid end to end, must
reproduce the text; where they do, that concatenation says which bytes each token covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_LEVEL = {"smollm2": True, "qwen": True, "mistral": False, "gemma3": False}
UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def reference_token_bytes(tokenizer: Any, token_id: int, byte_level: bool) -> bytes | None:
    """The bytes one token id stands for; ``None`` for special tokens."""
    if token_id in tokenizer.all_special_ids:
        return None
    token = tokenizer.convert_ids_to_tokens(token_id)
    if byte_level:
        return bytes(UNICODE_TO_BYTE[char] for char in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass(frozen=True)
class TokenPlace:
    start: int  # byte offsets in the rendered text's UTF-8 encoding
    end: int
    stands_for: bytes | None  # None: a special token
    special: str | None  # the special token's content


def reference_places(tokenizer: Any, ids: list[int], text: str, byte_level: bool) -> list[TokenPlace]:
    """Where each token lies in ``text``, by laying the tokens' bytes end to end.

    A special token covers its own literal content. A SentencePiece token standing for one more
    leading space than the text has there (the space it adds at the start of the text) covers
    the text without that space. Anything else that does not reproduce the text fails the test.
    """
    data = text.encode("utf-8")
    places, cursor = [], 0
    for token_id in ids:
        piece = reference_token_bytes(tokenizer, token_id, byte_level)
        if piece is None:
            content = tokenizer.convert_ids_to_tokens(token_id).encode("utf-8")
            assert data.startswith(content, cursor), (content, data[cursor : cursor + 20])
            places.append(TokenPlace(cursor, cursor + len(content), None, content.decode()))
            cursor += len(content)
        elif data.startswith(piece, cursor):
            places.append(TokenPlace(cursor, cursor + len(piece), piece, None))
            cursor += len(piece)
        else:
            assert not byte_level and piece.startswith(b" ") and data.startswith(piece[1:], cursor), (
                piece,
                data[cursor : cursor + 20],
            )
            places.append(TokenPlace(cursor, cursor + len(piece) - 1, piece, None))
            cursor += len(piece) - 1
    assert cursor == len(data), "the tokens do not reproduce the text"
    return places


def content_place(text: str, content: str, after: int = 0) -> tuple[int, int, int]:
    """Where ``content`` lies in ``text``, searching from byte ``after``: the byte offset of the
    content's byte 0, and the start and end of its verbatim part (templates may strip it)."""
    data, raw = text.encode("utf-8"), content.encode("utf-8")
    found = data.find(raw, after)
    if found >= 0:
        return found, found, found + len(raw)
    stripped = content.strip().encode("utf-8")
    found = data.find(stripped, after)
    assert found >= 0, f"{content!r} is not in the rendered text"
    lead = len(raw) - len(content.lstrip().encode("utf-8"))
    return found - lead, found, found + len(stripped)
