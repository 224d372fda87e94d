"""SwiGLU gate in PyTorch ops: the reference of the kernels (the tests differentiate it twice for the oracle of the
backward and double backward kernels), and the gate off CUDA (float64, CPU) or with the kernels off."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_gate_reference(ab: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """y = silu(a) * b elementwise, a and b the two halves of ab along dim."""
    a, b = ab.chunk(2, dim)
    return F.silu(a) * b
