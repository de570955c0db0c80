"""WRPO on TRL's DPOTrainer: the loss of a batch equals the formula computed by hand from plain
forward passes, is ln 2 at step 0 (policy = reference), alpha follows its schedule, and a short
training run moves the policy."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("trl")

from trl import DPOConfig

from fusion_train.implicit.dpo import WRPOTrainer, alpha_at

BETA = 0.5


def pairs() -> datasets.Dataset:
    def say(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": say("Blue."),
         "rejected": say("I do not know any colours at all."), "chosen_source": say("Red, like a ripe tomato.")},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
         "chosen": say("4"), "rejected": say("5"), "chosen_source": say("2 + 2 = 4.")},
        # The source's answer opens with a blank line, whose tokens merge with the template's
        # newline after "assistant": the prompt alone is no token prefix of prompt + that answer.
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "chosen": say("A pear."),
         "rejected": say("No."), "chosen_source": say("\n\nAn apple, crisp and red.")},
    ])  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tokenizer_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny_model

    return build_tiny_model(
        tokenizer_dirs["smollm2"], tmp_path_factory.mktemp("wrpo") / "m", hidden=16, layers=1
    )


def trainer_for(model_dir: Path, out: Path, max_steps: int = 4) -> WRPOTrainer:
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = copy.deepcopy(policy)
    config = DPOConfig(output_dir=str(out), beta=BETA, per_device_train_batch_size=3, max_steps=max_steps,
                       learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                       bf16=False)  # TRL defaults to bf16, which would run the reference model in bf16 autocast  # fmt: skip
    return WRPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=pairs(),
                       processing_class=AutoTokenizer.from_pretrained(model_dir), alpha_max=0.1)  # fmt: skip


def token_ids(tokenizer: object, messages: list, generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answers_start(tokenizer: object, row: dict) -> int:
    """Where a row's answers begin, in tokens: after the rendered prompt with its generation
    prompt, or where one of its three answers' tokens merge with the prompt's last ones (counted
    here by comparing token lists; then all three answers start there)."""
    context = token_ids(tokenizer, row["prompt"], generation_prompt=True)
    starts = [len(context)]
    for key in ("chosen", "rejected", "chosen_source"):
        whole = token_ids(tokenizer, row["prompt"] + row[key])
        starts.append(
            next((i for i, (a, b) in enumerate(zip(context, whole, strict=False)) if a != b), len(context))
        )
    return min(starts)


def logp_by_hand(model: torch.nn.Module, tokenizer: object, prompt: list, answer: list, start: int) -> float:
    """log p(tokens from ``start`` on | those before) over the rendered prompt + answer, each token
    predicted by the logits one position earlier."""
    ids = torch.tensor([token_ids(tokenizer, prompt + answer)])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logprobs[t - 1, ids[0, t]] for t in range(start, ids.shape[1])))


def batch_of(trainer: WRPOTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_alpha_rises_linearly_to_its_maximum() -> None:
    assert [alpha_at(s, 4, 0.1) for s in range(5)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert alpha_at(9, 4, 0.1) == 0.1 and alpha_at(3, 0, 0.1) == 0.0


def test_loss_at_step_zero_is_ln_2(model_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(model_dir, tmp_path)
    loss = trainer.compute_loss(trainer.model, batch_of(trainer))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


def test_loss_matches_the_formula_by_hand(model_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(model_dir, tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that differs from the reference
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trainer.state.global_step, trainer.state.max_steps = 2, 4  # alpha = 0.05
    loss = float(trainer.compute_loss(trainer.model, batch_of(trainer)))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    expected, starts = [], []
    for row in pairs():
        start = answers_start(tokenizer, row)
        starts.append(start)

        def r(key: str, row: dict = row, start: int = start) -> float:
            policy = logp_by_hand(trainer.model, tokenizer, row["prompt"], row[key], start)
            return policy - logp_by_hand(trainer.ref_model, tokenizer, row["prompt"], row[key], start)

        inner = BETA * (0.05 * r("chosen_source") + 0.95 * r("chosen") - r("rejected"))
        expected.append(-F.logsigmoid(torch.tensor(inner, dtype=torch.float64)).item())
    prompt_alone = len(token_ids(tokenizer, pairs()[2]["prompt"], generation_prompt=True))
    assert starts[2] < prompt_alone  # the third row's answers start inside its rendered prompt
    assert abs(expected[0] - math.log(2)) > 1e-3  # the check below is not the trivial one
    assert loss == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_training_moves_the_policy_towards_the_chosen(model_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(model_dir, tmp_path, max_steps=3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["wrpo/alpha"] for entry in logs] == pytest.approx([0.0, 1 / 30, 2 / 30])
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > 0
