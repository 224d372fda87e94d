"""Next-token losses: per token, then a masked mean per (sequence, mini-batch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position, (B, T), in at least fp32: h (B, T, d) are final hidden states, head (vocab, d)."""
    logits = h @ head.T
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the unmasked losses; a row with nothing unmasked gives 0."""
    mask = mask.to(losses.dtype)
    return (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)
