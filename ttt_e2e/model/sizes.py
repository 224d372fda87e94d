"""The paper's model sizes (docs/METHOD.md section 5), for tools that run without Hydra (benchmarks, parameter
accounting). The Hydra experiment configs in conf/experiment/ carry the same numbers; a test keeps them equal."""
from __future__ import annotations

from dataclasses import dataclass

from ttt_e2e.config import ModelConfig


@dataclass(frozen=True)
class Size:
    n_layers: int
    d_model: int
    n_heads: int
    mlp_width: int  # baseline (fa, swa)
    e2e_mlp_width: int  # E2E: both MLP and MLP'
    suffix_len: int


PAPER_SIZES = {
    "125m": Size(12, 768, 12, 2048, 1664, 3),
    "350m": Size(24, 1024, 16, 2816, 2304, 6),
    "760m": Size(24, 1536, 16, 4096, 3328, 6),
    "1b": Size(24, 2048, 32, 5376, 4352, 6),
    "3b": Size(32, 2560, 32, 6912, 5632, 8),
}
VOCAB, WINDOW = 128256, 8192  # Llama-3 tokenizer; sliding window W


def paper_config(size: str, variant: str, seq_length: int = 8192, **overrides) -> ModelConfig:
    """variant: e2e (TTT-E2E), swa (sliding window, no TTT) or fa (full attention)."""
    s = PAPER_SIZES[size]
    common = dict(vocab_size=VOCAB, n_layers=s.n_layers, d_model=s.d_model, n_heads=s.n_heads,
                  suffix_len=s.suffix_len, seq_length=seq_length)
    variants = {
        "e2e": dict(mlp_width=s.e2e_mlp_width, prime_mlp=True, window=WINDOW),
        "swa": dict(mlp_width=s.mlp_width, prime_mlp=False, window=WINDOW),
        "fa": dict(mlp_width=s.mlp_width, prime_mlp=False, window=None),
    }
    if variant not in variants:
        raise ValueError(f"variant must be one of {sorted(variants)}, got {variant!r}")
    return ModelConfig(**{**common, **variants[variant], **overrides})
