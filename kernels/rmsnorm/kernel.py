"""RMSNorm forward and backward Triton kernels over rows of a (N, D) tensor, statistics in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, N, D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < N)


@triton.jit
def _rms_bwd_kernel(X, W, RSTD, DY, DX, DW_PART, N, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)
    xhat = x * rstd[:, None]
    wdy = dy * w[None, :]
    c = tl.sum(wdy * xhat, axis=1) / D
    dx = rstd[:, None] * (wdy - xhat * c[:, None])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DW_PART + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cols < D)


def _geometry(N: int, D: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(64, 4096 // block_d, triton.next_power_of_2(N)))
    return block_d, rows, triton.cdiv(N, rows)


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) contiguous -> y (N, D) in x's dtype, rstd (N,) fp32."""
    N, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block_d, rows, grid = _geometry(N, D)
    _rms_fwd_kernel[(grid,)](x, w, y, rstd, N, D, eps, ROWS=rows, BLOCK_D=block_d)
    return y, rstd


def rms_norm_bwd(x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dw in w's dtype) for the cotangent dy (N, D)."""
    N, D = x.shape
    dx = torch.empty_like(x)
    block_d, rows, grid = _geometry(N, D)
    part = torch.empty(grid, D, dtype=torch.float32, device=x.device)  # one partial dw per program, summed below
    _rms_bwd_kernel[(grid,)](x, w, rstd, dy, dx, part, N, D, ROWS=rows, BLOCK_D=block_d)
    return dx, part.sum(0).to(w.dtype)
