"""Index helpers shared by every SWA kernel: which tiles can hold a visible (query, key) pair, and the mask.

Visibility (absolute positions): q_pos - window < k_pos <= q_pos and k_pos >= 0, with q_pos = q_pos0 + i and
k_pos = k_pos0 + j. Row-parallel kernels loop over only the key tiles that `key_range` returns (or a part of them,
`part_range`, where the key range is split over several programs), column-parallel ones over the query tiles of
`query_range`; fully masked tiles (outside the band, or cache positions < 0) are
never visited. Inside a visited tile the element mask `visible` is applied.
"""

import triton
import triton.language as tl


@triton.jit
def key_range(m0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TQ, TK, WINDOW, Q_POS0, K_POS0):
    """[lo, hi) key indices that query rows [m0, m0 + BLOCK_M) can see; lo rounded down to a BLOCK_N multiple."""
    last = tl.minimum(m0 + BLOCK_M, TQ) - 1
    lo = tl.maximum(Q_POS0 + m0 - WINDOW + 1, 0) - K_POS0
    hi = Q_POS0 + last - K_POS0 + 1
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, TK)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def part_range(lo, hi, part, NPARTS, BLOCK_N: tl.constexpr):
    """Part `part` of NPARTS of the key tiles [lo, hi) (lo a tile start): consecutive whole tiles, the parts as
    even as whole tiles allow, some possibly empty. NPARTS 1: [lo, hi)."""
    tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per = tl.cdiv(tiles, NPARTS)
    a = lo + part * per * BLOCK_N
    return a, tl.minimum(hi, a + per * BLOCK_N)


@triton.jit
def query_range(n0, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, TQ, TK, WINDOW, Q_POS0, K_POS0):
    """[lo, hi) query indices that can see key rows [n0, n0 + BLOCK_N); lo rounded down to a BLOCK_M multiple.

    Empty (hi <= lo) when every key of the tile sits at a negative position (the masked part of a KV cache).
    """
    first = K_POS0 + n0
    last = K_POS0 + tl.minimum(n0 + BLOCK_N, TK) - 1
    lo = tl.maximum(first, 0) - Q_POS0
    hi = last + WINDOW - Q_POS0
    hi = tl.where(last < 0, lo, hi)
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, TQ)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def visible(q_pos, k_pos, q_valid, k_valid, WINDOW):
    """(len(q_pos), len(k_pos)) mask of visible pairs; q_valid/k_valid drop the ragged tail rows of a tile."""
    qp = q_pos[:, None]
    kp = k_pos[None, :]
    return (kp <= qp) & (kp > qp - WINDOW) & (kp >= 0) & q_valid[:, None] & k_valid[None, :]


@triton.jit
def visible_t(k_pos, q_pos, k_valid, q_valid, WINDOW):
    """Transpose of `visible`, (len(k_pos), len(q_pos)), for the column-parallel kernels (keys as rows)."""
    kp = k_pos[:, None]
    qp = q_pos[None, :]
    return (kp <= qp) & (kp > qp - WINDOW) & (kp >= 0) & k_valid[:, None] & q_valid[None, :]


@triton.jit
def tile_is_full(m0, n0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TQ, TK, WINDOW, Q_POS0, K_POS0):
    """True when every (query, key) pair of the tile is visible and in bounds: the kernels then skip the element
    mask (a dozen integer ops per score, a large share of the work in the elementwise-heavy backward passes)."""
    in_bounds = (m0 + BLOCK_M <= TQ) & (n0 + BLOCK_N <= TK)
    causal = K_POS0 + n0 + BLOCK_N - 1 <= Q_POS0 + m0
    in_window = K_POS0 + n0 > Q_POS0 + m0 + BLOCK_M - 1 - WINDOW
    return in_bounds & causal & in_window & (K_POS0 + n0 >= 0)


@triton.jit
def query_tile(Q, DO, LSE, DELTA, sqt, sdt, m0, TQ, offs_d, d_valid, BLOCK_M: tl.constexpr):
    """Query tile m0.. of one head, as every backward kernel reads it: Q, DO, LSE, DELTA already offset to the head.
    Returns (offs_m, m_valid, row_mask, q, do, lse, delta), q and do the BLOCK_D main columns (a tail's are loaded
    by the caller)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_valid = offs_m < TQ
    row_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdt + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=m_valid, other=0.0)
    return offs_m, m_valid, row_mask, q, do, lse, delta


@triton.jit
def source_tile(K, V, skt, svt, n0, N_LO, N_HI, ROT, offs_d, d_valid, BLOCK_N: tl.constexpr):
    """Key tile n0.. of one key source of the row-parallel kernels: its keys N_LO..N_HI-1 (global indices), key j
    at row (j + ROT) mod N_HI of K, V (already offset so that row j is global index j; ROT > 0 only with N_LO = 0
    and n0, ROT, N_HI multiples of BLOCK_N: a ring whose oldest key sits at row ROT). Returns (offs_n, n_valid,
    rows, k, v), k and v the BLOCK_D main columns (a tail's are loaded by the caller at `rows`)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = (offs_n >= N_LO) & (offs_n < N_HI)
    # Whole tiles wrap: rows stay contiguous, so the loads stay vectorized (a wrap per row broke that: slower dQ)
    r0 = n0 + ROT
    rows = tl.where(r0 >= N_HI, r0 - N_HI, r0) + tl.arange(0, BLOCK_N)
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + rows[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
    return offs_n, n_valid, rows, k, v


@triton.jit
def source_tile_is_full(m0, n0, N_LO, N_HI, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TQ, TK, WINDOW, Q_POS0,
                        K_POS0):
    """`tile_is_full` for a tile of one key source: also wholly inside that source's keys N_LO..N_HI-1."""
    full = tile_is_full(m0, n0, BLOCK_M, BLOCK_N, TQ, TK, WINDOW, Q_POS0, K_POS0)
    return full & (n0 >= N_LO) & (n0 + BLOCK_N <= N_HI)


@triton.jit
def source_tile_desc(KD, VD, b, h, n0, N_LO, N_HI, ROT, BASE, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """`source_tile` through TMA tensor descriptors KD, VD of (B, H, rows, D) tensors, block (1, 1, BLOCK_N,
    BLOCK_D): key j of this source at row (j - BASE + ROT) mod N_HI (BASE: the source's first global index, the
    ring as in `source_tile`). Rows outside the tensor, negative ones included, load as zeros. Returns (offs_n,
    n_valid, row, k, v), row the first row of the tile (a tail's columns are loaded by the caller at it)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = (offs_n >= N_LO) & (offs_n < N_HI)
    r0 = n0 + ROT
    row = tl.where(r0 >= N_HI, r0 - N_HI, r0) - BASE
    k = tl.reshape(KD.load([b, h, row, 0]), [BLOCK_N, BLOCK_D])
    v = tl.reshape(VD.load([b, h, row, 0]), [BLOCK_N, BLOCK_D])
    return offs_n, n_valid, row, k, v


@triton.jit
def kv_program(H, GROUP: tl.constexpr, HEADS: tl.constexpr, TILE_MAJOR: tl.constexpr):
    """(key tile, b, kv head, g0, part, b * kv heads + kv head) of a column-parallel program: it sums over the
    HEADS query heads g0.. of its kv head's group of GROUP (grouped-query attention; all of them, g0 = 0, without
    parts) and, with group parts (HEADS < GROUP: common.group_parts), writes its fp32 partial sums into slot `part`
    (int64; 0 without parts). The grid (common.column_grid): TILE_MAJOR, (batch x kv heads x parts, key tiles),
    so that every head's first key tiles start first; else (key tiles, batch x kv heads, parts)."""
    if TILE_MAJOR:
        pid_n = tl.program_id(1)
        bhk = tl.program_id(0) // (GROUP // HEADS)
        part = tl.program_id(0) % (GROUP // HEADS)
    else:
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        if HEADS < GROUP:
            part = tl.program_id(2)
        else:
            part = tl.full([], 0, tl.int32)
    b = (bhk // (H // GROUP)).to(tl.int64)
    hk = (bhk % (H // GROUP)).to(tl.int64)
    return pid_n, b, hk, part * HEADS, part.to(tl.int64), bhk.to(tl.int64)
