"""Double-backward Triton kernels: the backward of (dQ, dK, dV) = attention_backward(Q, K, V, dO).

Given cotangents gQ, gK, gV of dQ, dK, dV (docs/METHOD.md section 6; delta = rowsum(P * dP), so O and lse need no
gradient of their own), with G = scale * (gQ K^T + Q gK^T) and H = dO gV^T:

  r      = rowsum(G * P)
  g_dP   = P * (G - r)
  g_P    = G * (dP - delta) - r * dP + H
  u      = rowsum(g_P * P) = rowsum(P * G * (dP - delta)) - r * delta + rowsum(P * H)
  g_S    = P * (g_P - u)
  grad dO = P gV + g_dP V
  grad Q  = scale * (dS gK + g_S K)
  grad K  = scale * (dS^T gQ + g_S^T Q)
  grad V  = g_dP^T dO

Three launches, none of which writes a Tq x Tk matrix: (1) row-parallel pass for the row reductions r and u;
(2) row-parallel pass for grad Q and grad dO; (3) column-parallel pass for grad K and grad V. Each recomputes
S, P, dP, G, H per tile from Q, K, V, dO, gQ, gK, gV and the saved lse and delta.

Grouped-query attention (k, v with Hkv heads, query head h reading kv head h // GROUP): the row-parallel passes
(per query head) read their kv head's K, V, gK, gV; the column-parallel one runs per kv head and sums grad K,
grad V over the group's query heads in one program (fixed order, no atomics), or in a few (group parts, summed
after in a fixed order: common.group_parts).

Missing cotangents (None upstream) are compile-time flags: HAS_GQ / HAS_GK / HAS_GV drop the products they
feed (with neither gQ nor gK, G = 0 and r = 0, g_dP = 0). gK and gV may cover only the keys from KG0 on (the
backward gave dK, dV for those only, see backward.py): the others' cotangents are 0, and the tiles below KG0 skip
the products with gK and gV.
"""

import torch
import triton
import triton.language as tl

from .common import (LOG2E, as_kernel_operand, block_d, column_grid, dot_precision, empty_like_layout, group_parts,
                     kv_group, tile_config)
from .parts import sum_parts
from .tiles import key_range, kv_program, query_range, query_tile, source_tile, tile_is_full, visible, visible_t


@triton.jit
def _swa_dbwd_ru_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, R, U,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt,
    H, TQ, TK, WINDOW, Q_POS0, K_POS0, KG0, qk_scale, scale,
    HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, GROUP: tl.constexpr,
):
    # Every input has its own strides (gK and gV: rows from key KG0 on); the outputs are contiguous.
    # Last query tiles first: under a causal mask they see the most keys, so the long programs start early and
    # the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # the kv head of query head h (grouped-query attention)
    Q += b * sqb + h * sqh
    GQ += b * sgqb + h * sgqh
    K += b * skb + hk * skh
    GK += b * sgkb + hk * sgkh
    V += b * svb + hk * svh
    GV += b * sgvb + hk * sgvh
    DO += b * sdb + h * sdh
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ
    R += bh.to(tl.int64) * TQ
    U += bh.to(tl.int64) * TQ

    m0 = pid_m * BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_m, m_valid, row_mask, q, do, lse, delta = query_tile(Q, DO, LSE, DELTA, sqt, sdt, m0, TQ, offs_d, d_valid,
                                                              BLOCK_M)
    if HAS_GQ:
        gq = tl.load(GQ + offs_m[:, None] * sgqt + offs_d[None, :], mask=row_mask, other=0.0)
    q_pos = Q_POS0 + offs_m
    r = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)  # rowsum(P * G * (dP - delta)) + rowsum(P * H)

    lo, hi = key_range(m0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < TK
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if not tile_is_full(m0, n0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
            p = tl.where(visible(q_pos, K_POS0 + offs_n, m_valid, n_valid, WINDOW), p, 0.0)
        has_kg = n0 + BLOCK_N > KG0  # the tile holds keys with cotangents gK, gV
        g_mask = kv_mask & (offs_n >= KG0)[:, None]
        if HAS_GQ or HAS_GK:
            v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_GQ:
                g += tl.dot(gq, tl.trans(k), input_precision=DOT_PREC)
            if HAS_GK:
                if has_kg:
                    gk = tl.load(GK + (offs_n - KG0)[:, None] * sgkt + offs_d[None, :], mask=g_mask, other=0.0)
                    g += tl.dot(q, tl.trans(gk), input_precision=DOT_PREC)
            pg = p * g * scale
            r += tl.sum(pg, 1)
            a += tl.sum(pg * (dp - delta[:, None]), 1)
        if HAS_GV:
            if has_kg:
                gv = tl.load(GV + (offs_n - KG0)[:, None] * sgvt + offs_d[None, :], mask=g_mask, other=0.0)
                hh = tl.dot(do, tl.trans(gv), input_precision=DOT_PREC)
                a += tl.sum(p * hh, 1)

    tl.store(R + offs_m, r, mask=m_valid)
    tl.store(U + offs_m, a - r * delta, mask=m_valid)


@triton.jit
def _swa_dbwd_row_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, R, U, OUT_Q, OUT_DO,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt, sob, soh, sot,
    H, TQ, TK, WINDOW, Q_POS0, K_POS0, KG0, qk_scale, scale,
    HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, GROUP: tl.constexpr,
):
    # grad Q = scale * (dS gK + g_S K) and grad dO = P gV + g_dP V; both outputs with strides (sob, soh, sot).
    # Last query tiles first: under a causal mask they see the most keys, so the long programs start early and
    # the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # the kv head of query head h (grouped-query attention)
    Q += b * sqb + h * sqh
    GQ += b * sgqb + h * sgqh
    K += b * skb + hk * skh
    GK += b * sgkb + hk * sgkh
    V += b * svb + hk * svh
    GV += b * sgvb + hk * sgvh
    DO += b * sdb + h * sdh
    OUT_Q += b * sob + h * soh
    OUT_DO += b * sob + h * soh
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ
    R += bh.to(tl.int64) * TQ
    U += bh.to(tl.int64) * TQ

    m0 = pid_m * BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_m, m_valid, row_mask, q, do, lse, delta = query_tile(Q, DO, LSE, DELTA, sqt, sdt, m0, TQ, offs_d, d_valid,
                                                              BLOCK_M)
    if HAS_GQ:
        gq = tl.load(GQ + offs_m[:, None] * sgqt + offs_d[None, :], mask=row_mask, other=0.0)
    r = tl.load(R + offs_m, mask=m_valid, other=0.0)
    u = tl.load(U + offs_m, mask=m_valid, other=0.0)
    q_pos = Q_POS0 + offs_m
    acc_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_do = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = key_range(m0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n, n_valid, _, k, v = source_tile(K, V, skt, svt, n0, 0, TK, 0, offs_d, d_valid, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if not tile_is_full(m0, n0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
            p = tl.where(visible(q_pos, K_POS0 + offs_n, m_valid, n_valid, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        dpc = dp - delta[:, None]
        g_p = -r[:, None] * dp
        has_kg = n0 + BLOCK_N > KG0  # the tile holds keys with cotangents gK, gV
        g_mask = n_valid[:, None] & d_valid[None, :] & (offs_n >= KG0)[:, None]
        if HAS_GQ or HAS_GK:
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_GQ:
                g += tl.dot(gq, tl.trans(k), input_precision=DOT_PREC)
            if HAS_GK:
                if has_kg:
                    gk = tl.load(GK + (offs_n - KG0)[:, None] * sgkt + offs_d[None, :], mask=g_mask, other=0.0)
                    g += tl.dot(q, tl.trans(gk), input_precision=DOT_PREC)
                    ds = p * dpc
                    acc_q += tl.dot(ds.to(gk.dtype), gk, input_precision=DOT_PREC)
            g = g * scale
            g_p += g * dpc
            g_dp = p * (g - r[:, None])
            acc_do += tl.dot(g_dp.to(v.dtype), v, input_precision=DOT_PREC)
        if HAS_GV:
            if has_kg:
                gv = tl.load(GV + (offs_n - KG0)[:, None] * sgvt + offs_d[None, :], mask=g_mask, other=0.0)
                g_p += tl.dot(do, tl.trans(gv), input_precision=DOT_PREC)
                acc_do += tl.dot(p.to(gv.dtype), gv, input_precision=DOT_PREC)
        g_s = p * (g_p - u[:, None])
        acc_q += tl.dot(g_s.to(k.dtype), k, input_precision=DOT_PREC)

    out_offs = offs_m[:, None] * sot + offs_d[None, :]
    tl.store(OUT_Q + out_offs, (acc_q * scale).to(OUT_Q.dtype.element_ty), mask=row_mask)
    tl.store(OUT_DO + out_offs, acc_do.to(OUT_DO.dtype.element_ty), mask=row_mask)


@triton.jit
def _swa_dbwd_col_kernel(
    Q, K, V, DO, GQ, GK, GV, LSE, DELTA, R, U, OUT_K, OUT_V,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt, sob, soh, sot, sop,
    H, TQ, TK, WINDOW, Q_POS0, K_POS0, KG0, qk_scale, scale,
    HAS_GQ: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, TILE_MAJOR: tl.constexpr,
):
    # grad K = scale * (dS^T gQ + g_S^T Q) and grad V = g_dP^T dO, all tiles transposed (keys as rows): one
    # program per key tile of one kv head, summing over the query heads that read it (grouped-query attention; a
    # fixed order, no atomics); HEADS < GROUP: group parts, as in backward.py's dK/dV (slots sop apart).
    pid_n, b, hk, g0, part, bhk = kv_program(H, GROUP, HEADS, TILE_MAJOR)
    OUT_K += b * sob + hk * soh + part * sop
    OUT_V += b * sob + hk * soh + part * sop
    K += b * skb + hk * skh
    GK += b * sgkb + hk * sgkh
    V += b * svb + hk * svh
    GV += b * sgvb + hk * sgvh

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < TK
    d_valid = offs_d < HEAD_DIM
    col_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=col_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=col_mask, other=0.0)
    has_kg = n0 + BLOCK_N > KG0  # this key tile has cotangents gK, gV
    g_mask = col_mask & (offs_n >= KG0)[:, None]
    if HAS_GK:
        gk = tl.load(GK + (offs_n - KG0)[:, None] * sgkt + offs_d[None, :], mask=g_mask, other=0.0)
    if HAS_GV:
        gv = tl.load(GV + (offs_n - KG0)[:, None] * sgvt + offs_d[None, :], mask=g_mask, other=0.0)
    k_pos = K_POS0 + offs_n
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo, hi = query_range(n0, BLOCK_N, BLOCK_M, TQ, TK, WINDOW, Q_POS0, K_POS0)
    for g in range(g0, g0 + HEADS):
        h = hk * GROUP + g  # the group's query heads (this part's), in order
        Qh = Q + b * sqb + h * sqh
        GQh = GQ + b * sgqb + h * sgqh
        DOh = DO + b * sdb + h * sdh
        row0 = (bhk * GROUP + g) * TQ  # this head's rows of lse, delta, r, u: b * H + h
        for m0 in range(lo, hi, BLOCK_M):
            offs_m, m_valid, row_mask, q, do, lse, delta = query_tile(Qh, DOh, LSE + row0, DELTA + row0, sqt, sdt,
                                                                      m0, TQ, offs_d, d_valid, BLOCK_M)
            r = tl.load(R + row0 + offs_m, mask=m_valid, other=0.0)
            u = tl.load(U + row0 + offs_m, mask=m_valid, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
            pt = tl.math.exp2(st - lse[None, :])
            if not tile_is_full(m0, n0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
                pt = tl.where(visible_t(k_pos, Q_POS0 + offs_m, n_valid, m_valid, WINDOW), pt, 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dpct = dpt - delta[None, :]
            g_pt = -r[None, :] * dpt
            if HAS_GQ:
                gq = tl.load(GQh + offs_m[:, None] * sgqt + offs_d[None, :], mask=row_mask, other=0.0)
            if HAS_GQ or HAS_GK:
                gt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                if HAS_GQ:
                    gt += tl.dot(k, tl.trans(gq), input_precision=DOT_PREC)
                if HAS_GK:
                    if has_kg:
                        gt += tl.dot(gk, tl.trans(q), input_precision=DOT_PREC)
                gt = gt * scale
                g_pt += gt * dpct
                g_dpt = pt * (gt - r[None, :])
                acc_v += tl.dot(g_dpt.to(do.dtype), do, input_precision=DOT_PREC)
            if HAS_GQ:
                dst = pt * dpct
                acc_k += tl.dot(dst.to(gq.dtype), gq, input_precision=DOT_PREC)
            if HAS_GV:
                if has_kg:
                    g_pt += tl.dot(gv, tl.trans(do), input_precision=DOT_PREC)
            g_st = pt * (g_pt - u[None, :])
            acc_k += tl.dot(g_st.to(q.dtype), q, input_precision=DOT_PREC)

    out_offs = offs_n[:, None] * sot + offs_d[None, :]
    tl.store(OUT_K + out_offs, (acc_k * scale).to(OUT_K.dtype.element_ty), mask=col_mask)
    tl.store(OUT_V + out_offs, acc_v.to(OUT_V.dtype.element_ty), mask=col_mask)


def swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, window, q_pos0, k_pos0, scale, k_grad_from=0):
    """(grad q, grad k, grad v, grad dO) given cotangents gq, gk, gv (any may be None) of (dq, dk, dv), where dk
    and dv were those of the keys k_grad_from.. (gk, gv: (B, Hkv, Tk - k_grad_from, D)); k, v have Hkv heads,
    Hkv dividing q's H (grouped-query attention: query head h reads kv head h // (H // Hkv)).

    The kernels read every input by its strides (the head dim's must be 1: as_kernel_operand) and write the outputs
    in q's layout: the transposed (B, T, H, D) views the model hands in cost no copies, in or out. Cotangents are
    cast to the operand dtype.
    """
    q, k, v, do = (as_kernel_operand(t) for t in (q, k, v, do))
    gq, gk, gv = (None if g is None else as_kernel_operand(g.to(t.dtype)) for g, t in ((gq, q), (gk, k), (gv, v)))
    B, H, TQ, D = q.shape
    HKV, TK = k.shape[1], k.shape[2]
    for name, g in (("gk", gk), ("gv", gv)):
        if g is not None and g.shape != (B, HKV, TK - k_grad_from, D):
            raise ValueError(f"swa_double_backward: {name} {tuple(g.shape)} must be (B, Hkv, Tk - k_grad_from, D) "
                             f"= {(B, HKV, TK - k_grad_from, D)}")
    has_gq, has_gk, has_gv = gq is not None, gk is not None, gv is not None
    if not (has_gq or has_gk or has_gv):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(do)
    # Every element is written by the kernels (key tiles of the masked cache store zeros): no memset needed. All
    # four in q's layout (common.empty_like_layout), as the backward's.
    out_q, out_do = (empty_like_layout(q, (B, H, TQ, D), t.dtype) for t in (q, do))
    out_k, out_v = (empty_like_layout(q, (B, HKV, TK, D), t.dtype) for t in (k, v))
    # Absent cotangents are never read (HAS_* flags); any tensor of the right dtype stands in for the pointer.
    gq_ = gq if has_gq else q
    gk_ = gk if has_gk else k
    gv_ = gv if has_gv else v
    r = torch.empty((B * H, TQ), dtype=torch.float32, device=q.device)
    u = torch.empty((B * H, TQ), dtype=torch.float32, device=q.device)
    strides = [t.stride(i) for t in (q, k, v, do, gq_, gk_, gv_) for i in range(3)]
    sizes = (H, TQ, TK, window, q_pos0, k_pos0, k_grad_from, scale * LOG2E, scale)
    common = dict(HAS_GQ=has_gq, HAS_GK=has_gk, HAS_GV=has_gv, HEAD_DIM=D, BLOCK_D=block_d(D),
                  DOT_PREC=dot_precision(q.dtype), GROUP=kv_group(q, k))

    cfg = tile_config("dbwd_ru", D, q.device, q.dtype)
    _swa_dbwd_ru_kernel[(triton.cdiv(TQ, cfg.block_m), B * H)](
        q, k, v, do, gq_, gk_, gv_, lse, delta, r, u, *strides, *sizes,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    cfg = tile_config("dbwd_row", D, q.device, q.dtype)
    _swa_dbwd_row_kernel[(triton.cdiv(TQ, cfg.block_m), B * H)](
        q, k, v, do, gq_, gk_, gv_, lse, delta, r, u, out_q, out_do, *strides, *out_q.stride()[:3], *sizes,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    cfg = tile_config("dbwd_col", D, q.device, q.dtype)
    tiles = triton.cdiv(TK, cfg.block_n)
    group = kv_group(q, k)
    nparts = group_parts(tiles * B * HKV, group, q.device, cfg.num_warps)
    grid, tile_major = column_grid(tiles, B * HKV, nparts)
    # the parts' fp32 partial sums in out_k's memory order (sum_parts adds them element by element in that order)
    part_k, part_v = ((out_k, out_v) if nparts == 1 else
                      (empty_like_layout(q, (B, HKV, TK, D), torch.float32, nparts) for _ in "kv"))
    _swa_dbwd_col_kernel[grid](
        q, k, v, do, gq_, gk_, gv_, lse, delta, r, u, part_k, part_v, *strides,
        *(part_k[0] if nparts > 1 else out_k).stride()[:3], part_k.stride(0) if nparts > 1 else 0, *sizes,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        HEADS=group // nparts, TILE_MAJOR=tile_major, **common)
    if nparts > 1:
        sum_parts(part_k, out_k), sum_parts(part_v, out_v)
    return out_q, out_k, out_v, out_do
