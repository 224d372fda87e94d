"""Cross-entropy over rows of (N, V) logits: forward, backward and double backward Triton kernels.

Per row, with p = softmax(z) = exp(z - lse) and y the target:
    loss = lse - z_y                        (forward; lse kept for the backward)
    dz   = g (p - e_y)                      (backward, for the loss cotangent g)
    for a cotangent u of dz:  grad g = <u, p - e_y>,  grad z = g p (u - <u, p>)   (double backward)
The loss and dz together (the inner gradient of TTT) take one launch (`ce_fwd_grad`). The double backward reads
the row twice, the first time for <u, p>; a caller that knows g <u, p> already (kernels/cross_entropy/head.py derives it from the
head's output) passes it to `ce_double_bwd_given`, one pass over (N, V) blocks that also adds the backward of a
loss cotangent dl, dl (p - e_y): TTT's inner loss enters the outer loss too.
Every pass reads the logits in their own dtype (bf16 under autocast) and computes in fp32: no fp32 copy of the
(N, V) logits is ever written. A negative target (ignore_index) gives loss 0 and no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(-1.0e38)  # a finite "minus infinity": exp(_NEG - _NEG) must not be NaN in lanes past the row's end


@triton.jit
def _ce_fwd_kernel(Z, Y, G, LOSS, LSE, DZ, V, stride_z, stride_dz, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # WITH_GRAD: also dz = g (p - e_y) for the loss cotangent g, in a second pass over the row
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], _NEG, tl.float32)  # per-lane running max and sum of exp
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        z = tl.where(c < V, tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32), _NEG)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.where(c < V, tl.exp(z - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    y = tl.load(Y + row)
    valid = y >= 0
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_y, 0.0))
    tl.store(LSE + row, lse)
    if WITH_GRAD:
        g = tl.where(valid, tl.load(G + row), 0.0)
        dz_row = DZ + row.to(tl.int64) * stride_dz
        for start in range(0, V, BLOCK_V):
            c = start + cols
            z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
            dz = g * (tl.exp(z - lse) - tl.where(c == y, 1.0, 0.0))
            tl.store(dz_row + c, dz.to(DZ.dtype.element_ty), mask=c < V)


@triton.jit
def _ce_bwd_kernel(Z, Y, LSE, G, DZ, V, stride_z, stride_dz, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y = tl.load(Y + row)
    g = tl.where(y >= 0, tl.load(G + row), 0.0)
    lse = tl.load(LSE + row)
    z = tl.load(Z + row.to(tl.int64) * stride_z + c, mask=c < V, other=0.0).to(tl.float32)
    dz = g * (tl.exp(z - lse) - tl.where(c == y, 1.0, 0.0))
    tl.store(DZ + row.to(tl.int64) * stride_dz + c, dz.to(DZ.dtype.element_ty), mask=c < V)


@triton.jit
def _ce_dbwd_kernel(Z, Y, LSE, G, U, GZ, GG, V, stride_z, stride_u, stride_gz, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    u_row = U + row.to(tl.int64) * stride_u
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(Y + row)
    valid = y >= 0
    g = tl.where(valid, tl.load(G + row), 0.0)
    lse = tl.load(LSE + row)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):  # first pass: <u, p>
        c = start + cols
        z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
        u = tl.load(u_row + c, mask=c < V, other=0.0).to(tl.float32)
        acc += tl.where(c < V, u * tl.exp(z - lse), 0.0)
    up = tl.sum(acc, axis=0)
    u_y = tl.load(u_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(GG + row, tl.where(valid, up - u_y, 0.0))
    gz_row = GZ + row.to(tl.int64) * stride_gz
    for start in range(0, V, BLOCK_V):  # second pass: g p (u - <u, p>)
        c = start + cols
        z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
        u = tl.load(u_row + c, mask=c < V, other=0.0).to(tl.float32)
        gz = g * tl.exp(z - lse) * (u - up)
        tl.store(gz_row + c, gz.to(GZ.dtype.element_ty), mask=c < V)


@triton.jit
def _ce_dbwd_given_kernel(Z, Y, LSE, G, U, C, DL, GZ, V, stride_z, stride_u, stride_gz, HAS_DL: tl.constexpr,
                          BLOCK_V: tl.constexpr):
    # gz = p (g u - c) [+ dl (p - e_y)], c = g <u, p> given: no pass for the row's reduction, so any block of any
    # row is independent (a 2-D grid, as the plain backward's)
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    y = tl.load(Y + row)
    valid = y >= 0
    g = tl.where(valid, tl.load(G + row), 0.0)
    gup = tl.where(valid, tl.load(C + row), 0.0)  # g <u, p>
    lse = tl.load(LSE + row)
    z = tl.load(Z + row.to(tl.int64) * stride_z + c, mask=c < V, other=0.0).to(tl.float32)
    u = tl.load(U + row.to(tl.int64) * stride_u + c, mask=c < V, other=0.0).to(tl.float32)
    p = tl.exp(z - lse)
    gz = p * (g * u - gup)
    if HAS_DL:
        dl = tl.where(valid, tl.load(DL + row), 0.0)
        gz += dl * (p - tl.where(c == y, 1.0, 0.0))
    tl.store(GZ + row.to(tl.int64) * stride_gz + c, gz.to(GZ.dtype.element_ty), mask=c < V)


@triton.jit
def _given_c_kernel(V, DX, W, Y, G, C, D, stride_v, stride_dx, stride_w, BLOCK_D: tl.constexpr):
    # c = <v, dx> + g <v, W_y> per row, 0 where the target is ignored (ce_given_c)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    y = tl.load(Y + row)
    valid = y >= 0
    v = tl.load(V + row.to(tl.int64) * stride_v + cols, mask=m, other=0.0).to(tl.float32)
    dx = tl.load(DX + row.to(tl.int64) * stride_dx + cols, mask=m, other=0.0).to(tl.float32)
    w_y = tl.load(W + tl.where(valid, y, 0).to(tl.int64) * stride_w + cols, mask=m, other=0.0).to(tl.float32)
    c = tl.sum(v * dx, 0) + tl.load(G + row) * tl.sum(v * w_y, 0)
    tl.store(C + row, tl.where(valid, c, 0.0))


def ce_given_c(v: torch.Tensor, dx: torch.Tensor, W: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """c = <v, dx> + g <v, W_y> (N,) fp32, each row's g <u, p> for `ce_double_bwd_given` when dx = g (p - e_y) W
    (kernels/cross_entropy/head.py derives it), 0 where y < 0: v, dx (N, d) and W (V, d) with unit column stride, g (N,) fp32. One
    launch, in place of the casts, gather and row dots it takes in PyTorch ops."""
    N, D = v.shape
    c = torch.empty(N, dtype=torch.float32, device=v.device)
    if N:
        _given_c_kernel[(N,)](v, dx, W, y, g, c, D, v.stride(0), dx.stride(0), W.stride(0),
                              BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return c


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))  # a 4096-wide slice of the row per step (8 warps)


def ce_fwd(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, V) with unit column stride, y (N,) int -> (loss (N,) fp32, lse (N,) fp32)."""
    N, V = z.shape
    loss = torch.empty(N, dtype=torch.float32, device=z.device)
    lse = torch.empty(N, dtype=torch.float32, device=z.device)
    _ce_fwd_kernel[(N,)](z, y, loss, loss, lse, z, V, z.stride(0), 0, WITH_GRAD=False, BLOCK_V=_block(V),
                         num_warps=8)
    return loss, lse


def ce_bwd(z: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dz (N, V) in z's dtype for the loss cotangent g (N,) fp32."""
    N, V = z.shape
    dz = torch.empty((N, V), dtype=z.dtype, device=z.device)
    block = _block(V)
    _ce_bwd_kernel[(N, triton.cdiv(V, block))](z, y, lse, g, dz, V, z.stride(0), dz.stride(0), BLOCK_V=block,
                                               num_warps=8)
    return dz


def ce_fwd_grad(z: torch.Tensor, y: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None):
    """ce_fwd and ce_bwd in one launch: (loss (N,) fp32, dz (N, V) in z's dtype, lse (N,) fp32) for the loss
    cotangent g (N,) fp32. out: an (N, V) tensor with unit column stride to write dz into."""
    N, V = z.shape
    loss = torch.empty(N, dtype=torch.float32, device=z.device)
    lse = torch.empty(N, dtype=torch.float32, device=z.device)
    dz = torch.empty((N, V), dtype=z.dtype, device=z.device) if out is None else out
    _ce_fwd_kernel[(N,)](z, y, g, loss, lse, dz, V, z.stride(0), dz.stride(0), WITH_GRAD=True, BLOCK_V=_block(V),
                         num_warps=8)
    return loss, dz, lse


def ce_double_bwd(z, y, lse, g, u) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (z, g) of <u, dz>, where dz = ce_bwd(z, y, lse, g): (gz (N, V) in z's dtype, gg (N,) fp32)."""
    N, V = z.shape
    gz = torch.empty((N, V), dtype=z.dtype, device=z.device)
    gg = torch.empty(N, dtype=torch.float32, device=z.device)
    _ce_dbwd_kernel[(N,)](z, y, lse, g, u, gz, gg, V, z.stride(0), u.stride(0), gz.stride(0), BLOCK_V=_block(V),
                          num_warps=8)
    return gz, gg


def ce_double_bwd_given(z, y, lse, g, u, c, dl=None, out=None) -> torch.Tensor:
    """`ce_double_bwd`'s gz, plus dl (p - e_y) for a loss cotangent dl (N,) fp32 if given, for a caller that knows
    c = g <u, p> (N,) fp32: one pass. out: the (N, V) tensor to write gz into, in z's dtype; it may be u itself
    (each element is read before it is written, by the same program)."""
    N, V = z.shape
    gz = torch.empty((N, V), dtype=z.dtype, device=z.device) if out is None else out
    block = _block(V)
    _ce_dbwd_given_kernel[(N, triton.cdiv(V, block))](z, y, lse, g, u, c, g if dl is None else dl, gz, V,
                                                      z.stride(0), u.stride(0), gz.stride(0),
                                                      HAS_DL=dl is not None, BLOCK_V=block, num_warps=8)
    return gz
