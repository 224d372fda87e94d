"""Prefill and decoding compute exactly what training computes (float64, torch backend, fresh random inputs)."""
import pytest
import torch
import torch.nn.functional as F

from ttt_e2e.inference import engine, feed, start
from ttt_e2e.ttt.meta import sequence_loss

TOL = dict(rtol=1e-10, atol=1e-10)


def _training(model, ttt, tokens, bos_id=None):
    """Meta-mode training losses on a (B, T+1) window, as the trainer computes them."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = None if bos_id is None else targets != bos_id
    return sequence_loss(model, inputs, targets, mask, ttt)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "prefix-ahead"])
@pytest.mark.parametrize("chunk", [8, 16, 24, None])  # 16 = W: the prefix caches adopt each chunk's k and v
def test_prefill_losses_equal_training(make_model, meta_ttt, chunk, overlap, monkeypatch):
    """With overlap_prefix each next chunk's prefix runs before the current chunk's inner steps (on the CPU in
    the same order as a side stream would, serially): the same losses."""
    model = make_model()
    T, B, bos = 48, 2, 5
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    tokens[:, ::7] = bos  # some targets are BOS: they carry no loss, in training and here
    ref = _training(model, meta_ttt, tokens, bos_id=bos)
    ahead = []
    monkeypatch.setattr(engine._Ahead, "take", lambda self: ahead.append(self.h.shape[1]) or self.h)
    state = start(model, meta_ttt, B, bos_id=bos, prefill_chunk=chunk, overlap_prefix=overlap)
    feed(state, tokens)
    # training passes (6 mini-batches; the last token waits): chunk 8 at 0, 8, .., 40; chunk 24 at 0, 24. Every
    # pass but the first takes its prefix from the look-ahead.
    assert ahead == ({8: [8] * 5, 16: [16] * 2, 24: [24]}.get(chunk, []) if overlap else [])
    assert len(state.losses) == T // meta_ttt.mini_batch_size  # the last token (target unknown) waits
    torch.testing.assert_close(torch.stack(state.losses, 1).mean(0), ref.minibatch_losses, **TOL)
    torch.testing.assert_close(torch.cat(state.token_losses, 1), ref.token_losses, **TOL)
    # The inner loop did something: phi moved, so later losses depend on the steps (else the test is vacuous).
    phi0 = dict(model.suffix.named_parameters())
    moved = max((state.phi[n] - phi0[n]).abs().max().item() for n in state.phi)
    assert moved > 1e-3


def _token_losses(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("prompt_len", [1, 13, 16, 17])
def test_decode_equals_training_across_steps(make_model, meta_ttt, prompt_len):
    """Prefill a prompt (partial last mini-batch or not), then decode token by token over several mini-batch
    boundaries (TTT steps during generation): every logit gives the training-time loss of its token."""
    model = make_model()
    T, B = 48, 2
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(2))
    ref = _training(model, meta_ttt, tokens).token_losses  # (B, T)
    state = start(model, meta_ttt, B)
    logits = feed(state, tokens[:, :prompt_len])
    for p in range(prompt_len - 1, T):  # logits at position p predict token p + 1
        torch.testing.assert_close(_token_losses(logits, tokens[:, p + 1]), ref[:, p], **TOL)
        logits = feed(state, tokens[:, p + 1:p + 2])
    assert len(state.losses) == T // meta_ttt.mini_batch_size  # every full mini-batch stepped once


def test_decode_after_adopted_chunks_equals_training(make_model, meta_ttt):
    """Prefill chunks of exactly W (the prefix caches take the chunk's own k and v as their rings, no copy), then
    decoding, which writes into those tensors: every logit still gives the training-time loss of its token."""
    model = make_model()
    T, W = 48, model.cfg.window
    tokens = torch.randint(0, model.cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(6))
    ref = _training(model, meta_ttt, tokens).token_losses
    state = start(model, meta_ttt, 2, prefill_chunk=W)
    logits = feed(state, tokens[:, :2 * W + 1])
    d = model.cfg.d_model
    for cache in state.caches[:model.cfg.n_prefix]:  # adopted: v is the chunk's, a view of the fused QKV output
        assert cache.v.shape[2] == W and cache.v.stride(2) == 3 * d
    for p in range(2 * W, T):
        torch.testing.assert_close(_token_losses(logits, tokens[:, p + 1]), ref[:, p], **TOL)
        logits = feed(state, tokens[:, p + 1:p + 2])


def test_decode_logits_equal_prefill_logits(make_model, meta_ttt):
    """The logits decoding gives for a token equal those a fresh prefill of the same prefix gives, before and
    after a TTT step taken during generation (b = 8: positions 15, 16 straddle one)."""
    model = make_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    state = start(model, meta_ttt, 2)
    decoded = [feed(state, tokens[:, :5])]
    for p in range(5, 40):
        decoded.append(feed(state, tokens[:, p:p + 1]))
    for n in (5, 8, 9, 16, 17, 31, 33, 40):
        fresh = feed(start(model, meta_ttt, 2), tokens[:, :n])
        torch.testing.assert_close(decoded[n - 5], fresh, **TOL)


def test_split_feeds_equal_one_feed(make_model, meta_ttt):
    """Continuing a prefill in pieces (pending mini-batch completed inside a later multi-token feed)."""
    model = make_model()
    T = 48
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(4))
    ref = _training(model, meta_ttt, tokens)
    state = start(model, meta_ttt, 1, prefill_chunk=16, overlap_prefix=True)
    for a, b in ((0, 3), (3, 21), (21, 22), (22, T + 1)):
        feed(state, tokens[:, a:b])
    torch.testing.assert_close(torch.cat(state.token_losses, 1), ref.token_losses, **TOL)


@pytest.mark.parametrize("window", [None, 8])
def test_baseline_decode_equals_forward(make_model, window):
    """fa (window None, growing cache) and swa (ring wraps: 40 tokens, W = 8) decode = plain model forward."""
    model = make_model(window=window, prime_mlp=False, seq_length=48)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(tokens)
    state = start(model, None, 3, prefill_chunk=4)
    logits = [feed(state, tokens[:, :11])]
    logits += [feed(state, tokens[:, p:p + 1]) for p in range(11, 40)]
    torch.testing.assert_close(torch.stack(logits, 1), ref[:, 10:], **TOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="forces the kernels on CPU tensors: the interpreter's case (on "
                    "a GPU the inference tests run them on the model's own device)")
def test_fused_norm_kernels_in_prefill_equal_training(make_model, meta_ttt, monkeypatch):
    """The fused QK-norm + RoPE and post-norm + residual kernels (forced here: the interpreter on a CPU) where
    inference uses them: no-grad in the prefix and forward-only passes, first order (torch.func's pullback) inside
    the inner steps. The losses equal the training computation's, which runs the separate ops (float32: the
    kernels take no float64)."""
    from ttt_e2e.kernels import qk_norm_rope, rmsnorm
    from ttt_e2e.model import layers
    calls = {"residual": 0, "residual_norm": 0, "rope": 0}

    def residual(*a, use_kernel=None, first_order=False, then=None):
        calls["residual_norm" if then is not None else "residual"] += 1
        return rmsnorm.rms_norm_residual(*a, use_kernel=True, first_order=first_order, then=then)

    def norm_rope(*a, use_kernel=None, first_order=False):
        calls["rope"] += 1
        return qk_norm_rope.qk_norm_rope(*a, use_kernel=True, first_order=first_order)

    import dataclasses
    model = make_model().float()
    model.cfg = dataclasses.replace(model.cfg, compute_dtype="float32")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(7))
    ref = _training(model, meta_ttt, tokens)
    monkeypatch.setattr(layers, "rms_norm_residual", residual)
    monkeypatch.setattr(layers, "qk_norm_rope", norm_rope)
    state = start(model, meta_ttt, 2, prefill_chunk=16)
    feed(state, tokens)
    assert calls["residual"] > 0 and calls["residual_norm"] > 0 and calls["rope"] > 0
    torch.testing.assert_close(torch.cat(state.token_losses, 1), ref.token_losses, rtol=1e-4, atol=1e-4)


# A Hugging Face model's shape (ttt_e2e.convert from-hf): 4 query heads on 2 kv heads of their own width, Llama 3's
# RoPE scaling, pre-norms only, an untied head
GQA = dict(n_kv_heads=2, attn_head_dim=6, rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=16,
           rope_theta=100.0, post_norm=False, qk_norm=False, tie_embeddings=False)


def test_grouped_query_attention_prefill_and_decode_equal_training(make_model, meta_ttt):
    """The caches hold the kv heads only (never repeated): prefill in chunks of W (the prefix caches adopt each
    chunk's k and v), then decoding across a mini-batch boundary, give the training-time loss of every token."""
    model = make_model(**GQA, seq_length=40)
    T, B = 40, 2
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(7))
    ref = _training(model, meta_ttt, tokens).token_losses
    state = start(model, meta_ttt, B, prefill_chunk=16)
    logits = feed(state, tokens[:, :33])
    assert all(c.k.shape[1] == 2 and c.k.shape[3] == 6 for c in state.caches)
    torch.testing.assert_close(torch.cat(state.token_losses, 1), ref[:, :32], **TOL)
    for p in range(32, T):
        torch.testing.assert_close(_token_losses(logits, tokens[:, p + 1]), ref[:, p], **TOL)
        logits = feed(state, tokens[:, p + 1:p + 2])
    assert len(state.losses) == T // meta_ttt.mini_batch_size
