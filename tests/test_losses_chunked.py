"""The chunked LM head loss (``losses.head_loss_sums``): values and gradients of the hidden states,
the head's weight and bias equal to the logits-based loss and the dense float64 reference, in
float32 and bf16, with padded vocabularies, rows without targets, temperature, soft-capping, tied
weights and chunks that do not divide N; and through ``FusionTrainer`` on a tied, soft-capped
Gemma-2. The DeepSpeed runs (ZeRO-2/3 against the logits-based loss) are in
test_train_deepspeed.py."""

from __future__ import annotations

import pytest
import torch
from train_fixtures import (
    batch_from_rows,
    dense_loss_sums,
    dense_reference_losses,
    fused_rows,
    logits_loss_sums,
)

from fusion_train import losses
from fusion_train.losses import fused_weights, head_loss_sums
from fusion_train.train import TrainInputError

BF16_STEP = 2.0**-7  # relative spacing of bf16 numbers


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


def _grads(sums, leaves, a=0.3, c=0.7):
    for leaf in leaves:
        if leaf is not None:
            leaf.grad = None
    (a * sums[0] + c * sums[1]).backward()
    return [None if leaf is None else leaf.grad.clone() for leaf in leaves]


CASES = [  # (vocab, tokenizer size, bias, softcap, temperature, chunk rows)
    pytest.param(37, 37, False, None, 1.0, 3, id="plain-chunk3"),
    pytest.param(37, 31, False, None, 2.0, 4, id="padded-T2-chunk4"),
    pytest.param(37, 31, True, None, 1.0, 1, id="padded-bias-chunk1"),
    pytest.param(37, 37, True, 5.0, 0.5, 3, id="softcap-bias-T0.5"),
    pytest.param(37, 31, False, 3.0, 1.0, 7, id="padded-softcap-chunk7"),
    pytest.param(37, 31, True, 4.0, 1.0, 64, id="one-chunk"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(("vocab", "size", "bias", "softcap", "temperature", "rows"), CASES)
def test_chunked_head_equals_the_logits_loss(dtype, vocab, size, bias, softcap, temperature, rows):
    leaves, labels, topk_ids, logprobs = _problem(vocab=vocab, size=size, dtype=dtype, bias=bias)
    fused = fused_weights(topk_ids, logprobs, temperature)
    h, w, b = leaves
    chunked = head_loss_sums(h, w, b, labels, size, topk_ids, fused, softcap=softcap, chunk_rows=rows)
    chunked_grads = _grads(chunked, leaves)
    reference = logits_loss_sums(h, w, b, labels, size, topk_ids, fused, softcap)
    reference_grads = _grads(reference, leaves)

    for ours, theirs in zip(chunked, reference, strict=True):
        assert ours.dtype == torch.float32
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-6)
    for name, ours, theirs in zip("hwb", chunked_grads, reference_grads, strict=True):
        if theirs is None:
            assert ours is None
            continue
        assert ours.dtype == theirs.dtype
        ours, theirs = ours.float(), theirs.float()
        if dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
        else:  # one bf16 step (both round the logit gradient to bf16, ours sums chunks in bf16)
            scale = theirs.abs().max().item()
            torch.testing.assert_close(ours, theirs, rtol=2 * BF16_STEP, atol=2 * BF16_STEP * scale, msg=name)

    if dtype == torch.float32:  # and the dense float64 reference, written from the formula
        hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        bd = None if b is None else b.detach().double().requires_grad_()
        logits = torch.nn.functional.linear(hd, wd, bd)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        clm, fusion = dense_loss_sums(logits, labels, topk_ids.tolist(), logprobs.tolist(), size, temperature)
        dense_grads = _grads((clm, fusion), [hd, wd, bd])
        assert chunked[0].item() == pytest.approx(clm.item(), rel=1e-5)
        assert chunked[1].item() == pytest.approx(fusion.item(), rel=1e-5)
        for name, ours, theirs in zip("hwb", chunked_grads, dense_grads, strict=True):
            if theirs is not None:
                torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-5, msg=name)


def test_rows_without_targets_get_the_clm_gradient_only():
    (h, w, _), labels, topk_ids, logprobs = _problem()
    fused = fused_weights(topk_ids, logprobs, 1.0)
    clm_only = head_loss_sums(h, w, None, labels, 31, chunk_rows=3)
    grad_clm = torch.autograd.grad(clm_only[0], h)[0]
    assert clm_only[1].item() == 0.0
    sums = head_loss_sums(h, w, None, labels, 31, topk_ids, fused, chunk_rows=3)
    grad = torch.autograd.grad(sums[0] + sums[1], h)[0]
    torch.testing.assert_close(grad[[2, 7]], grad_clm[[2, 7]], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grad[[0, 1]], grad_clm[[0, 1]])


def test_tied_weights_collect_both_gradients():
    """An embedding and the head share one weight: its gradient is the sum of both uses."""
    (h, w, _), labels, topk_ids, logprobs = _problem(vocab=31)
    fused = fused_weights(topk_ids, logprobs, 1.0)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])

    def run(loss_sums):
        w.grad = None
        hidden = torch.tanh(torch.nn.functional.embedding(tokens, w) + h.detach())
        clm, fusion = loss_sums(hidden, w, None, labels, 31, topk_ids, fused)
        (0.4 * clm + 0.6 * fusion).backward()
        return w.grad.clone()

    chunked = run(lambda *a: head_loss_sums(*a, chunk_rows=3))
    reference = run(logits_loss_sums)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    embedding_rows = torch.zeros(31, dtype=torch.bool)
    embedding_rows[tokens] = True
    head_only = run(lambda hid, *a: head_loss_sums(hid.detach(), *a, chunk_rows=3))
    assert not torch.allclose(chunked[embedding_rows], head_only[embedding_rows])  # both uses count


def test_default_chunks_follow_the_element_budget(monkeypatch):
    assert losses.head_chunk_rows(1000, elements=10_000, min_rows=1) == 10
    assert losses.head_chunk_rows(10**6, elements=10, min_rows=1) == 1
    assert losses.head_chunk_rows(262_144) == 256  # the floor: 2**24 // 262,144 would be 64
    assert losses.head_chunk_rows(32_000) == 2**24 // 32_000
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 37 * 3)
    monkeypatch.setattr(losses, "CHUNK_MIN_ROWS", 1)
    (h, w, _), labels, topk_ids, logprobs = _problem()
    seen = []
    original = losses._chunk_logits
    monkeypatch.setattr(losses, "_chunk_logits", lambda hid, *a: seen.append(len(hid)) or original(hid, *a))
    head_loss_sums(h, w, None, labels, 31, topk_ids, fused_weights(topk_ids, logprobs, 1.0))
    assert seen == [3, 3, 3, 1]  # never more than one chunk of logits


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


def test_trainer_on_a_tied_soft_capped_gemma2_matches_the_dense_reference(tiny_models, tmp_path, monkeypatch):
    from test_train import _collated, _trainer

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 32000 * 5)  # chunks of 5 rows
    monkeypatch.setattr(losses, "CHUNK_MIN_ROWS", 1)
    model_dir = _tiny_gemma2(tiny_models["mistral"], tmp_path / "gemma2")
    trainer, model, tokenizer = _trainer(model_dir, tmp_path, lm_weight=0.5, temperature=2.0)
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
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


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
