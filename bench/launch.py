"""How long starting ranks takes: a trivial stage call (it writes a small JSON file) in N local
processes, started the way ``--nproc N`` starts them (torch's elastic agent inside this process)
against the ``deepspeed`` runner, which ``--nproc`` used before and a hostfile still uses, in the
same run. What is left of a launch once the ranks' own imports are paid is the launcher's.

Usage: ``python bench/launch.py [--nproc 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusion_train.calls import MODULE, StageCall
from fusion_train.launch import deepspeed_launcher, free_port, launch_on_this_machine
from fusion_train.storage import write_json_atomic


def deepspeed_runner(call: Path, nproc: int) -> int:
    command = [deepspeed_launcher(), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "--no_local_rank", "--module", MODULE, str(call)]  # fmt: skip
    return subprocess.run(command, capture_output=True, check=False).returncode


def elastic_agent(call: Path, nproc: int) -> int:
    return launch_on_this_machine(MODULE, [str(call)], nproc, None)


def one_process(call: Path, nproc: int) -> int:
    """One rank's share alone: ``python -m fusion_train.calls`` (imports, the call, exit)."""
    return subprocess.run([sys.executable, "-m", MODULE, str(call)], check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.json"
        call = Path(folder) / "call.json"
        StageCall(write_json_atomic, {"path": out, "payload": {"written": True}}, out).write(call)
        seconds: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, start in (("one process", one_process), ("elastic agent", elastic_agent),
                                ("deepspeed runner", deepspeed_runner)):  # fmt: skip
                began = time.perf_counter()
                if start(call, args.nproc) != 0:
                    raise SystemExit(f"{name}: a rank failed")
                seconds.setdefault(name, []).append(time.perf_counter() - began)
    runner = statistics.median(seconds["deepspeed runner"])
    print(f"{args.nproc} ranks, median of {args.repeats}:")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<17} {median:6.2f} s  ({median / runner:.2f} x the deepspeed runner)")


if __name__ == "__main__":
    main()
