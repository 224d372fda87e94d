"""sequence_loss (the fast path) against the one-page naive loss (ttt/naive.py), loss and gradient of every
parameter, in float64, for every switch of the code path."""
import ast
import copy
from pathlib import Path

import pytest
import torch

from tiny import meta, tiny_batch, tiny_model
from ttt_e2e.config import Kernels
from ttt_e2e.ttt.meta import sequence_loss
from ttt_e2e.ttt.naive import naive_sequence_loss


def _compare(model, batch, ttt, ilr_mult=1.0, rtol=1e-10, reference=None, kernels=None):
    """Loss and meta-gradient of sequence_loss against the naive loss (of `reference`, a float64 copy, if given)."""
    reference = reference or model
    fast = sequence_loss(model, *batch, ttt, ilr_mult, kernels)
    slow = naive_sequence_loss(reference, *[None if t is None else t.cpu() for t in batch], ttt, ilr_mult)
    torch.testing.assert_close(fast.loss.double().cpu(), slow, rtol=rtol, atol=0)
    got = torch.autograd.grad(fast.loss, list(model.parameters()))
    want = torch.autograd.grad(slow, list(reference.parameters()))
    scale = max(w.abs().max().item() for w in want)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=rtol, atol=rtol * scale, msg=name)
    return fast


# (model overrides, ttt overrides): tiny_model's window 10 is not a multiple of b = 6, and spans mini-batches
CASES = {
    "meta": ({}, {}),
    "remat_inner_off": ({}, dict(remat_inner=False)),
    "remat_prefix": (dict(n_layers=4), dict(remat_prefix=True)),
    "remat_prefix_1_block": (dict(n_layers=4), dict(remat_prefix=True, remat_prefix_blocks=1)),
    "recompute_logits": ({}, dict(recompute_logits=True)),
    "recompute_logits_remat_off": ({}, dict(recompute_logits=True, remat_inner=False)),
    "eta_0": ({}, dict(inner_lr=0.0)),
    "no_clip": ({}, dict(inner_grad_clip=0.0)),
    "pretrain": ({}, dict(train_mode="pretrain")),
    "pretrain_recompute_logits": ({}, dict(train_mode="pretrain", recompute_logits=True)),
    "full_attention": (dict(window=None), {}),
    "window_below_b": (dict(window=4), {}),
    "one_suffix_block": (dict(suffix_len=1), {}),
    "untied_head_no_post_norm": (dict(tie_embeddings=False, post_norm=False, qk_norm=False), {}),
    "b_equals_T": ({}, dict(mini_batch_size=24)),
    # a Hugging Face model's shape (ttt_e2e.convert from-hf): grouped-query attention (4 query heads on 2 kv heads),
    # a head width of its own, Llama 3's RoPE scaling (its three bands: wavelengths 6.3, 29 and 135 against 8 and 32)
    "gqa_head_dim_rope_scaling": (dict(n_heads=4, n_kv_heads=2, attn_head_dim=6, rope_theta=100.0,
                                       rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=32,
                                       post_norm=False, tie_embeddings=False), {}),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", list(CASES))
def test_sequence_loss_equals_the_naive_loss(case, fused):
    """fused: the kernels on (the meta step's weight gradients deferred to one matmul per weight, model/linear.py;
    the Triton kernels themselves only take CUDA tensors) or off (every op in PyTorch)."""
    model_kw, ttt_kw = CASES[case]
    model = tiny_model(seed=5, **model_kw)
    model.use_fused_kernels(fused)
    _compare(model, tiny_batch(model, seed=6), meta(**ttt_kw), kernels=Kernels(fused, fused))


def test_the_clip_is_active_in_some_steps_and_not_others():
    model = tiny_model(seed=5)
    ttt = meta(inner_grad_clip=3.0)
    out = _compare(model, tiny_batch(model, seed=6), ttt)
    assert out.inner_grad_norm.max() > ttt.inner_grad_clip > out.inner_grad_norm.min(), out.inner_grad_norm


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_sizes_and_ilr_multiplier(batch):
    model = tiny_model(seed=2)
    _compare(model, tiny_batch(model, batch=batch, seed=3), meta(), ilr_mult=0.4)


def test_masks_without_mask_and_with_an_all_masked_mini_batch():
    model = tiny_model(seed=1)
    ids, targets, mask = tiny_batch(model, seed=2)
    _compare(model, (ids, targets, None), meta())
    mask = mask.clone()
    mask[0, 6:12] = False  # sequence 0's second mini-batch counts nothing: its l_t and its inner gradient are 0
    _compare(model, (ids, targets, mask), meta())


def test_the_triton_attention_kernels():
    """The suffix's attention (forward, backward, double backward) through the Triton kernels (the interpreter on
    a CPU), fp32, against the naive loss of the same weights in float64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = tiny_model(seed=5, d_model=32, attention_backend="torch")
    model = copy.deepcopy(reference)
    model.cfg.attention_backend = "triton"
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "triton"
    model = model.float().to(device)
    batch = [t.to(device) for t in tiny_batch(model, seed=6)]
    _compare(model, batch, meta(inner_lr=0.3), rtol=2e-5, reference=reference)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_every_kernel_on_a_gpu(mode):
    """fp32 on CUDA: attention, cross-entropy, RMSNorm, RoPE, SwiGLU gate and the SGD update through their kernels."""
    reference = tiny_model(seed=5, d_model=32)
    model = copy.deepcopy(reference).float().cuda()
    _compare(model, [t.cuda() for t in tiny_batch(model, seed=6)], meta(train_mode=mode, inner_lr=0.3), rtol=2e-5,
             reference=reference)


def test_the_naive_loss_imports_nothing_of_the_fast_code():
    tree = ast.parse(Path(__file__).parents[2].joinpath("ttt_e2e/ttt/naive.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert all(m.split(".")[0] in ("__future__", "math", "torch") for m in modules), modules
