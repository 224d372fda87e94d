"""Cross-entropy kernels vs the PyTorch reference in float64: loss, gradient, and the double backward the
meta-gradient takes (an inner gradient with create_graph, differentiated again), on fresh random logits with
vocabularies that are not multiples of the kernels' block, targets at both ends of the vocabulary and ignored
targets (the interpreter on a CPU, compiled on a GPU)."""
import pytest
import torch

from ttt_e2e.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from ttt_e2e.kernels.cross_entropy.kernel import ce_fwd_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32 kernels against float64; a wrong index or a missed lane is O(1e-2) or more
_seed = [7]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def _targets(N, V, ignore=False):
    _seed[0] += 1
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(_seed[0]))
    y[0], y[-1] = 0, V - 1  # the first and last column of the vocabulary
    if ignore:
        y[1::4] = -100
    return y.to(DEVICE)


SHAPES = [(5, 37), (9, 300), (3, 4096), (4, 5000)]  # V below, at and above one 4096 block, ragged


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("ignore", [False, True])
def test_loss_and_gradient(N, V, ignore):
    z, y, g = _randn(N, V, scale=4.0), _targets(N, V, ignore), _randn(N)
    z32, z64 = z.float().requires_grad_(), z.clone().requires_grad_()
    loss = cross_entropy(z32, y, use_kernel=True)
    ref = cross_entropy_reference(z64, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, **TOL)
    if ignore:
        assert (loss[y < 0] == 0).all()
    (got,), (want,) = torch.autograd.grad(loss, z32, g.float()), torch.autograd.grad(ref, z64, g)
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("ignore", [False, True])
def test_double_backward(N, V, ignore):
    """grad of <probe, dz> w.r.t. the logits and the loss cotangent, where dz is the gradient taken with
    create_graph: the pattern of the inner gradient (dz feeds the head's backward matmul) under the outer loss."""
    z, y, g, probe = _randn(N, V, scale=4.0), _targets(N, V, ignore), _randn(N), _randn(N, V)

    def second(z, g, kernel):
        z, g = z.clone().requires_grad_(), g.clone().requires_grad_()
        loss = cross_entropy(z, y, use_kernel=True) if kernel else cross_entropy_reference(z, y)
        (dz,) = torch.autograd.grad(loss, z, g, create_graph=True)
        return torch.autograd.grad((dz * probe.to(dz.dtype)).sum(), (z, g))

    got, want = second(z.float(), g.float(), True), second(z, g, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loss_and_gradient_in_one_launch(N, V, dtype):
    """ce_fwd_grad (TTT's inner loss and its gradient for row weights g, kernels/cross_entropy/head.py) against the reference's loss
    and autograd gradient, ignored targets included; dz in the logits' dtype, written into `out` when given."""
    z, y, g = _randn(N, V, scale=3.0), _targets(N, V, ignore=True), _randn(N)
    z64 = z.clone().requires_grad_()
    ref = cross_entropy_reference(z64, y)
    (ref_dz,) = torch.autograd.grad(ref, z64, g)
    out = torch.empty(N, V, dtype=dtype, device=DEVICE)
    loss, dz, lse = ce_fwd_grad(z.to(dtype), y, g.float(), out=out)
    assert dz.data_ptr() == out.data_ptr() and dz.dtype == dtype and loss.dtype == lse.dtype == torch.float32
    tol = TOL if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)  # fp16: the logits' and dz's rounding
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(dz.double(), ref_dz, **tol)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.to(dtype).double(), -1), **TOL)


def test_large_logits_do_not_overflow():
    """Logits far from 0 (the online max must rescale, not exponentiate them raw)."""
    N, V = 4, 700
    z, y = _randn(N, V, scale=3.0) + torch.tensor([[500.0], [-500.0], [80.0], [0.0]], device=DEVICE), _targets(N, V)
    torch.testing.assert_close(cross_entropy(z.float(), y, use_kernel=True).double(),
                               cross_entropy_reference(z, y), **TOL)


def test_half_logits_match_the_upcast_reference():
    """bf16/fp16 logits are read in their dtype and reduced in fp32: the same as upcasting them first."""
    N, V = 6, 1000
    z, y = _randn(N, V, scale=3.0).to(torch.float16), _targets(N, V)
    torch.testing.assert_close(cross_entropy(z, y, use_kernel=True), cross_entropy_reference(z, y),
                               rtol=1e-5, atol=1e-5)
    zr = z.clone().requires_grad_()
    zk = z.clone().requires_grad_()
    (gk,) = torch.autograd.grad(cross_entropy(zk, y, use_kernel=True).sum(), zk)
    (gr,) = torch.autograd.grad(cross_entropy_reference(zr, y).sum(), zr)
    assert gk.dtype == torch.float16
    torch.testing.assert_close(gk, gr, rtol=1e-3, atol=1e-3)  # one fp16 rounding of the same fp32 value


def test_third_derivative_is_refused():
    """once_differentiable cuts the graph after the double backward: asking for a third derivative raises
    instead of returning a silently wrong one (meta-learning needs only the second)."""
    z, y = _randn(3, 40).float().requires_grad_(), _targets(3, 40)
    (dz,) = torch.autograd.grad(cross_entropy(z, y, use_kernel=True).sum(), z, create_graph=True)
    (gz,) = torch.autograd.grad((dz * dz).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used"):
        torch.autograd.grad(gz.sum(), z)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="logits \\(N, V\\) and targets \\(N,\\)"):
        cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))


def test_empty_batch():
    z = torch.zeros(0, 50, device=DEVICE, requires_grad=True)
    loss = cross_entropy(z, torch.zeros(0, dtype=torch.long, device=DEVICE), use_kernel=True)
    assert loss.shape == (0,)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert g.shape == (0, 50)
