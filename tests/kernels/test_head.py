"""The inner loss's head node (kernels/cross_entropy/head.py) against autograd of the plain head and cross-entropy in float64: the
loss, the inner gradient w.r.t. the hidden states, and the outer gradients w.r.t. the hidden states and the head
for either cotangent or both, through the kernels (the interpreter on a CPU) and the PyTorch formulas, with the
head as a plain tensor and as a shared_weight (deferred gradient), ragged vocabularies and ignored targets."""
import pytest
import torch

from ttt_e2e.kernels.cross_entropy import cross_entropy_reference
from ttt_e2e.kernels.cross_entropy.kernel import ce_bwd, ce_double_bwd, ce_double_bwd_given, ce_given_c
from ttt_e2e.model.linear import shared_weight
from ttt_e2e.kernels.cross_entropy.head import _HeadLossAndGrad, head_loss_and_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_seed = [100]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def _targets(N, V, ignore):
    _seed[0] += 1
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(_seed[0]))
    y[0], y[-1] = 0, V - 1
    if ignore:
        y[1::3] = -100
    return y.to(DEVICE)


def _weights(y):
    m = (y >= 0).double()
    return m / m.sum().clamp(min=1)


def _reference(x, W, y, w, dl, v):
    """loss, dx, and the gradients of <dl, loss> + <v, dx> w.r.t. (x, W), by autograd twice."""
    x, W = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = cross_entropy_reference(x @ W.T, y)
    (dx,) = torch.autograd.grad(loss, x, w, create_graph=True)
    obj = sum((a * b).sum() for a, b in ((loss, dl), (dx, v)) if b is not None)
    return (loss, dx) + torch.autograd.grad(obj, (x, W))


def _ours(x, W, y, w, dl, v, kernel, shared, paired):
    x, W = x.clone().requires_grad_(), W.clone().requires_grad_()
    Wc = shared_weight(W, W.dtype) if shared else W
    if paired:
        loss, dx = head_loss_and_grad(x, Wc, y, w, kernel=kernel)
    else:  # the node as a caller with no backward to come builds it: W's gradient from two products
        g = w.to(torch.promote_types(x.dtype, torch.float32))  # as head_loss_and_grad hands the weights on
        loss, dx, *_ = _HeadLossAndGrad.apply(x, Wc, y, g, kernel, False)
    obj = sum((a * b.to(a.dtype)).sum() for a, b in ((loss, dl), (dx, v)) if b is not None)
    return (loss, dx) + torch.autograd.grad(obj, (x, W))


@pytest.mark.parametrize("N,V,d", [(6, 37, 8), (5, 4100, 16)])  # V below and past one 4096-wide kernel block
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("used", ["both", "loss", "grad"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
@pytest.mark.parametrize("paired", [True, False], ids=["paired", "unpaired"])
def test_head_node_matches_autograd(N, V, d, ignore, used, kernel, shared, paired):
    x, W, y = _randn(N, d), _randn(V, d, scale=0.7), _targets(N, V, ignore)
    w = _weights(y)
    dl = _randn(N) if used != "grad" else None
    v = _randn(N, d, scale=30.0) if used != "loss" else None  # dx is O(1/N): v large enough to weigh in
    want = _reference(x, W, y, w, dl, v)
    dtype = torch.float32 if kernel else torch.float64  # the kernels compute in fp32
    got = _ours(x.to(dtype), W.to(dtype), y, w, dl, v, kernel, shared, paired)
    for name, a, b in zip(("loss", "dx", "grad x", "grad W"), got, want):
        # fp32: errors scale with the largest terms of the sums (v is 30x), not with each element: the absolute
        # tolerance in units of the result's largest entry (an indexing slip is off by O(that entry))
        scale = max(1.0, b.abs().max().item())
        tol = dict(rtol=2e-5, atol=2e-5 * scale) if kernel else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.double(), b, **tol, msg=name)
    if ignore:
        assert (got[0][y < 0] == 0).all() and (got[1][y < 0] == 0).all()


@pytest.mark.parametrize("N,V", [(5, 37), (4, 5000)])
@pytest.mark.parametrize("with_dl", [False, True])
def test_given_kernel_equals_the_two_pass_kernel(N, V, with_dl):
    """One pass with c = g <u, p> given vs the kernel that reduces <u, p> itself (plus the plain backward for a
    loss cotangent dl); out=u overwrites u in place."""
    z, y, g, u = _randn(N, V, scale=4.0).float(), _targets(N, V, True), _randn(N).float(), _randn(N, V).float()
    dl = _randn(N).float() if with_dl else None
    lse = torch.logsumexp(z.double(), -1).float()
    c = g * (u.double() * torch.softmax(z.double(), -1)).sum(-1).float()
    want = ce_double_bwd(z, y, lse, g, u)[0] + (0 if dl is None else ce_bwd(z, y, lse, dl))
    got = ce_double_bwd_given(z, y, lse, g, u, c, dl, out=u)
    assert got.data_ptr() == u.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,V,d", [(7, 50, 24), (3, 9, 16)])
def test_given_c_kernel(N, V, d):
    """c = <v, dx> + g <v, W_y> per row (0 for an ignored target), in one launch, against float64; d not a
    power of two (masked columns), and dx, v as strided row views."""
    v, dx, W = _randn(N, 2 * d).float()[:, :d], _randn(N, d + 3).float()[:, 3:], _randn(V, d).float()
    y, g = _targets(N, V, True), _randn(N).float()
    want = (v.double() * dx.double()).sum(1) + g.double() * (v.double() * W.double()[y.clamp(min=0)]).sum(1)
    want = torch.where(y >= 0, want, 0.0)
    torch.testing.assert_close(ce_given_c(v, dx, W, y, g).double(), want, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named():
    x, W, y = _randn(4, 8), _randn(30, 8), _targets(4, 30, False)
    w = _weights(y)
    with pytest.raises(ValueError, match="expected \\(N, d\\), \\(V, d\\)"):
        head_loss_and_grad(x, W[:, :5], y, w)
    with pytest.raises(ValueError, match="cast both to the compute dtype"):
        head_loss_and_grad(x.float(), W, y, w)
    with pytest.raises(ValueError, match="row weights must be constants"):
        head_loss_and_grad(x, W, y, w.clone().requires_grad_())
