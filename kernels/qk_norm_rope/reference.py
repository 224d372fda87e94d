"""The PyTorch form of qk_norm_rope: the model's separate QK-norm and RoPE (the kernel's test oracle)."""
from __future__ import annotations

import torch

from ttt_e2e.kernels.rmsnorm.reference import rms_norm_reference
from ttt_e2e.kernels.rope.reference import rope_reference


def qk_norm_rope_reference(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           eps: float) -> torch.Tensor:
    return rope_reference(rms_norm_reference(x, w, eps), cos, sin)
