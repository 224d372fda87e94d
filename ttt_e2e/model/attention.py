"""The attention seam: the model reaches attention only through `attend`, which picks the backend.

One call covers the three modes the model needs, by absolute positions: query i sits at q_pos0 + i, key j at
k_pos0 + j, and key j is visible iff q_pos - window < k_pos <= q_pos (and k_pos >= 0).
  full causal:   window >= T,  q_pos0 = k_pos0 = 0
  sliding window: window W,    q_pos0 = k_pos0 = 0
  suffix:        b queries at q_pos0 = t*b against the KV cache then the block, k_pos0 = q_pos0 - len(cache)
"""
from __future__ import annotations

import torch

from .layers import RMSNorm, for_matmuls, norm_rope
from .linear import linear
from .rope import angles

BACKENDS = ("auto", "torch", "triton", "sdpa")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, q_pos0: int = 0, k_pos0: int = 0,
           backend: str = "auto", first_order: bool = False) -> torch.Tensor:
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D): grouped-query attention where Hkv divides H
    (query head h reads kv head h // (H / Hkv); K and V are never repeated here). Every backend supports double
    backward, except 'sdpa', which 'auto' picks only for a caller that promises first derivatives at most
    (first_order: the prefix blocks, outside every inner gradient) when the window covers the whole sequence: plain
    full causal attention, where PyTorch's cuDNN kernels are faster than ours (benchmarks/RESULTS.md)."""
    if backend == "auto":
        full = q_pos0 == k_pos0 == 0 and q.shape[2] == k.shape[2] and window >= k.shape[2]
        backend = ("sdpa" if first_order and full else "triton") if q.is_cuda else "torch"
    if backend == "triton":
        from ttt_e2e.kernels.swa import swa_attention as attention
    elif backend == "torch":
        from ttt_e2e.kernels.swa.reference import swa_reference as attention
    elif backend == "sdpa":
        return _sdpa_full_causal(q, k, v, window, q_pos0, k_pos0)
    else:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    return attention(q, k, v, window, q_pos0, k_pos0)


def attend_cached(q, k_cache, v_cache, k, v, *, window: int, q_pos0: int, k_pos0: int,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attend` over the cache's keys then the block's (k_pos0: the cache's first position); returns (o, keys,
    values), the concatenations. Through the Triton kernels the cache gets key gradients only where something
    differentiates w.r.t. it (not TTT's inner gradient: see kernels/swa/function.py)."""
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from ttt_e2e.kernels.swa import swa_attention_cached
        return swa_attention_cached(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0)
    keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
    return attend(q, keys, values, window=window, q_pos0=q_pos0, k_pos0=k_pos0, backend=backend), keys, values


def attend_over_cache(q, k_cache, v_cache, k, v, *, window: int, q_pos0: int, k_pos0: int, rot: int = 0,
                      backend: str = "auto") -> torch.Tensor:
    """`attend` over a constant cache's keys then the block's (inference: differentiable w.r.t. q, k, v only).
    rot: the cache is a ring whose first key (at k_pos0) sits at row rot. Through the Triton kernels the two are
    read where they lie: no concatenation of a window-long cache per call."""
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from ttt_e2e.kernels.swa import swa_attention_split
        return swa_attention_split(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0, rot=rot)
    k_cache, v_cache = k_cache.roll(-rot, 2), v_cache.roll(-rot, 2)
    keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
    return attend(q, keys, values, window=window, q_pos0=q_pos0, k_pos0=k_pos0, backend=backend)


def _sdpa_full_causal(q, k, v, window, q_pos0, k_pos0):
    """PyTorch's fused attention (FlashAttention-2 / cuDNN kernels), for the full-attention baseline: it has no
    double backward and no sliding window, so it serves only plain causal attention over a whole sequence."""
    T = q.shape[2]
    if not (q_pos0 == k_pos0 == 0 and k.shape[2] == T and window >= T):
        raise ValueError("attention backend 'sdpa' supports only full causal attention over a whole sequence "
                         f"(got window={window}, q_pos0={q_pos0}, k_pos0={k_pos0}, Tq={T}, Tk={k.shape[2]}); "
                         "use 'triton' or 'torch' for sliding windows and the TTT suffix")
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=k.shape[1] != q.shape[1])


class Attention(torch.nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int, rope_theta: float, qk_norm: bool, eps: float,
                 backend: str, n_kv_heads: int | None = None, head_dim: int | None = None,
                 rope_scaling: tuple | None = None):
        """n_kv_heads: grouped-query attention's key/value heads (None: n_heads); query head h reads kv head
        h // (n_heads / n_kv_heads). head_dim: None, d_model / n_heads. rope_scaling: model/rope.py's."""
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.window, self.rope_theta, self.rope_scaling, self.backend = window, rope_theta, rope_scaling, backend
        # q, k, v from one matrix (rows: the n_heads query heads, then the n_kv_heads key heads, then the value
        # heads): one matmul and, in the backward, one for x's gradient (in place of three and two adds): at the
        # suffix's 1K rows a d x d product is too small to fill the GPU (benchmarks/RESULTS.md)
        self.wqkv = torch.nn.Linear(d_model, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # One scale of size head_dim shared by all heads.
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else torch.nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else torch.nn.Identity()
        self.kernel = True  # RoPE through its Triton kernel on CUDA tensors (Transformer.use_fused_kernels)
        self.first_order = False  # never differentiated twice (the prefix blocks): attend may pick cuDNN

    def project(self, x: torch.Tensor, pos0: int):
        """q (B, H, T, D), k and v (B, Hkv, T, D) of x (B, T, d) at absolute positions pos0.., QK-normed and
        rotated."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        # QK-norm and RoPE in the projection's own (B, T, H + 2 Hkv, D) layout: the norm kernels read q's and k's
        # heads where they lie, the attention kernels take v (and the rotated q, k) by their strides.
        x = for_matmuls(x)
        q, k, v = linear(x, self.wqkv.weight).view(B, T, H + 2 * Hkv, self.head_dim).split((H, Hkv, Hkv), 2)
        cos, sin = angles(pos0, T, x.device, self.head_dim, self.rope_theta, self.rope_scaling)
        q, k = norm_rope(q, self.q_norm, cos, sin, self.kernel), norm_rope(k, self.k_norm, cos, sin, self.kernel)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, pos0: int = 0, cache=None, first_order: bool | None = None):
        """x (B, T, d) at absolute positions pos0.. . cache: None, or the (k, v) of earlier positions, each
        (B, Hkv, Tc, D): then returns the output and the (keys, values) it attended to (the cache then this
        block's, post-RoPE), from which the caller keeps the last W as the next cache. Or an inference cache
        object (ttt_e2e.inference.kv_cache), which holds the earlier keys itself and attends in its own way (a
        ring buffer): then the second output is this block's own (k, v). first_order: overrides self.first_order
        for this call (a caller that knows nothing differentiates it twice)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, pos0)
        if cache is not None and not isinstance(cache, tuple):
            o, kv = cache.attend(q, k, v, pos0, self.backend), (k, v)
        else:
            pos0 = int(pos0)  # the kernels take plain ints
            if cache is None:
                o = attend(q, k, v, window=self.window, q_pos0=pos0, k_pos0=pos0, backend=self.backend,
                           first_order=self.first_order if first_order is None else first_order)
                kv = (k, v)
            else:
                o, keys, values = attend_cached(q, *cache, k, v, window=self.window, q_pos0=pos0,
                                                k_pos0=pos0 - cache[0].shape[2], backend=self.backend)
                kv = (keys, values)
        return linear(o.transpose(1, 2).reshape(B, T, -1), self.wo.weight), kv
