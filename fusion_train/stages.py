"""What every recipe stage shares: a folder per stage named by a key of its inputs, where stages
run (``Resources``: processes, nodes, device placement), running a stage's function in them
(``run_in_ranks``, through ``fusion_train.calls``), and the errors a recipe run reports.

A stage's output lives in ``RUN/<stage>/<name>-<key>``, the key a hash of the stage's settings
and of the keys of what it reads; a folder with its done mark is reused, so a rerun only runs
what changed, and a killed run resumes (stages resume inside themselves where they can).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_train.calls import StageCall
from fusion_train.errors import UserError, one_line
from fusion_train.inference import InferenceSettings
from fusion_train.launch import LaunchSettings, launches
from fusion_train.settings import same_as
from fusion_train.storage import TRAINING_SUMMARY, write_json_atomic

DONE = ".done.json"


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


def recipe_error(where: str, section: str, error: UserError, keys: Collection[str]) -> RecipeError:
    """A command's check, failed on a recipe's section: the flags it names become the section's
    keys (``--warmup-ratio`` -> ``sft.warmup_ratio``), so the line names what to edit in the recipe."""
    named = False

    def key(flag: re.Match[str]) -> str:
        nonlocal named
        name = flag.group(1).replace("-", "_")
        named = named or name in keys
        return f"{section}.{name}" if name in keys else flag.group(0)

    message = re.sub(r"--([a-z][a-z0-9-]*)", key, one_line(str(error)))
    return RecipeError(f"{where}: {message}" if named else f"{where}: {section}: {message}")


class DiskFullError(UserError, RuntimeError):
    """The disk filled up during a stage; finished stages are kept and a rerun resumes."""


class StageError(UserError, RuntimeError):
    """A stage's own process failed; what it printed above says why, and a rerun resumes."""


@dataclass(frozen=True)
class Resources:
    """Where the stages run: processes (GPUs) per node, nodes (``fusion_train.launch``), and
    how the stages that only run models forward place them (``fusion_train.inference``)."""

    nproc: int = same_as(LaunchSettings, "nproc", default=1)
    hostfile: str | None = same_as(LaunchSettings, "hostfile")
    device: str = same_as(InferenceSettings, "device")
    attn_implementation: str = same_as(InferenceSettings, "attn_implementation")
    # represent and evaluate: zero3 | zero3-offload (train: train.deepspeed)
    deepspeed: str | None = same_as(InferenceSettings, "deepspeed")
    device_map: str | None = same_as(InferenceSettings, "device_map")
    engine: str = same_as(InferenceSettings, "engine")  # represent, evaluate and sample: hf | vllm
    tensor_parallel_size: int = same_as(InferenceSettings, "tensor_parallel_size")

    @property
    def launches(self) -> bool:
        return launches(self.nproc, self.hostfile)

    def inference(self, dtype: str = "auto") -> InferenceSettings:
        return InferenceSettings(
            device=self.device,
            dtype=dtype,
            attn_implementation=self.attn_implementation,
            deepspeed=self.deepspeed,
            device_map=self.device_map,
            engine=self.engine,
            tensor_parallel_size=self.tensor_parallel_size,
        )


def file_fingerprint(path: str) -> str:
    digest = hashlib.sha256()
    target = Path(path)
    files = sorted(target.rglob("*")) if target.is_dir() else [target]
    for f in files:
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class StageLog:
    """What ran and what was reused in this invocation (also written to ``pipeline.json``)."""

    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DISK_FULL_TEXT = os.strerror(errno.ENOSPC)  # what a child process prints: "No space left on device"


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, says the disk is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if DISK_FULL_TEXT in str(error):  # a stage that runs a subprocess reports its stderr
            return True
        error = error.__cause__ or error.__context__
    return False


def free_gigabytes(path: Path) -> float:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free / 1e9


@contextmanager
def disk_full_explained(label: str, out: Path) -> Iterator[None]:
    """Turn a full disk inside ``label`` into a DiskFullError that says what is kept and what to do."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"{label}: the disk holding {out} filled up ({free_gigabytes(out):.1f} GB free now). "
            "Nothing finished is lost: completed stages are kept, and this one resumes from its last "
            "finished part or checkpoint. Free some space (or point `run_dir` at a larger disk and "
            "move the run there), then run the same command again."
        ) from error


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """The key naming a stage's folder: a hash of the stage and everything it reads."""
    return hashlib.sha256(
        json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]


class Stages:
    """Runs a stage into ``RUN/<stage>/<name>-<key>`` unless that folder is already complete."""

    def __init__(self, run_dir: Path, log: StageLog, echo: Callable[[str], None]) -> None:
        self.run_dir, self.log, self.echo = run_dir, log, echo

    def run(
        self, stage: str, name: str, inputs: dict[str, Any], work: Callable[[Path], Any]
    ) -> tuple[Path, str]:
        key = stage_key(stage, inputs)
        out = self.run_dir / stage / f"{name}-{key}"
        label = f"{stage}/{name}"
        if (out / DONE).exists():
            self.log.reused.append(label)
            self.echo(f"= {label}: done before ({out.name})")
            return out, key
        self.echo(f"> {label} ...")
        started = time.perf_counter()
        with disk_full_explained(label, out):
            work(out)
        seconds = time.perf_counter() - started
        write_json_atomic(
            out / DONE, {"stage": stage, "name": name, "key": key, "inputs": inputs, "seconds": seconds}
        )
        self.log.ran.append(label)
        self.log.seconds[label] = seconds
        self.echo(f"  {label}: {seconds:.1f} s")
        return out, key


def run_in_ranks(
    label: str, function: Callable[..., Any], arguments: dict[str, Any], resources: Resources, out: Path
) -> None:
    """``function(**arguments)``, a stage's work into ``out``: here, or in every rank of
    ``resources`` (``fusion_train.calls``)."""
    code = StageCall(function, arguments, out).in_ranks(resources.nproc, resources.hostfile)
    if code != 0:
        raise StageError(
            f"{label} failed (exit code {code}; {free_gigabytes(out):.1f} GB free on the run's disk): see the "
            "log above, then rerun the recipe to resume"
        )


def _training_failed(label: str, out: Path, why: str) -> str:
    return (
        f"{label} failed ({why}; {free_gigabytes(out):.1f} GB free on the run's disk): see the log above, "
        "then rerun the recipe to resume from the last checkpoint"
    )


def train_in_stage(label: str, out: Path, start: Callable[[Path, bool], int]) -> None:
    """A training stage's body: ``start(out, resume)`` trains into ``out/model`` (checkpoints in
    ``out/model.work``, resumed when a killed run left them), in this process or under the
    launcher, and returns the exit status (0 when it trained here). A run killed after the model
    was published (whole, by a rename) only lacks the stage's done mark: nothing is trained
    again. Checkpoints go once the model is there."""
    if not (out / "model" / TRAINING_SUMMARY).exists():
        try:
            code = start(out, (out / "model.work").exists())
        except Exception as error:
            if isinstance(error, UserError) or is_disk_full(error):
                raise  # says what to do itself (a full disk: disk_full_explained, around every stage)
            traceback.print_exc()  # what a launched rank prints when it fails
            raise StageError(_training_failed(label, out, f"{type(error).__name__}: {error}")) from error
        if code != 0:
            raise StageError(_training_failed(label, out, f"exit code {code}"))
    for checkpoint in (out / "model.work").glob("checkpoint-*"):  # only needed to resume
        shutil.rmtree(checkpoint)
