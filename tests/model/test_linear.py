"""Deferred weight gradients (model/linear.py): the same gradients as plain autograd, formed once per weight."""
from __future__ import annotations

import copy

import pytest
import torch
from tiny import meta, tiny_batch, tiny_model

from ttt_e2e.config import Kernels
from ttt_e2e.model import linear as lin
from ttt_e2e.ttt.meta import sequence_loss


def _rand(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 700, 3)])  # (out, in, rows): the second concatenates
def test_weight_grad_total_is_the_sum_of_the_products(per_sequence, shape):
    out, inn, rows = shape
    acc = lin.WeightGrad(per_sequence)
    want = 0
    for i in range(3):
        if per_sequence:
            a, b = _rand(2, out, rows + i, seed=i), _rand(2, inn, rows + i, seed=10 + i)
            want = want + a @ b.mT
        else:
            a, b = _rand(rows + i, out, seed=i), _rand(rows + i, inn, seed=10 + i)
            want = want + a.T @ b
        acc.add(a, b)
    torch.testing.assert_close(acc.total(), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="after the weight's gradient was formed"):
        acc.add(a, b)


def _plain(model) -> Kernels:
    """The step with autograd's own weight gradients (on the CPU the switch changes nothing else): the model's
    modules switched, and the value for its loss."""
    model.use_fused_kernels(False)
    return Kernels(elementwise=False)


@pytest.mark.parametrize("remat", [False, True])
def test_meta_gradient_equals_plain_autograd(monkeypatch, remat):
    model = tiny_model()
    batch = tiny_batch(model)
    cfg = meta(remat_inner=remat)
    calls = []
    total = lin.WeightGrad.total
    monkeypatch.setattr(lin.WeightGrad, "total", lambda self: calls.append((self.per_sequence, len(self.pairs)))
                        or total(self))
    got = torch.autograd.grad(sequence_loss(model, *batch, cfg).loss, list(model.parameters()))
    n_mb = model.cfg.seq_length // cfg.mini_batch_size
    # Each suffix matrix and the head: formed once, from its forward use in every mini-batch and its inner-backward
    # use in every mini-batch but the last (which takes no inner step): 4 per block (wqkv, wo, w13, w2). The
    # first suffix block's attention (wqkv, wo) runs once over the whole sequence, outside the loop (ttt/meta.py):
    # plain autograd, no deferral.
    # The head's two uses of a mini-batch arrive as one pair of stacked factors (kernels/cross_entropy/head.py): n_mb pairs.
    L = model.cfg.suffix_len
    shared = sorted(n for seq, n in calls if not seq)
    assert shared == sorted([n_mb] + [2 * n_mb - 1] * (4 * L - 2)), calls
    # Each MLP' product (2 per block and mini-batch: w13, w2): its two uses summed by one node; one use in the last
    # mini-batch, and for the first block's w13, whose input the inner gradient does not differentiate
    seq = [n for s, n in calls if s]
    assert sorted(seq) == sorted([1] * (2 * L + (n_mb - 1)) + [2] * (2 * L * (n_mb - 1) - (n_mb - 1))), calls
    plain = _plain(model)
    calls.clear()
    want = torch.autograd.grad(sequence_loss(model, *batch, cfg, kernels=plain).loss, list(model.parameters()))
    assert not calls  # the switch turns deferral off
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_meta_gradient_is_as_accurate_as_plain_autograd():
    """Under bf16 autocast the sums run in another order (and round fewer times): against the float64 meta-
    gradient, the error over four fresh seeds is no larger than plain autograd's (1.1x: a lost or doubled use
    would be O(1))."""
    def flat(model, batch, bf16, kernels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sequence_loss(model, *batch, meta(), kernels=kernels).loss
        return torch.cat([g.double().flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    cases = [(tiny_model(seed=s), s) for s in range(4)]
    errors = {}
    for plain in (False, True):
        errors[plain] = []
        for model, s in cases:
            kernels = _plain(model) if plain else Kernels()
            batch = tiny_batch(model, seed=s + 5)
            want = flat(model, batch, False, kernels)
            got = flat(copy.deepcopy(model).float(), batch, True, kernels)
            errors[plain].append(((got - want).norm() / want.norm()).item())
    assert sum(errors[False]) <= 1.1 * sum(errors[True]), errors


def test_shared_weight_adds_gradients_of_plain_uses():
    w0 = _rand(4, 3, seed=1).requires_grad_()
    x = _rand(5, 3, seed=2)
    w = lin.shared_weight(w0, torch.float64)
    y = lin.linear(x, w).square().sum() + (w * 2).sum()  # one deferred use, one ordinary
    (got,) = torch.autograd.grad(y, w0)
    (want,) = torch.autograd.grad((x @ w0.T).square().sum() + (w0 * 2).sum(), w0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("second_create_graph", [False, True])
def test_seq_linear_gradient_of_a_gradient(second_create_graph):
    """Both inner gradients (w and x) feed the outer loss: w's cotangent from its two uses comes out of one node.
    Differentiating that once more is refused with a clear error."""
    w0, x0 = _rand(2, 4, 3, seed=1), _rand(2, 3, 5, seed=2)

    def outer(mm, w, x):
        gw, gx = torch.autograd.grad(torch.tanh(mm(w, x)).square().sum(), (w, x), create_graph=True)
        return (gw.sin().sum() + (gx * x).sum()) * mm(w, x).sum()

    w, x = w0.clone().requires_grad_(), x0.clone().requires_grad_()
    want = torch.autograd.grad(outer(torch.matmul, w, x), (w, x))
    if second_create_graph:
        with pytest.raises(RuntimeError, match="third derivative"):
            torch.autograd.grad(outer(lin.seq_linear, w, x), (w, x), create_graph=True)
        return
    got = torch.autograd.grad(outer(lin.seq_linear, w, x), (w, x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("remat", [False, True])
def test_meta_gradient_with_shared_gains_equals_plain(monkeypatch, remat):
    """The norms through their kernels (fp32: the kernels take no float64) in both runs:
    with deferral every suffix gain's gradient is added up once, from all its uses' partial sums, and the
    meta-gradient equals the one with deferral off."""
    from ttt_e2e.kernels import rmsnorm
    from ttt_e2e.kernels.rmsnorm import function
    from ttt_e2e.model import layers

    monkeypatch.setattr(layers, "rms_norm", lambda x, w, eps, use_kernel=None, out_dtype=None: rmsnorm.rms_norm(
        x, w, eps, use_kernel=True, out_dtype=out_dtype))
    parts = []
    real_total = function.GainGrad.total
    monkeypatch.setattr(function.GainGrad, "total", lambda self: parts.append(len(self.parts)) or real_total(self))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: compiled there, interpreted here
    model = tiny_model(d_model=32).float().to(device)  # head dim 16: the attention kernels take no 8
    batch = [t.to(device) for t in tiny_batch(model)]
    cfg = meta(remat_inner=remat)
    got = torch.autograd.grad(sequence_loss(model, *batch, cfg).loss, list(model.parameters()))
    # (the first block's attention-half gains run once, outside the loop: not shared, ttt/meta.py)
    skip = {*model.suffix.inner_names(), *model.suffix.hoisted_names()}
    gains = [n for n, p in model.suffix.named_parameters() if p.dim() == 1 and n not in skip]
    assert len(parts) == len(gains) and min(parts) >= model.cfg.seq_length // cfg.mini_batch_size, parts
    plain = _plain(model)
    parts.clear()
    want = torch.autograd.grad(sequence_loss(model, *batch, cfg, kernels=plain).loss, list(model.parameters()))
    assert not parts
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        # fp32 sums in another order: the noise is a few ulps of the tensor's largest terms, not of each element
        # (an absolute 1e-6 failed by 2.3e-6 on the H100 at |grad| up to 0.79); a lost or doubled use is O(1)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("transposed_out", [False, True])
def test_seq_linear_layouts(transposed_out):
    """Each product comes out in the layout its consumer reads contiguously: y (B, out, T) as asked, the
    gradient of x in x's layout (x the transposed view of (B, T, in) activations, as the MLP' takes it), and, in
    the double backward, the gradient of the inner gradient's cotangent in y's layout. Values as torch.matmul's."""
    w0, xr = _rand(2, 4, 3, seed=3), _rand(2, 5, 3, seed=4)  # xr (B, T, in): x = xr^T

    def run(mm, w, xr):
        x = xr.mT
        y = mm(w, x, transposed_out=transposed_out) if mm is lin.seq_linear else mm(w, x)
        gw, gx = torch.autograd.grad(torch.tanh(y).square().sum(), (w, x), create_graph=True)
        return y, gx, torch.autograd.grad((gw.sin().sum() + gx.cos().sum()) * y.sum(), (w, xr))

    w, x = w0.clone().requires_grad_(), xr.clone().requires_grad_()
    y, gx, outer = run(lin.seq_linear, w, x)
    assert (y.mT if transposed_out else y).is_contiguous()
    assert gx.mT.is_contiguous()  # x's layout: (B, T, in) rows
    w, x = w0.clone().requires_grad_(), xr.clone().requires_grad_()
    y_ref, gx_ref, outer_ref = run(torch.matmul, w, x)
    for a, b in zip((y, gx, *outer), (y_ref, gx_ref, *outer_ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
