"""Sliding-window attention with forward, backward and double backward Triton kernels.

    from ttt_e2e.kernels.swa import swa_attention, swa_reference

    o = swa_attention(q, k, v, window, q_pos0=0, k_pos0=0, scale=None)   # q (B,H,Tq,D), k/v (B,H,Tk,D)

Query i sits at position q_pos0 + i, key j at k_pos0 + j; key j is visible to query i iff
q_pos - window < k_pos <= q_pos and k_pos >= 0. On CUDA tensors (or on the CPU under TRITON_INTERPRET=1, set
before this package is imported) the Triton kernels run; elsewhere the materialized `swa_reference`.
"""

from __future__ import annotations

from .common import check_inputs, check_kernel_inputs, default_scale, use_triton
from .function import _SWAttention
from .reference import swa_mask, swa_reference

__all__ = ["swa_attention", "swa_reference", "swa_mask"]

_MAX_POS = 2**30  # positions and lengths are int32 inside the kernels


def swa_attention(q, k, v, window: int, q_pos0: int = 0, k_pos0: int = 0, scale: float | None = None):
    """Sliding-window attention o = softmax(scale * q k^T + mask) v, differentiable twice (see module doc)."""
    check_inputs(q, k, v, window, q_pos0, k_pos0)
    if not use_triton(q):
        return swa_reference(q, k, v, window, q_pos0, k_pos0, scale)
    check_kernel_inputs(q)
    tq, tk = q.shape[2], k.shape[2]
    if max(abs(q_pos0), abs(k_pos0), tq, tk) >= _MAX_POS:
        raise ValueError(f"swa_attention: positions/lengths must be below 2**30 (q_pos0={q_pos0}, k_pos0={k_pos0})")
    # A window longer than every query-key distance is full causal attention: clamp it so the kernels' int32
    # index arithmetic (k_pos + window) cannot overflow for window = huge.
    window = min(window, tq + tk + abs(q_pos0 - k_pos0) + 1)
    o, _lse = _SWAttention.apply(q, k, v, window, q_pos0, k_pos0, default_scale(q.shape[-1], scale))
    return o
