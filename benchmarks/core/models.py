"""Model builders for the benchmarks: the paper's shapes come from ttt_e2e/model/sizes.py (never retyped here),
the smoke-mode shapes from one tiny configuration."""
from __future__ import annotations

import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.model.sizes import paper_config

TINY_VOCAB = 258  # the byte tokenizer's vocabulary (256 bytes, BOS, EOS)

# Hugging Face configs the benchmarks convert (ttt_e2e.convert.hf; random weights, no download): name -> config.json
HF_CONFIGS = {
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5, hidden_act="silu",
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
HF_SUFFIX_LEN = 4  # the converted models' blocks with MLP'


def hf_configs(name: str, T: int, W: int) -> tuple[ModelConfig, ModelConfig]:
    """(the source's function as our model: full causal attention through SDPA, no MLP'; the converted model: window
    W, the last HF_SUFFIX_LEN blocks with MLP') of HF_CONFIGS[name] at sequence length T."""
    from dataclasses import replace

    from ttt_e2e.convert import hf

    converted = replace(hf.model_config(HF_CONFIGS[name], W, HF_SUFFIX_LEN).model, seq_length=T)
    return replace(converted, suffix_len=0, prime_mlp=False, window=None, attention_backend="sdpa"), converted


def tiny_config(variant: str, seq_length: int = 256, window: int = 64, **overrides) -> ModelConfig:
    """A toy model of the variant ("e2e", "swa", "fa") for smoke runs: the code paths of a benchmark, not its
    figures. Off the GPU, attention and the fused kernels in PyTorch ops: the Triton interpreter would take
    minutes, and the kernels have their own tests."""
    e2e = variant == "e2e"
    base = dict(vocab_size=TINY_VOCAB, n_layers=4, d_model=64, n_heads=4, mlp_width=160 if e2e else 192,
                suffix_len=2 if e2e else 0, prime_mlp=e2e, seq_length=seq_length,
                window=None if variant == "fa" else window, attention_backend="torch",
                fused_kernels=None if torch.cuda.is_available() else False)
    return ModelConfig(**{**base, **overrides})


def model_config(size: str, variant: str, seq_length: int = 8192, **overrides) -> ModelConfig:
    """The paper's `size` ("125m" ... "3b") as `variant`, or the tiny model when size is "tiny"."""
    if size == "tiny":
        return tiny_config(variant, seq_length, **overrides)
    return paper_config(size, variant, seq_length, **overrides)


def train_configs(size: str, T: int = 8192, b: int = 1024, W: int = 8192, **ttt) -> dict:
    """The two training steps RESULTS.md compares, as (ModelConfig, TTTConfig): "fa" pretraining with full
    attention (cuDNN through SDPA) and "e2e" meta-training with window W and inner mini-batch b; size: a paper
    size, "tiny", or a name of HF_CONFIGS (fa: the source's function, e2e: the converted model). `ttt` passes
    TTTConfig options (remat_*, recompute_logits) to both."""
    if size == "tiny":
        fa_model = tiny_config("fa", seq_length=T)
        e2e_model = tiny_config("e2e", seq_length=T, window=W)
    elif size in HF_CONFIGS:
        fa_model, e2e_model = hf_configs(size, T, W)
    else:
        fa_model = paper_config(size, "fa", T, attention_backend="sdpa")
        e2e_model = paper_config(size, "e2e", T, window=W)  # attention "auto": cuDNN for the prefix where W >= T
    pretrain = {k: v for k, v in ttt.items() if k == "recompute_logits"}
    return {"fa": (fa_model, TTTConfig(train_mode="pretrain", mini_batch_size=T, **pretrain)),
            "e2e": (e2e_model, TTTConfig(train_mode="meta", mini_batch_size=b, ilr_init=1.0, **ttt))}


def build(cfg: ModelConfig, ttt: TTTConfig | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
          seed: int | None = 0):
    """The Transformer of cfg, its weights drawn from `seed` (None: the global generator as it stands) in `dtype`
    (default: the current default), allocated on device directly."""
    from ttt_e2e.model.transformer import Transformer

    default = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            return Transformer(cfg, ttt) if ttt is not None else Transformer(cfg)
    finally:
        torch.set_default_dtype(default)
