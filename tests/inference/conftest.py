"""Tiny float64 models on the CPU with the torch (materialized) attention backend: exact references."""
import pytest
import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer


def tiny_model(window=16, seq_length=48, n_layers=3, suffix_len=2, prime_mlp=True, seed=0, init_std=0.2, **more):
    cfg = ModelConfig(**{**dict(vocab_size=37, n_layers=n_layers, d_model=32, n_heads=4, mlp_width=48,
                                prime_mlp_width=40, suffix_len=suffix_len, prime_mlp=prime_mlp, seq_length=seq_length,
                                window=window, attention_backend="torch", compute_dtype="float64",
                                init_std=init_std), **more})  # large init: losses and inner gradients far from trivial
    torch.manual_seed(seed)
    return Transformer(cfg).double()


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def meta_ttt():
    # clip above the typical gradient norm here on some steps and below on others is checked in the tests
    return TTTConfig(train_mode="meta", mini_batch_size=8, inner_lr=0.5, inner_grad_clip=1.0, remat_inner=False)
