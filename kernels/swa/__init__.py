"""Sliding-window attention with forward, backward and double backward Triton kernels.

    from ttt_e2e.kernels.swa import swa_attention, swa_reference

    o = swa_attention(q, k, v, window, q_pos0=0, k_pos0=0, scale=None)   # q (B,H,Tq,D), k/v (B,Hkv,Tk,D)
    o, keys, values = swa_attention_cached(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0)
    o = swa_attention_split(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0, rot=0)   # a constant cache

Query i sits at position q_pos0 + i, key j at k_pos0 + j; key j is visible to query i iff
q_pos - window < k_pos <= q_pos and k_pos >= 0. Grouped-query attention: k, v (and the caches) may have Hkv heads,
Hkv dividing H; query head h reads kv head h // (H // Hkv) (Hugging Face's repeat_kv layout), read in place (K/V
are never repeated), and the gradients of k, v come back with Hkv heads, summed over each group's query heads. On CUDA tensors (or on the CPU under TRITON_INTERPRET=1, set
before this package is imported) the Triton kernels run; elsewhere the materialized `swa_reference`.
"""

from __future__ import annotations

import torch

from .common import as_kernel_operand, check_cache, check_inputs, check_kernel_inputs, default_scale, use_triton
from .function import _SWACachedAttention, _SWAttention, _SWASplitAttention
from .reference import swa_mask, swa_reference

__all__ = ["swa_attention", "swa_attention_cached", "swa_attention_split", "swa_reference", "swa_mask"]

_MAX_POS = 2**30  # positions and lengths are int32 inside the kernels


def swa_attention(q, k, v, window: int, q_pos0: int = 0, k_pos0: int = 0, scale: float | None = None):
    """Sliding-window attention o = softmax(scale * q k^T + mask) v, differentiable twice (see module doc)."""
    check_inputs(q, k, v, window, q_pos0, k_pos0, scale)
    if not use_triton(q):
        return swa_reference(q, k, v, window, q_pos0, k_pos0, scale)
    window = _kernel_window(q, k.shape[2], window, q_pos0, k_pos0)
    o, _lse = _SWAttention.apply(q, k, v, window, q_pos0, k_pos0, default_scale(q.shape[-1], scale))
    return o


def swa_attention_cached(q, k_cache, v_cache, k, v, window: int, q_pos0: int = 0, k_pos0: int = 0,
                         scale: float | None = None):
    """Attention over cat(k_cache, k), cat(v_cache, v) (key j at k_pos0 + j, the cache first), as
    `swa_attention`; returns (o, keys, values), the concatenations included. When the cache needs no gradient
    (TTT's inner gradient, inference), the backward computes dK, dV of the block's keys only."""
    check_inputs(q, k, v, window, q_pos0, k_pos0, scale)
    check_inputs(q, k_cache, v_cache, window, q_pos0, k_pos0)
    check_cache(k_cache, k)
    if not use_triton(q):
        keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
        return swa_reference(q, keys, values, window, q_pos0, k_pos0, scale), keys, values
    room = window  # the longest cache a caller keeps (it trims to the window): the most rows a buffer needs
    window = _kernel_window(q, k_cache.shape[2] + k.shape[2], window, q_pos0, k_pos0)
    o, _lse, keys, values = _SWACachedAttention.apply(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0,
                                                      default_scale(q.shape[-1], scale), room)
    return o, keys, values


def swa_attention_split(q, k_cache, v_cache, k, v, window: int, q_pos0: int = 0, k_pos0: int = 0,
                        scale: float | None = None, rot: int = 0):
    """The output of `swa_attention_cached` with the cache a constant: the kernels read the cache's keys and the
    block's where they lie, no concatenation (inference: a prefill chunk's cache is a whole window, and so is an
    inner step's). rot: the cache is a ring whose first key (position k_pos0) sits at row rot, key j at row
    (j + rot) mod Tc, so that a step writes only its own b keys into it. Differentiable once, w.r.t. q, k, v."""
    check_inputs(q, k, v, window, q_pos0, k_pos0, scale)
    check_inputs(q, k_cache, v_cache, window, q_pos0, k_pos0)
    check_cache(k_cache, k)
    tc = k_cache.shape[2]
    if not (0 <= rot < max(tc, 1)):
        raise ValueError(f"swa_attention_split: rot must lie in [0, {tc}) for a cache of {tc} keys, got {rot}")
    if torch.is_grad_enabled() and (k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("swa_attention_split takes the cache as a constant: use swa_attention_cached where its "
                         "gradient is needed")
    if not use_triton(q):
        k_cache, v_cache = k_cache.roll(-rot, 2), v_cache.roll(-rot, 2)
        keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
        return swa_reference(q, keys, values, window, q_pos0, k_pos0, scale)
    window = _kernel_window(q, tc + k.shape[2], window, q_pos0, k_pos0)
    q, k_cache, v_cache, k, v = (as_kernel_operand(t) for t in (q, k_cache, v_cache, k, v))
    o, _lse = _SWASplitAttention.apply(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0,
                                       default_scale(q.shape[-1], scale), rot)
    return o


def _kernel_window(q, tk: int, window: int, q_pos0: int, k_pos0: int) -> int:
    check_kernel_inputs(q)
    tq = q.shape[2]
    if max(abs(q_pos0), abs(k_pos0), tq, tk) >= _MAX_POS:
        raise ValueError(f"swa_attention: positions/lengths must be below 2**30 (q_pos0={q_pos0}, k_pos0={k_pos0})")
    # A window longer than every query-key distance is full causal attention: clamp it so the kernels' int32
    # index arithmetic (k_pos + window) cannot overflow for window = huge.
    return min(window, tq + tk + abs(q_pos0 - k_pos0) + 1)
