"""The second launch of a row-parallel kernel whose key range was split into parts (common.key_parts), or of a
column-parallel one whose group of query heads was (common.group_parts): each part's program wrote fp32 partial
results; these add them up (dQ: a plain sum over keys; dK, dV, grad K, grad V: over query heads) or merge them by
their log-sum-exp (the forward). The parts are added in a fixed order: the result
is deterministic, as without parts.
"""

import torch
import triton
import triton.language as tl

from .common import block_d


@triton.jit
def _sum_parts_kernel(P, OUT, N, NPARTS, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(NPARTS):
        acc += tl.load(P + p * N + offs, mask=m, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _merge_forward_kernel(OP, LSEP, O, LSE, sob, soh, sot, H, TQ, NPARTS, sop, slp,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # Part p: o_p (normalized over its keys) and lse_p (base 2). o = sum_p 2^(lse_p - lse) o_p, lse = log2 sum_p
    # 2^lse_p; a part with no visible key has lse_p = -inf and weight 0, a row with none in any part keeps o = 0,
    # lse = -inf (as the one-part forward leaves it).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < TQ
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    LSEP += bh.to(tl.int64) * TQ
    OP += bh.to(tl.int64) * TQ * HEAD_DIM
    mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for p in range(NPARTS):
        mx = tl.maximum(mx, tl.load(LSEP + p * slp + offs_m, mask=m_valid, other=float("-inf")))
    m_safe = tl.where(mx == float("-inf"), 0.0, mx)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for p in range(NPARTS):
        w = tl.math.exp2(tl.load(LSEP + p * slp + offs_m, mask=m_valid, other=float("-inf")) - m_safe)
        den += w
        o = tl.load(OP + p * sop + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        acc += w[:, None] * o
    den_safe = tl.where(den == 0.0, 1.0, den)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             (acc / den_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bh.to(tl.int64) * TQ + offs_m,
             tl.where(den == 0.0, float("-inf"), m_safe + tl.math.log2(den_safe)), mask=m_valid)


def sum_parts(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = part.sum(0) in out's dtype; part (NPARTS, *out.shape) fp32; out and each part[p] dense in one
    memory order, part[p] right after part[p - 1] (the sum runs over memory, element by element)."""
    n = out.numel()
    block = 1024 if out.is_cuda else 256
    _sum_parts_kernel[(triton.cdiv(n, block),)](part, out, n, part.shape[0], BLOCK=block)
    return out


def merge_forward(o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """o (B, H, Tq, D; any strides with the head dim contiguous), lse (B*H, Tq) from the parts' o_part (P, B, H,
    Tq, D) and lse_part (P, B*H, Tq), both fp32 contiguous."""
    nparts, B, H, TQ, D = o_part.shape
    block_m = 64 if o.is_cuda else 16
    _merge_forward_kernel[(triton.cdiv(TQ, block_m), B * H)](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), o.stride(2), H, TQ, nparts, o_part.stride(0),
        lse_part.stride(0), HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=block_m)
