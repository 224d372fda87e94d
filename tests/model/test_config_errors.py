"""Bad settings fail at construction, with a message that names the setting."""
import pytest

from ttt_e2e.config import ConfigError, ModelConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer


@pytest.mark.parametrize("overrides,names", [
    (dict(window=0), "model.window"),
    (dict(d_model=30, n_heads=4), "model.n_heads"),
    (dict(n_layers=2, suffix_len=3), "model.suffix_len"),
    (dict(attention_backend="cuda"), "model.attention_backend"),
])
def test_bad_model_config(overrides, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        Transformer(ModelConfig(**overrides))


def test_seq_length_not_divisible_by_minibatch():
    with pytest.raises(ConfigError, match=r"model\.seq_length=100 is not divisible by ttt\.mini_batch_size=64"):
        Transformer(ModelConfig(seq_length=100), TTTConfig(mini_batch_size=64))


def test_meta_needs_inner_weights():
    with pytest.raises(ConfigError, match=r"model\.prime_mlp"):
        Transformer(ModelConfig(prime_mlp=False), TTTConfig(train_mode="meta"))


def test_remat_prefix_blocks_out_of_range():
    with pytest.raises(ConfigError, match=r"ttt\.remat_prefix_blocks must be null or in \[0, 2\]"):
        Transformer(ModelConfig(n_layers=4, suffix_len=2), TTTConfig(remat_prefix=True, remat_prefix_blocks=3))
