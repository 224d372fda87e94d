"""Rotary-embedding kernel vs the PyTorch reference in float64: forward, backward and the double backward of the
meta-gradient, on fresh random inputs with ragged row counts and head counts that are not powers of two (the
interpreter on a CPU, compiled on a GPU)."""
import pytest
import torch

from ttt_e2e.kernels.rope import rope, rope_reference
from ttt_e2e.model.rope import rope_angles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)
_seed = [31]


def _randn(*shape):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def _angles(T, D, pos0):
    return rope_angles(torch.arange(pos0, pos0 + T, device=DEVICE), D, 10000.0)


SHAPES = [(1, 7, 3, 8), (2, 37, 5, 16), (3, 4, 12, 64), (1, 1, 2, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(shape):
    B, T, H, D = shape
    cos, sin = _angles(T, D, pos0=1000)
    x, dy = _randn(*shape), _randn(*shape)
    x32, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    y, ref = rope(x32, cos, sin, use_kernel=True), rope_reference(x64, cos, sin)
    torch.testing.assert_close(y.double(), ref, **TOL)
    (got,), (want,) = torch.autograd.grad(y, x32, dy.float()), torch.autograd.grad(ref, x64, dy)
    torch.testing.assert_close(got.double(), want, **TOL)
    # a rotation keeps every pair's length: a second, independent check of the reference itself
    torch.testing.assert_close(ref.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_double_backward(shape):
    """The inner gradient's backward through RoPE, differentiated by the outer loss: grad of <probe, dx>
    w.r.t. the cotangent dy (the rotation is linear, so w.r.t. x it is zero)."""
    B, T, H, D = shape
    cos, sin = _angles(T, D, pos0=3)
    x, dy, probe = _randn(*shape), _randn(*shape), _randn(*shape)

    def second(x, dy, kernel):
        x, dy = x.clone().requires_grad_(), dy.clone().requires_grad_()
        y = rope(x, cos, sin, use_kernel=True) if kernel else rope_reference(x, cos, sin)
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        return torch.autograd.grad((dx * probe.to(dx.dtype)).sum(), (x, dy), allow_unused=True)

    (gx, gdy), (gx_ref, gdy_ref) = second(x.float(), dy.float(), True), second(x, dy, False)
    torch.testing.assert_close(gdy.double(), gdy_ref, **TOL)
    assert gx is None and gx_ref is None  # dx does not depend on x


@pytest.mark.gpu
def test_bf16_is_the_fp32_rotation_rounded_once():
    """bf16 in and out, fp32 math inside: each output is the float64 rotation rounded to bf16, give or take one
    bf16 step (the fp32 products round before the final rounding)."""
    shape = (2, 33, 4, 32)
    cos, sin = _angles(33, 32, pos0=0)
    x = _randn(*shape).to(torch.bfloat16)
    got = rope(x, cos, sin, use_kernel=True)
    assert got.dtype == torch.bfloat16
    want = rope_reference(x.double(), cos, sin)
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-6)


def test_bad_shapes_are_named():
    cos, sin = _angles(5, 8, 0)
    with pytest.raises(ValueError, match="rope: x \\(B, T, H, D\\)"):
        rope(torch.zeros(1, 6, 2, 8, device=DEVICE), cos, sin)
