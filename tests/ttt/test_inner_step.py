"""The inner step under autocast and in place, against its plain definitions (the SGD update itself:
tests/kernels/test_sgd_step.py)."""
import contextlib

import pytest
import torch
from torch.func import functional_call, grad

from tiny import tiny_batch, tiny_model
from ttt_e2e.ttt.inner import inner_step
from ttt_e2e.ttt.settings import InnerSettings
from ttt_e2e.ttt.loss import masked_mean, token_losses


def test_inner_gradient_under_autocast_is_autocasts_per_use_gradient():
    """Autocast casts phi at each use and widens each use's gradient; the step casts phi once and keeps g in the
    compute dtype. Same values: g here is the per-use gradient rounded the same way, and phi_{t+1} equal."""
    model = tiny_model().float()
    ids, targets, mask = tiny_batch(model, batch=2)
    b = 6
    inner = model.suffix.inner_names()
    params = dict(model.suffix.named_parameters())
    theta = {n: p for n, p in params.items() if n not in inner}
    phi = {n: params[n].detach().expand(2, *params[n].shape).clone() for n in inner}
    h = model.run_prefix(model.wte(ids)).detach()[:, :b]
    head = model.head_weight().detach()

    def loss(phi):
        out, _ = functional_call(model.suffix, {**theta, **phi}, (h, 0, None))
        return masked_mean(token_losses(out, head, targets[:, :b], kernel=False), mask[:, :b]).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_use = grad(loss)(phi)
        _, _, phi_next, _, gnorm, _ = inner_step(model.suffix, theta, head, phi, None, h, targets[:, :b],
                                              mask[:, :b], 0, InnerSettings(eta=0.5, clip=0.0,
                                              window=model.cfg.window, ce_kernel=False))
    for n in inner:
        assert per_use[n].dtype == torch.float32
        torch.testing.assert_close(phi_next[n], phi[n] - 0.5 * per_use[n], rtol=0, atol=0)
    ref_norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in per_use.values()]).sum(0).sqrt()
    torch.testing.assert_close(gnorm, ref_norm, rtol=1e-6, atol=0)


def test_theta_cast_once_is_autocasts_per_use_cast():
    """The meta loop hands the inner step the suffix matrices and the head cast once per step; under autocast
    that gives the same numbers as handing them in fp32 for autocast to cast at each use."""
    model = tiny_model().float()
    ids, targets, mask = tiny_batch(model, batch=2)
    b, inner = 6, model.suffix.inner_names()
    params = dict(model.suffix.named_parameters())
    phi = {n: params[n].detach().expand(2, *params[n].shape).clone() for n in inner}
    h = model.run_prefix(model.wte(ids)).detach()[:, :b]
    outs = []
    for cast in (False, True):
        theta = {n: p.bfloat16() if cast and p.dim() >= 2 else p for n, p in params.items() if n not in inner}
        head = model.head_weight().bfloat16() if cast else model.head_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(inner_step(model.suffix, theta, head, phi, None, h, targets[:, :b], mask[:, :b], 0,
                                   InnerSettings(eta=0.5, clip=1.0, window=model.cfg.window, ce_kernel=False)))
    (l0, _, phi0, _, n0, _), (l1, _, phi1, _, n1, _) = outs
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(n1, n0, rtol=0, atol=0)
    for n in inner:
        torch.testing.assert_close(phi1[n], phi0[n], rtol=0, atol=0)


def test_meta_gradient_under_autocast_is_the_same_with_and_without_remat():
    """Under bf16 autocast the loop hands each step's bf16 copy of phi to the next (the node above): the meta-
    gradient through it, with the inner steps kept or recomputed, agrees, and is finite."""
    from tiny import meta
    from ttt_e2e.ttt.meta import sequence_loss

    model = tiny_model().float()
    batch = tiny_batch(model)
    grads = []
    for remat in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sequence_loss(model, *batch, meta(remat_inner=remat, inner_grad_clip=2.5)).loss
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _bitwise(got, want):
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [True, False])  # fp32 phi with bf16 compute, and with fp32 compute
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_inner_step_in_place_is_bitwise_the_default(autocast, clip):
    """Three steps as inference takes them (phi_c handed in, phi and phi_c overwritten in place) against the
    default (phi cast in the step, new tensors): the same losses, norms, caches and phi_{t+1} in both dtypes."""
    model = tiny_model().float()
    ids, targets, mask = tiny_batch(model, batch=2)
    b, inner = 6, model.suffix.inner_names()
    params = {n: p.detach() for n, p in model.suffix.named_parameters()}
    theta = {n: p for n, p in params.items() if n not in inner}
    phi0 = {n: params[n].expand(2, *params[n].shape).clone() for n in inner}
    head = model.head_weight().detach()
    dtype = torch.bfloat16 if autocast else torch.float32
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        h = model.run_prefix(model.wte(ids))
        phi, caches = phi0, None
        buf = {n: p.clone() for n, p in phi0.items()}
        buf_c = buf if dtype == torch.float32 else {n: p.to(dtype) for n, p in phi0.items()}
        buf_caches = None
        settings = InnerSettings(eta=0.5, clip=clip, window=model.cfg.window, ce_kernel=False)
        for t in range(3):
            sl = slice(t * b, (t + 1) * b)
            args = (h[:, sl], targets[:, sl], mask[:, sl], t * b)
            want = inner_step(model.suffix, theta, head, phi, caches, *args, settings)
            got = inner_step(model.suffix, theta, head, buf, buf_caches, *args, settings, phi_c=buf_c,
                             out=(buf, buf_c))
            (l0, tok0, phi, caches, n0, phi_c), (l1, tok1, nxt, buf_caches, n1, nxt_c) = want, got
            assert nxt is buf and nxt_c is buf_c
            for a, w in [(l1, l0), (tok1, tok0), (n1, n0), *[x for kv in zip(buf_caches, caches) for x in zip(*kv)]]:
                _bitwise(a, w)
            for n in inner:
                assert nxt_c[n].dtype == dtype
                _bitwise(nxt[n], phi[n])
                _bitwise(nxt_c[n], phi_c[n])
    if clip:
        assert (n0 > clip).any(), n0  # the clip acted on the last step at least
