"""Loading models and tokenizers from local paths only, and naming them for provenance checks."""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_train.errors import UserError


class ModelLoadError(UserError, ValueError):
    """A model directory that cannot be used; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a representation: checked whenever two stages' outputs are combined."""

    path: str
    gguf_file: str | None
    tokenizer_hash: str
    tokenizer_size: int  # len(tokenizer): ids at or beyond it are padding rows, never targets
    vocab_size: int  # rows of the output embedding, >= tokenizer_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of the tokenizer's vocabulary and rules (not its chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"{type(tokenizer).__name__} is a slow tokenizer; fusion-train needs a fast (Rust) tokenizer "
            "for character offsets. Save the model with a tokenizer.json."
        )
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def model_directory(path: str | Path) -> Path:
    """``path``, refused unless it is a local directory (names on the hub are never fetched)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"{path}: not a directory. Pass a local model directory (hub names are not fetched)."
        )
    return path


def load_tokenizer(path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer from a local directory (or the GGUF file inside it); never the hub."""
    from transformers import AutoTokenizer

    path = model_directory(path)
    has_tokenizer = any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    if gguf_file is None and not has_tokenizer:
        raise ModelLoadError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json). Save the tokenizer "
            "next to the model with tokenizer.save_pretrained(path)."
        )
    tokenizer = AutoTokenizer.from_pretrained(
        path, gguf_file=gguf_file, local_files_only=True, trust_remote_code=trust_remote_code
    )
    tokenizer_hash(tokenizer)  # fails early for slow tokenizers
    return tokenizer


def attention_implementation(spec: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``auto``: FlashAttention-2 on a GPU in 16-bit when ``flash_attn`` is installed, else
    transformers' own default (SDPA where the architecture has it); otherwise ``spec``."""
    if spec != "auto":
        return spec
    from transformers.utils import is_flash_attn_2_available

    half = dtype in (torch.bfloat16, torch.float16)
    return "flash_attention_2" if device.type == "cuda" and half and is_flash_attn_2_available() else None


def load_model(
    path: str | Path,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    *,
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A causal LM from local safetensors (or a GGUF file, dequantised), in eval mode.

    ``dtype``: a torch dtype, its name, or "auto" (the checkpoint's). ``device_map``: where to
    load the weights (accelerate's placement; "auto" spreads them over the visible GPUs)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if gguf_file is None and not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path}: no config.json; pass a saved Hugging Face model directory or --gguf-file."
        )
    torch_dtype = dtype if not isinstance(dtype, str) or dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            gguf_file=gguf_file,
            dtype=torch_dtype,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf_file else True,
            attn_implementation=attn_implementation,
            device_map=device_map,
        )
    except ImportError as error:  # an attention implementation or device map whose package is missing
        raise ModelLoadError(f"{path}: {error}") from error
    except ValueError as error:
        if attn_implementation and "attn" in str(error).lower():
            raise ModelLoadError(
                f"{path}: --attn-implementation {attn_implementation} is not available for this model or "
                f"here ({str(error).splitlines()[0]}); use auto."
            ) from error
        raise
    return model.eval()


def identify(path: str | Path, gguf_file: str | None, tokenizer: Any, vocab_size: int) -> ModelIdentity:
    return ModelIdentity(
        path=str(Path(path).resolve()),
        gguf_file=gguf_file,
        tokenizer_hash=tokenizer_hash(tokenizer),
        tokenizer_size=len(tokenizer),
        vocab_size=vocab_size,
    )


def output_rows(model: torch.nn.Module) -> int:
    """Rows of the output embedding (also of a ZeRO-3 partitioned one, whose local tensor is empty)."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def release_memory() -> None:
    """Free the memory of models no longer referenced now, not when the collector gets to them:
    the next stage of the same process may need it (vLLM takes a share of the GPU's memory when
    it starts, and refuses to start without it)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_fingerprint(path: str | Path) -> str:
    """Changes when the model directory's files change (names, sizes, modification times).

    Results computed from a model are stored under it (the pipeline's stages, evaluation's cached
    losses), so a model replaced at the same path is never mistaken for the old one; weights,
    tokenizer and chat template files all count. Cheap: no file is read.
    """
    entries = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in model_directory(path).iterdir()
        if p.is_file()
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
