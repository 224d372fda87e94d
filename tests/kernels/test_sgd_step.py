"""The inner loop's SGD step (kernels/sgd/step.py) in PyTorch ops: clipped SGD and its gradient against their plain
definitions, and the in-place (inference) form bitwise equal to the default."""
import pytest
import torch

from ttt_e2e.kernels.sgd.step import _SumOfSquares, sgd_step


def _random_state(seed: int, B: int = 3, g_dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (5, 4), "b": (7,), "c": (2, 3, 2)}
    phi = {n: torch.randn(B, *s, generator=g, dtype=torch.float64, requires_grad=True) for n, s in shapes.items()}
    grads = {n: torch.randn(B, *s, generator=g, dtype=torch.float64).to(g_dtype).requires_grad_()
             for n, s in shapes.items()}
    with torch.no_grad():
        grads["a"][1] = 0  # one sequence's norm comes from the other tensors only
    return phi, grads


# g in phi's dtype (plain ops), or narrower (the node that also returns the narrow copy of phi_{t+1})
# g in phi's dtype (plain ops), or narrower (the node that also returns the narrow copy of phi_{t+1})
@pytest.mark.parametrize("g_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_norm", [0.0, 1.5, 1e6])  # off, active, inactive
def test_sgd_step_is_clipped_sgd_and_so_is_its_gradient(max_norm, g_dtype):
    phi, grads = _random_state(0, g_dtype=g_dtype)
    out, out_c, norm = sgd_step(phi, grads, eta=0.3, max_norm=max_norm)
    ref_norm = torch.stack([g.double().pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0).sqrt()
    factor = torch.ones_like(ref_norm) if max_norm <= 0 else torch.clamp(max_norm / ref_norm, max=1.0)
    ref = {n: phi[n] - 0.3 * factor.view(-1, *[1] * (g.dim() - 1)) * g for n, g in grads.items()}
    ref_c = {n: r.to(g_dtype) for n, r in ref.items()}
    if max_norm == 1.5:  # the clip active for every sequence (at 1e6 for none)
        assert (ref_norm > max_norm).all(), ref_norm
    tight = 1e-12 if g_dtype == torch.float64 else 1e-6  # the norm is summed in g's dtype
    torch.testing.assert_close(norm.double(), ref_norm, rtol=tight, atol=0)
    for n in out:
        assert out[n].dtype == torch.float64 and out_c[n].dtype == g_dtype
        torch.testing.assert_close(out[n], ref[n], rtol=tight, atol=tight)
        torch.testing.assert_close(out_c[n], ref_c[n], rtol=tight, atol=tight)
    w = {n: torch.randn_like(p) for n, p in out.items()}
    w_c = {n: torch.randn_like(p) for n, p in out_c.items()}
    inputs = [*phi.values(), *grads.values()]

    def probe(o, o_c):  # both outputs used, as in the loop: phi_{t+1} by the next update, its copy by the model
        return sum((o[n] * w[n]).sum() + (o_c[n] * w_c[n]).sum() for n in o)
    got = torch.autograd.grad(probe(out, out_c), inputs)
    want = torch.autograd.grad(probe(ref, ref_c), inputs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tight, atol=tight)


def test_sgd_step_at_a_zero_gradient_has_a_finite_gradient():
    phi, grads = _random_state(1)
    with torch.no_grad():
        for g in grads.values():
            g.zero_()
    out, _, norm = sgd_step(phi, grads, eta=0.3, max_norm=1.0)
    assert (norm == 0).all()
    dg = torch.autograd.grad(sum(p.sum() for p in out.values()), list(grads.values()))
    assert all(torch.isfinite(d).all() for d in dg)


def test_sum_of_squares_backward_rounds_once_into_the_gradients_dtype():
    g = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
    s = _SumOfSquares.apply(g)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, g.float().pow(2).flatten(1).sum(1), rtol=1e-6, atol=0)
    w = torch.tensor([0.3, -1.7])
    (dg,) = torch.autograd.grad((s * w).sum(), g)
    assert dg.dtype == torch.bfloat16
    torch.testing.assert_close(dg, (2 * w.view(-1, 1, 1) * g.float()).bfloat16(), rtol=0, atol=0)


def _bitwise(got, want):
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# g in the compute dtype: bf16 (the node's path by default) or phi's own fp32 (plain addcmul)
@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("max_norm", [0.0, 1.5, 1e6])
@pytest.mark.parametrize("alias", [True, False])  # out = phi itself, or separate buffers
def test_sgd_step_in_place_is_bitwise_the_default(max_norm, g_dtype, alias):
    phi, grads = _random_state(4, g_dtype=g_dtype)
    phi = {n: p.detach().float() for n, p in phi.items()}
    grads = {n: g.detach() for n, g in grads.items()}
    want, want_c, want_norm = sgd_step(phi, grads, eta=0.3, max_norm=max_norm)
    if alias:  # as inference holds them: phi_c is phi itself when the dtypes agree
        buf = {n: p.clone() for n, p in phi.items()}
        buf_c = buf if g_dtype == torch.float32 else {n: p.to(g_dtype) for n, p in phi.items()}
        inp = buf
    else:
        buf = {n: torch.full_like(p, float("nan")) for n, p in phi.items()}
        buf_c = {n: torch.full_like(p, float("nan"), dtype=g_dtype) for n, p in phi.items()}
        inp = phi
    got, got_c, norm = sgd_step(inp, grads, eta=0.3, max_norm=max_norm, out=(buf, buf_c))
    assert got is buf and got_c is buf_c
    _bitwise(norm, want_norm)
    for n in phi:
        _bitwise(got[n], want[n])
        _bitwise(got_c[n], want_c[n])


def test_sgd_step_in_place_refuses_tensors_under_autograd():
    phi, grads = _random_state(5)
    out = ({n: torch.empty_like(p) for n, p in phi.items()},) * 2
    with pytest.raises(ValueError, match="meta-gradient"):
        sgd_step(phi, {n: g.detach() for n, g in grads.items()}, eta=0.3, max_norm=1.0, out=out)
    with pytest.raises(ValueError, match="meta-gradient"):
        sgd_step({n: p.detach() for n, p in phi.items()}, grads, eta=0.3, max_norm=1.0, out=out)
