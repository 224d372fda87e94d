"""Tiny float64 models and data shared by the model and TTT tests."""
from __future__ import annotations

import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer


def tiny_model(seed: int = 0, std: float = 0.3, **overrides) -> Transformer:
    """A float64 model small enough for finite differences. Weights are larger than the training init (0.02) so
    that every path, the inner update included, moves the loss by much more than rounding."""
    cfg = dict(vocab_size=19, n_layers=3, d_model=16, n_heads=2, mlp_width=20, prime_mlp_width=12, suffix_len=2,
               seq_length=24, window=10)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else std))
    return model


def tiny_batch(model: Transformer, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    V, T = model.cfg.vocab_size, model.cfg.seq_length
    ids = torch.randint(0, V, (batch, T), generator=g)
    targets = torch.randint(0, V, (batch, T), generator=g)
    mask = torch.rand(batch, T, generator=g) > 0.15
    return ids, targets, mask


def meta(**overrides) -> TTTConfig:
    return TTTConfig(**{**dict(train_mode="meta", mini_batch_size=6, inner_lr=0.7, inner_grad_clip=1.0), **overrides})
