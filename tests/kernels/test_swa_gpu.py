"""SWA kernels at the model's real shapes, bf16 on a CUDA GPU, vs the materialized reference in fp32.

Tolerance (docs/METHOD.md): bf16 operands land between 1e-3 and 1e-2 in ||out - ref|| / ||ref||, so every output must
be under 1e-2. The reference runs in fp32 (TF32 off) on the same bf16-rounded inputs, ~1e-6 from exact; as a
yardstick the test also records the error of the materialized bf16 autograd (what the model would otherwise
run) and requires the kernels to be no worse than 2x that. Outputs are poisoned with NaN before the run (the
caching allocator hands back the NaN-filled block), so an element the kernels fail to write shows up as NaN.
"""

import pytest
import torch

from swa_cached import cached_reference, inner_then_outer
from ttt_e2e.kernels.swa import swa_attention, swa_attention_cached, swa_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = 1e-2
NAMES = ("o", "dq", "dk", "dv", "ggq", "ggk", "ggv", "ggdo")


def _poison_allocator(nbytes=6 << 30):
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    x.fill_(float("nan"))
    del x


def _run_all(fn, q, k, v, do, cot, window, q_pos0, k_pos0, dtype):
    q, k, v, do = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, do))
    o = fn(q, k, v, window, q_pos0, k_pos0)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    loss = sum((g * c.to(dtype)).sum() for g, c in zip((dq, dk, dv), cot))
    second = torch.autograd.grad(loss, (q, k, v, do))
    return [t.detach().float() for t in (o, dq, dk, dv) + second]


def _rel(a, b):
    assert torch.isfinite(a).all(), "non-finite output (unwritten element or NaN)"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (Tq, Tk, window, q_pos0, k_pos0): prefix SWA and full causal at 8K; the TTT suffix (b = 1024 queries against an
# 8192-key cache + the block) with a partly negative cache (early block) and a full one.
SHAPES = [
    pytest.param(8192, 8192, 2048, 0, 0, id="prefix-T8192-W2048"),
    pytest.param(8192, 8192, 8192, 0, 0, id="prefix-T8192-full"),
    pytest.param(1024, 9216, 8192, 4096, 4096 - 8192, id="suffix-b1024-W8192-early"),
    pytest.param(1024, 9216, 8192, 16384, 16384 - 8192, id="suffix-b1024-W8192"),
]


@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("TQ,TK,W,QP,KP", SHAPES)
def test_bf16_real_shapes(TQ, TK, W, QP, KP, D):
    _check_bf16(2, 2, TQ, TK, W, QP, KP, D)


# Grouped-query attention at Llama-3.2-1B's head layout (32 query heads, 8 kv heads, head dim 64) and Qwen3's (head
# dim 128): a prefix and a suffix block after a cache of W keys (Tq, Tk, window, q_pos0, k_pos0).
GQA_SHAPES = [
    pytest.param(2048, 2048, 1024, 0, 0, id="prefix-T2048-W1024"),
    pytest.param(512, 1536, 1024, 1024, 0, id="suffix-b512-W1024"),
]


@pytest.mark.parametrize("D", [64, 128], ids=["llama-3.2-1b", "qwen3"])
@pytest.mark.parametrize("TQ,TK,W,QP,KP", GQA_SHAPES)
def test_bf16_gqa_layouts(TQ, TK, W, QP, KP, D):
    _check_bf16(32, 8, TQ, TK, W, QP, KP, D)


def _check_bf16(H, HKV, TQ, TK, W, QP, KP, D):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(TQ * 7 + TK * 3 + W + QP + D + H - HKV)
    B = 1
    mk = lambda h, T: torch.randn(B, h, T, D, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(H, TQ), mk(HKV, TK), mk(HKV, TK), mk(H, TQ)
    cot = (mk(H, TQ), mk(HKV, TK), mk(HKV, TK))
    ref = _run_all(swa_reference, q, k, v, do, cot, W, QP, KP, torch.float32)
    mat = _run_all(swa_reference, q, k, v, do, cot, W, QP, KP, torch.bfloat16)
    torch.cuda.empty_cache()
    _poison_allocator()
    got = _run_all(swa_attention, q, k, v, do, cot, W, QP, KP, torch.bfloat16)
    errs = {n: _rel(a, b) for n, a, b in zip(NAMES, got, ref)}
    mat_errs = {n: _rel(a, b) for n, a, b in zip(NAMES, mat, ref)}
    print(f"\n[T{TQ}x{TK} W{W} q0={QP} H{H}/{HKV} D{D}] triton " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
          + "\n    materialized-bf16 " + " ".join(f"{n}={e:.1e}" for n, e in mat_errs.items()))
    assert all(e < TOL for e in errs.values()), errs
    assert all(errs[n] < 2 * mat_errs[n] + 1e-3 for n in NAMES), (errs, mat_errs)


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("QP", [4096, 16384], ids=["early", "full-cache"])
def test_bf16_cached_inner_gradient_then_outer(QP, D):
    """The suffix's pattern at its real shape (b = 1024 queries after the W = 8192 keys before them, fewer
    early on), bf16: the inner gradient w.r.t. the block (the kernels skip the cache's key gradients there),
    differentiated again w.r.t. everything; same tolerance and yardstick as above."""
    _check_bf16_cached(2, 2, 1024, 8192, QP, D)


@pytest.mark.parametrize("D", [64, 128], ids=["llama-3.2-1b", "qwen3"])
@pytest.mark.parametrize("QP", [512, 2048], ids=["early", "full-cache"])
def test_bf16_gqa_cached_inner_gradient_then_outer(QP, D):
    """The same with 32 query heads reading 8 kv heads, a 512-query block after up to W = 1024 cache keys."""
    _check_bf16_cached(32, 8, 512, 1024, QP, D)


def _check_bf16_cached(H, HKV, TQ, W, QP, D):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(QP + D + H - HKV)
    B = 1
    TC = min(QP, W)
    mk = lambda h, T: torch.randn(B, h, T, D, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    q, k, v, kc, vc = mk(H, TQ), mk(HKV, TQ), mk(HKV, TQ), mk(HKV, TC), mk(HKV, TC)
    cot = [mk(H, TQ), mk(H, TQ), mk(HKV, TQ), mk(HKV, TQ), mk(H, TQ)] + [mk(HKV, TC + TQ) for _ in range(2)]
    ref = inner_then_outer(cached_reference, *(t.float() for t in (q, k, v, kc, vc)), cot, W, QP)
    mat = inner_then_outer(cached_reference, q, k, v, kc, vc, cot, W, QP)
    torch.cuda.empty_cache()
    _poison_allocator()
    got = inner_then_outer(swa_attention_cached, q, k, v, kc, vc, cot, W, QP)
    names = ("q", "k", "v", "k_cache", "v_cache")
    errs = {n: _rel(a.float(), b) for n, a, b in zip(names, got, ref)}
    mat_errs = {n: _rel(a.float(), b) for n, a, b in zip(names, mat, ref)}
    print(f"\n[cached q0={QP} H{H}/{HKV} D{D}] triton " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
          + "\n    materialized-bf16 " + " ".join(f"{n}={e:.1e}" for n, e in mat_errs.items()))
    assert all(e < TOL for e in errs.values()), errs
    assert all(errs[n] < 2 * mat_errs[n] + 1e-3 for n in names), (errs, mat_errs)
