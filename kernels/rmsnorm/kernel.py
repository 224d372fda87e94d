"""RMSNorm forward and backward Triton kernels over rows of a (N, D) tensor, statistics in fp32.

x may also be a (..., G, D) view whose G rows of each leading index are contiguous and the leading indices s_outer
apart: the heads of one projection of a fused QKV output (B, T, H, D), read where they lie. Row r of x then sits at
(r // G) s_outer + (r % G) D; every other operand and result is a contiguous (N, D)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _x_offsets(rows, cols, D, G, s_outer):
    r = rows.to(tl.int64)
    return ((r // G) * s_outer + (r % G) * D)[:, None] + cols[None, :]


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, RES, W2, Y2, RSTD2, N, D, G, s_outer, eps, eps2, ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr, HAS_NEXT: tl.constexpr):
    # HAS_RES: y = res + norm(x), the norm rounded to x's dtype first, as the separate norm's output would be.
    # HAS_NEXT: also y2 = norm2(y) (gain W2, eps2; RSTD2) from y as stored, as the separate norm would read it
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + _x_offsets(rows, cols, D, G, s_outer), mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * w[None, :]
    if HAS_RES:
        y = y.to(X.dtype.element_ty).to(tl.float32) + tl.load(RES + offs, mask=m, other=0.0).to(tl.float32)
    y = y.to(Y.dtype.element_ty)
    tl.store(Y + offs, y, mask=m)
    tl.store(RSTD + rows, rstd, mask=rows < N)
    if HAS_NEXT:
        y = y.to(tl.float32)
        w2 = tl.load(W2 + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd2 = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps2)
        tl.store(Y2 + offs, (y * rstd2[:, None] * w2[None, :]).to(Y2.dtype.element_ty), mask=m)
        tl.store(RSTD2 + rows, rstd2, mask=rows < N)


@triton.jit
def _row_block(X, DY, RSTD, block, N, D, G, s_outer, cols, ROWS: tl.constexpr):
    """Row block `block` of the backward kernels: (mask, offsets of the contiguous operands, x and dy in fp32, rstd
    (ROWS,))."""
    rows = block * ROWS + tl.arange(0, ROWS)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + _x_offsets(rows, cols, D, G, s_outer), mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)
    return m, offs, x, dy, rstd


@triton.jit
def _rms_bwd_kernel(X, W, RSTD, DY, DX, DW_PART, ADD, N, D, G, s_outer, ROWS: tl.constexpr, ITERS: tl.constexpr,
                    BLOCK_D: tl.constexpr, HAS_DW: tl.constexpr, HAS_ADD: tl.constexpr):
    # ITERS row blocks per program, their dw summed here: fewer partial rows for the torch sum that follows.
    # HAS_DW False: dx only. HAS_ADD: dx + add (contiguous, DX's dtype), dx rounded to its dtype first: autograd's
    # sum of the norm's dx and another use's cotangent of x
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        m, offs, x, dy, rstd = _row_block(X, DY, RSTD, pid * ITERS + it, N, D, G, s_outer, cols, ROWS)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(wdy * xhat, axis=1) / D
        dx = (rstd[:, None] * (wdy - xhat * c[:, None])).to(DX.dtype.element_ty)
        if HAS_ADD:
            dx = (dx.to(tl.float32) + tl.load(ADD + offs, mask=m, other=0.0).to(tl.float32)).to(DX.dtype.element_ty)
        tl.store(DX + offs, dx, mask=m)
        if HAS_DW:
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_DW:
        tl.store(DW_PART + pid * D + cols, dw, mask=cols < D)


@triton.jit
def _rms_dbwd_kernel(X, W, RSTD, DY, U, V, GX, GW_PART, GDY, N, D, G, s_outer, ROWS: tl.constexpr, ITERS: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr):
    # Gradients of L = <u, dx> + <v, dw> w.r.t. x, w, dy (reference.py gives dx, dw); per row, with
    # xh = x r, a = w dy, c = mean(a xh):
    #   dL/da = r u - r <u, xh> xh / D                  -> grad dy = w dL/da + v xh,  grad w = sum_rows dy dL/da
    #   G     = -r c u - r <u, xh> a / D + v dy          (dL/dxh at fixed r),  dL/dr = <u, a> - c <u, xh>
    #   grad x = r G - (r / D) xh (<G, xh> + r dL/dr)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_V:
        v = tl.load(V + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    else:
        v = tl.zeros([1, BLOCK_D], dtype=tl.float32)
    gw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for it in range(ITERS):
        m, offs, x, dy, r = _row_block(X, DY, RSTD, pid * ITERS + it, N, D, G, s_outer, cols, ROWS)
        r = r[:, None]
        xh = x * r
        a = w * dy
        c = tl.sum(a * xh, axis=1)[:, None] / D
        if HAS_U:
            u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        else:
            u = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        uxh = tl.sum(u * xh, axis=1)[:, None]
        ua = tl.sum(u * a, axis=1)[:, None]
        dl_da = r * u - r * uxh * xh / D
        g = -r * c * u - r * uxh * a / D + v * dy
        dl_dr = ua - c * uxh
        gx = r * g - (r / D) * xh * (tl.sum(g * xh, axis=1)[:, None] + r * dl_dr)
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=m)
        tl.store(GDY + offs, (w * dl_da + v * xh).to(GDY.dtype.element_ty), mask=m)
        gw += tl.sum(dy * dl_da, axis=0)
    tl.store(GW_PART + pid * D + cols, gw, mask=cols < D)


def _geometry(N: int, D: int) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(64, 4096 // block_d, triton.next_power_of_2(N)))
    return block_d, rows, triton.cdiv(N, rows)


def _reducing_geometry(N: int, D: int) -> tuple[int, int, int, int]:
    """(block_d, rows, iters, grid) for the kernels that also sum over rows (the weight's gradient): each program
    takes `iters` row blocks, so the partial sums number at most max(128, blocks / 8) (a (512, 2048) fp32 sum
    per call instead of (4096, 2048) at 8K rows; the meta step makes ~800 of these calls at 1B)."""
    block_d, rows, blocks = _geometry(N, D)
    iters = triton.cdiv(blocks, max(128, blocks // 8))
    return block_d, rows, iters, triton.cdiv(blocks, iters)


def row_layout(x: torch.Tensor) -> tuple[int, int] | None:
    """(G, s_outer) where the kernels can read x's rows of D where they lie (module docstring): x contiguous (G = 1),
    or a (..., G, D) view with contiguous rows of D in each group of G and the groups evenly s_outer apart (the
    leading dims collapse into one); else None (the caller makes x contiguous)."""
    D = x.shape[-1]
    if x.is_contiguous():
        return 1, D
    if x.dim() < 3 or x.stride(-1) != 1 or x.stride(-2) != D:
        return None
    outer = [(n, st) for n, st in zip(x.shape[:-2], x.stride()[:-2]) if n != 1]
    if any(outer[i][1] != outer[i + 1][1] * outer[i + 1][0] for i in range(len(outer) - 1)):
        return None
    return x.shape[-2], (outer[-1][1] if outer else x.shape[-2] * D)


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(N, D, G, s_outer) of x, which row_layout accepts."""
    D = x.shape[-1]
    return x.numel() // D, D, *row_layout(x)


def rms_norm_fwd(x: torch.Tensor, w: torch.Tensor, eps: float,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) contiguous, or any (..., D) view row_layout accepts -> y (N, D) contiguous in out_dtype (default
    x's), rstd (N,) fp32."""
    N, D, G, s_outer = _rows(x)
    y = torch.empty((N, D), dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block_d, rows, grid = _geometry(N, D)
    _rms_fwd_kernel[(grid,)](x, w, y, rstd, y, w, y, rstd, N, D, G, s_outer, eps, eps, ROWS=rows, BLOCK_D=block_d,
                             HAS_RES=False, HAS_NEXT=False)
    return y, rstd


def rms_norm_residual_fwd(res: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float, w2=None, eps2: float = 0.0,
                          out_dtype2: torch.dtype | None = None):
    """(sum, rstd, norm2(sum), rstd2) in one pass, sum = res + norm(x): res (N, D) contiguous, x as in rms_norm_fwd;
    the norm rounded to x's dtype, the sum in fp32, stored in the promoted dtype of res and x. norm2, the next norm
    (gain w2, eps2) of the sum as stored, in out_dtype2 (default the sum's dtype); without w2, norm2(sum) and rstd2
    are empty tensors."""
    N, D, G, s_outer = _rows(x)
    y = torch.empty((N, D), dtype=torch.promote_types(res.dtype, x.dtype), device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    nxt = w2 is not None
    y2 = torch.empty((N, D) if nxt else 0, dtype=out_dtype2 or y.dtype, device=x.device)
    rstd2 = torch.empty(N if nxt else 0, dtype=torch.float32, device=x.device)
    block_d, rows, grid = _geometry(N, D)
    _rms_fwd_kernel[(grid,)](x, w, y, rstd, res, w2 if nxt else w, y2, rstd2, N, D, G, s_outer, eps, eps2, ROWS=rows,
                             BLOCK_D=block_d, HAS_RES=True, HAS_NEXT=nxt)
    return y, rstd, y2, rstd2


def rms_norm_bwd(x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, need_w: bool = True,
                 reduce: bool = True, add: torch.Tensor | None = None):
    """(dx in x's dtype and shape, contiguous; dw in w's dtype) for the cotangent dy (N, D) contiguous; dw None
    unless need_w. reduce False: dw as its fp32 partial sums (P, D), left for the caller to add up (with other
    uses', function.py: GainGrad). add: dx + add instead (add contiguous, in x's dtype)."""
    N, D, G, s_outer = _rows(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if need_w:
        block_d, rows, iters, grid = _reducing_geometry(N, D)
    else:  # no sum over rows: one row block per program (inference's inner step: 1K rows in 1K programs, not 128)
        block_d, rows, grid = _geometry(N, D)
        iters = 1
    # one partial dw per program, summed below
    part = torch.empty(grid if need_w else 0, D, dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(grid,)](x, w, rstd, dy, dx, part, dx if add is None else add, N, D, G, s_outer, ROWS=rows,
                             ITERS=iters, BLOCK_D=block_d, HAS_DW=need_w, HAS_ADD=add is not None)
    if not need_w:
        return dx, None
    return dx, part.sum(0).to(w.dtype) if reduce else part


def rms_norm_double_bwd(x, w, rstd, dy, g_dx, g_dw, reduce: bool = True):
    """Gradients w.r.t. (x, w, dy) of <g_dx, dx> + <g_dw, dw>, where (dx, dw) is rms_norm_bwd(x, w, rstd, dy);
    g_dx or g_dw may be None (zero). reduce False: w's as fp32 partial sums (P, D), as in rms_norm_bwd. x as there;
    gx in x's shape, contiguous."""
    N, D, G, s_outer = _rows(x)
    gx, gdy = torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(dy)
    block_d, rows, iters, grid = _reducing_geometry(N, D)
    part = torch.empty(grid, D, dtype=torch.float32, device=x.device)
    u = g_dx.contiguous() if g_dx is not None else x  # a dummy pointer when absent (never read)
    v = g_dw.contiguous() if g_dw is not None else w
    _rms_dbwd_kernel[(grid,)](x, w, rstd, dy, u, v, gx, part, gdy, N, D, G, s_outer, ROWS=rows, ITERS=iters,
                              BLOCK_D=block_d, HAS_U=g_dx is not None, HAS_V=g_dw is not None)
    return gx, (part.sum(0).to(w.dtype) if reduce else part), gdy
