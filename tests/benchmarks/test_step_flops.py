"""benchmarks/train/step_flops.py, the executed-work floor of the meta/pretrain step ratio quoted in RESULTS.md."""
import pytest
import torch

from ttt_e2e.model.sizes import paper_config
from ttt_e2e.model.transformer import Transformer

from benchmarks.core.models import HF_CONFIGS, hf_configs
from benchmarks.train import step_flops


@pytest.mark.parametrize("size", ["125m", "llama-3.2-1b"])
def test_pretrain_count_is_the_closed_form_and_meta_costs_more(size):
    """The counted pretraining step equals 6 FLOPs per matrix weight per token (the tied head once) plus 12 per
    causal (query, key) pair per query-head dim and layer, which checks the counter and the attention rescaling
    (with grouped-query attention too: a converted Llama, 32 query heads on 8 kv heads); the meta step does
    strictly more."""
    T, b = 512, 128
    r = step_flops.step_flops(size, T, b)
    cfg = hf_configs(size, T, T)[0] if size in HF_CONFIGS else paper_config(size, "fa", T)
    with torch.device("meta"):
        weights = sum(p.numel() for p in Transformer(cfg).parameters() if p.dim() >= 2)  # norm gains: no matmul
    closed = 6 * T * weights + 12 * (T * (T + 1) // 2) * cfg.n_heads * cfg.head_dim * cfg.n_layers
    assert abs(r["fa"]["total_tflop"] * 1e12 - closed) <= 1e-9 * closed, (r["fa"], closed / 1e12)
    assert r["e2e"]["attention_tflop"] > 0 and 1.2 < r["ratio"] < 3.0, r
