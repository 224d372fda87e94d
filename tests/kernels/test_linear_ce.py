"""linear_cross_entropy against the materialized reference F.cross_entropy(h @ W.T): values, gradients and
gradients of gradients (float64, fresh random inputs, row chunks that do not divide the rows)."""
import pytest
import torch
import torch.nn.functional as F

from ttt_e2e.kernels.cross_entropy import linear_ce
from ttt_e2e.kernels.cross_entropy.linear_ce import linear_cross_entropy


def _reference(h, W, y):
    return F.cross_entropy(h @ W.T, y, reduction="none")


def _inputs(N=13, d=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(V, d, dtype=torch.float64, generator=g).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, y


@pytest.fixture(params=[4, 2048], ids=["chunks-of-4", "one-chunk"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK", request.param)


def test_value_and_first_derivative(chunk):
    h, W, y = _inputs()
    w = torch.rand(len(y), dtype=torch.float64)  # per-token weights, as a masked mean gives (zeros included)
    w[3] = 0
    got, ref = linear_cross_entropy(h, W, y), _reference(h, W, y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * w).sum(), (h, W))
    g_ref = torch.autograd.grad((ref * w).sum(), (h, W))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_second_derivative_matches_reference(chunk):
    """The meta-learning pattern: an inner gradient w.r.t. h (and W), then the outer gradient of a function of
    it w.r.t. h, W and the per-token weights."""
    h, W, y = _inputs(seed=1)
    w = torch.rand(len(y), dtype=torch.float64).requires_grad_()
    probe_h, probe_W = torch.randn_like(h), torch.randn_like(W)

    def outer(fn):
        dh, dW = torch.autograd.grad((fn(h, W, y) * w).sum(), (h, W), create_graph=True)
        return torch.autograd.grad((dh * probe_h).sum() + (dW * probe_W).sum(), (h, W, w))

    for a, b in zip(outer(linear_cross_entropy), outer(_reference)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck(chunk):
    h, W, y = _inputs(N=5, d=3, V=4, seed=2)
    fn = lambda h, W: linear_cross_entropy(h, W, y)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, W))
    assert torch.autograd.gradgradcheck(fn, (h, W))


def test_third_derivative_is_refused():
    h, W, y = _inputs(seed=3)
    (dh,) = torch.autograd.grad(linear_cross_entropy(h, W, y).sum(), h, create_graph=True)
    (ddh,) = torch.autograd.grad((dh ** 2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ddh.sum(), h)


def test_bad_shapes_and_dtypes():
    h, W, y = _inputs()
    with pytest.raises(ValueError, match="expected"):
        linear_cross_entropy(h, W.T, y)
    with pytest.raises(ValueError, match="cast W"):
        linear_cross_entropy(h, W.float(), y)


@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_recompute_logits_gives_the_same_loss_and_meta_gradient(mode):
    """ttt.recompute_logits switches token_losses to linear_cross_entropy: same loss, same (meta-)gradient."""
    from tiny import meta, tiny_batch, tiny_model

    from ttt_e2e.ttt.meta import sequence_loss

    model = tiny_model()
    ids, targets, mask = tiny_batch(model)
    results = []
    for recompute in (False, True):
        out = sequence_loss(model, ids, targets, mask, meta(train_mode=mode, recompute_logits=recompute))
        results.append((out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
