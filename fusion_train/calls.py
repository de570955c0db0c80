"""A stage's function, called with the same arguments in this process or in every rank of a
launched job: the one way a recipe or a command runs a stage.

With one process, :meth:`StageCall.in_ranks` calls the function here. With several (``--nproc``,
a hostfile) it writes the call (the function's name, its arguments and what reports its result)
to a JSON file beside the stage's output and starts ``python -m fusion_train.calls CALL.json``
in every process (``fusion_train.launch``); every rank reads it and calls the same function with the same
arguments, and the function splits the work by its rank. Nothing is rebuilt from command-line
flags, so every setting reaches the ranks whether or not a flag declares it. A command's own
``--nproc``/``--hostfile`` go the same way (:meth:`StageCall.from_command`), after the
inputs are checked once here.

The JSON holds plain values, paths, tuples, and dataclasses named by class (only classes and
functions of this package are looked up when reading it back); no pickle is read.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import click

from fusion_train.errors import debugging, user_message
from fusion_train.launch import LaunchError, launch, launches
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


@dataclass(frozen=True)
class StageCall:
    """A stage's function with its arguments and output folder: made here, or in every rank from a
    call file written beside the output (where every node sees it). ``report`` prints the result
    on the main process (every rank returns one; the main rank's is the whole run's)."""

    function: Callable[..., Any]
    arguments: dict[str, Any]
    out: Path
    report: Callable[[Path, Any], None] | None = None

    def here(self) -> None:
        result = self.function(**self.arguments)
        if self.report is not None and os.environ.get("RANK", "0") == "0":
            self.report(self.out, result)

    def in_ranks(self, nproc: int | None, hostfile: str | None, master_port: int | None = None) -> int:
        """Here for one local process, else in every rank of a launched job (``nproc`` per node,
        the nodes of ``hostfile``: ``launch.launch``); the exit status (0 here)."""
        if not launches(nproc or 1, hostfile):
            self.here()
            return 0
        path = self.out.parent / f".{self.out.name}.call.json"
        self.write(path)
        try:
            return launch(MODULE, [str(path)], nproc, hostfile, master_port)
        finally:
            path.unlink(missing_ok=True)

    def from_command(self, params: Mapping[str, Any], check: Callable[[], object]) -> None:
        """A stage command's body once its flags (``params``) are parsed: here, or under the
        command's ``--nproc``/``--hostfile``, ``check()`` once here (a bad input fails before any
        rank starts, not in every rank) and then in every rank. ``--shard`` splits the work
        between processes the user starts, so it does not go with ``--nproc``."""
        nproc, hostfile, port = params.get("nproc"), params.get("hostfile"), params.get("master_port")
        if not launches(nproc or 1, hostfile):
            if port is not None:  # a world of one's rendezvous port
                os.environ.setdefault("MASTER_PORT", str(port))
            self.here()
            return
        if params.get("shard"):
            raise click.UsageError(
                "--shard splits the work between processes you start; --nproc starts them. Choose one."
            )
        check()
        code = self.in_ranks(nproc, hostfile, port)
        if code != 0:
            raise LaunchError(
                f"a process of `{self.function.__name__}` failed (exit status {code}); see above."
            )

    def write(self, path: Path) -> None:
        call = {"format": FORMAT, "function": _name(self.function), "arguments": encode(self.arguments),
                "out": str(self.out), "report": None if self.report is None else _name(self.report)}  # fmt: skip
        atomic_write_text(path, json.dumps(call, allow_nan=False, indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> StageCall:
        call = json.loads(Path(path).read_text(encoding="utf-8"))
        if call.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} call file")
        report = None if call["report"] is None else _find(call["report"])
        return cls(_find(call["function"]), decode(call["arguments"]), Path(call["out"]), report)


def main(argv: list[str]) -> int:
    """A rank: read the call, make it; a user error is one line, anything else its traceback.
    ``--local_rank``, which launchers started without ``--no_local_rank`` pass, is ignored: a
    stage reads ``LOCAL_RANK`` from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("call", help="the call file")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    call = StageCall.read(parser.parse_args(argv).call)
    try:
        call.here()
    except Exception as error:
        message = user_message(error)
        if message is None or debugging():
            raise
        print(f"Error (rank {os.environ.get('RANK', '0')}): {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
