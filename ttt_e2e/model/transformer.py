"""The sliding-window Transformer of docs/METHOD.md section 1: sandwich RMSNorms, SwiGLU, QK-norm, RoPE, tied head.

The last `suffix_len` blocks form `Suffix`, a module of its own so that the inner loop can call it with
`torch.func.functional_call`, substituting the inner weights (the MLP' of each suffix block) with per-sequence
tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ttt_e2e.config import Kernels, ModelConfig, TTTConfig

from .attention import Attention
from .layers import RMSNorm, SwiGLU, add_normed


def _norm(cfg: ModelConfig, on: bool) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if on else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_prime: bool):
        super().__init__()
        self.pre_attn_norm, self.post_attn_norm = _norm(cfg, cfg.pre_norm), _norm(cfg, cfg.post_norm)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_window, cfg.rope_theta, cfg.qk_norm,
                              cfg.norm_eps, cfg.attention_backend, cfg.kv_heads, cfg.head_dim, cfg.rope_scale)
        self.prime = SwiGLU(cfg.d_model, cfg.prime_width) if has_prime else None
        if has_prime:
            self.pre_prime_norm, self.post_prime_norm = _norm(cfg, cfg.pre_norm), _norm(cfg, cfg.post_norm)
        self.pre_mlp_norm, self.post_mlp_norm = _norm(cfg, cfg.pre_norm), _norm(cfg, cfg.post_norm)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width)
        for norm in (self.pre_attn_norm, getattr(self, "pre_prime_norm", None), self.pre_mlp_norm):
            if isinstance(norm, RMSNorm):  # its output only feeds the projections
                norm.feeds_matmuls = True

    # The modules of the attention half (attention_half), which come before the block's MLP' and MLP
    ATTENTION_HALF = ("pre_attn_norm", "attn", "post_attn_norm")

    def attention_half(self, x: torch.Tensor, pos0: int = 0, cache=None, first_order: bool | None = None,
                       then: nn.Module | None = None):
        """x + post_norm(attention(pre_norm(x))) and the (k, v) it attended to (see Attention.forward); with then
        (the next pre-norm), (that sum, then(sum)) in place of the sum (layers.add_normed)."""
        a, kv = self.attn(self.pre_attn_norm(x), pos0, cache, first_order)
        return add_normed(x, self.post_attn_norm, a, then), kv

    def forward(self, x: torch.Tensor, pos0: int = 0, cache=None, after_attention: bool = False):
        """after_attention: x is already attention_half's output (the caller ran it); then kv is () (no tensors:
        torch.func's auxiliary outputs hold nothing else). Each residual add also gives the next sublayer's
        pre-norm of its sum (u): one kernel for both where the norms are fused."""
        kv = ()
        pre = self.pre_prime_norm if self.prime is not None else self.pre_mlp_norm
        if after_attention:
            u = pre(x)
        else:
            (x, u), kv = self.attention_half(x, pos0, cache, then=pre)
        if self.prime is not None:
            x, u = add_normed(x, self.post_prime_norm, self.prime(u), then=self.pre_mlp_norm)
        x = add_normed(x, self.post_mlp_norm, self.mlp(u))
        return x, kv


class Suffix(nn.Module):
    """The suffix blocks and the final norm. With per-block KV caches it processes one mini-batch at a time."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, has_prime=cfg.prime_mlp) for _ in range(cfg.suffix_len))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ln_f.feeds_matmuls = True  # its output only feeds the head

    def inner_names(self) -> list[str]:
        """Names (as in named_parameters) of the inner weights phi: w13 (w1 and w3) and w2 of every MLP'."""
        return [n for n, _ in self.named_parameters() if ".prime." in n]

    def hoisted_names(self) -> list[str]:
        """Names (as in named_parameters) of the first block's attention half: what `forward(..., first_attended=
        True)` does not run. It never depends on phi (every MLP' comes after it), so the meta step runs it once
        over the whole sequence instead of once per mini-batch (ttt/meta.py)."""
        return [f"blocks.0.{n}" for n, _ in self.blocks[0].named_parameters()
                if n.split(".")[0] in Block.ATTENTION_HALF]

    def forward(self, x: torch.Tensor, pos0: int = 0, caches=None, first_attended: bool = False):
        """first_attended: x is already the first block's attention_half output (its cache entry then unused, its
        kv ())."""
        caches = caches if caches is not None else [None] * len(self.blocks)
        kvs = []
        for i, (block, cache) in enumerate(zip(self.blocks, caches)):
            x, kv = block(x, pos0, cache, after_attention=first_attended and i == 0)
            kvs.append(kv)
        return self.ln_f(x), kvs


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ttt: TTTConfig | None = None):
        """ttt: the settings the model will be trained with, checked against the architecture here so that a bad
        combination fails at construction rather than mid-run."""
        super().__init__()
        cfg.validate()
        if ttt is not None:
            ttt.validate(cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prefix = nn.ModuleList(Block(cfg, has_prime=False) for _ in range(cfg.n_prefix))
        for block in self.prefix:  # run once per sequence, outside the inner loop: first derivatives only
            block.attn.first_order = True
        self.suffix = Suffix(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self.use_fused_kernels(Kernels.of(cfg).elementwise)

    def use_fused_kernels(self, elementwise: bool) -> None:
        """On CUDA tensors: RMSNorm, RoPE and the SwiGLU gate through their Triton kernels or their PyTorch forms.
        The model's own forward only, and nothing recorded: the loss and the inner loop take the run's `Kernels`
        (config.py) as an argument, whose .elementwise this must equal (LossModule sets both from one value).
        Each kernel saves device time and costs host time, which only a CUDA graph of the step hides."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, SwiGLU)):
                m.kernel = elementwise

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            else:  # embeddings and every linear
                p.normal_(0.0, self.cfg.init_std)

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def run_prefix(self, h: torch.Tensor, remat_blocks: int = 0) -> torch.Tensor:
        """remat_blocks: the first this many prefix blocks recompute their activations in the backward."""
        for i, block in enumerate(self.prefix):
            h = checkpoint(lambda x, b=block: b(x)[0], h, use_reentrant=False) if i < remat_blocks else block(h)[0]
        return h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain (no TTT) forward over the whole sequence: logits (B, T, vocab)."""
        h = self.run_prefix(self.wte(input_ids))
        h, _ = self.suffix(h)
        return h @ self.head_weight().T
