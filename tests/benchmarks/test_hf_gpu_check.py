"""benchmarks/eval/hf_gpu_check.py's greedy comparison: in fp32, parting only at a near-tie of the source's logits."""
from types import SimpleNamespace

import pytest
import torch

from benchmarks.eval.hf_gpu_check import tie_at_first_difference


class LastLogits:
    """A source whose next-token logits after any prefix are the given vector."""

    def __init__(self, logits):
        self.logits = torch.tensor(logits)

    def __call__(self, seq):
        return SimpleNamespace(logits=self.logits.expand(1, seq.shape[1], -1))


def test_equal_decodings_have_no_tie():
    assert tie_at_first_difference(LastLogits([0.0, 1.0, 2.0]), torch.zeros(1, 3, dtype=torch.long), [2, 2], [2, 2]) == 0


def test_the_gap_between_the_two_tokens_at_the_first_difference():
    src = LastLogits([0.0, 1.9999, 2.0, -5.0])
    assert abs(tie_at_first_difference(src, torch.zeros(1, 3, dtype=torch.long), [2, 2, 2], [2, 1, 3]) - 1e-4) < 1e-6
    # parting at a clear preference is not a tie (a wrong kv-head mapping or rope would part like this)
    assert tie_at_first_difference(src, torch.zeros(1, 3, dtype=torch.long), [2, 2], [3, 2]) == 7.0


def test_the_converted_model_decodes_in_fp32_on_cuda(tmp_path):
    """The inference engine autocasts as the model's compute_dtype says (auto: bf16 on CUDA); the greedy comparison
    against the fp32 source needs fp32, or bf16 rounding parts the decodings at gaps far above a near-tie."""
    pytest.importorskip("transformers")
    from benchmarks.eval.hf_gpu_check import build, converted
    from ttt_e2e.convert import from_hf
    from ttt_e2e.precision import autocast_dtype

    build("llama_gqa", tmp_path / "src")
    dst = from_hf(str(tmp_path / "src"), tmp_path / "ours", window=64, suffix_len=1)
    model = converted(dst, "torch", "cpu")
    assert autocast_dtype(model.cfg, torch.device("cuda")) is None
    assert model.cfg.attention_backend == "torch"
