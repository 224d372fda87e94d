"""Typed configs. Model and TTT settings live here; trainer settings extend this file.

Every check that a user can trip with a bad setting is made in `validate()`, so a model refuses to be built
with a config that would fail (or silently misbehave) later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A setting is invalid; the message names it."""


@dataclass
class ModelConfig:
    vocab_size: int = 258  # the built-in byte-level tokenizer: 256 bytes + BOS + EOS
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    mlp_width: int = 384
    prime_mlp_width: Optional[int] = None  # width of MLP' (the inner weights); None: same as mlp_width
    suffix_len: int = 1  # the last `suffix_len` blocks form the suffix
    prime_mlp: bool = True  # suffix blocks carry MLP', the weights TTT updates
    seq_length: int = 512  # training context length T
    window: Optional[int] = 128  # sliding window W; None: full causal attention over seq_length
    qk_norm: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere | torch | triton
    compute_dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, parameters' dtype elsewhere

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def prime_width(self) -> int:
        return self.prime_mlp_width or self.mlp_width

    @property
    def attention_window(self) -> int:
        """The window the attention uses: full causal is a window as long as the sequence."""
        return self.window if self.window is not None else self.seq_length

    @property
    def n_prefix(self) -> int:
        return self.n_layers - self.suffix_len

    def validate(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "mlp_width", "seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"model.window must be >= 1 (or null for full attention), got {self.window}")
        if not 0 <= self.suffix_len <= self.n_layers:
            raise ConfigError(f"model.suffix_len={self.suffix_len} must be in [0, model.n_layers={self.n_layers}]")
        if self.prime_mlp_width is not None and self.prime_mlp_width < 1:
            raise ConfigError(f"model.prime_mlp_width must be >= 1, got {self.prime_mlp_width}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"model.attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"model.compute_dtype must be auto, float32, bfloat16, float16 or float64, "
                              f"got {self.compute_dtype!r}")


@dataclass
class TTTConfig:
    train_mode: str = "meta"  # pretrain: plain next-token loss | meta: TTT-E2E inner loop inside the outer loss
    mini_batch_size: int = 64  # b: tokens per inner step
    inner_lr: float = 1.0  # eta, before the ilr multiplier
    inner_grad_clip: float = 1.0  # clip of the inner gradient's global norm (per sequence); <= 0 disables
    ilr_init: float = 0.1  # the ilr multiplier warms up linearly from this to 1 ...
    ilr_warmup_steps: int = 0  # ... over this many outer steps
    remat_inner: bool = True  # recompute each inner step in the outer backward instead of storing it
    remat_prefix: bool = False  # recompute each prefix block in the outer backward

    def ilr_multiplier(self, step: int) -> float:
        if self.ilr_warmup_steps <= 0 or step >= self.ilr_warmup_steps:
            return 1.0
        return self.ilr_init + (1.0 - self.ilr_init) * step / self.ilr_warmup_steps

    def validate(self, model: ModelConfig) -> None:
        if self.train_mode not in ("pretrain", "meta"):
            raise ConfigError(f"ttt.train_mode must be pretrain or meta, got {self.train_mode!r}")
        if self.mini_batch_size < 1:
            raise ConfigError(f"ttt.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if model.seq_length % self.mini_batch_size:
            raise ConfigError(f"model.seq_length={model.seq_length} is not divisible by "
                              f"ttt.mini_batch_size={self.mini_batch_size}")
        if self.train_mode == "meta":
            if model.suffix_len < 1:
                raise ConfigError("ttt.train_mode=meta needs model.suffix_len >= 1 (the suffix holds the inner weights)")
            if not model.prime_mlp:
                raise ConfigError("ttt.train_mode=meta needs model.prime_mlp=true (MLP' holds the inner weights)")
        if self.ilr_warmup_steps < 0:
            raise ConfigError(f"ttt.ilr_warmup_steps must be >= 0, got {self.ilr_warmup_steps}")


@dataclass
class DataConfig:
    # "stdlib": the Python standard library's own source files (on every machine, no download); otherwise a
    # Hugging Face hub dataset name, or local files/folder (.txt, .json/.jsonl, .parquet) read with `datasets`.
    source: str = "stdlib"
    name: Optional[str] = None  # hub dataset config name
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "bytes"  # "bytes": built-in byte-level; otherwise a transformers tokenizer name or local path
    cache_dir: str = "~/.cache/ttt_e2e"  # tokenized streams, memory-mapped, keyed by source + tokenizer
    val_fraction: float = 0.05  # tail of the token stream held out for validation / eval.py
    max_docs: Optional[int] = None  # cap on documents read (quick runs)
    seed: int = 0  # sampling order
