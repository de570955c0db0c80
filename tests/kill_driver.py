"""Runs a ``fusion-train`` command in this process and SIGKILLs it at a chosen call, like a crash.

Usage: ``kill_driver.py WHEN TARGET N ARGS...``: kill the process on the N-th call of TARGET
(``module:attribute.path``, e.g. ``datasets:Dataset.save_to_disk``), ``before`` it runs or
``after`` it returned, then run ``fusion-train ARGS...`` (``varm-merge ARGS...`` when the first
argument is ``varm-merge``). The patch exists only in this driver:
the project's code has no fault-injection hooks. A killed run exits with -SIGKILL, so a test
can tell the planned kill from any other failure.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def kill_at(target: str, when: str, n: int) -> None:
    """Replace ``target`` by a wrapper that SIGKILLs this process on its ``n``-th call."""
    if when not in ("before", "after"):
        raise SystemExit(f"WHEN must be before or after, not {when!r}")
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original: Callable[..., Any] = getattr(owner, name)
    calls = 0

    def die() -> None:
        print(f"kill_driver: SIGKILL {when} call {calls} of {target}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if when == "before" and calls == n:
            die()
        result = original(*args, **kwargs)
        if when == "after" and calls == n:
            die()
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    when, target, count, *arguments = sys.argv[1:]
    kill_at(target, when, int(count))
    if arguments[:1] == ["varm-merge"]:
        from varm_merge.cli import main

        main(arguments[1:], prog_name="varm-merge")
    else:
        from fusion_train.cli import main

        main(arguments, prog_name="fusion-train")
