"""The GPU check in its CPU form (``bench/gpu_check.sh --dry-run``), as CI runs it: every part runs
here at tiny shapes and the report has every figure the issue asks for, with numbers or a stated
reason, so the one command a short GPU slot gets cannot rot between slots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# The figures of issue 26, in the report's order.
FIGURES = ("dtype_auto", "chunked_head", "training_step", "represent", "sample", "varm")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.slow
def test_dry_run_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    logs = "".join(p.read_text()[-3000:] for p in sorted(out.glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert sorted(p.name for p in out.iterdir()) == ["figures.log", "report.json", "report.md", "tests.log"]

    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dry-run" and report["failures"] == []
    assert [(p["part"], p["status"]) for p in report["parts"]] == [("tests", "ok"), ("figures", "ok")]
    cases = report["tests"]["cases"]
    assert cases and {c["outcome"] for c in cases} == {"skipped"}  # no GPU here: each says why
    assert f"{len(cases)} skipped" in report["tests"]["summary"]
    assert list(report["figures"]) == list(FIGURES)
    for key in FIGURES:
        section = report["figures"][key]
        assert section["error"] is None, key
        assert section["rows"], key
        for row in section["rows"]:
            assert "error" not in row and any(_number(v) for v in row.values()), (key, row)
        missing = [k for row in section["rows"] for k, v in row.items() if v is None]
        assert not missing or section["skipped"], f"{key}: {missing} left empty without a reason"
    assert all(item["why"] for item in report["skipped"])

    text = (out / "report.md").read_text()
    assert text.startswith("# GPU check, ") and "(dry-run)" in text
    for heading in ("## 1. CUDA tests", "## 2. Figures", "## 3. Skipped, and why"):
        assert heading in text
    assert text.count("\n### ") == len(FIGURES)


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    for arguments in ([], ["--dry-run"], ["--verbose", str(tmp_path)], [str(tmp_path), str(tmp_path)]):
        result = subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True)
        assert result.returncode == 2, arguments
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("usage: "), result.stderr
