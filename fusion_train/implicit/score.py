"""Implicit stage 2: score every sampled response, with a reward model and/or verifiers.

The reward model (any transformers sequence-classification model: ArmoRM, Skywork-Reward ...)
reads the prompt and the response as one conversation in its own chat template, as it was
trained. Its reward is one column of its ``.logits`` (with more than one, ``--reward-label`` says
which) or, for models with their own code such as ArmoRM, whose ``.logits`` hold several
objectives, the ``.score`` field of its output (see :func:`reward_model_spec`). Verifiers are
plain callables (``fusion_train.implicit.verifiers``). Every scorer's score is stored per
response under the scorer's name, so ``prefer`` can rank by any of them. Responses are scored in
parts written atomically, as in ``sample``: a killed run resumes at the first missing part, and
ranks split the parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import datasets
import torch

from fusion_train import options
from fusion_train.calls import StageCall
from fusion_train.chat import resolve_chat_template
from fusion_train.errors import Command, UserError, one_line
from fusion_train.implicit.sample import load_samples
from fusion_train.implicit.verifiers import Verifier, get_verifier
from fusion_train.launch import barrier, launch_options, process_group, resolve_device
from fusion_train.models import (
    REWARD_MODEL,
    check_model_directory,
    from_pretrained,
    load_tokenizer,
    model_fingerprint,
    release_memory,
)
from fusion_train.parts import (
    PARTS_DIR,
    echo_shard_done,
    load_output,
    parse_shard,
    part_path,
    parts_bar,
    parts_to_do,
    write_part,
)
from fusion_train.settings import options_from, setting
from fusion_train.storage import check_output, claim_output, read_json, write_json_atomic

FORMAT = "fusion-train/scored@1"
SUMMARY = "summary.json"
REWARD_OUTPUTS = ("auto", "score", "logits")


@dataclass(frozen=True)
class ScoreSettings:
    """How responses are judged: ``fusion-train score``'s settings (a recipe's score section takes
    most of them)."""

    reward_model: str | None = setting(
        None,
        type=click.Path(exists=True, file_okay=False),
        help="A local sequence-classification reward model; it reads prompt and response in its own chat "
        "template.",
    )
    reward_label: str | None = setting(
        None,
        metavar="NAME|INDEX",
        help="Which output of the reward model is the reward (required when it has more than one).",
    )
    reward_output: str = setting(
        "auto",
        type=click.Choice(REWARD_OUTPUTS),
        help="Where the reward is: score (the output's .score, e.g. ArmoRM), logits (a column of .logits), or "
        "auto: .score when the model's own code (--trust-remote-code) declares one, else .logits.",
    )
    reward_chat_template: str | None = setting(
        None,
        help="Template for the reward model: built-in name or .jinja file. Default: its tokenizer's own.",
    )
    verifiers: tuple[str, ...] = setting(
        (),
        flag="--verifier",
        help="Repeatable: numeric-answer, reference-overlap, or package.module:function.",
    )
    batch_size: int = setting(8, type=options.POSITIVE_INT, help="Conversations per reward-model batch.")
    chunk_size: int = setting(
        4096, type=options.POSITIVE_INT, help="Responses per part (the unit of resuming and sharding)."
    )
    dtype: str = setting("float32", type=options.MODEL_DTYPES, help="Reward model weights' dtype.")
    trust_remote_code: bool = setting(False, help="Allow model code from the reward model directory.")


class ScoreError(UserError, ValueError):
    """Scorers or sample directories that cannot be used as given."""


@dataclass(frozen=True)
class RewardModel:
    """A sequence-classification reward model and which of its outputs is the reward."""

    path: str
    label: int  # index into the model's logits (output "logits")
    label_name: str
    num_labels: int
    chat_template: str | None = None  # default: the reward model's own
    output: str = "logits"  # "logits": column ``label`` of .logits; "score": the output's .score

    @property
    def name(self) -> str:
        base = f"reward:{Path(self.path).resolve().name}"
        return f"{base}/{self.label_name}" if self.output == "logits" and self.num_labels > 1 else base


def custom_model_class(path: Path, trust_remote_code: bool) -> str | None:
    """The reward model's own class (``auto_map`` in config.json, e.g. ArmoRM's
    ``modeling_custom.LlamaForRewardModelWithGating``), or None for a transformers class.

    Without ``trust_remote_code`` such a model is refused: transformers would otherwise quietly load
    its built-in class for the config's model type, with a fresh random head instead of the model's."""
    auto_map = read_json(path / "config.json").get("auto_map") or {}
    custom = auto_map.get("AutoModelForSequenceClassification")
    if (custom or "AutoConfig" in auto_map) and not trust_remote_code:
        raise ScoreError(
            f"{path}: the reward model runs its own code ({custom or auto_map['AutoConfig']}, auto_map in config.json); "
            "read it, then pass --trust-remote-code to run it."
        )
    return custom


def declared_fields(model_class: type) -> set[str] | None:
    """The fields of the output type ``model_class.forward`` declares it returns (any member of a
    Union), or None when the declaration names no dataclass."""
    forward = inspect.unwrap(model_class.forward)
    try:
        declared = typing.get_type_hints(forward).get("return")
    except Exception:  # other annotations may not resolve; the return type alone may
        declared = forward.__annotations__.get("return")
        if isinstance(declared, str):
            declared = forward.__globals__.get(declared)
    fields = [
        {f.name for f in dataclasses.fields(t)}
        for t in (typing.get_args(declared) or (declared,))
        if isinstance(t, type) and dataclasses.is_dataclass(t)
    ]
    return set().union(*fields) if fields else None


def custom_class(path: Path, custom: str) -> type:
    """Import the reward model's own class (trusted by now); code that does not import with this
    transformers is a one-line error naming it."""
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(custom, path, local_files_only=True)
    except (ImportError, SyntaxError) as error:
        raise ScoreError(
            f"{path}: its code ({custom}) does not import with transformers {transformers.__version__} ({error}); "
            "edit the model directory's copy of it, or use transformers' version its authors used."
        ) from error


def auto_reward_output(path: Path, custom: str | None) -> str:
    """``--reward-output auto``: transformers' own sequence classifiers return ``.logits``; a model
    with its own code returns ``.score`` when the output type its forward declares has that field
    (ArmoRM's ``CustomOutput``). Decided from the class, before any weights load."""
    if custom is None:
        return "logits"
    fields = declared_fields(custom_class(path, custom))
    if fields is None:
        raise ScoreError(
            f"{path}: {custom}.forward declares no output type, so which output is the reward is unknown; pass "
            "--reward-output score (its .score) or logits (a column of its .logits)."
        )
    return "score" if "score" in fields else "logits"


def reward_model_spec(
    path: str | Path,
    label: str | None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    output: str = "auto",
) -> RewardModel:
    """Decide which output is the reward, before anything is scored or any weights load: the
    output's ``.score`` (``output="score"``; one reward per response, no ``label``) or column
    ``label`` (NAME or INDEX; needed with several) of its ``.logits``; ``"auto"``: see
    :func:`auto_reward_output`."""
    from transformers import AutoConfig

    if output not in REWARD_OUTPUTS:
        raise ScoreError(f"--reward-output {output!r}: use one of {', '.join(REWARD_OUTPUTS)}.")
    path = check_model_directory(path, kind=REWARD_MODEL, trust_remote_code=trust_remote_code)
    custom = custom_model_class(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)]
    if custom is not None:
        custom_class(path, custom)  # its code imports, before any output directory is claimed
    if output == "auto":
        output = auto_reward_output(path, custom)
    elif output == "score" and custom is None:
        raise ScoreError(
            f"--reward-output score: {path} is a transformers class ({', '.join(config.architectures or ['?'])}), "
            "whose output has .logits only; use --reward-output logits (the default for it)."
        )
    if output == "score":
        if label is not None:
            raise ScoreError(
                f"--reward-label {label!r}: the reward is the model's .score, one number per response; drop "
                "--reward-label, or pass --reward-output logits to read a column of its .logits instead."
            )
        return RewardModel(str(path), 0, "score", config.num_labels, chat_template, output="score")
    if label is None:
        if config.num_labels > 1:
            raise ScoreError(
                f"{path}: the reward model has {config.num_labels} outputs ({', '.join(names)}); say which one is the "
                "reward with --reward-label NAME|INDEX."
            )
        return RewardModel(str(path), 0, names[0], 1, chat_template)
    index = int(label) if label.lstrip("-").isdigit() else (names.index(label) if label in names else None)
    if index is None or not 0 <= index < config.num_labels:
        raise ScoreError(
            f"--reward-label {label!r}: not one of the reward model's outputs: "
            + ", ".join(f"{i} ({n})" for i, n in enumerate(names))
            + "."
        )
    return RewardModel(str(path), index, names[index], config.num_labels, chat_template)


class RewardScorer:
    """A loaded reward model that scores conversations (prompt + response) in its own template.

    The model pools the logits of each sequence's last token that is not its pad token (that is how
    transformers' sequence classifiers work), so batches are padded with that token: a batched
    score equals the score of the sequence alone. A model without a pad token scores one at a time.
    """

    def __init__(
        self, spec: RewardModel, batch_size: int = 8, dtype: str = "float32", trust_remote_code: bool = False
    ) -> None:
        self.spec = spec
        path = Path(spec.path)
        custom_model_class(path, trust_remote_code)  # never a built-in stand-in for its own class
        check_model_directory(path, kind=REWARD_MODEL, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.template, _ = resolve_chat_template(self.tokenizer, spec.chat_template)
        self.device = resolve_device("auto")
        self.model = (
            from_pretrained(  # refused if its score head (or any weight) is not in the checkpoint
                REWARD_MODEL,
                path,
                dtype=getattr(torch, dtype) if dtype != "auto" else "auto",
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
            )
            .eval()
            .to(self.device)
        )
        self.pad_id = self.model.config.pad_token_id
        self.batch_size = batch_size if self.pad_id is not None else 1

    @torch.inference_mode()
    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        render = self.tokenizer.apply_chat_template
        encoded = [
            self.tokenizer(render(c, chat_template=self.template, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
            for c in conversations
        ]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores: list[float] = [math.nan] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            longest = max(len(encoded[i]) for i in batch)
            ids = torch.full(
                (len(batch), longest), self.pad_id if self.pad_id is not None else 0, dtype=torch.long
            )
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            output = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            for i, value in zip(batch, self.rewards(output, len(batch)).tolist(), strict=True):
                scores[i] = value
        return scores

    def rewards(self, output: Any, rows: int) -> torch.Tensor:
        """The reward of each of ``rows`` conversations in the model's ``output``: its ``.score``
        (shape [rows] or [rows, 1]) or column ``label`` of its ``.logits``, as float32."""
        field = self.spec.output
        value = getattr(output, field, None)
        if not isinstance(value, torch.Tensor):
            other = "logits" if field == "score" else "score"
            raise ScoreError(
                f"{self.spec.path}: the model's output ({type(output).__name__}) has no .{field}; "
                f"try --reward-output {other}."
            )
        if field == "score":
            if value.numel() != rows:
                raise ScoreError(
                    f"{self.spec.path}: .score has shape {list(value.shape)} for {rows} conversations; a reward is "
                    "one number per conversation ([batch] or [batch, 1])."
                )
            return value.reshape(rows).float()
        if value.dim() != 2 or value.shape[0] != rows or value.shape[1] <= self.spec.label:
            raise ScoreError(
                f"{self.spec.path}: .logits has shape {list(value.shape)} for {rows} conversations, no column "
                f"{self.spec.label} to read the reward from; see --reward-output."
            )
        return value[:, self.spec.label].float()


def verifier_scores(name: str, verifier: Verifier, rows: datasets.Dataset) -> list[float | None]:
    """``verifier`` on every response; an exception in it, or anything but a finite number or None,
    stops the run naming the verifier and the record (the user's code: ``--debug`` shows where)."""
    scores: list[float | None] = []
    for row in rows:
        try:
            value = verifier(row["response"], row["reference"], row["prompt"])
        except Exception as error:
            raise ScoreError(
                f"--verifier {name!r} raised on record {row['id']!r} (source {row['source']!r}, sample "
                f"{row['sample_index']}): {one_line(error)}. Fix the verifier; `fusion-train --debug score ...` "
                "shows the traceback."
            ) from error
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ScoreError(
                f"--verifier {name!r} returned {value!r} for record {row['id']!r}; a verifier returns a finite "
                "number, or None when it cannot judge."
            )
        scores.append(None if value is None else float(value))
    return scores


def sampled_from(manifest: dict[str, Any]) -> str:
    """The prompts of a ``sample`` output, in words: its data file and how many of its records."""
    return f"{manifest['num_records']} records of {manifest['data']['path']}"


def _fingerprint(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ScoringPlan:
    """What a ``score`` run scores and records, worked out and checked before any model loads."""

    rows: datasets.Dataset  # every source's responses, in the order of ``samples_dirs``
    names: list[str]  # the scorers' names, the reward model first
    verifiers: dict[str, Verifier]
    manifest: dict[str, Any]


def plan_scoring(
    samples_dirs: list[str | Path],
    *,
    reward_model: RewardModel | None = None,
    verifiers: tuple[str, ...] = (),
    chunk_size: int = 4096,
    dtype: str = "float32",
) -> ScoringPlan:
    """The responses, scorers and manifest of a run; no scorer, an unknown verifier, a sample
    directory that is not complete, a source given twice or samples of different prompts stop it
    here (under ``--nproc``, before any rank starts)."""
    if reward_model is None and not verifiers:
        raise ScoreError("no scorer: give --reward-model DIR and/or --verifier NAME.")
    resolved = {name: get_verifier(name) for name in verifiers}
    loaded = [(Path(d), *load_samples(d)) for d in samples_dirs]
    sources: dict[str, Path] = {}
    for path, manifest, _ in loaded:
        if manifest["source"] in sources:
            raise ScoreError(
                f"{path} and {sources[manifest['source']]} both hold samples of source {manifest['source']!r}; "
                "give each source once (or sample with different --source-name)."
            )
        sources[manifest["source"]] = path
    first, first_manifest, _ = loaded[0]
    for path, manifest, _ in loaded[1:]:
        if manifest["data"]["fingerprint"] != first_manifest["data"]["fingerprint"]:
            raise ScoreError(
                f"{first} and {path} hold answers to different prompts: {first} to {sampled_from(first_manifest)}, "
                f"{path} to {sampled_from(manifest)}; score together only samples of the same prompts (every source "
                "sampled with the same --data and --limit)."
            )
    scorers: list[dict[str, Any]] = [{"name": name, "kind": "verifier"} for name in verifiers]
    if reward_model is not None:
        scorers.insert(
            0,
            {
                "name": reward_model.name,
                "kind": "reward-model",
                "path": str(Path(reward_model.path).resolve()),
                "fingerprint": model_fingerprint(reward_model.path),
                "output": reward_model.output,
                "label": reward_model.label if reward_model.output == "logits" else None,
                "chat_template": reward_model.chat_template,
                "dtype": dtype,
            },
        )
    names = [s["name"] for s in scorers]
    if len(set(names)) < len(names):
        raise ScoreError(f"a scorer is given twice: {', '.join(names)}.")
    rows = datasets.concatenate_datasets([data for _, _, data in loaded])
    manifest = {
        "format": FORMAT,
        "samples": [
            {"path": str(path.resolve()), "source": m["source"], "fingerprint": _fingerprint(m)}
            for path, m, _ in loaded
        ],
        "scorers": scorers,
        "num_responses": len(rows),
        "chunk_size": chunk_size,
        "num_parts": -(-len(rows) // chunk_size),
    }
    return ScoringPlan(rows, names, resolved, manifest)


def score(
    samples_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    reward_model: RewardModel | None = None,
    verifiers: tuple[str, ...] = (),
    batch_size: int = 8,
    chunk_size: int = 4096,
    dtype: str = "float32",
    shard: tuple[int, int] | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Score the responses of every ``samples_dirs`` (one per source); write them, with a
    ``scores`` column (scorer name -> score, null where a verifier could not judge), into
    ``out_dir``, ``chunk_size`` responses per part (resumable and split between ranks like
    ``sample``). Returns the summary once every part exists (``None`` on other ranks of a launched
    job, or while other shards' parts are missing): responses and mean score per scorer and source."""
    out_dir = Path(out_dir)
    plan = plan_scoring(
        samples_dirs, reward_model=reward_model, verifiers=verifiers, chunk_size=chunk_size, dtype=dtype
    )
    rows, names, num_parts = plan.rows, plan.names, plan.manifest["num_parts"]
    claim_output(out_dir, plan.manifest)
    with process_group() as rank:
        mine = parts_to_do(out_dir, num_parts, shard or rank.share)
        reward = (
            RewardScorer(reward_model, batch_size, dtype, trust_remote_code)
            if mine and reward_model
            else None
        )
        struct = datasets.Features({name: datasets.Value("float64") for name in names})
        for chunk in parts_bar(mine, "score", progress and rank.is_main):
            part = rows.select(range(chunk * chunk_size, min(len(rows), (chunk + 1) * chunk_size)))
            columns: list[list[float | None]] = []
            if reward is not None:
                columns.append(
                    reward([[*r["prompt"], {"role": "assistant", "content": r["response"]}] for r in part])
                )
            columns += [verifier_scores(name, verifier, part) for name, verifier in plan.verifiers.items()]
            scores = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
            write_part(part_path(out_dir, chunk), part.add_column("scores", scores, feature=struct))
        del reward
        release_memory()
        barrier()  # every rank's parts exist
    if not rank.is_main or not all(part_path(out_dir, c).exists() for c in range(num_parts)):
        return None  # another rank, or other shards' parts are missing
    summary = summarise(load_scored(out_dir)[1], names)
    write_json_atomic(out_dir / SUMMARY, summary)
    return summary


EXAMPLES = 5  # ids of non-finite scores shown per scorer and source


def summarise(scored: datasets.Dataset, names: list[str]) -> dict[str, Any]:
    """Per scorer: responses it judged, those it could not, the mean score, overall and per source.

    A reward model can output NaN or infinity (a broken head, an overflow in float16): such scores
    are counted apart (``non_finite``, with example ``id#sample_index``) and kept out of the mean,
    which one NaN would make NaN (and the summary invalid JSON)."""
    sources = sorted(set(scored["source"]))
    all_scores = scored["scores"]
    rows = list(zip(scored["source"], scored["id"], scored["sample_index"], strict=True))

    def stats(name: str, source: str | None) -> dict[str, Any]:
        values = [
            (s[name], f"{i}#{j}")
            for s, (o, i, j) in zip(all_scores, rows, strict=True)
            if source is None or o == source
        ]
        judged = [v for v, _ in values if v is not None and math.isfinite(v)]
        bad = [example for v, example in values if v is not None and not math.isfinite(v)]
        return {
            "judged": len(judged),
            "not_judged": sum(v is None for v, _ in values),
            "non_finite": len(bad),
            "non_finite_examples": bad[:EXAMPLES],
            "mean": sum(judged) / len(judged) if judged else None,
        }

    return {
        "responses": len(scored),
        "scorers": {
            name: {**stats(name, None), "by_source": {src: stats(name, src) for src in sources}}
            for name in names
        },
    }


def load_scored(out_dir: str | Path) -> tuple[dict[str, Any], datasets.Dataset]:
    """The manifest and the scored responses of a finished ``score`` run, in input order."""
    return load_output(Path(out_dir), FORMAT, "score", ScoreError)


# --------------------------------------------------------------------------- command


@click.command("score", cls=Command)
@click.option(
    "--samples",
    "samples_dirs",
    required=True,
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Output of `fusion-train sample`, repeatable: one per source (and the target's own, for WRPO).",
)
@options.output_directory()
@options_from(ScoreSettings)
@click.option(
    "--shard",
    default=None,
    help="i/n: process every n-th part starting at i. Default: RANK/WORLD_SIZE of the launcher, else everything.",
)
@launch_options
def score_command(**params: Any) -> None:
    """Score sampled responses with a reward model and/or verifiers (implicit fusion).

    With --nproc N the parts are split between N processes (one per GPU, or CPU processes; with
    --hostfile, on every node); the scores do not change."""
    p = SimpleNamespace(**params)
    if p.reward_label is not None and p.reward_model is None:
        raise click.BadParameter("needs --reward-model", param_hint="--reward-label")
    if p.reward_output != "auto" and p.reward_model is None:
        raise click.BadParameter("needs --reward-model", param_hint="--reward-output")
    spec = (
        reward_model_spec(
            p.reward_model, p.reward_label, p.reward_chat_template, p.trust_remote_code, p.reward_output
        )
        if p.reward_model is not None
        else None
    )
    plan_options = {
        "reward_model": spec,
        "verifiers": p.verifiers,
        "chunk_size": p.chunk_size,
        "dtype": p.dtype,
    }

    def check() -> None:
        check_output(Path(p.out_dir), plan_scoring(list(p.samples_dirs), **plan_options).manifest)

    arguments = {
        "samples_dirs": list(p.samples_dirs),
        "out_dir": p.out_dir,
        "batch_size": p.batch_size,
        "shard": parse_shard(p.shard),
        "trust_remote_code": p.trust_remote_code,
        **plan_options,
    }
    StageCall(score, arguments, Path(p.out_dir), report_scored).from_command(params, check)


def report_scored(out: Path, summary: dict[str, Any] | None) -> None:
    """What `score` prints at the end: every scorer's mean, or that only this shard's parts are done."""
    if summary is None:
        echo_shard_done(out)
        return
    for name, stats in summary["scorers"].items():
        mean = "n/a" if stats["mean"] is None else f"{stats['mean']:.4f}"
        click.echo(f"{name}: mean {mean} over {stats['judged']} responses ({stats['not_judged']} not judged)")
        for source, counts in stats["by_source"].items():
            if counts["non_finite"]:
                click.echo(
                    f"  {source}: {counts['non_finite']} non-finite scores (NaN or infinite), left out of the "
                    f"mean; prefer and rate never rank them: {', '.join(counts['non_finite_examples'])}"
                )
    click.echo(f"written: {out / PARTS_DIR}, {SUMMARY}")


if __name__ == "__main__":
    score_command(prog_name="fusion-train score")
