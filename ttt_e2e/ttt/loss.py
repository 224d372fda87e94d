"""Next-token losses: per token, then a masked mean per (sequence, mini-batch)."""
from __future__ import annotations

import torch

from ttt_e2e.kernels.cross_entropy import cross_entropy
from ttt_e2e.model.layers import compute_dtype
from ttt_e2e.model.linear import linear

from ttt_e2e.kernels.cross_entropy.linear_ce import linear_cross_entropy


def token_losses(h: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                 recompute_logits: bool = False, kernel: bool = True) -> torch.Tensor:
    """Cross-entropy of each position, (B, T), in at least fp32: h (B, T, d) are final hidden states, head (vocab, d).
    kernel: on a GPU through the cross-entropy kernels (kernels/cross_entropy), else PyTorch's.
    recompute_logits: the same function through kernels/cross_entropy/linear_ce.py, which keeps no logits for the
    backward."""
    if recompute_logits:
        dtype = compute_dtype(h)
        loss = linear_cross_entropy(h.flatten(0, 1).to(dtype), head.to(dtype), targets.flatten())
        return loss.view(targets.shape)
    # In the matmul's dtype: the kernels read bf16 logits and reduce in fp32 (no fp32 copy). A linear map rather
    # than h @ head.T: the head's gradient comes out in the head's own (vocab, d) layout, and in the meta step its
    # 2 T / b uses form it in one go (model/linear.py).
    logits = linear(h, head)
    use_kernel = None if kernel else False
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), use_kernel=use_kernel).view(targets.shape)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the unmasked losses; a row with nothing unmasked gives 0."""
    mask = mask.to(losses.dtype)
    return (losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)
