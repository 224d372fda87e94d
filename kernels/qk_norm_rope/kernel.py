"""QK-norm then RoPE in one Triton kernel (the forward; function.py adds a first-order backward): each head row of
q or k is read once (where it lies in the fused QKV projection's output), normalized, rounded to its dtype as the
separate norm would store it, rotated and stored, where the separate kernels write the normed rows and read them
back: one pass over the rows instead of three (profiles in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttt_e2e.kernels.rmsnorm.kernel import row_layout


@triton.jit
def _qk_norm_rope_kernel(X, W, COS, SIN, Y, RSTD, N, T, H, D, P, s_outer, eps, ROWS: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    # Head row r = (b T + t) H + h sits at (r // H) s_outer + (r % H) D; its pairs (x_2j, x_2j+1), j < P = D / 2,
    # turn by angle (t, j). Loaded as (ROWS, BLOCK_P, 2) and split into the even and odd lanes in registers.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, 2 * BLOCK_P)
    r = rows.to(tl.int64)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + ((r // H) * s_outer + (r % H) * D)[:, None] + cols[None, :], mask=m, other=0.0)
    xf = x.to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    y = (xf * rstd[:, None] * w[None, :]).to(x.dtype).to(tl.float32)  # the norm's output, rounded as it is stored
    y0, y1 = tl.split(tl.reshape(y, (ROWS, BLOCK_P, 2)))
    j = tl.arange(0, BLOCK_P)
    mp = (rows[:, None] < N) & (j[None, :] < P)
    ang = ((r // H) % T)[:, None] * P + j[None, :]
    c = tl.load(COS + ang, mask=mp, other=0.0)
    s = tl.load(SIN + ang, mask=mp, other=0.0)
    out = tl.reshape(tl.join(y0 * c - y1 * s, y1 * c + y0 * s), (ROWS, 2 * BLOCK_P))
    tl.store(Y + r[:, None] * D + cols[None, :], out.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < N)


def qk_norm_rope_fwd(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H, D) with contiguous head rows (row_layout: contiguous, or q's or k's view of a fused projection),
    w (D,), cos/sin (T, D/2) fp32 contiguous -> (y (B, T, H, D) contiguous in x's dtype, the norm's rstd (B T H,)
    fp32, rows in (b, t, h) order as the norm kernels number them)."""
    B, T, H, D = x.shape
    G, s_outer = row_layout(x)
    if G not in (1, H):
        raise ValueError(f"qk_norm_rope: x's heads must be contiguous rows of each position, got strides {x.stride()}")
    if G == 1:  # contiguous: each position's H rows follow each other
        s_outer = H * D
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    n = B * T * H
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_p = triton.next_power_of_2(D // 2)
    rows = max(1, min(16, 2048 // (2 * block_p)))  # 16 head rows of 80 per program: the fastest measured at 3B
    _qk_norm_rope_kernel[(triton.cdiv(n, rows),)](x, w, cos, sin, y, rstd, n, T, H, D, D // 2, s_outer, eps,
                                                  ROWS=rows, BLOCK_P=block_p)
    return y, rstd
