"""The blocks' pre-norms hand their result to the matmuls in the compute dtype (RMSNorm.feeds_matmuls): the same
block output as casting after the norm, with the post-norms and the residual stream left in their dtypes."""
import torch
from tiny import tiny_model

from ttt_e2e.model.layers import RMSNorm


def test_pre_norms_feed_matmuls_in_the_compute_dtype():
    model = tiny_model().float()
    block = model.prefix[0]
    pre = {n for n, m in block.named_modules() if isinstance(m, RMSNorm) and m.feeds_matmuls}
    assert pre == {"pre_attn_norm", "pre_mlp_norm"}, pre  # prefix blocks have no MLP'
    assert {n for n, m in model.suffix.blocks[0].named_modules()
            if isinstance(m, RMSNorm) and m.feeds_matmuls} == {"pre_attn_norm", "pre_prime_norm", "pre_mlp_norm"}
    x = torch.randn(2, 12, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.pre_attn_norm(x).dtype == torch.bfloat16
        assert block.post_attn_norm(x).dtype == torch.float32
        got, _ = block(x)
        for name in pre:
            getattr(block, name).feeds_matmuls = False
        want, _ = block(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)  # the matmuls cast the norm's fp32 result to bf16 themselves: the same values
