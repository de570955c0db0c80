"""The preference losses' trainers, as ``preference_losses.LOSSES`` declares them: for WRPO and
length-normalised DPO the loss of a batch and the rewards logged, for IPO and SLiC's hinge the
loss, equal the papers' formulas computed by hand from plain forward passes; WRPO's loss is ln 2 at
step 0 (policy = reference), alpha follows its schedule, and a short training run moves the policy."""

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

from numeric import approx_at_scale, rounding_bound
from trl import DPOConfig, DPOTrainer

from fusion_train.implicit.preference_losses import LOSSES
from fusion_train.implicit.preference_trainers import alpha_at

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


def trainer_for(
    model_dir: Path, out: Path, max_steps: int = 4, loss: str = "wrpo", alpha_max: float = 0.1
) -> DPOTrainer:
    """The trainer and TRL loss type ``LOSSES[loss]`` declares (``stock``: TRL's own DPOTrainer with
    sigmoid_norm), on :func:`pairs` for a loss that reads chosen_source, else on the pairs without
    the source's answers (the third row, whose answer merges with the prompt, left out)."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = copy.deepcopy(policy)
    declared = LOSSES.get(loss)
    config = DPOConfig(output_dir=str(out), beta=BETA, per_device_train_batch_size=3, max_steps=max_steps,
                       learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                       bf16=False, loss_type=[declared.loss_type if declared else "sigmoid_norm"])  # TRL defaults to bf16, which would run the reference model in bf16 autocast  # fmt: skip
    common = {"model": policy, "ref_model": reference, "args": config,
              "processing_class": AutoTokenizer.from_pretrained(model_dir)}  # fmt: skip
    if loss == "wrpo":
        return declared.trainer(train_dataset=pairs(), alpha_max=alpha_max, **common)
    data = pairs().select([0, 1]).remove_columns("chosen_source")
    return (declared.trainer if declared else DPOTrainer)(train_dataset=data, **common)


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


def log_probabilities_by_hand(
    trainer: DPOTrainer, tokenizer: object, rows: datasets.Dataset
) -> list[list[tuple[float, float, int]]]:
    """Per row, for its chosen then its rejected response: log p under the policy and under the
    reference model, and the response's tokens (its answer and the template's end of turn)."""
    found = []
    for row in rows:
        start = len(token_ids(tokenizer, row["prompt"], generation_prompt=True))
        found.append([(logp_by_hand(trainer.model, tokenizer, row["prompt"], row[key], start),
                       logp_by_hand(trainer.ref_model, tokenizer, row["prompt"], row[key], start),
                       len(token_ids(tokenizer, row["prompt"] + row[key])) - start)
                      for key in ("chosen", "rejected")])  # fmt: skip
    return found


def batch_of(trainer: DPOTrainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_alpha_rises_linearly_to_its_maximum() -> None:
    assert [alpha_at(s, 4, 0.1) for s in range(5)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert alpha_at(9, 4, 0.1) == 0.1 and alpha_at(3, 0, 0.1) == 0.0


def test_loss_at_step_zero_is_ln_2(model_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(model_dir, tmp_path)
    loss = trainer.compute_loss(trainer.model, batch_of(trainer))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """A policy that differs from the reference (the same for every trainer made from one model)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))


def logged(trainer: DPOTrainer, names: list[str]) -> list[float]:
    """The values last logged under ``names`` (as eval metrics: the model loads in eval mode)."""
    mode = "train" if trainer.model.training else "eval"
    return [trainer._metrics[mode][name][-1] for name in names]


def test_loss_matches_the_formula_by_hand(model_dir: Path, tmp_path: Path) -> None:
    """WRPO at alpha 0.5: the loss, each response's reward beta r(y), y_wt's margin over y_l, and
    the weighted chosen reward beta (alpha r(y_ws) + (1 - alpha) r(y_wt)) with its margin over
    beta r(y_l) and its accuracy, all as the mean over the batch's three rows."""
    trainer = trainer_for(model_dir, tmp_path, alpha_max=1.0)
    perturb(trainer.model)
    trainer.state.global_step, trainer.state.max_steps = 2, 4  # alpha = 0.5
    loss = float(trainer.compute_loss(trainer.model, batch_of(trainer)))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    expected, starts, rewards, scale = [], [], [], 0.0
    for row in pairs():
        start = answers_start(tokenizer, row)
        starts.append(start)
        by_key = {}
        for key in ("chosen", "rejected", "chosen_source"):
            policy = logp_by_hand(trainer.model, tokenizer, row["prompt"], row[key], start)
            reference = logp_by_hand(trainer.ref_model, tokenizer, row["prompt"], row[key], start)
            by_key[key] = BETA * (policy - reference)
            scale = max(scale, BETA * abs(policy), BETA * abs(reference))
        rewards.append(by_key)
        inner = 0.5 * by_key["chosen_source"] + 0.5 * by_key["chosen"] - by_key["rejected"]
        expected.append(-F.logsigmoid(torch.tensor(inner, dtype=torch.float64)).item())
    prompt_alone = len(token_ids(tokenizer, pairs()[2]["prompt"], generation_prompt=True))
    assert starts[2] < prompt_alone  # the third row's answers start inside its rendered prompt
    assert abs(expected[0] - math.log(2)) > 1e-3  # the check below is not the trivial one
    assert loss == approx_at_scale(sum(expected) / len(expected), dtype=torch.float32, scale=scale)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    weighted = [0.5 * r["chosen_source"] + 0.5 * r["chosen"] for r in rewards]
    by_hand = [mean([r[key] for r in rewards]) for key in ("chosen", "rejected", "chosen_source")]
    by_hand += [mean([r["chosen"] - r["rejected"] for r in rewards]), mean(weighted),
                mean([w - r["rejected"] for w, r in zip(weighted, rewards, strict=True)])]  # fmt: skip
    names = ["rewards/chosen", "rewards/rejected", "rewards/chosen_source", "rewards/margins",
             "rewards/weighted_chosen", "rewards/weighted_margins"]  # fmt: skip
    assert logged(trainer, names) == approx_at_scale(by_hand, dtype=torch.float32, scale=scale)
    accuracies = [mean([r["chosen"] > r["rejected"] for r in rewards]),
                  mean([w > r["rejected"] for w, r in zip(weighted, rewards, strict=True)])]  # fmt: skip
    assert accuracies[0] != accuracies[1]  # y_ws's reward turns some pairs around
    names = ["rewards/accuracies", "rewards/weighted_accuracies"]  # shares of the 3 rows, in float32
    assert logged(trainer, names) == approx_at_scale(accuracies, dtype=torch.float32)
    assert logged(trainer, ["wrpo/alpha"]) == [0.5]


def test_length_normalised_rewards_are_the_ones_the_loss_compares(model_dir: Path, tmp_path: Path) -> None:
    """sigmoid_norm: the logged rewards are beta r(y) / n(y), n the response's tokens (its answer
    and the template's end of turn), with their margins and accuracies; the summed ones beside
    them. The loss is TRL's own sigmoid_norm loss on the same batch, and the formula by hand."""
    trainer = trainer_for(model_dir, tmp_path, loss="sigmoid_norm")
    perturb(trainer.model, seed=16)  # the first pair: summed rewards say chosen, normalised rejected
    loss = float(trainer.compute_loss(trainer.model, batch_of(trainer)))

    stock = trainer_for(model_dir, tmp_path / "stock", loss="stock")
    perturb(stock.model, seed=16)
    assert stock.args.loss_type == ["sigmoid_norm"] and type(stock) is DPOTrainer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    summed, normalised, scale = [], [], 0.0
    for pair in log_probabilities_by_hand(trainer, tokenizer, pairs().select([0, 1])):
        rewards = [(BETA * (policy - reference), tokens) for policy, reference, tokens in pair]
        scale = max(
            scale, *(BETA * abs(value) for policy, reference, _ in pair for value in (policy, reference))
        )
        summed.append([reward for reward, _ in rewards])
        normalised.append([reward / tokens for reward, tokens in rewards])
    assert [s[0] > s[1] for s in summed] != [
        n[0] > n[1] for n in normalised
    ]  # the two rank a pair differently
    expected = [-F.logsigmoid(torch.tensor(c - r, dtype=torch.float64)).item() for c, r in normalised]
    assert loss == approx_at_scale(sum(expected) / 2, dtype=torch.float32, scale=scale)
    stock_loss = float(stock.compute_loss(stock.model, batch_of(stock)))
    assert loss == approx_at_scale(stock_loss, dtype=torch.float32, scale=scale)

    for prefix, values in (("rewards", normalised), ("summed_rewards", summed)):
        by_hand = [sum(v[0] for v in values) / 2, sum(v[1] for v in values) / 2,
                   sum(v[0] - v[1] for v in values) / 2]  # fmt: skip
        names = [f"{prefix}/chosen", f"{prefix}/rejected", f"{prefix}/margins"]
        assert logged(trainer, names) == approx_at_scale(by_hand, dtype=torch.float32, scale=scale), prefix
        accuracy = [sum(v[0] > v[1] for v in values) / 2]
        assert logged(trainer, [f"{prefix}/accuracies"]) == approx_at_scale(accuracy, dtype=torch.float32), (
            prefix
        )


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_trl_losses_match_the_papers_formulas_by_hand(loss: str, model_dir: Path, tmp_path: Path) -> None:
    """On a batch where the policy differs from the reference, the mean over its pairs of IPO's
    (arXiv 2310.12036, eq. 17, beta as tau) ``(h - 1 / (2 beta))^2``, h the margin of the per-token
    mean log-ratios r(y) / n(y) (TRL's choice; n counts the answer's tokens and the template's end
    of turn), or SLiC's hinge ``max(0, 1 - beta (r(y_w) - r(y_l)))`` on the summed log-ratios."""
    trainer = trainer_for(model_dir, tmp_path, loss=loss)
    perturb(trainer.model)
    value = float(trainer.compute_loss(trainer.model, batch_of(trainer)))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    summed, mean, logps = [], [], []  # per pair: r(y_w) - r(y_l), h; every log-probability
    for pair in log_probabilities_by_hand(trainer, tokenizer, pairs().select([0, 1])):
        (chosen, n_chosen), (rejected, n_rejected) = [
            (policy - reference, tokens) for policy, reference, tokens in pair
        ]
        logps += [value for policy, reference, _ in pair for value in (policy, reference)]
        summed.append(chosen - rejected)
        mean.append(chosen / n_chosen - rejected / n_rejected)
    target = 1 / (2 * BETA)
    if loss == "ipo":
        expected = sum((h - target) ** 2 for h in mean) / 2
        # a float32 rounding of a log-probability moves h by as much, and the loss by 2 |h - target| times that
        scale = 2 * max(abs(h - target) for h in mean) * max(map(abs, logps))
        on_sums = sum((d - target) ** 2 for d in summed) / 2  # IPO on summed log-ratios, not TRL's
        assert abs(on_sums - expected) > 10 * rounding_bound(scale, torch.float32)
    else:
        hinges = [1 - BETA * d for d in summed]
        assert all(h > 0 for h in hinges)  # inside the margin: the loss still has a gradient
        expected = sum(hinges) / 2
        scale = BETA * max(map(abs, logps))
    at_step_zero = {"ipo": target**2, "hinge": 1.0}[loss]  # policy = reference
    assert abs(expected - at_step_zero) > 10 * rounding_bound(scale, torch.float32)
    assert value == approx_at_scale(expected, dtype=torch.float32, scale=scale)


def test_training_moves_the_policy_towards_the_chosen(model_dir: Path, tmp_path: Path) -> None:
    trainer = trainer_for(model_dir, tmp_path, max_steps=3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["wrpo/alpha"] for entry in logs] == pytest.approx([0.0, 1 / 30, 2 / 30])
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > 0
