"""The chunked LM head loss (``losses.head_loss_sums``): values and gradients of the hidden states,
the head's weight and bias equal to the logits-based loss and the dense float64 reference, in
float32 and bf16, with padded vocabularies, rows without targets, temperature, soft-capping, tied
weights and chunks that do not divide N; and through ``FusionTrainer`` on a tied, soft-capped
Gemma-2. The DeepSpeed runs (ZeRO-2/3 against the logits-based loss) are in
test_train_deepspeed.py."""

from __future__ import annotations

import pytest
import torch
from logits_losses import logits_loss_sums
from numeric import approx_at_scale, assert_close_at_scale
from train_fixtures import (
    batch_from_rows,
    dense_loss_sums,
    dense_reference_losses,
    fused_rows,
)

from fusion_train import losses
from fusion_train.errors import TrainInputError
from fusion_train.losses import fused_weights, head_loss_sums


def _problem(n=10, hidden=8, vocab=37, size=31, k=4, dtype=torch.float32, bias=False, seed=0):
    """Hidden states, a head (weight, bias), labels and top-k targets; row 2 and 7 all padding."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    w = 2.0 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) if bias else None
    labels = torch.randint(0, size, (n,), generator=generator)
    topk_ids = torch.randint(0, size, (n, k), generator=generator)
    topk_ids[:, -1] = -1  # a padding slot
    topk_ids[[2, 7]] = -1  # rows without any valid target
    logprobs = torch.log_softmax(torch.randn(n, k, generator=generator), -1)
    logprobs = logprobs.masked_fill(topk_ids < 0, float("-inf"))
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    return leaves, labels, topk_ids, logprobs


def _grads(loss, leaves):
    for leaf in leaves:
        if leaf is not None:
            leaf.grad = None
    loss.backward()
    return [None if leaf is None else leaf.grad.clone() for leaf in leaves]


CASES = [  # (vocab, tokenizer size, bias, softcap, temperature, chunk tokens)
    pytest.param(37, 37, False, None, 1.0, 3, id="plain-chunk3"),
    pytest.param(37, 31, False, None, 2.0, 4, id="padded-T2-chunk4"),
    pytest.param(37, 31, True, None, 1.0, 1, id="padded-bias-chunk1"),
    pytest.param(37, 37, True, 5.0, 0.5, 3, id="softcap-bias-T0.5"),
    pytest.param(37, 31, False, 3.0, 1.0, 7, id="padded-softcap-chunk7"),
    pytest.param(37, 31, True, 4.0, 1.0, 64, id="one-chunk"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(("vocab", "size", "bias", "softcap", "temperature", "tokens"), CASES)
def test_chunked_head_equals_the_logits_loss(dtype, vocab, size, bias, softcap, temperature, tokens):
    leaves, labels, topk_ids, logprobs = _problem(vocab=vocab, size=size, dtype=dtype, bias=bias)
    fused = fused_weights(topk_ids, logprobs, temperature)
    h, w, b = leaves
    weights = {"clm_weight": 0.3, "fusion_weight": 0.7, "softcap": softcap}
    chunked = head_loss_sums(h, w, b, labels, size, topk_ids, fused, **weights, chunk_tokens=tokens)
    chunked_grads = _grads(chunked[0], leaves)
    reference = logits_loss_sums(h, w, b, labels, size, topk_ids, fused, **weights)
    reference_grads = _grads(reference[0], leaves)

    for ours, theirs in zip(chunked, reference, strict=True):
        assert ours.dtype == torch.float32
        assert ours.item() == approx_at_scale(theirs.item(), dtype=torch.float32)
    for name, ours, theirs in zip("hwb", chunked_grads, reference_grads, strict=True):
        if theirs is None:
            assert ours is None
            continue
        assert ours.dtype == theirs.dtype
        ours, theirs = ours.float(), theirs.float()
        # In bf16 both round the logit gradient to bf16, ours each chunk's product too: a few steps.
        assert_close_at_scale(ours, theirs, dtype=dtype, ulps=64 if dtype == torch.float32 else 4, msg=name)

    if dtype == torch.float32:  # and the dense float64 reference, written from the formula
        clm, fusion, dense_grads = _dense(leaves, labels, topk_ids, logprobs, size, temperature, softcap,
                                          lambda clm, fusion: 0.3 * clm + 0.7 * fusion)  # fmt: skip
        assert chunked[1].item() == approx_at_scale(clm, dtype=torch.float32)
        assert chunked[2].item() == approx_at_scale(fusion, dtype=torch.float32)
        for name, ours, theirs in zip("hwb", chunked_grads, dense_grads, strict=True):
            if theirs is not None:
                assert_close_at_scale(ours, theirs, dtype=torch.float32, msg=name)


def _dense(leaves, labels, topk_ids, logprobs, size, temperature, softcap, combine):
    """CLM and fusion sums of the dense float64 reference, and the gradients of ``combine(clm, fusion)``."""
    h, w, b = (None if t is None else t.detach().double().requires_grad_() for t in leaves)
    logits = torch.nn.functional.linear(h, w, b)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    clm, fusion = dense_loss_sums(logits, labels, topk_ids.tolist(), logprobs.tolist(), size, temperature)
    return clm.item(), fusion.item(), _grads(combine(clm, fusion), [h, w, b])


@pytest.mark.parametrize(
    ("clm_weight", "fusion_weight", "use"),
    [
        pytest.param(0.3, 0.7, lambda loss: 3.0 * loss, id="loss-times-3"),
        pytest.param(0.3, 0.7, lambda loss: loss / torch.tensor(40.0), id="loss-over-a-tensor"),
        pytest.param(0.0, 1.0, lambda loss: 0.5 * loss, id="fusion-only-halved"),
        pytest.param(1.0, 0.0, lambda loss: -2.0 * loss, id="clm-only-negated"),
    ],
)
def test_gradients_computed_in_forward_follow_how_the_loss_is_used(clm_weight, fusion_weight, use):
    """The gradients are computed in forward, before anyone scales the loss: backward must scale
    them by the incoming gradient, and the weights given in forward decide the mix. Compared with
    the dense float64 reference of the same use (e.g. 3 x (0.3 CLM + 0.7 fusion))."""
    leaves, labels, topk_ids, logprobs = _problem(vocab=37, size=31, bias=True)
    fused = fused_weights(topk_ids, logprobs, 1.0)
    sums = head_loss_sums(*leaves, labels, 31, topk_ids, fused, clm_weight=clm_weight,
                          fusion_weight=fusion_weight, softcap=4.0, chunk_tokens=3)  # fmt: skip
    ours = _grads(use(sums[0]), leaves)
    _, _, dense = _dense(leaves, labels, topk_ids, logprobs, 31, 1.0, 4.0,
                         lambda clm, fusion: use(clm_weight * clm + fusion_weight * fusion))  # fmt: skip
    for name, mine, theirs in zip("hwb", ours, dense, strict=True):
        assert_close_at_scale(mine, theirs, dtype=torch.float32, msg=name)


def test_the_separate_sums_are_not_differentiable():
    """The stored gradients are those of the weighted loss: a gradient through the CLM or fusion
    sum alone cannot come from them, so autograd refuses it rather than returning a wrong one; and
    they are handed out once."""
    (h, w, _), labels, topk_ids, logprobs = _problem()
    loss, clm, fusion = head_loss_sums(
        h, w, None, labels, 31, topk_ids, fused_weights(topk_ids, logprobs, 1.0)
    )
    assert loss.requires_grad and not clm.requires_grad and not fusion.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        fusion.backward()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated only once"):
        loss.backward()


def test_rows_without_targets_get_the_clm_gradient_only():
    (h, w, _), labels, topk_ids, logprobs = _problem()
    fused = fused_weights(topk_ids, logprobs, 1.0)
    clm_only = head_loss_sums(h, w, None, labels, 31, chunk_tokens=3)
    grad_clm = torch.autograd.grad(clm_only[0], h)[0]
    assert clm_only[2].item() == 0.0
    sums = head_loss_sums(h, w, None, labels, 31, topk_ids, fused, chunk_tokens=3)
    grad = torch.autograd.grad(sums[0], h)[0]
    assert_close_at_scale(grad[[2, 7]], grad_clm[[2, 7]], dtype=torch.float32)
    with pytest.raises(AssertionError, match="largest difference"):  # rows with targets do differ
        assert_close_at_scale(grad[[0, 1]], grad_clm[[0, 1]], dtype=torch.float32)


def test_tied_weights_collect_both_gradients():
    """An embedding and the head share one weight: its gradient is the sum of both uses."""
    (h, w, _), labels, topk_ids, logprobs = _problem(vocab=31)
    fused = fused_weights(topk_ids, logprobs, 1.0)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])

    def run(loss_sums):
        w.grad = None
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, w) + h.detach())
        loss, _, _ = loss_sums(
            hidden, w, None, labels, 31, topk_ids, fused, clm_weight=0.4, fusion_weight=0.6
        )
        loss.backward()
        return w.grad.clone()

    chunked = run(lambda *a, **k: head_loss_sums(*a, **k, chunk_tokens=3))
    reference = run(logits_loss_sums)
    assert_close_at_scale(chunked, reference, dtype=torch.float32)
    embedding_rows = torch.zeros(31, dtype=torch.bool)
    embedding_rows[tokens] = True
    head_only = run(lambda hid, *a, **k: head_loss_sums(hid.detach(), *a, **k, chunk_tokens=3))
    with pytest.raises(AssertionError, match="largest difference"):  # both uses count
        assert_close_at_scale(chunked[embedding_rows], head_only[embedding_rows], dtype=torch.float32)


def test_chunks_follow_the_chunk_tokens(monkeypatch):
    """``chunk_tokens`` rows of logits at a time, any size giving the same values and gradients;
    without autograd no gradient is computed."""
    (h, w, b), labels, topk_ids, logprobs = _problem(bias=True)
    fused = fused_weights(topk_ids, logprobs, 1.0)
    seen = []
    original = losses._chunk_head
    monkeypatch.setattr(
        losses, "_chunk_head", lambda hid, *a: seen.append((len(hid), a[-1] is not None)) or original(hid, *a)
    )
    results = {}
    for tokens in (1, 3, 10, 1000):
        seen.clear()
        sums = head_loss_sums(h, w, b, labels, 31, topk_ids, fused, chunk_tokens=tokens)
        results[tokens] = [t.detach() for t in sums] + _grads(sums[0], [h, w, b])
        assert [rows for rows, _ in seen] == {1: [1] * 10, 3: [3, 3, 3, 1], 10: [10], 1000: [10]}[tokens]
    for tokens in (1, 3, 10):  # equal up to float32 summation order (1-row chunks: vector products)
        for ours, theirs in zip(results[tokens], results[1000], strict=True):
            assert_close_at_scale(ours, theirs, dtype=torch.float32)
    seen.clear()
    with torch.no_grad():
        sums = head_loss_sums(h, w, b, labels, 31, topk_ids, fused, chunk_tokens=3)
    assert seen == [(3, False), (3, False), (3, False), (1, False)]
    assert_close_at_scale(sums[0], results[1000][0], dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        head_loss_sums(h, w, b, labels, 31, chunk_tokens=0)


# --------------------------------------------------------------------------- through the trainer


def _tiny_gemma2(tokenizer_dir, out, softcap=8.0):
    """A tiny Gemma-2 (tied embeddings, soft-capped logits) on the Mistral tokenizer."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          final_logit_softcapping=softcap, tie_word_embeddings=True,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id, attn_implementation="eager")  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # large logits, so the cap bends them
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_trainer_on_a_tied_soft_capped_gemma2_matches_the_dense_reference(tiny_models, tmp_path):
    from test_train import _collated, _trainer

    model_dir = _tiny_gemma2(tiny_models["mistral"], tmp_path / "gemma2")
    trainer, model, tokenizer = _trainer(
        model_dir, tmp_path, lm_weight=0.5, temperature=2.0, loss_chunk_tokens=5
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rows = fused_rows(model_dir, examples=3, top_k=4)
    loss = trainer.compute_loss(model, _collated(rows, tokenizer.eos_token_id))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert model.config.final_logit_softcapping == 8.0  # restored after the call

    logits = model(**batch_from_rows(rows, tokenizer.eos_token_id)).logits  # soft-capped by the model
    assert 5.0 < logits.abs().max() < 8.0  # the cap bends the largest logits
    clm, fusion = dense_reference_losses(logits, rows, len(tokenizer), temperature=2.0)
    reference = 0.5 * clm + 0.5 * fusion
    reference.backward()
    assert loss.item() == approx_at_scale(reference.item(), dtype=torch.float32)
    for name, parameter in model.named_parameters():
        assert_close_at_scale(grads[name], parameter.grad, dtype=torch.float32, msg=name)


def test_models_that_rescale_their_logits_are_refused(tiny_models, tmp_path):
    from test_train import _collated, _trainer

    trainer, model, tokenizer = _trainer(tiny_models["mistral"], tmp_path, lm_weight=0.5)
    model.config.logit_scale = 0.0625  # as Cohere's config
    rows = fused_rows(tiny_models["mistral"], examples=1)
    with pytest.raises(TrainInputError, match="rescales its logits after the LM head \\(logit_scale"):
        trainer.compute_loss(model, _collated(rows, tokenizer.eos_token_id))
    assert "forward" not in vars(model.lm_head)


def test_models_that_work_on_the_heads_output_are_refused(tiny_models, tmp_path):
    """Granite divides its logits by ``logits_scaling`` after the head, even by 1.0: refused with
    the reason, not a TypeError from inside the model."""
    from test_train import _collated, _trainer
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["mistral"])
    config = GraniteConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=1.0)  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(tmp_path / "granite")
    tokenizer.save_pretrained(tmp_path / "granite")
    trainer, model, _ = _trainer(tmp_path / "granite", tmp_path, lm_weight=0.5)
    rows = fused_rows(tiny_models["mistral"], examples=1)
    with pytest.raises(
        TrainInputError, match="GraniteForCausalLM works on its LM head's logits after the head"
    ):
        trainer.compute_loss(model, _collated(rows, tokenizer.eos_token_id))
    assert "forward" not in vars(model.lm_head)
