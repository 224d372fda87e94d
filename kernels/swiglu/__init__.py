"""SwiGLU gate silu(a) * b with forward and backward Triton kernels, differentiable twice, where a and b are the
two halves of one tensor: the output of a fused (W1; W3) projection.

    from ttt_e2e.kernels.swiglu import swiglu_gate
    h = swiglu_gate(x @ w13.T)          # w13 = cat(w1, w3): silu(x w1^T) * (x w3^T); math in fp32, h in x's dtype
    h = swiglu_gate(w13 @ xt, dim=1)    # per-sequence weights (B, 2 hidden, d) @ (B, d, T): halves along dim 1

One kernel each for the forward, the backward and the double backward instead of the few, several and dozen or so
elementwise kernels of the PyTorch form (`swiglu_gate_reference`), which the meta step runs thousands of times; the
gradient of ab comes out of one kernel as one tensor (no concatenation of the halves' gradients).
"""
from __future__ import annotations

import torch

from .function import _Gate
from .reference import swiglu_gate_reference

__all__ = ["swiglu_gate", "swiglu_gate_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu_gate(ab: torch.Tensor, dim: int = -1, use_kernel: bool | None = None) -> torch.Tensor:
    """silu(a) * b for the halves a, b of ab along dim. use_kernel None: the kernels for CUDA tensors of
    fp32/bf16/fp16, the reference otherwise (float64, CPU)."""
    dim = dim % ab.dim() if ab.dim() else 0
    if ab.dim() == 0 or ab.shape[dim] % 2:
        raise ValueError(f"swiglu_gate: ab {tuple(ab.shape)} must split in two equal halves along dim {dim}")
    if use_kernel is None:
        use_kernel = ab.is_cuda and ab.dtype in _DTYPES
    if not use_kernel:
        return swiglu_gate_reference(ab, dim)
    return _Gate.apply(ab.contiguous(), dim)
