"""One Triton kernel for the rotary embedding and its backward: the backward of a rotation by theta is the
rotation by -theta (SIGN = -1), so one kernel serves every derivative."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, COS, SIN, Y, R, T, HP, P, SIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Rows r = b T + t of HP = H P pairs each (P = D / 2); pair j of a row turns by angle (t, j mod P). The row
    # is read and written contiguously (vectorized) and split into its even and odd lanes in registers.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, 2 * BLOCK)
    offs = rows[:, None].to(tl.int64) * (2 * HP) + cols[None, :]
    m2 = (rows[:, None] < R) & (cols[None, :] < 2 * HP)
    x0, x1 = tl.split(tl.reshape(tl.load(X + offs, mask=m2, other=0.0).to(tl.float32), (ROWS, BLOCK, 2)))
    j = tl.arange(0, BLOCK)
    m = (rows[:, None] < R) & (j[None, :] < HP)
    ang = (rows % T)[:, None] * P + (j % P)[None, :]
    c = tl.load(COS + ang, mask=m, other=0.0).to(tl.float32)
    s = tl.load(SIN + ang, mask=m, other=0.0).to(tl.float32) * SIGN
    y = tl.reshape(tl.join(x0 * c - x1 * s, x1 * c + x0 * s), (ROWS, 2 * BLOCK))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m2)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """x (B, T, H, D) contiguous, cos/sin (T, D/2) contiguous -> x rotated by sign * angle, in x's dtype."""
    B, T, H, D = x.shape
    y = torch.empty_like(x)
    hp = H * D // 2
    block = triton.next_power_of_2(hp)
    rows = max(1, min(16, 4096 // block))
    R = B * T
    _rope_kernel[(triton.cdiv(R, rows),)](x, cos, sin, y, R, T, hp, D // 2, SIGN=sign, ROWS=rows, BLOCK=block)
    return y
