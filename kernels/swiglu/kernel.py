"""SwiGLU gate forward and backward Triton kernels, elementwise, math in fp32.

The gate reads both halves of one tensor ab, the output of a fused (W1; W3) projection: ab is a contiguous
(outer, 2, inner) block, a = ab[:, 0], b = ab[:, 1] (halves along the last dim: outer = rows, inner = hidden;
along dim 1 of a per-sequence (B, 2 hidden, T) product: outer = B, inner = hidden T). y, dy are (outer, inner);
the gradient of ab is written as one (outer, 2, inner) tensor, with no concatenation of da and db.

With s = sigmoid(a): silu(a) = a s, silu'(a) = s (1 + a (1 - s)), silu''(a) = s (1 - s) (2 + a (1 - 2 s)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _offsets(N, INNER, BLOCK: tl.constexpr):
    # int64: a (batch, seq, hidden) activation can pass 2^31 elements. offs indexes y (outer, inner); a_offs the
    # matching element of ab's first half (its second half is INNER further).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a_offs = offs + (offs // INNER) * INNER
    return offs, a_offs, offs < N


@triton.jit
def _gate_fwd_kernel(AB, Y, N, INNER, BLOCK: tl.constexpr):
    offs, a_offs, m = _offsets(N, INNER, BLOCK)
    a = tl.load(AB + a_offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(AB + a_offs + INNER, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(Y + offs, (a * s * b).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd_kernel(AB, DY, DAB, N, INNER, BLOCK: tl.constexpr):
    # da = dy b silu'(a), db = dy silu(a)
    offs, a_offs, m = _offsets(N, INNER, BLOCK)
    a = tl.load(AB + a_offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(AB + a_offs + INNER, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    d1 = s * (1.0 + a * (1.0 - s))
    tl.store(DAB + a_offs, (dy * b * d1).to(DAB.dtype.element_ty), mask=m)
    tl.store(DAB + a_offs + INNER, (dy * a * s).to(DAB.dtype.element_ty), mask=m)


@triton.jit
def _gate_dbwd_kernel(AB, DY, U, GAB, GDY, N, INNER, BLOCK: tl.constexpr):
    # Gradients of L = <ua, da> + <ub, db> w.r.t. a, b, dy, with da = dy b silu'(a), db = dy silu(a) and (ua, ub)
    # the halves of U, the cotangent of dab:
    #   grad dy = ua b silu'(a) + ub silu(a),  grad b = ua dy silu'(a),  grad a = ua dy b silu''(a) + ub dy silu'(a)
    offs, a_offs, m = _offsets(N, INNER, BLOCK)
    a = tl.load(AB + a_offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(AB + a_offs + INNER, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    ua = tl.load(U + a_offs, mask=m, other=0.0).to(tl.float32)
    ub = tl.load(U + a_offs + INNER, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    d1 = s * (1.0 + a * (1.0 - s))
    d2 = s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
    tl.store(GAB + a_offs, (ua * dy * b * d2 + ub * dy * d1).to(GAB.dtype.element_ty), mask=m)
    tl.store(GAB + a_offs + INNER, (ua * dy * d1).to(GAB.dtype.element_ty), mask=m)
    tl.store(GDY + offs, (ua * b * d1 + ub * a * s).to(GDY.dtype.element_ty), mask=m)


def _grid(N: int) -> tuple[int]:
    return (triton.cdiv(N, BLOCK),)


def halves(ab: torch.Tensor, dim: int) -> tuple[tuple[int, ...], int]:
    """(y's shape, inner) for ab split in two along dim."""
    shape = list(ab.shape)
    shape[dim] //= 2
    inner = shape[dim]
    for n in shape[dim:][1:]:
        inner *= n
    return tuple(shape), inner


def gate_fwd(ab: torch.Tensor, dim: int) -> torch.Tensor:
    """ab contiguous, its two halves along dim a and b -> y = silu(a) b in ab's dtype (contiguous)."""
    shape, inner = halves(ab, dim)
    y = torch.empty(shape, dtype=ab.dtype, device=ab.device)
    N = y.numel()
    if N:
        _gate_fwd_kernel[_grid(N)](ab, y, N, inner, BLOCK=BLOCK)
    return y


def gate_bwd(ab: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    """dab (ab's shape) for the cotangent dy (contiguous, y's shape)."""
    _, inner = halves(ab, dim)
    dab = torch.empty_like(ab)
    N = dy.numel()
    if N:
        _gate_bwd_kernel[_grid(N)](ab, dy, dab, N, inner, BLOCK=BLOCK)
    return dab


def gate_double_bwd(ab: torch.Tensor, dy: torch.Tensor, u: torch.Tensor, dim: int):
    """Gradients w.r.t. (ab, dy) of <u, dab>, where dab is gate_bwd(ab, dy, dim); u contiguous, ab's shape."""
    _, inner = halves(ab, dim)
    gab, gdy = torch.empty_like(ab), torch.empty_like(dy)
    N = dy.numel()
    if N:
        _gate_dbwd_kernel[_grid(N)](ab, dy, u, gab, gdy, N, inner, BLOCK=BLOCK)
    return gab, gdy
