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
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    return out.loss.detach().double(), torch.cat([x.flatten() for x in grads]).double()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_meta_gradient_triton_matches_torch():
    """The oracle is the torch backend in fp32 (matmuls without tf32). Triton in fp32 (its dots run in tf32,
    about 3e-4 relative each, compounded through the double backward) must land within 5e-3 of it; Triton under
    bf16 autocast must be no less accurate than the torch backend under the same autocast, whose error is the
    rounding of bf16 itself (a few 1e-2 on the whole meta-gradient)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    seed = int(torch.randint(0, 10**6, ()))
    loss_ref, ref = _grads("torch", torch.float32, seed)
    loss_t32, t32 = _grads("triton", torch.float32, seed)
    _, t16 = _grads("triton", torch.bfloat16, seed)
    _, r16 = _grads("torch", torch.bfloat16, seed)
    assert torch.isfinite(t32).all() and torch.isfinite(t16).all()
    assert abs(loss_t32 - loss_ref) <= 1e-4 * abs(loss_ref)
    assert _rel(t32, ref) < 5e-3, _rel(t32, ref)
    err_triton, err_torch = _rel(t16, ref), _rel(r16, ref)
    print(f"meta-gradient relative error vs fp32 torch: triton fp32 {_rel(t32, ref):.2e}, "
          f"triton bf16 {err_triton:.2e}, torch bf16 {err_torch:.2e}")
    assert err_triton <= 1.25 * err_torch, (err_triton, err_torch)
