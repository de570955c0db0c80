"""A stage's function, called with the same arguments in this process or in every rank of a
launched job: the one way a recipe runs a stage.

With one process, :func:`call_in_ranks` calls the function here. With several (``--nproc``,
a hostfile) it writes the call (the function's name and its arguments) to a JSON file beside the
stage's output and starts ``python -m fusion_train.calls CALL.json`` under the deepspeed
launcher; every rank reads it and calls the same function with the same arguments, and the
function splits the work by its rank. Nothing is rebuilt from command-line flags, so every
setting reaches the ranks whether or not a flag declares it.

The JSON holds plain values, paths, tuples, and dataclasses named by class (only classes and
functions of this package are looked up when reading it back); no pickle is read.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from fusion_train.errors import debugging, user_message
from fusion_train.launch import launch, launches
from fusion_train.storage import atomic_write_text

MODULE = "fusion_train.calls"  # what the launcher runs in every rank
FORMAT = "fusion-train/call@1"
PACKAGE = "fusion_train."  # the only modules a call file may name


def _name(thing: Any) -> str:
    return f"{thing.__module__}:{thing.__qualname__}"


def _find(name: str) -> Any:
    """The function or class ``module:qualname`` of this package that ``name`` names."""
    module, _, qualname = name.partition(":")
    if not module.startswith(PACKAGE):
        raise ValueError(f"{name!r} is not part of {PACKAGE.rstrip('.')}")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def encode(value: Any) -> Any:
    """``value`` as JSON: containers and dataclasses tagged, so that :func:`decode` gives it back."""
    if is_dataclass(value) and not isinstance(value, type):
        values = {f.name: encode(getattr(value, f.name)) for f in fields(value) if f.init}
        return {"dataclass": _name(type(value)), "fields": values}
    if isinstance(value, Path):
        return {"path": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return {"list": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be passed to a launched rank")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if not isinstance(value, dict):
        return value
    if "dataclass" in value:
        return _find(value["dataclass"])(**{k: decode(v) for k, v in value["fields"].items()})
    ((tag, content),) = value.items()
    if tag == "path":
        return Path(content)
    if tag == "tuple":
        return tuple(decode(v) for v in content)
    if tag == "list":
        return [decode(v) for v in content]
    return {k: decode(v) for k, v in content.items()}


def write_call(function: Callable[..., Any], arguments: dict[str, Any], path: Path) -> None:
    """The call file that every rank reads."""
    call = {"format": FORMAT, "function": _name(function), "arguments": encode(arguments)}
    atomic_write_text(path, json.dumps(call, allow_nan=False, indent=1) + "\n")


def read_call(path: str | Path) -> tuple[Callable[..., Any], dict[str, Any]]:
    call = json.loads(Path(path).read_text(encoding="utf-8"))
    if call.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} call file")
    return _find(call["function"]), decode(call["arguments"])


def call_in_ranks(
    function: Callable[..., Any], arguments: dict[str, Any], nproc: int, hostfile: str | None, out: Path
) -> int:
    """``function(**arguments)`` here for one local process, else in every rank under the
    deepspeed launcher (``nproc`` per node, the nodes of ``hostfile``); the exit status (0 here).
    The call file is written beside ``out`` (the stage's output), which every node must see."""
    if not launches(nproc, hostfile):
        function(**arguments)
        return 0
    path = out.parent / f".{out.name}.call.json"
    write_call(function, arguments, path)
    try:
        return launch(MODULE, [str(path)], nproc, hostfile, None)
    finally:
        path.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    """A rank: read the call, make it; a user error is one line, anything else its traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (path,) = argv
    function, arguments = read_call(path)
    try:
        function(**arguments)
    except Exception as error:
        message = user_message(error)
        if message is None or debugging():
            raise
        print(f"Error (rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
