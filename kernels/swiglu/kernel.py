"""SwiGLU gate forward and backward Triton kernels, elementwise over flat contiguous tensors, math in fp32.

With s = sigmoid(a): silu(a) = a s, silu'(a) = s (1 + a (1 - s)), silu''(a) = s (1 - s) (2 + a (1 - 2 s)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _offsets(N, BLOCK: tl.constexpr):
    # int64: a (batch, seq, hidden) activation can pass 2^31 elements
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _gate_fwd_kernel(A, B, Y, N, BLOCK: tl.constexpr):
    offs, m = _offsets(N, BLOCK)
    a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(Y + offs, (a * s * b).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd_kernel(A, B, DY, DA, DB, N, BLOCK: tl.constexpr):
    # da = dy b silu'(a), db = dy silu(a)
    offs, m = _offsets(N, BLOCK)
    a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    d1 = s * (1.0 + a * (1.0 - s))
    tl.store(DA + offs, (dy * b * d1).to(DA.dtype.element_ty), mask=m)
    tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=m)


@triton.jit
def _gate_dbwd_kernel(A, B, DY, UA, UB, GA, GB, GDY, N, BLOCK: tl.constexpr,
                      HAS_UA: tl.constexpr, HAS_UB: tl.constexpr):
    # Gradients of L = <ua, da> + <ub, db> w.r.t. a, b, dy, with da = dy b silu'(a), db = dy silu(a):
    #   grad dy = ua b silu'(a) + ub silu(a),  grad b = ua dy silu'(a),  grad a = ua dy b silu''(a) + ub dy silu'(a)
    offs, m = _offsets(N, BLOCK)
    a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    d1 = s * (1.0 + a * (1.0 - s))
    ga = tl.zeros([BLOCK], dtype=tl.float32)
    gb = tl.zeros([BLOCK], dtype=tl.float32)
    gdy = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_UA:
        ua = tl.load(UA + offs, mask=m, other=0.0).to(tl.float32)
        d2 = s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
        gdy += ua * b * d1
        gb += ua * dy * d1
        ga += ua * dy * b * d2
    if HAS_UB:
        ub = tl.load(UB + offs, mask=m, other=0.0).to(tl.float32)
        gdy += ub * a * s
        ga += ub * dy * d1
    tl.store(GA + offs, ga.to(GA.dtype.element_ty), mask=m)
    tl.store(GB + offs, gb.to(GB.dtype.element_ty), mask=m)
    tl.store(GDY + offs, gdy.to(GDY.dtype.element_ty), mask=m)


def _grid(N: int) -> tuple[int]:
    return (triton.cdiv(N, BLOCK),)


def gate_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b contiguous of one shape and dtype -> y = silu(a) b in a's dtype."""
    y = torch.empty_like(a)
    N = a.numel()
    if N:
        _gate_fwd_kernel[_grid(N)](a, b, y, N, BLOCK=BLOCK)
    return y


def gate_bwd(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) for the cotangent dy (contiguous, a's shape)."""
    da, db = torch.empty_like(a), torch.empty_like(b)
    N = a.numel()
    if N:
        _gate_bwd_kernel[_grid(N)](a, b, dy, da, db, N, BLOCK=BLOCK)
    return da, db


def gate_double_bwd(a, b, dy, ua, ub):
    """Gradients w.r.t. (a, b, dy) of <ua, da> + <ub, db>, where (da, db) is gate_bwd(a, b, dy); ua or ub may be
    None (zero)."""
    ga, gb, gdy = torch.empty_like(a), torch.empty_like(b), torch.empty_like(dy)
    N = a.numel()
    if N:
        u = ua.contiguous() if ua is not None else a  # a dummy pointer when absent (never read)
        v = ub.contiguous() if ub is not None else b
        _gate_dbwd_kernel[_grid(N)](a, b, dy, u, v, ga, gb, gdy, N, BLOCK=BLOCK,
                                    HAS_UA=ua is not None, HAS_UB=ub is not None)
    return ga, gb, gdy
