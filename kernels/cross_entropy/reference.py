"""Per-token cross-entropy of logits, the PyTorch form the kernels are tested against (and run on the CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (N, V), targets (N,) -> loss (N,) in at least fp32; a negative target gives 0 (ignore_index)."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits, targets.masked_fill(targets < 0, -100), reduction="none")
