"""Running a stage in several processes, once for every stage that can (represent, evaluate,
sample, score, train, sft, dpo).

``--nproc N [--master-port P]`` start N processes on this machine (one per GPU, or CPU
processes) under torch's elastic agent, what ``torchrun`` runs; ``--hostfile F`` starts them on
every node of the file under DeepSpeed's ``deepspeed`` launcher (pdsh). Either gives each process
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; what every process runs is the stage's call
(``fusion_train.calls``).
Starting a stage's module under ``torchrun`` or ``deepspeed --module`` directly works the same
way: a stage reads only these variables.

Also here, because every multi-process stage needs them: which device a rank uses, the process
group (gloo on CPU hosts), and how many parameter elements each rank holds (ZeRO-3 partitions).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from fusion_train.errors import UserError
from fusion_train.settings import options_from, setting

T = TypeVar("T")
# How long a rank of a stage's gloo group waits for the others (torch's default is 30 minutes): a rank
# whose parts were done in an earlier run waits at the end for all the others' work. A rank that
# fails does not leave the others waiting: the launcher then ends them all.
RANK_WAIT = timedelta(days=7)


class LaunchError(UserError, ValueError):
    """Launcher options that cannot start the processes."""


@dataclass(frozen=True)
class Rank:
    """This process's place in a launched job (a world of one when not launched)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def of_this_process(cls) -> Rank:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def share(self) -> tuple[int, int]:
        """(i, n): this rank takes every n-th unit of work starting at i."""
        return self.rank, self.world_size


def launched() -> bool:
    """Whether this process was started by a launcher (deepspeed, torchrun)."""
    return "LOCAL_RANK" in os.environ


# --------------------------------------------------------------------------- devices


def on_cpu_host() -> bool:
    """Whether DeepSpeed found no accelerator: stages then run on CPU processes with gloo."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def resolve_device(spec: str, rank: Rank | None = None) -> torch.device:
    """``auto`` (this rank's GPU if there is one, else the CPU), ``cpu``, ``cuda`` (this rank's
    GPU: ``cuda:LOCAL_RANK``) or ``cuda:N``; a GPU that is not there is an input error."""
    rank = rank or Rank.of_this_process()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda") and not spec.startswith("cuda:"):
        raise LaunchError(f"--device {spec}: expected auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        raise LaunchError(f"--device {spec}: no CUDA GPU is visible here; use --device cpu or auto.")
    index = rank.local_rank if spec in ("auto", "cuda") else int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise LaunchError(
            f"--device {spec}: GPU {index} asked for, {torch.cuda.device_count()} visible; "
            "start at most one process per GPU."
        )
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that support it, float32 elsewhere (CPUs without bf16 matrix
    units are slower in bf16, and float32 is the reference); else the named dtype."""
    if spec == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, spec)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU communication backend from compiling its shared-memory op.

    On a host without accelerators DeepSpeed's ``TorchBackend`` builds ``deepspeed_shm_comm``
    with the system C++ compiler whenever a process group starts (30-70 s, an error without a
    compiler), although only DeepSpeed inference's all-reduce uses it; our collectives go
    through gloo. DeepSpeed builds it only if its per-process table of buildable ops
    (``deepspeed.ops.__compatible_ops__``, edits to which persist) marks it compatible, so marking
    it not compatible gives the fallback DeepSpeed takes where the op cannot build. An op
    installed prebuilt (``DS_BUILD_SHM_COMM=1``) needs no compiler and is left alone.
    """
    if not on_cpu_host():  # only the CPU accelerator has the op
        return
    import deepspeed.ops
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    if not installed_ops.get(ShareMemCommBuilder.NAME, False):
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


# --------------------------------------------------------------------------- process groups


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def end_process_group_at_exit() -> None:
    """End the process group a stage leaves behind (transformers' Trainer keeps its own for the
    rest of the process) before the interpreter's own teardown: left to it, gloo's threads can be
    destroyed in an order that aborts a process whose work succeeded ("terminate called without
    an active exception", pytorch/pytorch#190489). Registered once per process."""

    def end() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(end)


@contextmanager
def world_of_one() -> Iterator[None]:
    """For the time of a stage, give a process started without a launcher the variables a launched
    rank has (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``: DeepSpeed
    and transformers start their process group from them); a launched rank keeps its own.

    On the way out the environment is as it was, also where transformers or DeepSpeed changed it
    meanwhile, so a library caller's later :func:`launch` is not taken for one inside a launched
    process. A process group started meanwhile is left alone: transformers (accelerate's
    ``PartialState``) keeps its own for the rest of the process, and the next stage reuses it.
    """
    saved = dict(os.environ)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def process_group(deepspeed: bool = False) -> Iterator[Rank]:
    """The process group of a launched job, for the time of a stage (nothing for a world of one).

    ``deepspeed``: DeepSpeed's own initialisation (its backend: NCCL on GPUs, gloo on CPUs), which
    ZeRO needs also in a world of one; otherwise a gloo group, which is all a stage needs to wait
    for the other ranks. A group this starts is ended on the way out, and so are the variables
    it set (:func:`world_of_one`), so a later stage of the same process starts clean.
    """
    rank = Rank.of_this_process()
    owned = not torch.distributed.is_initialized() and (deepspeed or rank.world_size > 1)
    with world_of_one() if owned and deepspeed else nullcontext():
        try:
            if owned and deepspeed:
                import deepspeed as ds

                skip_shm_comm_op()
                ds.init_distributed(verbose=False)
            elif owned:
                torch.distributed.init_process_group("gloo", timeout=RANK_WAIT)
            yield rank
        finally:
            if owned and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank must call this together)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    if torch.distributed.get_backend() == "nccl":
        value = value.cuda()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def all_ranks(value: T) -> list[T]:
    """Every rank's ``value`` (picklable; small), in rank order (every rank must call this together)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def parameters_held(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter elements in the model and held by each rank (under ZeRO-3, each rank's partition)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return {"total": total, "held_per_rank": all_ranks(held)}


# --------------------------------------------------------------------------- the launcher


def read_hostfile(hostfile: str) -> dict[str, int]:
    """Host -> slots of a DeepSpeed hostfile, or an input error naming the file."""
    from deepspeed.launcher.runner import fetch_hostfile

    if not Path(hostfile).is_file():
        raise LaunchError(f"--hostfile {hostfile}: no such file.")
    try:
        hosts = fetch_hostfile(hostfile)
    except ValueError as error:
        raise LaunchError(f"--hostfile {hostfile}: {error} (lines are `HOST slots=N`).") from error
    if not hosts:
        raise LaunchError(f"--hostfile {hostfile}: no hosts (lines are `HOST slots=N`).")
    return dict(hosts)


def deepspeed_launcher() -> str:
    """The ``deepspeed`` launcher script: next to this Python (a virtual environment), else on PATH
    (packages installed into a folder of their own, as the GPU check does)."""
    sibling = Path(sys.executable).with_name("deepspeed")
    launcher = str(sibling) if sibling.exists() else shutil.which("deepspeed")
    if launcher is None:
        raise LaunchError(
            "the `deepspeed` launcher is not installed next to this Python nor on PATH; "
            "install deepspeed in this environment."
        )
    return launcher


def launcher_command(module: str, nproc: int | None, hostfile: str, master_port: int | None) -> list[str]:
    """The ``deepspeed`` launcher command that runs ``module`` on every node of ``hostfile``
    (``nproc`` processes on each, else its slots); checked first."""
    command = [deepspeed_launcher()]
    if nproc is not None:
        command += ["--num_gpus", str(nproc)]
    hosts = read_hostfile(hostfile)
    if len(hosts) > 1 and shutil.which("pdsh") is None:
        raise LaunchError(
            "a multi-node --hostfile needs pdsh, the deepspeed launcher's default way to reach the "
            "other nodes; install it, or run `deepspeed --launcher ...` yourself (see the README)."
        )
    command += ["--hostfile", hostfile]
    if master_port is not None:
        command += ["--master_port", str(master_port)]
    return [*command, "--no_local_rank", "--module", module]


def launches(nproc: int, hostfile: str | None) -> bool:
    """Whether a stage runs under the launcher: more than one process, or the nodes of a hostfile
    (one local process runs in the caller's)."""
    return nproc > 1 or hostfile is not None


def world_size_of(nproc: int | None, hostfile: str | None) -> int:
    """The number of processes ``--nproc``/``--hostfile`` start."""
    if hostfile is None:
        return nproc or 1
    return sum(nproc or slots for slots in read_hostfile(hostfile).values())


def launch(
    module: str, arguments: list[str], nproc: int | None, hostfile: str | None, master_port: int | None
) -> int:
    """Run ``python -m module *arguments`` in ``nproc`` processes: on this machine under torch's
    elastic agent (:func:`launch_on_this_machine`), on the nodes of ``hostfile`` under the
    ``deepspeed`` launcher; the exit status (non-zero when a rank failed). Check the inputs before."""
    if launched():
        raise LaunchError("--nproc/--hostfile given inside a launched process; drop them.")
    if nproc is not None and nproc < 1:
        raise LaunchError("--nproc must be at least 1.")
    if hostfile is None:
        return launch_on_this_machine(module, arguments, nproc or 1, master_port)
    command = [*launcher_command(module, nproc, hostfile, master_port), *arguments]
    try:
        return subprocess.run(command, check=False).returncode
    except OSError as error:
        raise LaunchError(f"the deepspeed launcher could not start: {error}") from error


def launch_on_this_machine(module: str, arguments: list[str], nproc: int, master_port: int | None) -> int:
    """``nproc`` processes of ``python -m module *arguments`` on this machine, started by torch's
    elastic agent (what ``torchrun`` runs; here in this process, so no launcher process starts:
    about 10 s less per launch on 2 CPU cores than the ``deepspeed`` runner and its per-node
    launcher, which import DeepSpeed twice before any rank starts). Each rank gets ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the rendezvous port:
    ``master_port``, else a free one), as under either launcher. When a rank fails the agent ends
    the others; the exit status is the first failed rank's (0 when all succeed). The agent's own
    log lines, its temporary log folder, its signal handlers and the variable it sets do not
    outlive the launch."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    environment = dict(os.environ)  # the agent sets TORCHELASTIC_SIGNALS_TO_HANDLE here
    handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]  # the agent's defaults
    handlers = {number: signal.getsignal(number) for number in handled}
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)  # "closing signal SIGTERM" etc.: the ranks say what failed
    try:
        with tempfile.TemporaryDirectory(prefix="fusion-train-launch-") as logs:
            config = LaunchConfig(
                min_nodes=1,
                max_nodes=1,
                nproc_per_node=nproc,
                run_id=uuid.uuid4().hex,
                rdzv_backend="c10d",
                rdzv_endpoint=f"127.0.0.1:{master_port or 0}",
                max_restarts=0,
                logs_specs=DefaultLogsSpecs(log_dir=logs),
            )
            elastic_launch(config, sys.executable)("-u", "-m", module, *arguments)
        return 0
    except ChildFailedError as error:
        return error.get_first_failure()[1].exitcode or 1
    except OSError as error:
        raise LaunchError(f"the processes could not start: {error}") from error
    finally:
        agent_log.setLevel(level)
        for number, handler in handlers.items():
            signal.signal(number, handler)
        os.environ.clear()
        os.environ.update(environment)


@dataclass(frozen=True)
class LaunchSettings:
    """How many processes a command starts under the deepspeed launcher (a recipe's
    ``resources`` take ``nproc`` and ``hostfile`` from here)."""

    nproc: int | None = setting(
        None,
        type=click.IntRange(min=1),
        help="Processes per node (one per GPU, or CPU processes): start under the `deepspeed` launcher.",
    )
    hostfile: str | None = setting(None, help="DeepSpeed hostfile (`HOST slots=N` lines) for several nodes.")
    master_port: int | None = setting(None, help="Rendezvous port (default: a free one locally).")


def launch_options(function: Any) -> Any:
    """``--nproc``, ``--hostfile``, ``--master-port`` (and the launcher's hidden ``--local_rank``)."""
    hidden = click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
    return options_from(LaunchSettings)(hidden(function))
