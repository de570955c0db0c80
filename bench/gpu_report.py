"""The GPU check's report: part 3 of bench/gpu_check.sh, from what the parts left in its work folder.

    python -m bench.gpu_report WORK OUT --mode gpu|dry-run [--wheels gpu-wheels]

Reads WORK/parts.tsv (each part's exit status, seconds and cap), WORK/tests.xml (pytest's JUnit
file of the CUDA tests) and WORK/figures.json (bench/gpu_figures.py), whichever exist: a part
stopped at its cap leaves less, and the report says so. Writes OUT/report.json and OUT/report.md:
the parts, the CUDA tests with a summary line, the figures side by side, what was skipped and
why, and the environment (versions; on the device, whether the carried packages' requirements
are met by what the image has). Exits 1 when a part, a test or a figure failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from fusion_train.storage import atomic_write_text

SCHEMA = "fusion-train/gpu-check@1"
# The figures bench/gpu_figures.py measures, in order (defined here: the report must not depend
# on the figures' imports, it reports their failure).
SECTIONS = ("dtype_auto", "chunked_head", "training_step", "represent", "sample", "varm")
TIMED_OUT = (124, 137)  # timeout(1)'s status for a command it stopped, and for one it killed
PACKAGES = ("torch", "transformers", "accelerate", "peft", "tokenizers", "huggingface-hub", "datasets",
            "deepspeed", "mergekit", "trl", "pydantic")  # fmt: skip


def read_parts(path: Path) -> list[dict[str, Any]]:
    """Lines ``name rc seconds cap`` written by gpu_check.sh as each part ends."""
    parts = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, seconds, cap = line.split("\t")
        code, status = int(rc), "ok"
        if code in TIMED_OUT:
            status = f"stopped at its {cap} s cap"
        elif code != 0:
            status = f"failed (exit {code})"
        parts.append(
            {"part": name, "status": status, "seconds": int(seconds), "cap s": int(cap), "exit": code}
        )
    return parts


def read_tests(path: Path, part: dict[str, Any] | None) -> dict[str, Any]:
    """The CUDA tests from pytest's JUnit file: one row per test and a summary line."""
    if not path.exists():
        why = part["status"] if part else "not run"
        return {"summary": f"no results: the tests part {why}", "counts": {}, "cases": []}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        found = {child.tag: child for child in case}
        outcome = next((tag for tag in ("failure", "error", "skipped") if tag in found), "passed")
        message = found[outcome].get("message", "") if outcome != "passed" else ""
        cases.append({
            "test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
            "seconds": float(case.get("time") or 0), "message": " ".join(message.split())[:300],
        })  # fmt: skip
    counts = {
        outcome: sum(c["outcome"] == outcome for c in cases)
        for outcome in ("passed", "failure", "error", "skipped")
    }
    summary = (f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, "
               f"{counts['skipped']} skipped in {sum(c['seconds'] for c in cases):.0f} s")  # fmt: skip
    if part and part["exit"] in TIMED_OUT:
        summary += f"; the part was {part['status']}, the tests after these did not run"
    return {"summary": summary, "counts": counts, "cases": cases}


def requirement_problems(manifest: dict[str, Any]) -> list[str]:
    """Each carried wheel installed at its version, and its requirements met by what is installed
    (the image's packages of unlisted versions are only known here, on the device)."""
    problems = []
    for wheel in manifest["wheels"]:
        installed = installed_version(wheel["name"])
        if installed != wheel["version"]:
            problems.append(f"{wheel['name']} {wheel['version']} carried, {installed or 'none'} imported")
            continue
        for line in metadata.requires(wheel["name"]) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            version = installed_version(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel['name']} needs {requirement}; installed: {version or 'none'}")
    return problems


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(wheels: Path | None) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "packages": {name: installed_version(name) for name in PACKAGES},
    }
    manifest = wheels / "manifest.json" if wheels else None
    if manifest and manifest.exists():
        found["requirement problems"] = requirement_problems(json.loads(manifest.read_text()))
    return found


def skipped(
    tests: dict[str, Any], figures: dict[str, Any], parts: list[dict[str, Any]], mode: str
) -> list[dict]:
    """What did not run or was not measured, and why (part 3 of the report)."""
    left = [{"what": c["test"], "why": c["message"]} for c in tests["cases"] if c["outcome"] == "skipped"]
    figures_part = next((p for p in parts if p["part"] == "figures"), None)
    for key in SECTIONS:
        section = figures.get(key)
        if section is None:
            why = figures_part["status"] if figures_part else "not run"
            left.append({"what": f"figure {key}", "why": f"no result: the figures part {why}"})
            continue
        left += [{"what": f"figure {key}", "why": why} for why in section["skipped"]]
    if mode == "dry-run":
        left.append(
            {"what": "gpu-wheels", "why": "dry run: what is installed here is used; nothing installed"}
        )
    return left


def failures(report: dict[str, Any]) -> list[str]:
    found = [f"part {p['part']}: {p['status']}" for p in report["parts"] if p["exit"] != 0]
    found += [
        f"test {c['test']}: {c['outcome']}"
        for c in report["tests"]["cases"]
        if c["outcome"] in ("failure", "error")
    ]
    for key, section in report["figures"].items():
        found += [f"figure {key}: {section['error']}"] if section.get("error") else []
        found += [
            f"figure {key}, {row.get('model')}: {row['error']}" for row in section["rows"] if "error" in row
        ]
    found += [f"environment: {p}" for p in report["environment"].get("requirement problems", [])]
    return found


# --------------------------------------------------------------------------- markdown


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def markdown(report: dict[str, Any]) -> str:
    env, tests = report["environment"], report["tests"]
    packages = ", ".join(f"{name} {version or '-'}" for name, version in env["packages"].items())
    total = sum(p["seconds"] for p in report["parts"])
    lines = [
        f"# GPU check, {report['date']} ({report['mode']})", "",
        f"Device: {env['gpu'] or 'CPU (no GPU)'}; Python {env['python']}, CUDA {env['cuda'] or '-'}; {packages}.",
        f"Parts took {total:.0f} s (budget: 8 minutes on one H200). Result: "
        + ("**all ran**." if not report["failures"] else f"**{len(report['failures'])} failures** (below)."),
        "", *table([{k: p[k] for k in ("part", "status", "seconds", "cap s")} for p in report["parts"]]), "",
        "## 1. CUDA tests", "", f"**{tests['summary']}**", "",
    ]  # fmt: skip
    if tests["cases"]:
        lines += [*table(tests["cases"]), ""]
    lines += ["## 2. Figures", ""]
    for key, section in report["figures"].items():
        lines += [f"### {section['title']} (`{key}`, {section.get('seconds', 0):.0f} s)", ""]
        lines += [f"- {note}" for note in section["notes"]]
        lines += [f"- **error**: {section['error']}"] if section.get("error") else []
        lines += ["", *table(section["rows"])] if section["rows"] else []
        lines.append("")
    lines += ["## 3. Skipped, and why", ""]
    lines += [f"- {item['what']}: {item['why']}" for item in report["skipped"]] or ["- nothing"]
    if report["failures"]:
        lines += ["", "## Failures", "", *[f"- {failure}" for failure in report["failures"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    parser.add_argument("--wheels", type=Path, help="the carried wheels' folder (its manifest.json)")
    args = parser.parse_args()
    parts = read_parts(args.work / "parts.tsv")
    figures_file = args.work / "figures.json"
    figures = json.loads(figures_file.read_text())["figures"] if figures_file.exists() else {}
    tests = read_tests(args.work / "tests.xml", next((p for p in parts if p["part"] == "tests"), None))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": args.mode,
        "parts": parts,
        "environment": environment(args.wheels),
        "tests": tests,
        "figures": figures,
        "skipped": skipped(tests, figures, parts, args.mode),
    }
    report["failures"] = failures(report)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(args.out / "report.md", markdown(report))
    print(f"report: {args.out / 'report.md'}; tests: {tests['summary']}; "
          + (f"{len(report['failures'])} failures" if report["failures"] else "no failures"))  # fmt: skip
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
