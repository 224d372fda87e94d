"""SwiGLU gate silu(a) * b with forward and backward Triton kernels, differentiable twice.

    from ttt_e2e.kernels.swiglu import swiglu_gate
    h = swiglu_gate(x @ w1.T, x @ w3.T)     # elementwise; math in fp32; h in the inputs' dtype

One kernel each for the forward, the backward and the double backward instead of the few, several and dozen or so
elementwise kernels of the PyTorch form (`swiglu_gate_reference`), which the meta step runs thousands of times.
"""
from __future__ import annotations

import torch

from .function import _Gate
from .reference import swiglu_gate_reference

__all__ = ["swiglu_gate", "swiglu_gate_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu_gate(a: torch.Tensor, b: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """use_kernel None: the kernels for CUDA tensors of fp32/bf16/fp16 of equal shapes and dtypes, the reference
    otherwise (float64, CPU, broadcasting)."""
    if use_kernel is None:
        use_kernel = a.is_cuda and b.is_cuda and a.dtype in _DTYPES and a.dtype == b.dtype and a.shape == b.shape
    if not use_kernel:
        return swiglu_gate_reference(a, b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu_gate: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must match "
                         "in shape and dtype")
    return _Gate.apply(a.contiguous(), b.contiguous())
