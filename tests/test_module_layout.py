"""The package's import graph, read from the source (every import statement: at module level,
under ``TYPE_CHECKING`` and inside functions): no import cycle, and no module that shared work
lives in (formats, engines, settings, the trainer plumbing) imports a stage's module (one that
defines a command); only the orchestration does. And the stages that do not train or merge start
without importing the libraries that only training and merging need."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion_train", "varm_merge")
# Modules whose job is to run stages in order (recipes) or to gather their commands.
ORCHESTRATION = {"fusion_train.cli", "fusion_train.__main__", "varm_merge.__main__", "fusion_train.recipe", "fusion_train.explicit",
                 "fusion_train.implicit.sections", "fusion_train.implicit.pipeline"}  # fmt: skip


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules that the statements of ``tree`` import (``from a import b``: ``a.b``
    where that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the package imports absolutely"
            assert node.module is not None
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}  # fmt: skip
    return found & modules


def import_graph() -> tuple[dict[str, set[str]], set[str]]:
    """Module -> the package's modules it imports; the modules that define a click command."""
    files = module_files()
    graph, commands = {}, set()
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = imported(tree, set(files)) - {name}
        decorators = (d.func if isinstance(d, ast.Call) else d for n in ast.walk(tree)
                      if isinstance(n, ast.FunctionDef) for d in n.decorator_list)  # fmt: skip
        if any(isinstance(d, ast.Attribute) and d.attr in ("command", "group") for d in decorators):
            commands.add(name)
    return graph, commands


def test_the_reading_finds_what_the_modules_import() -> None:
    graph, commands = import_graph()
    assert {"fusion_train.train", "fusion_train.implicit.dpo", "varm_merge.cli"} <= commands
    assert "fusion_train.training" not in commands
    assert {"fusion_train.calls", "fusion_train.training", "fusion_train.fused"} <= graph[
        "fusion_train.train"
    ]
    assert "fusion_train.launch" in graph["fusion_train.calls"]


def test_no_import_cycle() -> None:
    graph, _ = import_graph()
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_only_the_orchestration_imports_a_stage() -> None:
    graph, commands = import_graph()
    shared = set(graph) - commands - ORCHESTRATION
    assert {name: sorted(graph[name] & commands) for name in shared if graph[name] & commands} == {}


# Stages that neither train nor merge, and the rank entry point: each starts as a new process (a
# command, a launched rank), so what they import is paid at every start.
LIGHT_MODULES = ("fusion_train.cli", "fusion_train.calls", "fusion_train.represent", "fusion_train.align",
                 "fusion_train.fuse", "fusion_train.evaluate", "fusion_train.implicit.sample",
                 "fusion_train.implicit.score", "fusion_train.implicit.prefer", "fusion_train.implicit.rate")  # fmt: skip
# Seconds of imports each, on 2 cores: what only training or merging needs.
HEAVY_LIBRARIES = ("transformers.trainer", "deepspeed", "trl", "mergekit", "peft")


def test_stages_that_do_not_train_or_merge_import_no_trainer_engine_or_merger() -> None:
    """Imported in a fresh interpreter (what a command or rank starts from), they leave none of
    the training and merging libraries in ``sys.modules``."""
    script = (
        f"import importlib, sys\nfor m in {LIGHT_MODULES!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
