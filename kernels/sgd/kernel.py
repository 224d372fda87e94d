"""Triton kernels of the inner loop's clipped SGD update, one pass per tensor each.

phi (B, N) fp32 (its batch stride may be 0: phi_0 is the weights expanded), g (B, N) in the compute dtype,
scale (B,) fp32. Each program handles BLOCK elements of one sequence.
"""
import triton
import triton.language as tl


@triton.jit
def _sgd_fwd_kernel(PHI, G, OUT, OUT_C, SCALE, N, s_phi, BLOCK: tl.constexpr):
    # phi + scale g in phi's dtype, and the same rounded to the compute dtype: one read of phi and g (addcmul
    # of mixed dtypes first widens g into a new tensor, and the rounded copy is one more pass).
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(SCALE + b)
    p = tl.load(PHI + b * s_phi + offs, mask=mask, other=0.0)
    g = tl.load(G + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    nxt = p + s * g
    tl.store(OUT + b * N + offs, nxt, mask=mask)
    tl.store(OUT_C + b * N + offs, nxt.to(OUT_C.dtype.element_ty), mask=mask)


@triton.jit
def _sgd_bwd_sum_kernel(D_NEXT, D_COPY, G, D, PART, N, s_part, HAS_NEXT: tl.constexpr, HAS_COPY: tl.constexpr,
                        BLOCK: tl.constexpr):
    # d = d_next + d_copy (phi_t's cotangent: both outputs are phi_t + scale g) and this block's sum of d * g,
    # the block's share of the scale's cotangent (fixed-order partial sums: deterministic).
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_NEXT:
        d += tl.load(D_NEXT + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COPY:
        d += tl.load(D_COPY + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(D + b * N + offs, d, mask=mask)
    g = tl.load(G + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + b * s_part + pid, tl.sum(d * g, 0))  # PART: this tensor's columns of a (B, all parts) buffer


@triton.jit
def _sgd_bwd_g_kernel(D, G, DG, SCALE, TWO_DSQ, N, BLOCK: tl.constexpr):
    # g's cotangent: scale d through the update plus 2 dsq g through the clip's norm, rounded once.
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(SCALE + b)
    t = tl.load(TWO_DSQ + b)
    d = tl.load(D + b * N + offs, mask=mask, other=0.0)
    g = tl.load(G + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DG + b * N + offs, (s * d + t * g).to(DG.dtype.element_ty), mask=mask)


@triton.jit
def _sumsq_kernel(G, PART, N, s_part, BLOCK: tl.constexpr):
    # One block's share of one sequence's sum of g^2: fixed-order partial sums, summed after in a fixed order too
    # (deterministic, unlike atomics). Many small programs: the loads of one block in flight per program, and
    # enough programs to cover the latency (a loop of 8 blocks per program ran at two thirds of the bandwidth).
    pid, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(G + b * N + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(PART + b * s_part + pid, tl.sum(x * x, 0))


@triton.jit
def _clip_kernel(NORMS, ETA, SCALE, COEF, NORM, NT, B, eta, max_norm, tiny, ETA_IS_PTR: tl.constexpr,
                 CLIP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    # NORMS (NT, B): each tensor's 2-norm per sequence. Per sequence: sq = sum of their squares, the clip's scale
    # -eta min(1, max_norm / ||g||), its derivative d scale / d sq, and ||g||: what clip.clip_scale computes in a
    # dozen launches, in one.
    t = tl.arange(0, BLOCK_T)
    b = tl.arange(0, BLOCK_B)
    x = tl.load(NORMS + t[:, None] * B + b[None, :], mask=(t[:, None] < NT) & (b[None, :] < B), other=0.0)
    sq = tl.sum(x * x, 0)
    e = tl.load(ETA).to(tl.float32) if ETA_IS_PTR else eta
    if CLIP:
        norm = tl.sqrt(sq + tiny)
        nc = tl.maximum(norm, max_norm)  # = norm where the clip acts; no overflow in the lanes where it does not
        scale = -e * (max_norm / nc)
        coef = tl.where(norm >= max_norm, e * max_norm / (2.0 * nc * nc * nc), 0.0)
    else:
        scale = tl.zeros([BLOCK_B], dtype=tl.float32) - e
        coef = tl.zeros([BLOCK_B], dtype=tl.float32)
    tl.store(SCALE + b, scale, mask=b < B)
    tl.store(COEF + b, coef, mask=b < B)
    tl.store(NORM + b, tl.sqrt(sq), mask=b < B)
