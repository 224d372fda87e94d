"""Rotary embedding of interleaved pairs as one Triton kernel, differentiable to any order.

    from ttt_e2e.kernels.rope import rope
    q = rope(q, cos, sin)    # q (B, T, H, D), cos/sin (T, D/2) fp32 from model.layers.rope_angles

One kernel for the forward and one for each derivative instead of the PyTorch form's six (casts, concatenations,
flip, two products and a sum) and their derivatives; computed in fp32, stored in x's dtype.
"""
from __future__ import annotations

import torch

from .function import _Rope
from .reference import rope_reference

__all__ = ["rope", "rope_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """use_kernel None: the kernel for CUDA tensors of fp32/bf16/fp16, the reference otherwise."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != (x.shape[1], x.shape[-1] // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope: x (B, T, H, D) with D even and cos, sin (T, D/2) expected, got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if use_kernel is None:
        use_kernel = x.is_cuda and x.dtype in _DTYPES
    if not use_kernel:
        return rope_reference(x, cos, sin)
    return _Rope.apply(x.contiguous(), cos.float().contiguous(), sin.float().contiguous(), 1)
