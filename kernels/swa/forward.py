"""Forward Triton kernel: flash-style online softmax over the key tiles in the window.

Saves lse (fp32, base-2 units: log2 of the row's softmax normalizer including the max) for the backward passes,
which recompute P = exp2(S * log2e * scale - lse) per tile instead of storing P.

Grouped-query attention: a program (one query tile of one query head h) reads kv head h // GROUP where it lies;
the GROUP query heads of a kv head are neighbours in the grid, so their programs share its K/V tiles in L2.

The keys may come from two tensors, a KV cache then a block (inference reads both where they lie rather than
concatenating them), the cache possibly a ring rotated by whole tiles (`_fwd_tiles`).

Where the grid (query tiles x heads) would leave SM slots idle (the 125M suffix: 12 heads x 16 tiles), each query
tile's keys are split over several programs (common.key_parts), whose normalized partial outputs and lse one more
launch merges (parts.py); dQ (backward.py) does the same with plain partial sums.

On Hopper, 16-bit keys and values in 16-byte-aligned layouts are read through TMA tensor descriptors
(common.key_descriptors; faster at the 3B prefix chunk than the pointer loads, which other inputs keep:
benchmarks/RESULTS.md).

A head dim that is not a power of two runs as two column blocks, BLOCK_D + TAIL (80 = 64 + 16, 96 = 64 + 32;
`common.head_split`): tl.dot needs power-of-two sides, and one 128-wide block would spend 37.5% of the MMA work
of head dim 80 (the 3B model's) on zero padding.
"""

import torch
import triton
import triton.language as tl

from .common import (LOG2E, dot_precision, empty_like_layout, forward_tile, head_split, key_descriptors, key_parts,
                     kv_group, unroll_ring)
from .parts import merge_forward
from .tiles import key_range, part_range, source_tile, source_tile_desc, source_tile_is_full, visible

# Read the key/value tiles through TMA tensor descriptors where their layout allows (common.key_descriptors).
USE_DESCRIPTORS = True


@triton.jit
def _fwd_tiles(q, q_t, m_i, l_i, acc, acc_t, K, V, KD, VD, KTD, VTD, b, h, BASE, skt, svt, lo, hi, N_LO, N_HI, ROT,
               m0, q_pos, m_valid, offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
               DOT_PREC: tl.constexpr, DESC: tl.constexpr):
    """The online softmax over key tiles [lo, hi) of one key source (tiles.py: source_tile), its tiles read
    through the TMA descriptors KD, VD (and KTD, VTD for a tail's columns) with DESC, else by pointers K, V."""
    for n0 in range(lo, hi, BLOCK_N):
        if DESC:
            offs_n, n_valid, row, k, v = source_tile_desc(KD, VD, b, h, n0, N_LO, N_HI, ROT, BASE, BLOCK_N, BLOCK_D)
        else:
            offs_n, n_valid, rows, k, v = source_tile(K, V, skt, svt, n0, N_LO, N_HI, ROT, offs_d, d_valid,
                                                      BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if TAIL > 0:
            if DESC:
                k_t = tl.reshape(KTD.load([b, h, row, BLOCK_D]), [BLOCK_N, TAIL])
            else:
                k_t = tl.load(K + rows[:, None] * skt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PREC)
        if not source_tile_is_full(m0, n0, N_LO, N_HI, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0):
            s = tl.where(visible(q_pos, K_POS0 + offs_n, m_valid, n_valid, WINDOW), s, float("-inf"))
        # The max of the raw scores, scaled after (qk_scale > 0): the scaling and the subtraction below are then
        # one FMA per score, not two ops (at the 3B shapes the softmax's ALU work, not the MMAs, bounds this
        # kernel; benchmarks/RESULTS.md).
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        # A row with nothing visible so far has m_new = -inf: subtract 0 instead so exp2 sees -inf, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        if TAIL > 0:
            if DESC:
                v_t = tl.reshape(VTD.load([b, h, row, BLOCK_D]), [BLOCK_N, TAIL])
            else:
                v_t = tl.load(V + rows[:, None] * svt + offs_t[None, :], mask=n_valid[:, None], other=0.0)
            acc_t = acc_t * alpha[:, None] + tl.dot(p.to(v_t.dtype), v_t, input_precision=DOT_PREC)
        m_i = m_new
    return m_i, l_i, acc, acc_t


@triton.jit
def _swa_fwd_kernel(
    Q, K, V, K2, V2, O, LSE, KD, VD, KTD, VTD, K2D, V2D, K2TD, V2TD,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sk2b, sk2h, sk2t, sv2b, sv2h, sv2t, sob, soh, sot, sop, slp,
    H, TQ, TK, SPLIT, ROT, WINDOW, Q_POS0, K_POS0, qk_scale, NPARTS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TWO_SOURCES: tl.constexpr, DESC: tl.constexpr,
    GROUP: tl.constexpr,
):
    # Last query tiles first: under a causal mask they see the most keys, so the long programs start early and
    # the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    part = tl.program_id(2)  # of NPARTS: with more than one, O and LSE are this part's fp32 partial results
    b_i = bh // H  # int32 coordinates for the descriptors
    h_i = bh % H
    hk_i = h_i // GROUP  # the kv head this query head reads (grouped-query attention; GROUP 1: h)
    b = b_i.to(tl.int64)
    h = h_i.to(tl.int64)
    hk = hk_i.to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    O += b * sob + h * soh + part.to(tl.int64) * sop
    LSE += bh.to(tl.int64) * TQ + part.to(tl.int64) * slp

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = BLOCK_D + tl.arange(0, TAIL if TAIL > 0 else 16)  # the tail columns (unused without a tail)
    m_valid = offs_m < TQ
    d_valid = offs_d < HEAD_DIM  # unsplit head dims below BLOCK_D: the pad columns load as 0
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_t = q
    if TAIL > 0:
        q_t = tl.load(Q + offs_m[:, None] * sqt + offs_t[None, :], mask=m_valid[:, None], other=0.0)
    q_pos = Q_POS0 + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, TAIL if TAIL > 0 else 16], dtype=tl.float32)

    # Keys 0..SPLIT-1 from K/V; with TWO_SOURCES, keys SPLIT..TK-1 from K2/V2 (a KV cache and the block after
    # it, read where they lie instead of concatenated). A tile across SPLIT runs in both loops, each masking the
    # other's keys. ROT: K/V is a ring of SPLIT rows whose key 0 sits at row ROT.
    lo, hi = key_range(m0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0)
    lo, hi = part_range(lo, hi, part, NPARTS, BLOCK_N)
    m_i, l_i, acc, acc_t = _fwd_tiles(
        q, q_t, m_i, l_i, acc, acc_t, K, V, KD, VD, KTD, VTD, b_i, hk_i, 0, skt, svt, lo, tl.minimum(hi, SPLIT), 0,
        SPLIT, ROT, m0, q_pos, m_valid, offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale, BLOCK_M,
        BLOCK_N, BLOCK_D, TAIL, DOT_PREC, DESC)
    if TWO_SOURCES:
        K2 += b * sk2b + hk * sk2h - SPLIT * sk2t
        V2 += b * sv2b + hk * sv2h - SPLIT * sv2t
        lo2 = tl.maximum(lo, (SPLIT // BLOCK_N) * BLOCK_N)
        m_i, l_i, acc, acc_t = _fwd_tiles(
            q, q_t, m_i, l_i, acc, acc_t, K2, V2, K2D, V2D, K2TD, V2TD, b_i, hk_i, SPLIT, sk2t, sv2t, lo2, hi,
            SPLIT, TK, 0, m0, q_pos, m_valid, offs_d, offs_t, d_valid, TQ, TK, WINDOW, Q_POS0, K_POS0, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, TAIL, DOT_PREC, DESC)

    # Rows with no visible key: l_i = 0, output 0, lse = -inf (the backward masks those rows explicitly).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = m_i + tl.math.log2(l_safe)
    tl.store(O + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    if TAIL > 0:
        tl.store(O + offs_m[:, None] * sot + offs_t[None, :], (acc_t / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_valid[:, None])
    tl.store(LSE + offs_m, lse, mask=m_valid)


def swa_forward(q, k, v, window, q_pos0, k_pos0, scale, k2=None, v2=None, rot=0):
    """o (q's shape, in q's layout: common.empty_like_layout) and lse (B*H, Tq) fp32 in base-2 units. Inputs
    already checked, head dim stride 1; k, v (and k2, v2) have Hkv heads, Hkv dividing q's H (grouped-query
    attention: query head h reads kv head h // (H // Hkv), in place).
    k2, v2: more keys/values after k, v (the keys are cat(k, k2), read in place: no concatenation). rot: k, v
    are a ring whose first key sits at row rot (the keys are cat(k.roll(-rot, 2), k2))."""
    B, H, TQ, D = q.shape
    cfg = forward_tile(TQ, B * H, D, q.device, q.dtype)
    k, v, rot = unroll_ring(k, v, rot, cfg.block_n)
    split = k.shape[2]
    two = k2 is not None
    k2, v2 = (k2, v2) if two else (k, v)
    TK = split + (k2.shape[2] if two else 0)
    o = empty_like_layout(q, (B, H, TQ, D))
    lse = torch.empty((B * H, TQ), dtype=torch.float32, device=q.device)
    main, tail = head_split(D)
    programs = triton.cdiv(TQ, cfg.block_m) * B * H
    nparts = key_parts("fwd", programs, min(TK, window + cfg.block_m), cfg.block_n, q.device, cfg.num_warps)
    o_out, lse_out = o, lse
    if nparts > 1:
        o_out = torch.empty((nparts, B, H, TQ, D), dtype=torch.float32, device=q.device)
        lse_out = torch.empty((nparts, B * H, TQ), dtype=torch.float32, device=q.device)
    descs = key_descriptors((k, v, k2, v2), cfg.block_n, main, tail) if USE_DESCRIPTORS else None
    _swa_fwd_kernel[(triton.cdiv(TQ, cfg.block_m), B * H, nparts)](
        q, k, v, k2, v2, o_out, lse_out, *(descs or [None] * 8),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k2.stride(0), k2.stride(1), k2.stride(2),
        v2.stride(0), v2.stride(1), v2.stride(2), o_out.stride(-4), o_out.stride(-3), o_out.stride(-2),
        o_out.stride(0) if nparts > 1 else 0, lse_out.stride(0) if nparts > 1 else 0,
        H, TQ, TK, split, rot, window, q_pos0, k_pos0, scale * LOG2E, nparts,
        HEAD_DIM=D, BLOCK_D=main, TAIL=tail, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PREC=dot_precision(q.dtype), TWO_SOURCES=two, DESC=descs is not None, GROUP=kv_group(q, k),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if nparts > 1:
        merge_forward(o_out, lse_out, o, lse)
    return o, lse
