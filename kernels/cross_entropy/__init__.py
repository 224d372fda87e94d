"""Per-token cross-entropy of (N, V) logits with Triton kernels, differentiable twice.

    from ttt_e2e.kernels.cross_entropy import cross_entropy
    loss = cross_entropy(logits, targets)   # (N,) fp32; logits stay in their dtype (bf16 under autocast)

The PyTorch form upcasts the logits to fp32 and runs log-softmax, its backward and their derivatives as a dozen
passes over (N, V) tensors; over a 128K vocabulary these were a third of the GPU time of a 125M meta step. The
kernels make one pass for the forward, one for the backward and two for the double backward.
"""
from __future__ import annotations

import torch

from .function import _CrossEntropy
from .reference import cross_entropy_reference

__all__ = ["cross_entropy", "cross_entropy_reference", "kernels_apply"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernels_apply(t: torch.Tensor) -> bool:
    """Whether the kernels take tensors like t by default: CUDA, fp32/bf16/fp16 (else the PyTorch forms)."""
    return t.is_cuda and t.dtype in _DTYPES


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
    """logits (N, V), targets (N,) in [0, V) or negative (ignored: loss 0) -> loss (N,).
    use_kernel None: the kernels for CUDA logits of fp32/bf16/fp16, the reference otherwise (float64, CPU)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits (N, V) and targets (N,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if use_kernel is None:
        use_kernel = kernels_apply(logits)
    if not use_kernel or logits.numel() == 0:  # an empty batch launches nothing
        return cross_entropy_reference(logits, targets)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    loss, _ = _CrossEntropy.apply(logits, targets.contiguous())
    return loss
