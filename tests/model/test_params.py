"""Parameter counts of the paper's configs: E2E matches its baseline's budget (METHOD.md section 5)."""
import pytest

from ttt_e2e.config import ModelConfig
from ttt_e2e.model.params import count_parameters

V = 128256


def _analytic(L, d, heads, mlp, suffix, prime):
    block = 4 * d * d + 3 * d * mlp + 4 * d + 2 * (d // heads)  # attention, MLP, 4 sandwich norms, QK-norm scales
    extra = suffix * (3 * d * mlp + 2 * d) if prime else 0  # MLP' and its two norms in each suffix block
    return V * d + L * block + extra + d  # tied embedding, blocks, ln_f


@pytest.mark.parametrize("L,d,heads,base_mlp,e2e_mlp,suffix", [
    (12, 768, 12, 2048, 1664, 3),  # 125M
    (24, 2048, 32, 5376, 4352, 6),  # 1B
])
def test_e2e_matches_baseline_budget(L, d, heads, base_mlp, e2e_mlp, suffix):
    common = dict(vocab_size=V, n_layers=L, d_model=d, n_heads=heads, suffix_len=suffix, seq_length=8192, window=8192)
    base = count_parameters(ModelConfig(**common, mlp_width=base_mlp, prime_mlp=False))
    e2e = count_parameters(ModelConfig(**common, mlp_width=e2e_mlp, prime_mlp=True))
    assert base["total"] == _analytic(L, d, heads, base_mlp, suffix, prime=False)
    assert e2e["total"] == _analytic(L, d, heads, e2e_mlp, suffix, prime=True)
    assert e2e["inner"] == suffix * 3 * d * e2e_mlp
    assert abs(e2e["total"] / base["total"] - 1) < 0.01  # matched budgets
