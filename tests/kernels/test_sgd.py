"""The clipped SGD kernels (fp32 phi, bf16/fp16 g) against the plain-autograd reference on fresh random inputs:
phi_{t+1} and its narrow copy, the norm, and the gradients w.r.t. phi and g, with the clip off, inactive and
active, rows that are not multiples of the kernels' block, phi expanded over the batch (stride 0, as phi_0 is)
and missing cotangents (the interpreter on a CPU, compiled on a GPU).

Tolerances: fp32 results against the same fp32 math, 1e-6 (a wrong index or scale is O(1)); the narrow copy and
g's cotangent are rounded once to bf16/fp16, so they are compared with the fp32 reference at that format's
quantum (the interpreter truncates where a GPU rounds to nearest: up to one unit in the last place)."""
import pytest
import torch

from ttt_e2e.kernels.sgd import clipped_sgd, clipped_sgd_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(7, 9), (300,), (33, 40)]  # per-sequence shapes: one partial block, several, a ragged matrix
_seed = [11]


def _randn(*shape, dtype=torch.float32, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def _quantum(dtype):
    return torch.finfo(dtype).eps  # relative size of one unit in the last place


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_norm", [0.0, 1e6, 1.5])  # off, inactive, active
@pytest.mark.parametrize("expanded", [False, True])
def test_values_and_gradients(dtype, max_norm, expanded):
    B = 2
    base = [_randn(*s) for s in SHAPES]
    phi = [p.expand(B, *p.shape) if expanded else _randn(B, *p.shape) for p in base]
    g = [_randn(B, *s, dtype=dtype, scale=0.3) for s in SHAPES]
    eta = 0.7
    # Cotangents correlated with g: the clip's term of g's cotangent (through the norm) is then of the same order
    # as the update's, so a mistake in either shows
    c_next = [(x.float() * 2 + _randn(*x.shape)).requires_grad_(False) for x in g]
    c_copy = [(x.float() - _randn(*x.shape, scale=0.5)).to(dtype) for x in g]

    def run(fn, phi_in, g_in):
        phi_in = [p.detach().requires_grad_() for p in phi_in]
        g_in = [x.detach().requires_grad_() for x in g_in]
        nxt, nxt_c, norm = fn(phi_in, g_in, eta, max_norm)
        loss = sum((a * c).sum() for a, c in zip(nxt, c_next)) + sum((a.float() * c.float()).sum()
                                                                      for a, c in zip(nxt_c, c_copy))
        grads = torch.autograd.grad(loss, phi_in + g_in)
        return nxt, nxt_c, norm, grads[:len(phi)], grads[len(phi):]

    got = run(clipped_sgd, phi, g)
    # the reference in fp32 on the same (rounded) g: its cotangent of g then carries no rounding of its own
    ref = run(clipped_sgd_reference, phi, [x.float() for x in g])
    if max_norm == 1.5:
        assert (ref[2] > max_norm).all(), ref[2]  # the clip acts
    q = _quantum(dtype)
    for a, b in zip(got[0], ref[0]):
        assert a.dtype == torch.float32 and _rel(a, b) < 1e-6
    for a, b in zip(got[1], ref[0]):
        assert a.dtype == dtype and ((a.double() - b.double()).abs() <= q * b.double().abs() + 1e-30).all()
    assert _rel(got[2], ref[2]) < 1e-6
    for a, b in zip(got[3], ref[3]):  # phi's cotangent: fp32 sums
        assert a.shape == b.shape and _rel(a, b) < 1e-6
    for a, b in zip(got[4], ref[4]):  # g's: rounded once to g's format
        assert a.dtype == dtype and _rel(a, b) < q


def test_missing_cotangents_and_bad_inputs():
    B, eta = 3, torch.tensor(0.4, device=DEVICE)  # eta as the CUDA graph holds it: a 0-d tensor
    phi = [_randn(B, 50).requires_grad_(), _randn(B, 6, 5).requires_grad_()]
    g = [_randn(B, 50, dtype=torch.bfloat16).requires_grad_(), _randn(B, 6, 5, dtype=torch.bfloat16).requires_grad_()]
    c = _randn(B, 50)
    for fn, gg in ((clipped_sgd, g), (clipped_sgd_reference, [x.detach().float().requires_grad_() for x in g])):
        nxt, nxt_c, _ = fn(phi, gg, eta, 0.5)
        # only phi_{t+1} of the first tensor is used: the second gets no cotangent, its g only the clip's term
        out = torch.autograd.grad((nxt[0] * c).sum(), phi + gg, allow_unused=True)
        if fn is clipped_sgd:
            got = out
        else:
            ref = out
    assert _rel(got[0], ref[0]) < 1e-6
    assert ref[1] is None and (got[1] is None or got[1].abs().max() == 0)
    q = _quantum(torch.bfloat16)
    assert _rel(got[2], ref[2]) < q and _rel(got[3], ref[3]) < q
    with pytest.raises(ValueError, match="phi fp32 and g bf16/fp16"):
        clipped_sgd([phi[0]], [g[0].float()], 0.1, 1.0)
    with pytest.raises(ValueError, match="as many phi as g"):
        clipped_sgd(phi, g[:1], 0.1, 1.0)


@pytest.mark.parametrize("in_place", [True, False])
def test_update_in_place(in_place):
    """Inference's form: no autograd, phi_{t+1} written over phi (or into a buffer), the copy into another."""
    from ttt_e2e.kernels.sgd import sgd_update_
    B = 3
    phi, g = _randn(B, 33, 40), _randn(B, 33, 40, dtype=torch.bfloat16)
    scale = _randn(B)
    want = phi + scale.view(-1, 1, 1) * g.float()
    out = phi if in_place else torch.full_like(phi, float("nan"))
    out_c = torch.full_like(g, float("nan"))
    sgd_update_(phi, g, scale, out, out_c)
    assert _rel(out, want) < 1e-6
    assert ((out_c.double() - want.double()).abs() <= _quantum(torch.bfloat16) * want.double().abs()).all()
    with pytest.raises(ValueError, match="contiguous fp32 out"):
        sgd_update_(phi, g, scale, out.transpose(1, 2), out_c)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("max_norm", [0.0, 1e6, 2.0])  # off, inactive, active
@pytest.mark.parametrize("eta_tensor", [False, True])  # the trainer's schedule hands a 0-d tensor
@pytest.mark.parametrize("wide", [False, True])  # the long rows' norms by the sum-of-squares kernel (3B's), or not
def test_clip_kernel_against_clip_scale(monkeypatch, B, max_norm, eta_tensor, wide):
    """clipped_scale: (scale, d scale / d sq, norm) per sequence from the norms of every tensor, in one launch, as
    clip_scale gives them from the summed squares (here rows whose norms straddle the threshold)."""
    from ttt_e2e.kernels.sgd import function
    from ttt_e2e.kernels.sgd.clip import clip_scale
    from ttt_e2e.kernels.sgd import clipped_scale

    if wide:  # rows of 64 and more: 4097 spans several programs, the last one ragged
        monkeypatch.setattr(function, "WIDE_ROWS", 64)

    g = [_randn(B, n, dtype=torch.bfloat16, scale=s) for n, s in ((5, 0.3), (4097, 0.02), (70, 0.2), (1, 1.0),
                                                                   (300, 0.05))]
    for x in g:
        x[0] *= 0.01  # sequence 0 well below the threshold where the clip is on
    g[3][-1] = 3.0  # the last one above it
    eta = torch.tensor(0.7, device=DEVICE) if eta_tensor else 0.7
    scale, coef, norm = clipped_scale(g, eta, max_norm)
    sq = sum(x.double().square().sum(1) for x in g).requires_grad_()
    want_scale = clip_scale(sq, 0.7, max_norm)
    # d scale / d sq by autograd (each sequence's scale depends on its own sq only)
    want_coef = torch.autograd.grad(want_scale.sum(), sq)[0] if max_norm > 0 else torch.zeros_like(sq)
    sq, want_scale = sq.detach(), want_scale.detach()
    torch.testing.assert_close(norm.double(), sq.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(coef.double(), want_coef, rtol=1e-5, atol=0)
    if max_norm == 2.0:
        assert (coef[-1] != 0) and scale[-1].abs() < 0.7 * 2 / 3 + 1e-6
        assert B == 1 or (coef[0] == 0 and scale[0] == -0.7)
