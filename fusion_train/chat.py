"""Chat data: reading the common record shapes into one form, and rendering a conversation in a
model's own chat template while remembering where every message's text landed.

Knowing where each assistant message's content lies inside the rendered text is what lets later
stages align tokens across tokenizers and templates exactly, by character spans, instead of
guessing with edit distances.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fusion_train.errors import UserError, read_text

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
DOMAIN_FIELDS = ("domain", "dataset", "category", "source")
BUILTIN_TEMPLATES = ("plain", "chatml", "llama2")


class ChatDataError(UserError, ValueError):
    """Input data that cannot be read; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class Conversation:
    """One normalised chat record: messages with roles ``system``/``user``/``assistant``."""

    id: str
    messages: tuple[dict[str, str], ...]
    domain: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read a JSON file, a JSONL file, or a ``datasets`` directory saved with ``save_to_disk``.

    Every record gets a stable id: its own ``id`` field, or a hash of its content. Explicit ids
    must be unique; identical conversations without ids get ``#2``, ``#3``... suffixes.
    """
    path = Path(path)
    conversations: list[Conversation] = []
    seen: dict[str, int] = {}
    for index, record in _read_records(path):
        conv = normalise_record(record, where=f"{path}, record {index}")
        if conv.id in seen:
            if "id" in record:
                raise ChatDataError(
                    f"{path}, record {index}: id {conv.id!r} was already used by record {seen[conv.id]}; "
                    "ids must be unique (remove the field to get content-hash ids)."
                )
            suffix = 2
            while f"{conv.id}#{suffix}" in seen:
                suffix += 1
            conv = Conversation(f"{conv.id}#{suffix}", conv.messages, conv.domain, conv.metadata)
        seen[conv.id] = index
        conversations.append(conv)
    if not conversations:
        raise ChatDataError(
            f"{path}: no records found (the data is empty); give a file with at least one chat record."
        )
    return conversations


def _read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise ChatDataError(f"{path}: no such file or directory.")
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise ChatDataError(
                f"{path}: not a `datasets` directory saved with save_to_disk ({exc})."
            ) from exc
        if isinstance(data, datasets.DatasetDict):
            raise ChatDataError(f"{path}: holds splits {list(data)}; pass one split's directory.")
        yield from enumerate(data)
        return
    text = read_text(path, ChatDataError)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChatDataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}.") from exc
        if not isinstance(records, list):
            raise ChatDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}.")
        for index, record in enumerate(records):
            yield index, _as_dict(record, path, index)
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ChatDataError(
                f"{path}, line {lineno}: not valid JSON ({exc.msg}); expected one JSON object per line."
            ) from exc
        yield index, _as_dict(record, path, index)
        index += 1


def _as_dict(record: Any, path: Path, index: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ChatDataError(f"{path}, record {index}: expected a JSON object, got {type(record).__name__}.")
    return record


def normalise_record(record: dict[str, Any], where: str = "record") -> Conversation:
    """Turn an OpenAI-, ShareGPT- or Alpaca-style record into a :class:`Conversation`."""
    if "messages" in record:
        messages = _messages(record, "messages", "role", "content", where)
        used = {"messages"}
    elif "conversations" in record:
        messages = _messages(record, "conversations", "from", "value", where)
        used = {"conversations"}
    elif "instruction" in record and "output" in record:
        prompt = _text(record, "instruction", where)
        if record.get("input") is not None and _text(record, "input", where):
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record, "output", where)},
        ]
        used = {"instruction", "input", "output"}
    else:
        raise ChatDataError(
            f"{where}: unknown record shape with keys {sorted(record)}; expected OpenAI-style "
            "{'messages': [{'role', 'content'}]}, ShareGPT-style {'conversations': [{'from', 'value'}]} "
            "or Alpaca-style {'instruction', 'input'?, 'output'}."
        )
    metadata = {k: v for k, v in record.items() if k not in used and k != "id"}
    domain = next((str(record[k]) for k in DOMAIN_FIELDS if record.get(k) not in (None, "")), "")
    messages_tuple = tuple(messages)
    record_id = str(record["id"]) if record.get("id") not in (None, "") else content_id(messages_tuple)
    return Conversation(record_id, messages_tuple, domain, metadata)


def _text(record: dict[str, Any], key: str, where: str) -> str:
    """A field that must hold text: ``null`` or a number would otherwise train on "None" or "3"."""
    value = record[key]
    if not isinstance(value, str):
        found = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
        raise ChatDataError(f"{where}: {key!r} must be text, got {found}; fix or remove the record.")
    return value


def _messages(
    record: dict[str, Any], key: str, role_key: str, content_key: str, where: str
) -> list[dict[str, str]]:
    raw = record[key]
    if not isinstance(raw, list):
        found = "null" if raw is None else f"{type(raw).__name__} {raw!r:.60}"
        raise ChatDataError(f"{where}: {key!r} must be a list of messages, got {found}.")
    return [_message(m, role_key, content_key, f"{where}, {key}[{i}]") for i, m in enumerate(raw)]


def _message(raw: Any, role_key: str, content_key: str, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or role_key not in raw or content_key not in raw:
        raise ChatDataError(
            f"{where}: every message needs {role_key!r} and {content_key!r}, got {raw!r:.200}."
        )
    role = SHAREGPT_ROLES.get(str(raw[role_key]).lower(), str(raw[role_key]).lower())
    if role not in ROLES:
        raise ChatDataError(f"{where}: unknown role {raw[role_key]!r}; use one of {', '.join(ROLES)}.")
    return {"role": role, "content": _text(raw, content_key, where)}


def content_id(messages: tuple[dict[str, str], ...]) -> str:
    """A stable id from the conversation's content (the same text always gets the same id)."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def data_fingerprint(conversations: list[Conversation]) -> str:
    """Identifies a data set by its ids and contents, so stages can check they read the same data."""
    digest = hashlib.sha256()
    for conv in conversations:
        digest.update(conv.id.encode("utf-8") + b"\0" + content_id(conv.messages).encode("ascii") + b"\n")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- rendering


def resolve_chat_template(tokenizer: Any, name_or_path: str | None) -> tuple[str, str]:
    """The Jinja template to use and where it came from.

    ``name_or_path`` may be a built-in name (``plain``, ``chatml``, ``llama2``) or a ``.jinja``
    file; without it the tokenizer's own ``chat_template`` is used, and the ``plain`` fallback
    when the tokenizer has none (base models such as Gemma-3-270m).
    """
    if name_or_path:
        if name_or_path in BUILTIN_TEMPLATES:
            return builtin_template(name_or_path), f"builtin:{name_or_path}"
        path = Path(name_or_path)
        if not path.is_file():
            raise ChatDataError(
                f"--chat-template {name_or_path!r}: neither a built-in template "
                f"({', '.join(BUILTIN_TEMPLATES)}) nor a file."
            )
        return path.read_text(encoding="utf-8"), str(path)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own, "tokenizer"
    return builtin_template("plain"), "builtin:plain"


def builtin_template(name: str) -> str:
    """The text of a built-in template shipped with the package (plain, chatml, llama2)."""
    return resources.files("fusion_train.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class RenderedConversation:
    """The conversation's text in one template, and where each message's content starts in it.

    ``content_offsets[i]`` is ``(start_in_text, start_in_content, length)``: the template may
    strip surrounding whitespace, so the part of message ``i`` that appears verbatim is
    ``content[start_in_content : start_in_content + length]``, at ``text[start_in_text:]``.
    """

    text: str
    content_offsets: tuple[tuple[int, int, int], ...]


def render(tokenizer: Any, template: str, conv: Conversation) -> RenderedConversation:
    """Render ``conv`` with ``template`` and locate every message's content in the text.

    Raises :class:`ChatDataError` when the template drops or rewrites a message's content
    (beyond stripping surrounding whitespace): spans would otherwise point at the wrong text.
    """
    text = tokenizer.apply_chat_template(list(conv.messages), chat_template=template, tokenize=False)
    offsets = []
    cursor = 0
    for index, message in enumerate(conv.messages):
        content = message["content"]
        stripped = content.strip()
        lead = len(content) - len(content.lstrip())
        found = text.find(content, cursor)
        if found >= 0:
            offsets.append((found, 0, len(content)))
            cursor = found + len(content)
            continue
        found = text.find(stripped, cursor)
        if found < 0:
            raise ChatDataError(
                f"record {conv.id!r}: the chat template does not reproduce the content of message {index} "
                f"({message['role']}: {content[:60]!r}...). Choose a template that keeps message text "
                "verbatim with --chat-template (plain, chatml, llama2 or a .jinja file)."
            )
        offsets.append((found, lead, len(stripped)))
        cursor = found + len(stripped)
    return RenderedConversation(text, tuple(offsets))


# Three turns to render: where the answer ends and the second question begins shows what the
# template writes between an assistant turn and the user's next one.
_QUESTION, _ANSWER, _FOLLOW_UP = "What is one plus one?", "Two.", "And two plus two?"


@dataclass(frozen=True)
class TurnOpening:
    """What a template writes at the start of a user turn that follows an assistant turn (its
    whitespace stripped, e.g. ``User:``, ``[INST]``, ``<|im_start|>user``). A model that writes
    it itself is inventing the user's next turn."""

    text: str
    after_line_break: bool  # the template puts a line break before it (a line must start with it)


def user_turn_opening(tokenizer: Any, template: str) -> TurnOpening | None:
    """The opening of the next user turn, read from what ``template`` renders between an answer
    and a follow-up question, less what it writes after an answer that ends the conversation (the
    closing of the assistant turn: an end-of-sequence token, a newline). None when the template
    writes nothing but whitespace there, or cannot render a follow-up question."""
    from jinja2 import TemplateError

    turns = [{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER}]
    try:
        closed = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
        followed = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": _FOLLOW_UP}], chat_template=template, tokenize=False
        )
    except TemplateError:  # e.g. a template that refuses more than one user turn
        return None
    answer, closed_answer = followed.find(_ANSWER), closed.find(_ANSWER)
    follow_up = followed.find(_FOLLOW_UP, answer)
    if min(answer, closed_answer, follow_up) < 0:  # the template rewrites message text
        return None
    between = followed[answer + len(_ANSWER) : follow_up]
    closing = closed[closed_answer + len(_ANSWER) :]
    shared = 0
    while shared < min(len(between), len(closing)) and between[shared] == closing[shared]:
        shared += 1
    rest = between[shared:]
    opening = rest.strip()
    if not opening:
        return None
    before = between[: len(between) - len(rest.lstrip())]
    return TurnOpening(opening, "\n" in before)
