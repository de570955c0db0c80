"""The raw bytes each token id of a tokenizer stands for, and the special tokens' roles.

Tokens are compared as the raw bytes they stand for, not as vocabulary strings: byte-level BPE
(GPT-2, SmolLM2, Qwen) stores ``" hello"`` as ``"Ġhello"``, SentencePiece as ``"▁hello"`` and
splits unknown characters into ``<0xNN>`` pieces; undoing those conventions makes exact matches
between unrelated tokenizers far more common. Special tokens are not text and are matched by
role (end of turn, eos, bos) instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

# Roles of special tokens, most specific first: a token that is both eos and end of turn is
# matched as end of turn.
ROLES = ("end_of_turn", "eos", "bos", "pad", "unk")
MATCHED_ROLES = ("end_of_turn", "eos", "bos")  # pad and unk are never a meaningful prediction
OTHER_SPECIAL = "other_special"
# Used only when the chat template cannot tell which token closes an assistant turn.
END_OF_TURN_NAMES = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|eot|>")

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
@cache
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the rest
    are shifted to code points 256 and up so that every byte has a visible character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


@cache
def _gpt2_decoding() -> tuple[dict[int, int], re.Pattern[str]]:
    """``_gpt2_unicode_to_byte`` in the form the C string functions take, since every token of a
    vocabulary goes through it: a ``str.translate`` table to code points equal to the byte values
    (which latin-1 then encodes as those bytes), and a pattern matching a character outside it."""
    table = _gpt2_unicode_to_byte()
    outside = re.compile("[^" + "".join(re.escape(ch) for ch in table) + "]")
    return {ord(ch): byte for ch, byte in table.items()}, outside


@dataclass(frozen=True)
class SpecialToken:
    content: str
    roles: tuple[str, ...]  # subset of ROLES in ROLES order, or (OTHER_SPECIAL,)


@dataclass(frozen=True)
class TokenBytes:
    """What every token id of one tokenizer stands for.

    ``pieces[i]`` is the raw bytes of text token ``i`` and ``None`` for special tokens (see
    ``specials``) and ids without a token. ``byte_pieces`` holds the ids of SentencePiece
    ``<0xNN>`` pieces: they duplicate ordinary tokens' bytes, and the ordinary token wins.
    ``prepends_space``: the tokenizer adds a space (the ``▁`` word marker) before text that does
    not start with one, so the bytes of an encoding start with one extra ``b" "`` which the
    tokenizer's decoder strips again.
    """

    pieces: list[bytes | None]
    specials: dict[int, SpecialToken]
    byte_pieces: frozenset[int]
    prepends_space: bool

    def __len__(self) -> int:
        return len(self.pieces)

    def id_for_role(self, role: str) -> int | None:
        """The lowest id carrying ``role``, or None."""
        return next((i for i, s in sorted(self.specials.items()) if role in s.roles), None)

    def digest(self) -> str:
        """A hash of everything read: every token's bytes, the byte pieces, the leading-space
        convention and the special tokens' roles (which depend on settings outside
        ``tokenizer.json``). Cached maps keyed by it go stale whenever the reading rules change."""
        digest = hashlib.sha256()
        for piece in self.pieces:
            digest.update(b"\xff" * 4 if piece is None else len(piece).to_bytes(4, "little") + piece)
        specials = sorted((i, s.content, s.roles) for i, s in self.specials.items())
        digest.update(json.dumps([specials, sorted(self.byte_pieces), self.prepends_space]).encode("utf-8"))
        return digest.hexdigest()[:16]


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every component (decoder, pre-tokenizer, normalizer step) in a tokenizer JSON subtree."""
    if isinstance(node, list):
        return [part for item in node for part in _walk(item)]
    if not isinstance(node, dict):
        return []
    found = [node] if "type" in node else []
    for key in ("decoders", "pretokenizers", "normalizers"):
        found += _walk(node.get(key))
    return found


@dataclass(frozen=True)
class _Conventions:
    byte_level: bool
    replacements: tuple[tuple[str, str], ...]  # applied to the token string, e.g. ("▁", " ")
    byte_fallback: bool
    prepends_space: bool


def _conventions(backend_json: dict[str, Any]) -> _Conventions:
    """Read the string conventions from the decoder, pre-tokenizer and normalizer definitions."""
    decoder = _walk(backend_json.get("decoder"))
    pre = _walk(backend_json.get("pre_tokenizer"))
    normalizer = _walk(backend_json.get("normalizer"))
    byte_level = any(c["type"] == "ByteLevel" for c in decoder + pre)
    replacements = []
    for c in decoder:
        if c["type"] == "Metaspace":
            replacements.append((c.get("replacement", "▁"), " "))
        elif c["type"] == "Replace" and isinstance(c.get("pattern"), dict) and "String" in c["pattern"]:
            replacements.append((c["pattern"]["String"], c["content"]))
    byte_fallback = any(c["type"] == "ByteFallback" for c in decoder) or bool(
        backend_json.get("model", {}).get("byte_fallback")
    )
    prepends_space = any(
        (
            c["type"] == "Metaspace"
            and (c.get("prepend_scheme") in ("first", "always") or c.get("add_prefix_space"))
        )
        or (c["type"] == "ByteLevel" and c.get("add_prefix_space"))
        for c in pre
    ) or any(c["type"] == "Prepend" for c in normalizer)
    return _Conventions(byte_level, tuple(replacements), byte_fallback, prepends_space)


def _conventions_json(backend: Any) -> dict[str, Any]:
    """The parts of a fast tokenizer's JSON that ``_conventions`` reads, each from its own
    component: the whole JSON of a large vocabulary (its merges) takes seconds to write and parse."""
    parts = {}
    for name in ("decoder", "pre_tokenizer", "normalizer"):
        component = getattr(backend, name)
        parts[name] = None if component is None else json.loads(component.__getstate__())
    byte_fallback = getattr(backend.model, "byte_fallback", None)
    if byte_fallback is None:  # a model class that does not expose it: read its own JSON
        byte_fallback = json.loads(backend.model.__getstate__()).get("byte_fallback", False)
    return {**parts, "model": {"byte_fallback": byte_fallback}}


def _text_bytes(token: str, conv: _Conventions) -> tuple[bytes, bool]:
    """The bytes a vocabulary string stands for, and whether it is a ``<0xNN>`` byte piece."""
    if conv.byte_fallback:
        match = _BYTE_PIECE.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)]), True
    for old, new in conv.replacements:
        token = token.replace(old, new)
    if conv.byte_level:
        to_byte_values, outside_table = _gpt2_decoding()
        if outside_table.search(token) is None:
            return token.translate(to_byte_values).encode("latin-1"), False
        # As the ByteLevel decoder does: a string outside the table stands for its UTF-8 bytes.
    return token.encode("utf-8"), False


def end_of_turn_token(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """The special token that closes an assistant turn in the chat template, if there is one.

    Renders a two-message conversation and reads which special token follows the assistant's
    text; without a usable template, falls back to well-known names (``END_OF_TURN_NAMES``).
    """
    specials = sorted(
        (t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special),
        key=len,
        reverse=True,
    )
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template.strip():
        marker = "Xq7 reply text"
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        except Exception:  # any template error means "cannot tell"; names are the fallback
            text = ""
        if isinstance(text, str) and marker in text:
            after = text[text.index(marker) + len(marker) :].lstrip()
            found = next((s for s in specials if after.startswith(s)), None)
            if found is not None:
                return found
    return next((name for name in END_OF_TURN_NAMES if name in specials), None)


def token_bytes(tokenizer: Any, chat_template: str | None = None) -> TokenBytes:
    """The raw bytes of every token id below ``len(tokenizer)`` and the roles of special tokens.

    The conventions (byte-level table, word marker, byte fallback) are read from the fast
    tokenizer's JSON, not guessed from its name. Added tokens that are not special are text and
    stand for their content's UTF-8 bytes (they are matched on the raw input). ``chat_template``
    overrides the tokenizer's own template when finding the end-of-turn token.
    """
    backend = tokenizer.backend_tokenizer
    conv = _conventions(_conventions_json(backend))
    size = len(tokenizer)
    pieces: list[bytes | None] = [None] * size
    byte_pieces = set()
    added = backend.get_added_tokens_decoder()
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        if index < size and index not in added:
            pieces[index], is_byte_piece = _text_bytes(token, conv)
            if is_byte_piece:
                byte_pieces.add(index)
    named = {
        "eos": tokenizer.eos_token_id,
        "bos": tokenizer.bos_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    end_of_turn = end_of_turn_token(tokenizer, chat_template)
    special_ids = {i for i, t in added.items() if t.special} | {i for i in named.values() if i is not None}
    for index, token in added.items():
        if index < size and index not in special_ids:
            pieces[index] = token.content.encode("utf-8")
    specials = {}
    for index in sorted(i for i in special_ids if i < size):
        # A role token that is an ordinary vocabulary entry is still not text.
        content = tokenizer.convert_ids_to_tokens(index)
        roles = {role for role, i in named.items() if i == index}
        if content == end_of_turn:
            roles.add("end_of_turn")
        specials[index] = SpecialToken(content, tuple(r for r in ROLES if r in roles) or (OTHER_SPECIAL,))
        pieces[index] = None
    return TokenBytes(pieces, specials, frozenset(byte_pieces), conv.prepends_space)
