"""RMSNorm over each head (QK-norm) then the rotary embedding, as one Triton kernel.

    from ttt_e2e.kernels.qk_norm_rope import qk_norm_rope
    q = qk_norm_rope(q, w, cos, sin, eps)    # = rope(rms_norm(q, w, eps), cos, sin)

For the passes that nothing differentiates (inference's prefix chunks, forward-only suffix passes, decoding) and,
with first_order=True, those differentiated once (inference's inner step). Otherwise (grad mode on, e.g. the meta
step's double backward) it runs the two ops, differentiable twice (kernels/rmsnorm, kernels/rope): the same values.
"""
from __future__ import annotations

import torch

from ttt_e2e.kernels.rmsnorm import rms_norm
from ttt_e2e.kernels.rmsnorm.kernel import row_layout
from ttt_e2e.kernels.rope import rope

from .function import _QKNormRope
from .reference import qk_norm_rope_reference

__all__ = ["qk_norm_rope", "qk_norm_rope_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def qk_norm_rope(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 use_kernel: bool | None = None, first_order: bool = False) -> torch.Tensor:
    """x (B, T, H, D), w (D,), cos/sin (T, D/2). use_kernel None: the kernel for CUDA tensors of fp32/bf16/fp16.
    first_order: the caller differentiates the result once at most (the fused kernel with a backward)."""
    if x.dim() != 4 or x.shape[-1] % 2 or w.shape != x.shape[-1:] or cos.shape != (x.shape[1], x.shape[-1] // 2) \
            or sin.shape != cos.shape:
        raise ValueError(f"qk_norm_rope: x (B, T, H, D) with D even, w (D,) and cos, sin (T, D/2) expected, got x "
                         f"{tuple(x.shape)}, w {tuple(w.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if use_kernel is None:
        use_kernel = x.is_cuda and x.dtype in _DTYPES and w.dtype in _DTYPES
    if not use_kernel or (torch.is_grad_enabled() and not first_order):
        return rope(rms_norm(x, w, eps, use_kernel=use_kernel), cos, sin, use_kernel=use_kernel)
    layout = row_layout(x)
    if layout is None or layout[0] not in (1, x.shape[2]):
        x = x.contiguous()
    y, _ = _QKNormRope.apply(x, w.contiguous(), cos.float().contiguous(), sin.float().contiguous(), eps)
    return y
