"""SwiGLU gate in PyTorch ops: the reference of the kernels (the tests differentiate it twice for the oracle of the
backward and double backward kernels), and the gate off CUDA (float64, CPU) or with the kernels off."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_gate_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y = silu(a) * b elementwise."""
    return F.silu(a) * b
