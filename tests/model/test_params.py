"""Parameter counts of the paper's configs: E2E matches its baseline's budget (docs/METHOD.md section 5)."""
import subprocess
import sys

import pytest

from ttt_e2e.model.params import count_parameters
from ttt_e2e.model.sizes import PAPER_SIZES, VOCAB, paper_config


def _analytic(L, d, heads, mlp, suffix, prime):
    block = 4 * d * d + 3 * d * mlp + 4 * d + 2 * (d // heads)  # attention, MLP, 4 sandwich norms, QK-norm scales
    extra = suffix * (3 * d * mlp + 2 * d) if prime else 0  # MLP' and its two norms in each suffix block
    return VOCAB * d + L * block + extra + d  # tied embedding, blocks, ln_f


@pytest.mark.parametrize("size,expected_base,expected_e2e", [
    ("125m", 183_474_432, 184_363_776),
    ("1b", 1_458_246_656, 1_467_708_416),
])
def test_e2e_matches_baseline_budget(size, expected_base, expected_e2e):
    s = PAPER_SIZES[size]
    base, e2e = count_parameters(paper_config(size, "fa")), count_parameters(paper_config(size, "e2e"))
    assert base["total"] == expected_base == _analytic(s.n_layers, s.d_model, s.n_heads, s.mlp_width,
                                                       s.suffix_len, prime=False)
    assert e2e["total"] == expected_e2e == _analytic(s.n_layers, s.d_model, s.n_heads, s.e2e_mlp_width,
                                                     s.suffix_len, prime=True)
    assert e2e["inner"] == s.suffix_len * 3 * s.d_model * s.e2e_mlp_width
    assert abs(e2e["total"] / base["total"] - 1) < 0.012  # matched budgets (within 1.2% for every size)


def test_params_command_prints_every_size():
    out = subprocess.run([sys.executable, "-m", "ttt_e2e.model.params"], capture_output=True, text=True,
                         check=True).stdout
    assert "| 125m | 183,474,432 | 184,363,776 |" in out
    assert "| 1b | 1,458,246,656 | 1,467,708,416 |" in out
    assert all(f"| {size} |" in out for size in PAPER_SIZES)
