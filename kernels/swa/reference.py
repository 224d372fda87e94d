"""Materialized sliding-window attention in plain PyTorch.

This is the ground truth the Triton kernels are tested against, and the fallback on a CPU without the Triton
interpreter. It builds the full Tq x Tk score matrix, so it costs O(Tq * Tk) memory: fine for tests and short
sequences, not for the real shapes (that is why the kernels exist). Every op is a plain differentiable torch op,
so double (and higher) backward come from autograd for free, in any dtype, on any device.
"""

from __future__ import annotations

import math

import torch


def swa_mask(tq: int, tk: int, window: int, q_pos0: int = 0, k_pos0: int = 0, device=None) -> torch.Tensor:
    """Boolean (Tq, Tk) visibility mask: key j is visible to query i iff q_pos - window < k_pos <= q_pos, k_pos >= 0."""
    q_pos = q_pos0 + torch.arange(tq, device=device)[:, None]
    k_pos = k_pos0 + torch.arange(tk, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window) & (k_pos >= 0)


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Grouped-query attention's keys or values (B, Hkv, T, D) as (B, n_heads, T, D): query head h reads kv head
    h // (n_heads // Hkv), the layout of Hugging Face's `repeat_kv`. The reference may copy; the kernels never do."""
    hkv = x.shape[-3]
    if hkv == n_heads:
        return x
    if hkv == 0 or n_heads % hkv:
        raise ValueError(f"grouped-query attention needs the kv heads ({hkv}) to divide the query heads ({n_heads})")
    return x.repeat_interleave(n_heads // hkv, dim=-3)


def swa_reference(q, k, v, window: int, q_pos0: int = 0, k_pos0: int = 0, scale: float | None = None):
    """o = softmax(scale * q k^T + mask) v, with the same contract as `swa_attention`. k and v may have fewer heads
    than q (grouped-query attention, `expand_kv`).

    A query row with no visible key outputs 0 (not NaN): the row's max is replaced by 0 before exp, and the
    normalizer by 1, exactly as the kernels do, so gradients stay finite too.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    k, v = expand_kv(k, q.shape[-3]), expand_kv(v, q.shape[-3])
    mask = swa_mask(q.shape[-2], k.shape[-2], window, q_pos0, k_pos0, device=q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    # Empty rows have m = -inf; exp(-inf - (-inf)) would be NaN. The max is only there for stability, any finite
    # constant gives the same softmax, so use 0 for those rows (detached: it cancels out of the result anyway).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p / denom, v).to(q.dtype)
