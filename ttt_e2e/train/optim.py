"""AdamW and its schedule: linear warmup over warmup_fraction of the steps, then cosine down to min_lr."""
from __future__ import annotations

import math

import torch

from ttt_e2e.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on matrices (linears, embedding) only: decaying RMSNorm scales pulls them toward 0, which
    is not a regularizer of anything; optim.decay_norms=true decays every parameter, as the reference does.
    Parameters are taken in module order so optimizer state lines up (two groups either way). fused: torch's
    one-kernel AdamW (the run's plan chooses it: plan.py)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 or cfg.decay_norms]
    no_decay = [p for p in params if not (p.dim() >= 2 or cfg.decay_norms)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, **({"fused": True} if fused else {}))


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    warmup = int(round(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + (0 if cfg.reference_schedule else 1)) / warmup
    decay_steps = max(1, total - warmup - (0 if cfg.reference_schedule else 1))
    progress = min(1.0, (step - warmup) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: OptimConfig):
    # LambdaLR multiplies each group's initial lr (= cfg.lr) by the factor; its state is just the step count.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total, cfg) / cfg.lr)
