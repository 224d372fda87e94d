"""On the GPU: the meta-gradient through the Triton kernels matches the one through the torch reference."""
import pytest
import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _grads(backend: str, dtype, seed: int):
    cfg = ModelConfig(vocab_size=512, n_layers=4, d_model=256, n_heads=4, mlp_width=384, suffix_len=2,
                      seq_length=1024, window=384, attention_backend=backend)
    ttt = TTTConfig(train_mode="meta", mini_batch_size=128, inner_lr=1.0)
    torch.manual_seed(seed)
    model = Transformer(cfg, ttt).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = sequence_loss(model, ids[:, :-1], ids[:, 1:], None, ttt)
    return out.loss.detach(), torch.autograd.grad(out.loss, list(model.parameters()))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
def test_meta_gradient_triton_matches_torch(dtype, tol):
    # fp32: Triton's fp32 dots run in tf32 (about 3e-4 relative each), compounded through two backward passes;
    # bf16: operands round at 4e-3 and the reference rounds differently, so a few 1e-2 at the whole gradient.
    seed = int(torch.randint(0, 10**6, ()))
    loss_t, grads_t = _grads("triton", dtype, seed)
    loss_r, grads_r = _grads("torch", dtype, seed)
    assert abs(loss_t.item() - loss_r.item()) <= tol * abs(loss_r.item())
    flat_t = torch.cat([g.flatten() for g in grads_t])
    flat_r = torch.cat([g.flatten() for g in grads_r])
    assert torch.isfinite(flat_t).all()
    assert _rel(flat_t, flat_r) < tol, _rel(flat_t, flat_r)
