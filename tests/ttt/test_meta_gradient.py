"""The meta-gradient (through every inner gradient) against central finite differences, in float64."""
import pytest
import torch

from tiny import meta, tiny_batch, tiny_model
from ttt_e2e.ttt.meta import sequence_loss


def _loss(model, batch, ttt):
    return sequence_loss(model, *batch, ttt).loss


@pytest.mark.parametrize("remat", [False, True])
def test_meta_gradient_matches_finite_differences(remat):
    model = tiny_model()
    batch = tiny_batch(model)
    ttt = meta(remat_inner=remat, inner_grad_clip=2.5)
    out = sequence_loss(model, *batch, ttt)
    # The test must exercise the inner loop as it runs in training: several mini-batches with the KV cache
    # spanning a boundary (window 10 > b 6), and the clip both active and inactive.
    norms = out.inner_grad_norm
    assert norms.max() > ttt.inner_grad_clip > norms.min(), norms

    params = dict(model.named_parameters())
    assert {"suffix.blocks.0.prime.w13", "prefix.0.attn.wqkv.weight", "wte.weight"} <= params.keys()
    grads = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))
    g = torch.Generator().manual_seed(7)
    eps = 1e-6
    for name, p in params.items():  # one random direction per tensor: every parameter is checked on its own
        d = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * d)
            up = _loss(model, batch, ttt).item()
            p.sub_(2 * eps * d)
            down = _loss(model, batch, ttt).item()
            p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        analytic = (grads[name] * d).sum().item()
        assert abs(fd - analytic) <= 1e-6 * abs(fd), (name, fd, analytic)


def test_remat_gives_the_same_gradient():
    model = tiny_model(seed=3)
    batch = tiny_batch(model, seed=4)
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(model, batch, meta(remat_inner=False)), params)
    g1 = torch.autograd.grad(_loss(model, batch, meta(remat_inner=True)), params)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("blocks", [None, 1])
def test_prefix_remat_gives_the_same_gradient(blocks):
    """ttt.remat_prefix recomputes all prefix blocks, or with remat_prefix_blocks only the first N of them."""
    model = tiny_model(seed=8, n_layers=4)
    batch = tiny_batch(model, seed=9)
    assert model.cfg.n_prefix >= 2  # so that N = 1 leaves a block that keeps its activations
    params = list(model.parameters())
    g0 = torch.autograd.grad(_loss(model, batch, meta(remat_inner=False)), params)
    ttt = meta(remat_inner=False, remat_prefix=True, remat_prefix_blocks=blocks)
    assert ttt.prefix_remat_blocks(model.cfg) == (model.cfg.n_prefix if blocks is None else blocks)
    g1 = torch.autograd.grad(_loss(model, batch, ttt), params)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_inner_lr_zero_meta_equals_pretrain():
    model = tiny_model(seed=5)
    batch = tiny_batch(model, seed=6)
    m = sequence_loss(model, *batch, meta(inner_lr=0.0))
    p = sequence_loss(model, *batch, meta(train_mode="pretrain"))
    torch.testing.assert_close(m.loss, p.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.token_losses, p.token_losses, rtol=1e-12, atol=1e-14)
    # and the meta loss with learning does differ, so the comparison above is not vacuous
    assert abs(sequence_loss(model, *batch, meta()).loss.item() - p.loss.item()) > 1e-4


def test_meta_gradient_through_the_attention_kernels():
    """The whole meta-gradient with the suffix's attention through the Triton kernels (the Triton interpreter on
    a CPU), fp32, is as close to the float64 meta-gradient as the same fp32 model through the materialized
    reference is: the kernels' inner backward skips the KV cache's key gradients (a constant of the inner loss),
    the outer backward must still reach the cache. Both fp32 errors are measured against float64, not against each
    other: the meta-gradient's own fp32 rounding error (seen: 3e-5 relative) is larger than the two paths'
    difference, which depends on the device's summation order."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = {}
    for backend, dtype in (("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)):
        model = tiny_model(seed=5, d_model=32, attention_backend=backend).to(dtype).to(device)
        batch = [t.to(device) for t in tiny_batch(model, seed=6)]
        params = list(model.parameters())
        grads[backend, dtype] = torch.cat([g.flatten().double()
                                           for g in torch.autograd.grad(_loss(model, batch, meta()), params)])
    exact = grads["torch", torch.float64]
    err = {b: ((grads[b, torch.float32] - exact).norm() / exact.norm()).item() for b in ("torch", "triton")}
    assert err["torch"] < 1e-4, err  # fp32's own error: a wrong reference would be far off
    assert err["triton"] < 1.5 * err["torch"], err  # seen: 1.12x (CPU interpreter), 0.76x (H100)


def test_no_inner_step_after_the_last_mini_batch(monkeypatch):
    """The last mini-batch's update would reach no loss: it takes its loss only (the meta-gradient test above
    checks that this loses nothing)."""
    import ttt_e2e.ttt.meta as meta_mod

    model = tiny_model()
    batch = tiny_batch(model)
    ttt = meta()
    calls = []
    step = meta_mod.inner_step
    monkeypatch.setattr(meta_mod, "inner_step", lambda *a, **k: calls.append(a[8]) or step(*a, **k))
    out = sequence_loss(model, *batch, ttt)
    n_mb = model.cfg.seq_length // ttt.mini_batch_size
    assert calls == [t * ttt.mini_batch_size for t in range(n_mb - 1)]
    assert out.inner_grad_norm.shape == (n_mb - 1,) and out.minibatch_losses.shape == (n_mb,)


@pytest.mark.parametrize("window", [48, 20])  # the whole sequence (caches grow in buffers), and a trimmed cache
@pytest.mark.parametrize("remat", [False, True])
def test_meta_gradient_with_growing_kv_buffers(monkeypatch, window, remat):
    """The meta step through the Triton attention kernels (the interpreter here, fp32), whose suffix keys grow in
    buffers (kernels/swa/function.py: _append), against the PyTorch attention's meta-gradient: 8 mini-batches,
    so that the buffers are appended to, outgrown and, with a window shorter than the sequence, left for trimmed
    caches; with remat the recomputation gets buffers of its own. A milder inner rate than the finite-difference
    test's 0.7: there 8 inner steps amplify fp32 rounding (either backend's) to ~1e-4, here it stays ~2e-6."""
    from ttt_e2e.kernels.swa import function

    made = []
    real = function._new_buffer
    monkeypatch.setattr(function, "_new_buffer", lambda kc, vc, rows: made.append(rows) or real(kc, vc, rows))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = {}
    for backend in ("torch", "triton"):
        model = tiny_model(d_model=32, attention_backend=backend, seq_length=48, window=window).float().to(device)
        ttt = meta(mini_batch_size=6, remat_inner=remat, inner_lr=0.1)
        loss = sequence_loss(model, *[t.to(device) for t in tiny_batch(model)], ttt).loss
        grads[backend] = torch.autograd.grad(loss, list(model.parameters()))
    cached_calls = 7 * model.cfg.suffix_len  # mini-batches 1..7 attend over a cache, in every suffix block
    assert 0 < len(made) < cached_calls * (2 if remat else 1), made
    for (name, _), a, b in zip(model.named_parameters(), grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


def _meta_loss_every_block_in_the_loop(model, ids, targets, mask, ttt):
    """The meta loss with the whole suffix inside the loop (the first block's attention too, over its KV cache):
    what ttt/meta.py computed before it ran that attention once over the sequence."""
    from ttt_e2e.config import Kernels
    from ttt_e2e.ttt.inner import inner_step, minibatch_loss
    from ttt_e2e.ttt.settings import InnerSettings

    B, T = ids.shape
    b = ttt.mini_batch_size
    h = model.run_prefix(model.wte(ids))
    inner = model.suffix.inner_names()
    theta = {n: p for n, p in model.suffix.named_parameters() if n not in inner}
    phi = {n: p.expand(B, *p.shape) for n, p in model.suffix.named_parameters() if n in inner}
    head, caches, losses = model.head_weight(), None, []
    for t in range(T // b):
        args = (theta, head, phi)
        sl = slice(t * b, (t + 1) * b)
        if t < T // b - 1:
            l_t, _, phi, caches, _, _ = inner_step(model.suffix, *args, caches, h[:, sl], targets[:, sl], mask[:, sl],
                                                   t * b, InnerSettings.build(model, ttt, Kernels.of(model.cfg)))
        else:
            l_t, _, _ = minibatch_loss(model.suffix, theta, head, phi, caches, h[:, sl], targets[:, sl],
                                       mask[:, sl], t * b)
        losses.append(l_t)
    return torch.stack(losses, 1).mean()


@pytest.mark.parametrize("remat", [False, True])
def test_first_attention_outside_the_loop_is_the_same_function(remat):
    """The first suffix block's attention half runs once over the whole sequence (it never depends on phi): the
    same loss and meta-gradient as running it per mini-batch over the KV cache, with the window spanning
    mini-batch boundaries (10 > b = 6) and the clip active in some steps, not in others."""
    model = tiny_model(seed=5)
    batch = tiny_batch(model, seed=6)
    ttt = meta(remat_inner=remat, inner_grad_clip=3.0)
    params = list(model.parameters())
    out = sequence_loss(model, *batch, ttt)
    assert out.inner_grad_norm.max() > ttt.inner_grad_clip > out.inner_grad_norm.min(), out.inner_grad_norm
    got = out.loss
    want = _meta_loss_every_block_in_the_loop(model, *batch, ttt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for p, a, b in zip(model.named_parameters(), torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=p[0])
