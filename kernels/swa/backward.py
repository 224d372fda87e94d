"""Backward Triton kernels: dQ (row-parallel) and dK, dV (column-parallel), FlashAttention-2 style.

  delta = rowsum(dO * O)        (preprocess kernel, fp32)
  P = exp2(S * log2e - lse)     (recomputed per tile from the saved lse)
  dV = P^T dO ; dP = dO V^T ; dS = P * (dP - delta) ; dQ = scale dS K ; dK = scale dS^T Q

dQ and dK/dV are separate launches rather than one kernel with atomic adds into dQ: no atomics keeps the result
deterministic (the outer loop differentiates through this op again) at the cost of recomputing S and dP once more.
Head dims that are not a power of two run as two column blocks, as in the forward (forward.py).

Grouped-query attention: dQ's programs (per query head) read their kv head as the forward does; dK, dV's (per kv
head and key tile) loop over the query heads of the group, so each kv head's gradient is one program's sum,
deterministic, with no atomics; where that makes the grid short, a few programs share a group and their fp32
partial sums are added after (common.group_parts).

dQ reads its keys as the forward does (a cache, possibly a ring, then a block: forward.py). dK, dV can be
restricted to the keys from index k_grad_from on: TTT's inner gradient treats the KV cache as a
constant, and the cache's key tiles hold ~15/16 of the visible pairs of a suffix block at W = 8b.
"""

import torch
import triton
import triton.language as tl

from .common import (LOG2E, block_d, column_grid, dot_precision, empty_like_layout, group_parts, head_split, key_parts,
                     key_tile_rows, kv_group, tile_config, unroll_ring)
from .parts import sum_parts
from .tiles import (key_range, kv_program, part_range, query_range, query_tile, source_tile, source_tile_is_full,
                    tile_is_full, visible, visible_t)


@triton.jit
def _swa_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, sot, sdb, sdh, sdt, H, TQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Last query tiles first: under a causal mask they see the most keys, so the long programs start early and
    # the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < TQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _dq_tiles(q, q_t, do, do_t, lse, delta, acc, acc_t, K, V, skt, svt, lo, hi, N_LO, N_HI, ROT, m0, q_pos, m_valid,
              offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ's sum over key tiles [lo, hi) of one key source, addressed as in the forward's `_fwd_tiles`."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n, n_valid, rows, k, v = source_tile(K, V, skt, svt, n0, N_LO, N_HI, ROT, offs_d, d_valid, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if TAIL > 0:
            k_t = tl.load(K + rows[:, None] * skt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
            v_t = tl.load(V + rows[:, None] * svt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PREC)
            dp = tl.dot(do_t, tl.trans(v_t), dp, input_precision=DOT_PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if not source_tile_is_full(m0, n0, N_LO, N_HI, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
            # Masked entries (and rows with lse = -inf) may be NaN/inf here; where() makes them 0.
            p = tl.where(visible(q_pos, K_POS0 + offs_n, m_valid, n_valid, WINDOW), p, 0.0)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if TAIL > 0:
            acc_t += tl.dot(ds.to(k_t.dtype), k_t, input_precision=DOT_PREC)
    return acc, acc_t


@triton.jit
def _swa_bwd_dq_kernel(
    Q, K, V, K2, V2, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sk2b, sk2h, sk2t, sv2b, sv2h, sv2t, sdb, sdh, sdt, sgb, sgh, sgt,
    sgp, H, TQ, TK, SPLIT, ROT, WINDOW, Q_POS0, K_POS0, qk_scale, scale, NPARTS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SOURCES: tl.constexpr, GROUP: tl.constexpr,
):
    # Last query tiles first: under a causal mask they see the most keys, so the long programs start early and
    # the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    part = tl.program_id(2)  # of NPARTS: with more than one, DQ is this part's fp32 partial sum
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP  # the kv head of query head h (forward.py)
    Q += b * sqb + h * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    DO += b * sdb + h * sdh
    DQ += b * sgb + h * sgh + part.to(tl.int64) * sgp
    LSE += bh.to(tl.int64) * TQ
    DELTA += bh.to(tl.int64) * TQ

    m0 = pid_m * BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = BLOCK_D + tl.arange(0, TAIL if TAIL > 0 else 16)  # the tail columns of a split head dim
    d_valid = offs_d < HEAD_DIM
    offs_m, m_valid, row_mask, q, do, lse, delta = query_tile(Q, DO, LSE, DELTA, sqt, sdt, m0, TQ, offs_d, d_valid,
                                                              BLOCK_M)
    q_t, do_t = q, do
    if TAIL > 0:
        q_t = tl.load(Q + offs_m[:, None] * sqt + offs_t[None, :], mask=m_valid[:, None], other=0.0)
        do_t = tl.load(DO + offs_m[:, None] * sdt + offs_t[None, :], mask=m_valid[:, None], other=0.0)
    q_pos = Q_POS0 + offs_m
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, TAIL if TAIL > 0 else 16], dtype=tl.float32)

    # The key sources as in the forward (forward.py): K/V (a ring if ROT > 0), then K2/V2 with TWO_SOURCES
    lo, hi = key_range(m0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0)
    lo, hi = part_range(lo, hi, part, NPARTS, BLOCK_N)
    acc, acc_t = _dq_tiles(q, q_t, do, do_t, lse, delta, acc, acc_t, K, V, skt, svt, lo, tl.minimum(hi, SPLIT), 0,
                           SPLIT, ROT, m0, q_pos, m_valid, offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0,
                           qk_scale, BLOCK_M, BLOCK_N, TAIL, DOT_PREC)
    if TWO_SOURCES:
        K2 += b * sk2b + hk * sk2h - SPLIT * sk2t
        V2 += b * sv2b + hk * sv2h - SPLIT * sv2t
        lo2 = tl.maximum(lo, (SPLIT // BLOCK_N) * BLOCK_N)
        acc, acc_t = _dq_tiles(q, q_t, do, do_t, lse, delta, acc, acc_t, K2, V2, sk2t, sv2t, lo2, hi, SPLIT, TK, 0,
                               m0, q_pos, m_valid, offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0,
                               qk_scale, BLOCK_M, BLOCK_N, TAIL, DOT_PREC)

    tl.store(DQ + offs_m[:, None] * sgt + offs_d[None, :], (acc * scale).to(DQ.dtype.element_ty), mask=row_mask)
    if TAIL > 0:
        tl.store(DQ + offs_m[:, None] * sgt + offs_t[None, :], (acc_t * scale).to(DQ.dtype.element_ty),
                 mask=m_valid[:, None])


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, k, v, k_t, v_t, k_pos, dk, dv, dk_t, dv_t, b, h, row0, m0, n0,
               sqb, sqh, sqt, sdb, sdh, sdt, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale, offs_d, offs_t, d_valid,
               n_valid, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV (and their tail columns) += one query tile m0.. of query head h (its lse, delta rows from row0)."""
    Qh = Q + b * sqb + h * sqh
    DOh = DO + b * sdb + h * sdh
    offs_m, m_valid, _, q, do, lse, delta = query_tile(Qh, DOh, LSE + row0, DELTA + row0, sqt, sdt, m0, TQ,
                                                       offs_d, d_valid, BLOCK_M)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    if TAIL > 0:
        q_t = tl.load(Qh + offs_m[:, None] * sqt + offs_t[None, :], mask=m_valid[:, None], other=0.0)
        do_t = tl.load(DOh + offs_m[:, None] * sdt + offs_t[None, :], mask=m_valid[:, None], other=0.0)
        st = tl.dot(k_t, tl.trans(q_t), st, input_precision=DOT_PREC)
        dpt = tl.dot(v_t, tl.trans(do_t), dpt, input_precision=DOT_PREC)
    pt = tl.math.exp2(st * qk_scale - lse[None, :])
    if not tile_is_full(m0, n0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
        pt = tl.where(visible_t(k_pos, Q_POS0 + offs_m, n_valid, m_valid, WINDOW), pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    if TAIL > 0:
        dv_t += tl.dot(pt.to(do_t.dtype), do_t, input_precision=DOT_PREC)
        dk_t += tl.dot(dst.to(q_t.dtype), q_t, input_precision=DOT_PREC)
    return dk, dv, dk_t, dv_t


@triton.jit
def _swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt, sgp,
    H, TQ, TK, WINDOW, Q_POS0, K_POS0, KG0, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr,
    TILE_MAJOR: tl.constexpr,
):
    # One program per key tile from key KG0 on, of one kv head; everything is computed transposed (keys as rows)
    # so dK, dV accumulate in place, over the query heads that read this kv head (grouped-query attention: a sum
    # in a fixed order, no atomics). HEADS < GROUP: group parts (common.group_parts), program_id(2) sums HEADS of
    # them into its own fp32 slot of DK, DV (sgp apart). DK/DV row j holds key KG0 + j.
    pid_n, b, hk, g0, part, bhk = kv_program(H, GROUP, HEADS, TILE_MAJOR)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    DK += b * sgb + hk * sgh + part * sgp  # DK and DV are allocated alike: one set of strides
    DV += b * sgb + hk * sgh + part * sgp

    n0 = KG0 + pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = BLOCK_D + tl.arange(0, TAIL if TAIL > 0 else 16)  # the tail columns of a split head dim
    n_valid = offs_n < TK
    d_valid = offs_d < HEAD_DIM
    col_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + offs_n[:, None] * skt + offs_d[None, :], mask=col_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * svt + offs_d[None, :], mask=col_mask, other=0.0)
    k_t, v_t = k, v  # placeholders without a tail (never read then)
    if TAIL > 0:
        k_t = tl.load(K + offs_n[:, None] * skt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
        v_t = tl.load(V + offs_n[:, None] * svt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
    k_pos = K_POS0 + offs_n
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk_t = tl.zeros([BLOCK_N, TAIL if TAIL > 0 else 16], dtype=tl.float32)
    dv_t = tl.zeros([BLOCK_N, TAIL if TAIL > 0 else 16], dtype=tl.float32)

    lo, hi = query_range(n0, BLOCK_N, BLOCK_M, TQ, TK, WINDOW, Q_POS0, K_POS0)
    for g in range(g0, g0 + HEADS):
        for m0 in range(lo, hi, BLOCK_M):
            # the group's query heads (this part's), in order; their rows of lse, delta: (b * H + h) * TQ
            dk, dv, dk_t, dv_t = _dkdv_tile(
                Q, DO, LSE, DELTA, k, v, k_t, v_t, k_pos, dk, dv, dk_t, dv_t, b, hk * GROUP + g, (bhk * GROUP + g) * TQ,
                m0, n0, sqb, sqh, sqt, sdb, sdh, sdt, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale, offs_d, offs_t,
                d_valid, n_valid, BLOCK_M, BLOCK_N, TAIL, DOT_PREC)

    out_offs = (offs_n - KG0)[:, None] * sgt + offs_d[None, :]
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=col_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=col_mask)
    if TAIL > 0:
        out_t = (offs_n - KG0)[:, None] * sgt + offs_t[None, :]
        tl.store(DK + out_t, (dk_t * scale).to(DK.dtype.element_ty), mask=n_valid[:, None])
        tl.store(DV + out_t, dv_t.to(DV.dtype.element_ty), mask=n_valid[:, None])


def swa_backward_delta(o, do):
    """delta = rowsum(dO * O) in fp32, shape (B*H, Tq)."""
    B, H, TQ, D = o.shape
    delta = torch.empty((B * H, TQ), dtype=torch.float32, device=o.device)
    block_m = 64 if o.is_cuda else 16
    grid = (triton.cdiv(TQ, block_m), B * H)
    _swa_bwd_delta_kernel[grid](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, TQ,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=block_m,
    )
    return delta


def swa_backward(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale, k_grad_from=0):
    """(dq, dk, dv) in their inputs' dtypes and q's layout (common.empty_like_layout); dk and dv of the keys
    k_grad_from.. only."""
    dq = swa_backward_dq(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale)
    dk, dv = swa_backward_dkdv(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale, k_grad_from)
    return dq, dk, dv


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1), t.stride(2))]


def swa_backward_dq(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale, k2=None, v2=None, rot=0):
    """dq (q's dtype and layout) over the keys cat(k, k2) (k, v a ring from row rot: as in swa_forward)."""
    B, H, TQ, D = q.shape
    cfg = tile_config("bwd_dq", D, q.device, q.dtype)
    k, v, rot = unroll_ring(k, v, rot, cfg.block_n)
    split = k.shape[2]
    two = k2 is not None
    k2, v2 = (k2, v2) if two else (k, v)
    TK = split + (k2.shape[2] if two else 0)
    dq = empty_like_layout(q, q.shape)
    main, tail = head_split(D)
    grid = (triton.cdiv(TQ, cfg.block_m), B * H)
    nparts = key_parts("bwd_dq", grid[0] * grid[1], min(TK, window + cfg.block_m), cfg.block_n, q.device,
                       cfg.num_warps)
    # the parts in dq's memory order: sum_parts adds them element by element in that order
    out = dq if nparts == 1 else empty_like_layout(q, q.shape, torch.float32, parts=nparts)
    _swa_bwd_dq_kernel[(*grid, nparts)](
        q, k, v, k2, v2, do, lse, delta, out, *_strides(q, k, v, k2, v2, do, out[0] if nparts > 1 else out),
        out.stride(0) if nparts > 1 else 0, H, TQ, TK, split, rot, window, q_pos0, k_pos0, scale * LOG2E, scale,
        nparts, HEAD_DIM=D, BLOCK_D=main, TAIL=tail, DOT_PREC=dot_precision(q.dtype), TWO_SOURCES=two,
        GROUP=kv_group(q, k), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dq if nparts == 1 else sum_parts(out, dq)


def swa_backward_dkdv(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale, k_grad_from=0):
    """(dk, dv) of the keys k_grad_from.. (in k's and v's dtypes and Hkv heads, q's layout), each kv head's summed
    over the query heads of its group (in parts where the grid would be short: common.group_parts)."""
    B, H, TQ, D = q.shape
    HKV, TK = k.shape[1], k.shape[2]
    shape = (B, HKV, TK - k_grad_from, D)
    # in q's layout (the model's k and v come out of the projections as q does); dv takes dk's strides
    dk = empty_like_layout(q, shape, k.dtype)
    dv = empty_like_layout(q, shape, v.dtype)
    main, tail = head_split(D)
    cfg = tile_config("bwd_dkdv", D, q.device, q.dtype)
    group = kv_group(q, k)
    tiles = triton.cdiv(TK - k_grad_from, cfg.block_n)
    nparts = group_parts(tiles * B * HKV, group, q.device, cfg.num_warps, key_tile_rows(TQ, window, cfg.block_n))
    grid, tile_major = column_grid(tiles, B * HKV, nparts)
    # the parts' fp32 partial sums in dk's memory order (sum_parts adds them element by element in that order)
    out_k, out_v = (dk, dv) if nparts == 1 else (empty_like_layout(q, shape, torch.float32, nparts) for _ in "kv")
    _swa_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, out_k, out_v, *_strides(q, k, v, do, out_k[0] if nparts > 1 else dk),
        out_k.stride(0) if nparts > 1 else 0, H, TQ, TK, window, q_pos0, k_pos0, k_grad_from, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=main, TAIL=tail, DOT_PREC=dot_precision(q.dtype), GROUP=group, HEADS=group // nparts,
        TILE_MAJOR=tile_major, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if nparts > 1:
        sum_parts(out_k, dk), sum_parts(out_v, dv)
    return dk, dv
