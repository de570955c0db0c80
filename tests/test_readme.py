"""The README's walk-through runs as written: every ```bash block marked ``<!-- walkthrough -->``
is pasted, command by command, into a real shell in a folder holding tiny models on real
tokenizers and small chat files, as a new user would. The commands are never rewritten here, so
a README example that no longer runs (a stale path, a flag renamed) fails this test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QWEN_PADDED_VOCAB, build_tiny_model, write_chats

README = Path(__file__).resolve().parents[1] / "docs" / "walkthrough.md"  # linked from the README
MARKER = "<!-- walkthrough -->"
# The pivot shares no tokenizer with the sources: both align paths that cross tokenizers run.
MODELS = {"pivot": "smollm2", "source-1": "mistral", "source-2": "qwen"}
HELDOUT = [
    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue, like the sky."}], "dataset": "short"},
    {"messages": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "One, two, three."}], "dataset": "short"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour", "dataset": "translate"},
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"},
                       {"from": "gpt", "value": "2 + 2 = 4. 🎉"}], "dataset": "maths"},
]  # fmt: skip


def walkthrough_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks that directly follow a walk-through marker line."""
    return re.findall(rf"^{re.escape(MARKER)}\n```bash\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def commands(block: str) -> list[str]:
    """Command lines as a shell reads them: lines ending in a backslash continue the command;
    blank lines and whole-line comments are not commands."""
    found, current = [], ""
    for line in block.splitlines():
        current += line + "\n"
        if line.endswith("\\"):
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            found.append(current.rstrip("\n"))
        current = ""
    assert not current, f"a command ends in a continuation: {current!r}"
    return found


def test_blocks_are_found_as_marked() -> None:
    """The extraction itself: a marked block is taken whole, an unmarked one is not, and a
    continued command is one command."""
    text = (
        f"{MARKER}\n```bash\necho a \\\n    b\n# a comment\n\necho c\n```\n\n```bash\necho not-marked\n```\n"
    )
    (block,) = walkthrough_blocks(text)
    assert commands(block) == ["echo a \\\n    b", "echo c"]


def test_readme_marks_every_stage_of_the_walkthrough() -> None:
    """Every marker opens a ```bash block, and the walk-through covers every stage in the
    pipeline's order."""
    text = README.read_text(encoding="utf-8")
    blocks = walkthrough_blocks(text)
    assert text.count(MARKER) == len(blocks)
    lines = [c for b in blocks for c in commands(b)]
    order = ["fusion-train represent", "fusion-train align", "fusion-train fuse", "fusion-train train",
             "varm-merge config", "varm-merge run", "fusion-train evaluate"]  # fmt: skip
    first = [next(i for i, c in enumerate(lines) if c.startswith(step)) for step in order]
    assert first == sorted(first), lines


def workspace(root: Path, tokenizer_dirs: dict[str, Path]) -> Path:
    """What the walk-through starts from: three local models and two chat files."""
    for seed, (name, tokenizer) in enumerate(MODELS.items()):
        vocab = QWEN_PADDED_VOCAB if tokenizer == "qwen" else None
        build_tiny_model(tokenizer_dirs[tokenizer], root / "models" / name, seed=seed, vocab_size=vocab)
    write_chats(root / "chats.jsonl")
    (root / "heldout.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in HELDOUT), encoding="utf-8"
    )
    return root


@pytest.mark.slow
def test_readme_walkthrough_runs_in_order(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Each command of the walk-through, in a shell, in order, exits 0; the merged model (with
    its tokenizer) and the evaluation report exist at the paths the README names."""
    root = workspace(tmp_path / "work", tokenizer_dirs)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FUSION_TRAIN_DEBUG", None)
    for block in walkthrough_blocks(README.read_text(encoding="utf-8")):
        for command in commands(block):
            done = subprocess.run(
                ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, (
                f"{command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )

    merged = root / "runs" / "merged"
    assert json.loads((merged / "config.json").read_text())["architectures"]
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()
    assert list(merged.glob("*.safetensors"))
    report = (root / "runs" / "eval" / "report.md").read_text(encoding="utf-8")
    for name in ("pivot", "source-1", "source-2", "target-1", "target-2", "baseline", "merged"):
        assert f"| {name} |" in report, name
    for target in ("target-1", "target-2", "baseline"):
        assert (root / "runs" / target / "training_summary.json").is_file()
    assert (root / "runs" / "varm-weights" / "varm_weights.json").is_file()
