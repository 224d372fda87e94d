"""The fused QK-norm + RoPE kernel (forward only) vs the PyTorch reference in float64 and vs the separate kernels
it replaces, on fresh random inputs: contiguous heads and q's, k's views of a fused QKV projection, ragged
positions, head dims that are not powers of two (the interpreter on a CPU, compiled on a GPU)."""
import pytest
import torch

from ttt_e2e.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from ttt_e2e.kernels.rmsnorm import rms_norm, rms_norm_reference
from ttt_e2e.kernels.rope import rope
from ttt_e2e.model.rope import rope_angles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32 kernel against a float64 reference; a wrong row or angle gives O(1)
_seed = [71]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def _inputs(B, T, H, D, layout, pos0=777):
    """x (B, T, H, D) as the model hands it over: contiguous, or the q/k part of a (B, T, 3, H, D) projection."""
    if layout == "contiguous":
        x = _randn(B, T, H, D, scale=3.0)
    else:
        x = _randn(B, T, 3, H, D, scale=3.0)[:, :, {"q": 0, "k": 1}[layout]]
    w = 1 + _randn(D, scale=0.3)
    cos, sin = rope_angles(torch.arange(pos0, pos0 + T, device=DEVICE), D, 10000.0)
    return x, w, cos, sin


@pytest.mark.parametrize("shape", [(1, 7, 3, 8), (2, 37, 5, 16), (2, 9, 4, 80), (1, 3, 2, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "q", "k"])
def test_against_reference(shape, layout):
    x, w, cos, sin = _inputs(*shape, layout)
    with torch.no_grad():
        got = qk_norm_rope(x.float(), w.float(), cos, sin, 1e-6, use_kernel=True)
    assert got.shape == x.shape and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), qk_norm_rope_reference(x, w, cos, sin, 1e-6), **TOL)


@pytest.mark.parametrize("layout", ["contiguous", "k"])
def test_equals_the_separate_kernels(layout):
    """In half precision too: the norm's output is rounded as the separate norm stores it, so the two agree up to
    the order of the fp32 sum of squares (one half-precision ulp at most, where a rounding falls differently)."""
    x, w, cos, sin = _inputs(2, 21, 4, 80, layout)
    x = x.half()
    with torch.no_grad():
        got = qk_norm_rope(x, w.float(), cos, sin, 1e-6, use_kernel=True)
        want = rope(rms_norm(x, w.float(), 1e-6, use_kernel=True), cos, sin, use_kernel=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-3)
    assert (got != want).float().mean() < 0.01


def test_grad_mode_takes_the_differentiable_ops():
    x, w, cos, sin = _inputs(1, 5, 2, 16, "q")
    x = x.float().requires_grad_()
    y = qk_norm_rope(x, w.float(), cos, sin, 1e-6, use_kernel=True)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(qk_norm_rope_reference(x64, w, cos, sin, 1e-6).square().sum(), x64)
    torch.testing.assert_close(gx.double(), want, **TOL)


def test_bad_shapes():
    x, w, cos, sin = _inputs(1, 5, 2, 16, "contiguous")
    with pytest.raises(ValueError, match="qk_norm_rope"):
        qk_norm_rope(x, w[:8], cos, sin, 1e-6)
    with pytest.raises(ValueError, match="qk_norm_rope"):
        qk_norm_rope(x, w, cos[:4], sin[:4], 1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "q"])
def test_first_order_backward(layout):
    """first_order: the fused forward with a backward (inference's inner step) gives the reference's gradients
    w.r.t. x and w, and refuses a second derivative instead of returning a wrong one."""
    x, w, cos, sin = _inputs(2, 9, 4, 80, layout)
    dy = _randn(2, 9, 4, 80)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    y = qk_norm_rope(x32, w32, cos, sin, 1e-6, use_kernel=True, first_order=True)
    got = torch.autograd.grad(y, (x32, w32), dy.float(), create_graph=True)
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(qk_norm_rope_reference(x64, w64, cos, sin, 1e-6), (x64, w64), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(got[0].sum(), x32)


def test_first_order_backward_under_torch_func():
    """As the inner step takes it: torch.func.vjp's pullback with create_graph (its tensors arrive wrapped; the
    kernels must run inside a Function's forward, where they are plain)."""
    from ttt_e2e.kernels.rmsnorm import rms_norm_residual
    x, w, cos, sin = _inputs(1, 6, 2, 16, "k")
    res, dy = _randn(1, 6, 2, 16), _randn(1, 6, 2, 16)

    def f(x):
        return rms_norm_residual(res.float(), qk_norm_rope(x, w.float(), cos, sin, 1e-6, use_kernel=True,
                                                           first_order=True), w.float(), 1e-6, use_kernel=True,
                                 first_order=True)

    _, pullback = torch.func.vjp(f, x.float())
    (got,) = pullback(dy.float(), create_graph=True)
    x64 = x.clone().requires_grad_()
    want, = torch.autograd.grad(res + rms_norm_reference(qk_norm_rope_reference(x64, w, cos, sin, 1e-6), w, 1e-6),
                                x64, dy)
    torch.testing.assert_close(got.double(), want, **TOL)
