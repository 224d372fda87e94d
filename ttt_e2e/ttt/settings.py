"""The inner loop's settings: one frozen value, built once from the configs and the run's kernel choice, then
passed down whole (to every inner step, through remat, into inference's CUDA graphs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.model.transformer import Transformer


@dataclass(frozen=True, eq=False)
class InnerSettings:
    eta: float | torch.Tensor  # the inner learning rate times the ilr multiplier (a 0-d tensor in a CUDA graph)
    clip: float  # the largest global norm of each sequence's inner gradient; <= 0: no clip
    window: int  # the attention window W: the KV caches keep the last W keys
    recompute_logits: bool = False  # the head and its loss as one node that keeps no logits (linear_ce.py)
    ce_kernel: bool = True  # the cross-entropy through its Triton kernels (on CUDA tensors)
    sgd_kernel: bool = False  # the clipped SGD update through its Triton kernels (kernels/sgd/step.py)
    first_attended: bool = False  # h is already the first suffix block's attention_half output (ttt/meta.py)

    @classmethod
    def build(cls, model: Transformer, ttt: TTTConfig, kernels: Kernels, ilr_mult: float | torch.Tensor = 1.0,
              first_attended: bool = False) -> "InnerSettings":
        return cls(eta=ttt.inner_lr * ilr_mult, clip=ttt.inner_grad_clip, window=model.cfg.attention_window,
                   recompute_logits=ttt.recompute_logits, ce_kernel=kernels.cross_entropy,
                   sgd_kernel=kernels.elementwise, first_attended=first_attended)


PLAIN = InnerSettings(eta=0.0, clip=0.0, window=0)  # a loss without an update: only the defaults of the head matter
