"""A conversation as one model reads it: rendered in the model's chat template, tokenized, and
each supervised (assistant) token placed on the bytes of the rendered text.

``represent`` records distributions at these positions, ``evaluate`` scores them and
``inference`` runs the model on them; alignment later compares two models' byte spans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion_train import vocab
from fusion_train.chat import Conversation, render


@dataclass(frozen=True)
class ChatTokenizer:
    """A tokenizer with the chat template it renders conversations in, and the raw bytes each of
    its token ids stands for (``fusion_train.vocab.token_bytes``; ``None`` for special tokens):
    what ``encode_conversation`` needs to place every token on the bytes of the rendered text."""

    tokenizer: Any
    template: str
    pieces: Sequence[bytes | None]

    @classmethod
    def of(cls, tokenizer: Any, template: str) -> ChatTokenizer:
        return cls(tokenizer, template, vocab.token_bytes(tokenizer, template).pieces)


@dataclass
class EncodedExample:
    """A conversation tokenized in one model's template, with its supervised tokens located."""

    conv: Conversation
    input_ids: list[int]
    positions: list[int]  # supervised positions p (>= 1): logits at p - 1 predict input_ids[p]
    messages: list[int]  # index of the assistant message each supervised token belongs to
    # The bytes each token covers, counted from the first byte of that message's content, not
    # clipped to it: a token that also covers template text before the answer starts below 0.
    # End-of-turn tokens: start = end = the content's length in bytes.
    byte_start: list[int]
    byte_end: list[int]
    num_bytes: int
    truncated: bool


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``offsets[c]`` is where character ``c`` of ``text`` starts in its UTF-8 encoding (and
    ``offsets[len(text)]`` the encoding's length)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def token_byte_spans(
    text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], pieces: Sequence[bytes | None]
) -> tuple[list[int], list[int]]:
    """The bytes of ``text.encode()`` each token covers, as ``[start, end)`` lists.

    A tokenizer reports character offsets, which cannot tell the byte pieces of one character
    apart (both pieces of a split emoji claim the whole emoji). The tokens' own bytes can: walking
    the text with a cursor, a token whose bytes are the next bytes of the text, within its
    character span, covers exactly those. A token whose bytes are not in the text there (special
    tokens, text changed by a normaliser, the space SentencePiece adds at the start) gets its
    character span in bytes; it then stands for other bytes than it covers, and alignment, which
    compares both, never pairs it with a token that stands for the text.
    """
    data = text.encode("utf-8")
    char_bytes = char_to_byte_offsets(text)
    starts, ends = [], []
    cursor = 0
    for token, (a, b) in zip(ids, offsets, strict=True):
        low, high = int(char_bytes[a]), int(char_bytes[b])
        piece = pieces[token] if 0 <= token < len(pieces) else None
        if piece and cursor < high and cursor + len(piece) > low and data.startswith(piece, cursor):
            start, end = cursor, cursor + len(piece)
        elif piece and low >= cursor and data.startswith(piece, low):  # the tokenizer skipped text
            start, end = low, low + len(piece)
        else:
            start, end = low, high
        starts.append(start)
        ends.append(end)
        cursor = max(cursor, end)
    return starts, ends


def encode_conversation(
    chat: ChatTokenizer, conv: Conversation, max_length: int, overflow: str
) -> EncodedExample | str:
    """Tokenize ``conv`` and find its supervised tokens; a string is the reason to skip it."""
    assistant = conv.assistant_indices
    if not assistant:
        return "no assistant message"
    if any(not conv.messages[i]["content"].strip() for i in assistant):
        return "empty assistant message"
    rendered = render(chat.tokenizer, chat.template, conv)
    enc = chat.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    token_start, token_end = token_byte_spans(rendered.text, ids, offsets, chat.pieces)
    char_bytes = char_to_byte_offsets(rendered.text)
    special = set(chat.tokenizer.all_special_ids)

    positions, messages, starts, ends = [], [], [], []
    covered: dict[int, tuple[int, int]] = {}  # message -> the verbatim content's bytes, relative
    cursor = 0
    for m in assistant:
        text_start, content_start, length = rendered.content_offsets[m]
        content = conv.messages[m]["content"]
        first, last = int(char_bytes[text_start]), int(char_bytes[text_start + length])
        base = first - len(content[:content_start].encode("utf-8"))  # where the content's byte 0 would be
        covered[m] = (first - base, last - base)
        while cursor < len(ids) and token_end[cursor] <= first:
            cursor += 1
        while cursor < len(ids) and token_start[cursor] < last:
            if token_end[cursor] > max(token_start[cursor], first):  # zero-width tokens cover nothing
                positions.append(cursor)
                messages.append(m)
                starts.append(token_start[cursor] - base)
                ends.append(token_end[cursor] - base)
            cursor += 1
        # The special token that closes the turn (<|im_end|>, </s>, <end_of_turn>) is supervised too:
        # a model must learn to stop. It may follow only whitespace that the template adds.
        if (
            cursor < len(ids)
            and ids[cursor] in special
            and not rendered.text[text_start + length : offsets[cursor][0]].strip()
        ):
            content_bytes = len(content.encode("utf-8"))
            positions.append(cursor)
            messages.append(m)
            starts.append(content_bytes)
            ends.append(content_bytes)
            cursor += 1

    truncated = len(ids) > max_length
    if truncated:
        if overflow == "skip":
            return f"longer than --max-length {max_length} ({len(ids)} tokens)"
        ids = ids[:max_length]
        keep = sum(p < max_length for p in positions)
        positions, messages, starts, ends = positions[:keep], messages[:keep], starts[:keep], ends[:keep]
    # Position 0 has no preceding logits to predict it.
    first_kept = next((i for i, p in enumerate(positions) if p >= 1), len(positions))
    positions, messages = positions[first_kept:], messages[first_kept:]
    starts, ends = starts[first_kept:], ends[first_kept:]
    if not positions:
        return "no supervised token within --max-length" if truncated else "no supervised token"
    num_bytes = _covered_bytes(covered, messages, starts, ends)
    return EncodedExample(conv, ids, positions, messages, starts, ends, num_bytes, truncated)


def _covered_bytes(
    verbatim: dict[int, tuple[int, int]], messages: list[int], starts: list[int], ends: list[int]
) -> int:
    """UTF-8 bytes of the assistant text the supervised tokens cover (the union of their spans,
    within the part of each message the template reproduces)."""
    total = 0
    for m in sorted(set(messages)):
        low, high = verbatim[m]
        hit = np.zeros(high - low, dtype=bool)
        for msg, a, b in zip(messages, starts, ends, strict=True):
            if msg == m:
                hit[max(a, low) - low : max(min(b, high), low) - low] = True
        total += int(hit.sum())
    return total
