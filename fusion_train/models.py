"""Loading models and tokenizers from local paths only, and naming them for provenance checks."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fusion_train.errors import UserError, read_text


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
        problem = "not a directory" if path.exists() else "does not exist"
        raise ModelLoadError(f"{path}: {problem}. Pass a local model directory (hub names are not fetched).")
    return path


@dataclass(frozen=True)
class ModelKind:
    """What a command loads a model directory as: a transformers auto class, its table of model
    types, and what to pass instead of a directory that is not one."""

    name: str
    auto_class: str
    mapping: str  # the auto class's table (model_type -> class) in transformers' modeling_auto
    instead: str  # the fix: "pass {instead}"

    def classes(self) -> dict[str, str]:
        """model_type -> the class ``auto_class`` loads for it, in this transformers."""
        from transformers.models.auto import modeling_auto

        return getattr(modeling_auto, self.mapping)


CAUSAL_LM = ModelKind(
    "causal LM",
    "AutoModelForCausalLM",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "a causal LM with all its weights saved",
)
REWARD_MODEL = ModelKind(
    "reward model",
    "AutoModelForSequenceClassification",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "a reward model with its head saved (a *ForSequenceClassification model, or one with its own code)",
)
CONFIG, WEIGHTS, TOKENIZER = "config", "weights", "tokenizer"
WHOLE_MODEL = (TOKENIZER, CONFIG, WEIGHTS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SAFE_WEIGHTS, SAFE_WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
# Architectures with a classification head in place of the LM head: not causal LMs.
CLASSIFIER = re.compile(r"For(SequenceClassification|TokenClassification|QuestionAnswering)$")


def check_model_directory(
    path: str | Path,
    needs: Collection[str] = WHOLE_MODEL,
    *,
    kind: ModelKind = CAUSAL_LM,
    gguf_file: str | None = None,
    trust_remote_code: bool | None = None,
) -> Path:
    """``path``, refused in one line naming the directory, what is wrong and the fix, unless it
    holds what ``needs`` names (TOKENIZER, CONFIG, WEIGHTS) of a model of ``kind``: readable
    tokenizer files; a config.json that parses, of a model type this transformers loads as
    ``kind`` and not an architecture with another head; complete safetensors weights (every
    shard an index names, no file shorter than its header says). With ``gguf_file``, that file
    holds all of it. ``trust_remote_code``: the command's flag (None: the command has none).

    Cheap (config.json and the weights' headers are read, no tensor), so commands run it on every
    model directory they read before any work: before an output is claimed, ranks are launched
    or a model loads. Otherwise transformers fails halfway, with a traceback, or quietly
    initialises at random what it does not find."""
    path = model_directory(path)
    try:
        names = {entry.name for entry in path.iterdir()}
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot be read ({error.strerror}); check its permissions.") from error
    if gguf_file is not None:
        _check_readable(path / gguf_file)
        return path
    if TOKENIZER in needs:
        present = [name for name in TOKENIZER_FILES if name in names]
        if not present:
            raise ModelLoadError(
                f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json). Save the tokenizer "
                "next to the model with tokenizer.save_pretrained(path)."
            )
        for name in present:
            _check_readable(path / name)
    if CONFIG in needs:
        _check_config(path, kind, trust_remote_code)
    if WEIGHTS in needs:
        for name in _weights_files(path, names):
            _check_safetensors(path / name)
    return path


def _check_readable(file: Path) -> None:
    """Refuse a file that cannot be opened (missing, a link to a missing file, no permission)."""
    try:
        with file.open("rb"):
            pass
    except OSError as error:
        broken = ", a link to a missing file" if file.is_symlink() and not file.exists() else ""
        raise ModelLoadError(
            f"{file}: cannot be read ({error.strerror}{broken}); copy or download it again."
        ) from error


def _check_config(path: Path, kind: ModelKind, trust_remote_code: bool | None) -> None:
    """config.json parses and names a model that loads as ``kind``."""
    file = path / "config.json"
    if not file.exists() and not file.is_symlink():
        raise ModelLoadError(
            f"{path}: no config.json; pass a saved Hugging Face model directory (model.save_pretrained(path))."
        )
    _check_readable(file)
    try:
        config = json.loads(read_text(file, ModelLoadError))
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{file}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); save the model "
            "again, or repair the file."
        ) from error
    if not isinstance(config, dict):
        raise ModelLoadError(
            f"{file}: expected a JSON object, got {type(config).__name__}; save the model again."
        )
    auto_map = config.get("auto_map") or {}
    own_code = auto_map.get(kind.auto_class) or auto_map.get("AutoConfig")
    if not own_code:
        _check_model_type(path, config, kind)
    elif trust_remote_code is None:
        raise ModelLoadError(
            f"{path}: the {kind.name} runs its own code ({own_code}, auto_map in config.json), which this "
            "command does not run; pass a model of a transformers class."
        )
    elif not trust_remote_code:
        raise ModelLoadError(
            f"{path}: the {kind.name} runs its own code ({own_code}, auto_map in config.json); read it, then "
            "pass --trust-remote-code to run it."
        )


def _check_model_type(path: Path, config: dict[str, Any], kind: ModelKind) -> None:
    """A model type this transformers knows and loads as ``kind``, and no architecture with a head
    other than the one ``kind`` needs (which would be initialised at random)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelLoadError(
            f"{path}/config.json: no model_type, so transformers cannot tell the architecture; save the model "
            "again with save_pretrained."
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} (config.json) is unknown to transformers "
            f"{transformers.__version__}; upgrade transformers, or pass a model of a type it knows."
        )
    if model_type not in kind.classes():
        raise ModelLoadError(
            f"{path}: transformers has no {kind.name} class for model_type {model_type!r} (config.json); "
            f"pass {kind.instead}."
        )
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if not architectures:
        return
    if kind == REWARD_MODEL and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(
            f"{path}: config.json names {', '.join(architectures)}, not a sequence classifier, so a reward "
            f"model's score head would be initialised at random; pass {kind.instead}."
        )
    if kind == CAUSAL_LM and all(CLASSIFIER.search(a) for a in architectures):
        raise ModelLoadError(
            f"{path}: config.json names {', '.join(architectures)}, a classifier, not a causal LM: its LM head "
            f"would be initialised at random; pass {kind.instead}."
        )


def _weights_files(path: Path, names: set[str]) -> list[str]:
    """The safetensors files transformers reads: the shards an index names (all of them present),
    else model.safetensors."""
    if SAFE_WEIGHTS_INDEX in names:
        index = path / SAFE_WEIGHTS_INDEX
        _check_readable(index)
        try:
            shards = sorted(set(json.loads(read_text(index, ModelLoadError))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelLoadError(
                f"{index}: not a weights index (a JSON object whose weight_map maps tensor names to files); "
                "download the model again."
            ) from error
        missing = [shard for shard in shards if shard not in names]
        if missing:
            listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ModelLoadError(
                f"{path}: {len(missing)} of the {len(shards)} weights files {SAFE_WEIGHTS_INDEX} names are "
                f"missing ({listed}); download them again."
            )
        return shards
    if SAFE_WEIGHTS in names:
        return [SAFE_WEIGHTS]
    others = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".gguf", ".safetensors")))
    found = f", only {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" if others else ""
    raise ModelLoadError(
        f"{path}: no weights in safetensors format ({SAFE_WEIGHTS} or {SAFE_WEIGHTS_INDEX}){found}; save the "
        "model with model.save_pretrained(path), which writes safetensors (pickle files are not loaded)."
    )


def _check_safetensors(file: Path) -> None:
    """A safetensors file whose header parses and whose size holds every tensor the header lists:
    a download or copy cut short is refused here, not halfway through loading."""
    _check_readable(file)
    size = file.stat().st_size
    with file.open("rb") as stream:
        prefix = stream.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        try:
            if header_size > size - 8:
                raise ValueError("shorter than its header")
            header = json.loads(stream.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            problem = f"{size} bytes, no valid header"
        else:
            needed = 8 + header_size + end
            problem = f"{size} of the {needed} bytes its header lists" if size < needed else None
    if problem:
        raise ModelLoadError(
            f"{file}: not a complete safetensors file ({problem}); download or copy it again."
        )


def load_tokenizer(path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer from a local directory (or the GGUF file inside it); never the hub."""
    from transformers import AutoTokenizer

    path = check_model_directory(path, (TOKENIZER,), gguf_file=gguf_file)
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
    """A causal LM from local safetensors (or a GGUF file, dequantised), in eval mode; refused when
    any of its weights would be initialised at random (:func:`from_pretrained`).

    ``dtype``: a torch dtype, its name, or "auto" (the checkpoint's). ``device_map``: where to
    load the weights (accelerate's placement; "auto" spreads them over the visible GPUs)."""
    path = check_model_directory(
        path, (CONFIG, WEIGHTS), gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )
    torch_dtype = dtype if not isinstance(dtype, str) or dtype == "auto" else getattr(torch, dtype)
    try:
        model = from_pretrained(
            CAUSAL_LM,
            path,
            gguf_file=gguf_file,
            dtype=torch_dtype,
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


def from_pretrained(kind: ModelKind, path: Path, **kwargs: Any) -> torch.nn.Module:
    """``kind``'s auto class's ``from_pretrained`` on local files, refused when any weight would be
    initialised at random instead of read: missing from the checkpoint (a causal LM read as a
    reward model has no score head; a checkpoint saved without its LM head) or saved in another
    shape than config.json gives. transformers only logs those, in its load report, and goes on;
    weights tied to others (an LM head tied to the embeddings) are not missing. The report is
    shown when the model is not refused (unexpected weights alone are harmless)."""
    import transformers

    auto_class = getattr(transformers, kind.auto_class)
    with _held_load_report():
        try:
            model, info = auto_class.from_pretrained(
                path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except RuntimeError as error:  # under ZeRO-3 weights of another shape are an error of their own
            mismatches = [
                line.strip().rstrip(".") for line in str(error).splitlines() if "size mismatch" in line
            ]
            if not mismatches:
                raise
            raise ModelLoadError(
                f"{path}: {len(mismatches)} weights have another shape in the checkpoint than config.json gives "
                f"({mismatches[0]}{', ...' if len(mismatches) > 1 else ''}); pass {kind.instead}, with its own "
                "config.json."
            ) from error
        _refuse_random_weights(path, type(model).__name__, info, kind)
    return model


@contextlib.contextmanager
def _held_load_report() -> Iterator[None]:
    """transformers' load report (a table of missing, mismatched and unexpected weights, logged as a
    warning) held while a model loads: logged once the model is accepted, dropped when it is
    refused (the one-line error says what matters in it)."""
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:
        logger.handle(record)


def _refuse_random_weights(path: Path, model_class: str, info: dict[str, Any], kind: ModelKind) -> None:
    """Refuse a model whose loading info lists weights that were initialised at random."""
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, saved, built = mismatched[0]
        raise ModelLoadError(
            f"{path}: {len(mismatched)} weights of {model_class} have another shape in the checkpoint than "
            f"config.json gives and would be initialised at random ({key}: {list(saved)} saved, {list(built)} "
            f"expected{', ...' if len(mismatched) > 1 else ''}); pass {kind.instead}, with its own config.json."
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} weights of {model_class} are not in the checkpoint and would be initialised "
            f"at random ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); pass {kind.instead}."
        )


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
