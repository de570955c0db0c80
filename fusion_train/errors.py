"""User errors, and the click classes that show them as one line instead of a traceback.

An error the user can fix (bad data, flag, recipe, config, path) is a :class:`UserError`; its
message names the culprit (file and record, key, flag or path) and the fix. Every command of
``fusion-train`` and ``varm-merge`` reports it as click's ``Error: ...`` with exit status 1.
Anything else is a bug and keeps its traceback. ``--debug`` on either CLI, or
``FUSION_TRAIN_DEBUG=1`` (which also reaches launched processes), shows the traceback of user
errors too, for bug reports.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import click
import yaml

DEBUG_ENV = "FUSION_TRAIN_DEBUG"

#: OSErrors that describe the user's files or machine, not the code: shown as one line when
#: they name the file (a full disk, a missing or unreadable path, a read-only folder).
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOTEMPTY,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }
)


class UserError(Exception):
    """A problem in the user's input or environment; the message names the culprit and the fix."""


class TrainInputError(UserError, ValueError):
    """An input that would make training fail or silently train the wrong thing (here, not in
    ``training``, so that reading fused data does not import transformers' Trainer)."""


def one_line(error: BaseException | str) -> str:
    """An error (``ValueError: ...``) or a message on one line, for a user error that quotes code
    it does not control (a user's verifier, a library): its line breaks would split the error line."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def read_text(path: str | Path, error_class: type[UserError] = UserError) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); other encodings are a user error naming it."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise error_class(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save the file as UTF-8."
        ) from error


def read_yaml(path: str | Path, error_class: type[UserError] = UserError) -> Any:
    """A YAML file (``safe_load``); a syntax error is a user error naming the file, line and column."""
    try:
        return yaml.safe_load(read_text(path, error_class))
    except yaml.MarkedYAMLError as error:
        found, began = error.problem_mark, error.context_mark
        where = f", line {found.line + 1}, column {found.column + 1}" if found else ""
        problem = error.problem or "syntax error"
        if error.context:  # e.g. "while parsing a flow sequence", which began elsewhere
            problem += f", {error.context}" + (f" that began at line {began.line + 1}" if began else "")
        raise error_class(f"{path}{where}: not valid YAML ({problem}).") from error
    except yaml.YAMLError as error:
        raise error_class(f"{path}: not valid YAML ({error}).") from error


def debugging() -> bool:
    """Whether user errors should show their traceback (``--debug`` or ``FUSION_TRAIN_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def user_message(error: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (keep its traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS and error.filename is not None:
        target = f"{error.filename} -> {error.filename2}" if error.filename2 else str(error.filename)
        return f"{target}: {error.strerror}."
    return None


class ReportsUserErrors:
    """Mixin for click commands: a user error becomes ``Error: <message>`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except click.ClickException:
            raise
        except Exception as error:
            message = user_message(error)
            if message is None or debugging():
                raise
            raise click.ClickException(message) from error


class Command(ReportsUserErrors, click.Command):
    """A stage command; also reports user errors when run on its own (e.g. under a launcher)."""


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # the environment, so launched processes and child commands show tracebacks too
        os.environ[DEBUG_ENV] = "1"


class Group(ReportsUserErrors, click.Group):
    """The top-level group of both CLIs: ``-h``, ``--debug``, and user errors as one line."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = kwargs.setdefault("context_settings", {})
        settings.setdefault("help_option_names", ["-h", "--help"])
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--debug"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_set_debug,
                help=f"Show the full traceback of errors in your input too (or set {DEBUG_ENV}=1).",
            )
        )
