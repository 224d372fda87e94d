"""Sliding-window attention kernels vs the materialized float64 reference: forward, backward, double backward.

On a CPU the kernels run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1) in fp32 with 16x16 tiles;
on a GPU the same cases run compiled (fp32 operands with IEEE products). Shapes are small and ragged: lengths not
multiples of the tile, windows below/at/above the length, head dim 80 (padded tile), KV-cache offsets with
negative positions, Tq != Tk; grouped-query attention (k, v with fewer heads than q) at the end. Every case draws
fresh random inputs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (conftest.py does it too)

from ttt_e2e.kernels.swa import (swa_attention, swa_attention_cached, swa_attention_split, swa_mask,  # noqa: E402
                                 swa_reference)
from swa_cached import cached_reference, inner_then_outer  # noqa: E402
from ttt_e2e.kernels.swa import common, function  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 arithmetic against a float64 reference: observed ~3e-7; 2e-5 leaves room for long sums, and still fails on
# any indexing or masking mistake (those give errors of order 1e-2 or more).
TOL = 2e-5
_seed = [1234]


def fresh_randn(*shape, dtype=torch.float32):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def rel_err(a, b):
    """||a - b|| / ||b||, with ||b|| floored at 1: some gradients are exactly zero in exact arithmetic (window 1:
    softmax over one key has no dependence on the scores), where fp32 leaves ~1e-7 noise; the inputs are O(1) per
    element, so a real error is still many orders above the tolerance."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1.0)).item()


def test_triton_path_is_used():
    # Otherwise every comparison below would test the reference against itself.
    assert common.use_triton(torch.empty(1, device=DEVICE)), "swa kernels imported without TRITON_INTERPRET=1"


def _run_all(fn, q, k, v, do, cot, window, q_pos0, k_pos0, dtype):
    """o, (dq, dk, dv) = grad(o, dO), and grad of <cot, (dq, dk, dv)> w.r.t. (q, k, v, dO), all in `dtype`."""
    q, k, v, do = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, do))
    o = fn(q, k, v, window, q_pos0, k_pos0)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    loss = sum((g * c.to(dtype)).sum() for g, c in zip((dq, dk, dv), cot) if c is not None)
    second = torch.autograd.grad(loss, (q, k, v, do), allow_unused=True)
    second = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(second, (q, k, v, do)))
    return (o, dq, dk, dv) + second


NAMES = ("o", "dq", "dk", "dv", "ggq", "ggk", "ggv", "ggdo")

# (B, H, Tq, Tk, D, window, q_pos0, k_pos0)
CASES = [
    pytest.param(2, 3, 37, 37, 32, 10, 0, 0, id="prefix-T37-W10"),
    pytest.param(1, 2, 37, 37, 32, 37, 0, 0, id="prefix-T37-W=T"),
    pytest.param(1, 2, 37, 37, 32, 1000, 0, 0, id="prefix-T37-full-causal"),
    pytest.param(1, 2, 33, 33, 16, 1, 0, 0, id="prefix-W1-diagonal-only"),
    pytest.param(1, 2, 29, 29, 80, 12, 0, 0, id="prefix-D80"),
    # TTT suffix: b queries at t*b against W cache keys + the block, cache starting at q_pos0 - W.
    pytest.param(1, 1, 70, 70, 96, 30, 0, 0, id="prefix-T70-W30-D96-interior-tiles"),
    pytest.param(1, 1, 45, 45, 128, 17, 0, 0, id="prefix-D128"),
    pytest.param(2, 2, 20, 44, 32, 24, 20, -4, id="suffix-some-cache-negative"),
    pytest.param(1, 2, 20, 44, 32, 24, 0, -24, id="suffix-first-block-cache-all-negative"),
    pytest.param(1, 2, 20, 44, 64, 24, 60, 36, id="suffix-full-cache-D64"),
    pytest.param(1, 2, 40, 64, 32, 100, 0, -24, id="negative-cache-window-beyond-everything"),
    pytest.param(1, 1, 18, 43, 80, 25, 7, -18, id="suffix-D80-ragged"),
    pytest.param(1, 2, 20, 45, 16, 16, 30, 5, id="tq-ne-tk-offsets"),
]


@pytest.mark.parametrize("B,H,TQ,TK,D,W,QP,KP", CASES)
def test_fwd_bwd_double_bwd_vs_reference(B, H, TQ, TK, D, W, QP, KP):
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D)
    do = fresh_randn(B, H, TQ, D)
    cot = (fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D))
    got = _run_all(swa_attention, q, k, v, do, cot, W, QP, KP, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, QP, KP, torch.float64)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("scale", [0.05, 2.3])
def test_explicit_scale(scale):
    """A scale other than 1/sqrt(D), far on either side of it: the forward takes each row's max before scaling."""
    B, H, TQ, TK, D, W, QP, KP = 1, 2, 30, 41, 32, 19, 11, 0
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D)
    do = fresh_randn(B, H, TQ, D)
    cot = (fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D))
    with_scale = lambda f: lambda *a: f(*a, scale=scale)  # noqa: E731
    got = _run_all(with_scale(swa_attention), q, k, v, do, cot, W, QP, KP, torch.float32)
    ref = _run_all(with_scale(swa_reference), q, k, v, do, cot, W, QP, KP, torch.float64)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("used", [("q",), ("k",), ("v",), ("q", "v")])
def test_double_backward_with_missing_cotangents(used):
    # Only some of dq, dk, dv enter the loss: the unused cotangents reach the kernels as None.
    B, H, TQ, TK, D, W, QP, KP = 1, 2, 21, 40, 32, 22, 19, -3
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D)
    do = fresh_randn(B, H, TQ, D)
    cot = tuple(fresh_randn(*x.shape) if n in used else None for n, x in zip("qkv", (q, k, v)))
    got = _run_all(swa_attention, q, k, v, do, cot, W, QP, KP, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, QP, KP, torch.float64)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref) if b.norm() > 0}
    assert all(e < TOL for e in errs.values()), errs
    for n, a, b in zip(NAMES, got, ref):
        if b.norm() == 0:
            assert a.abs().max() == 0, n


def _layout(kind, B, H, T, D):
    """A (B, H, T, D) tensor laid out as the model's transposed (B, T, H, D) view, contiguous, or rows T of a
    longer (B, H, T + 5, D) tensor: strides that differ in every dim but the last."""
    if kind == "bthd":
        return fresh_randn(B, T, H, D).transpose(1, 2)
    if kind == "rows":
        return fresh_randn(B, H, T + 5, D)[:, :, 2:T + 2]
    return fresh_randn(B, H, T, D)


@pytest.mark.parametrize("layouts", [("bthd",) * 7, ("bthd", "plain", "rows", "bthd", "plain", "rows", "bthd"),
                                     ("rows", "bthd", "plain", "rows", "bthd", "plain", "rows")],
                         ids=["model", "mixed", "mixed2"])
def test_non_contiguous_inputs(layouts):
    # The model's layout: (B, T, H, D) viewed as (B, H, T, D); and every input (q, k, v, dO, and the cotangents
    # of dq, dk, dv) with strides of its own, which the double backward reads as they are
    B, H, T, D, W = 2, 3, 27, 32, 9
    q, k, v, do, *cot = (_layout(kind, B, H, T, D) for kind in layouts)
    got = _run_all(swa_attention, q, k, v, do, cot, W, 0, 0, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, 0, 0, torch.float64)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs


@pytest.mark.parametrize("nparts", [1, 3])
@pytest.mark.parametrize("kind", ["bthd", "plain"])
def test_outputs_in_the_layout_of_q(monkeypatch, nparts, kind):
    """o, dq, dk, dv and the double backward's four outputs come out in q's memory order (the model's (B, T, H, D)
    one: its reshape to (B, T, H * D) is then a view), with key parts too (their partial dq in the same order), and
    equal the reference."""
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", nparts)
    B, H, T, D, W = 2, 3, 40, 32, 25
    q, k, v, do = (_layout(kind, B, H, T, D).requires_grad_() for _ in range(4))
    cot = [fresh_randn(B, H, T, D) for _ in range(3)]

    def run(attn, dtype):
        q_, k_, v_, do_ = (t.to(dtype) for t in (q, k, v, do))
        o = attn(q_, k_, v_, W)
        grads = torch.autograd.grad(o, (q, k, v), do_, create_graph=True)
        # the double backward's outputs: gradients of <cot, (dq, dk, dv)> w.r.t. q, k, v, dO
        return (o, *grads, *torch.autograd.grad(grads, (q, k, v, do), [c.to(dtype) for c in cot]))

    got, want = run(swa_attention, torch.float32), run(swa_reference, torch.float64)
    for name, a, b in zip(("o", "dq", "dk", "dv", "gq", "gk", "gv", "gdo"), got, want):
        assert a.stride() == q.stride(), (name, a.stride(), q.stride())
        assert rel_err(a, b) < TOL, name


def test_rows_with_no_visible_key_give_zero_not_nan():
    # Keys start at position 5: queries 0..4 see nothing. Output 0 there, all gradients finite and correct.
    B, H, TQ, TK, D, W = 1, 2, 12, 12, 16, 4
    q, k, v, do = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TQ, D)
    cot = (fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D))
    got = _run_all(swa_attention, q, k, v, do, cot, W, 0, 5, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, 0, 5, torch.float64)
    assert got[0][:, :, :5].abs().max() == 0
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs


def test_torch_func_grad_of_grad():
    B, H, TQ, TK, D, W, QP, KP = 1, 2, 19, 35, 16, 20, 16, -4
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TK, D), fresh_randn(B, H, TK, D)
    c = fresh_randn(B, H, TQ, D)
    c2 = fresh_randn(B, H, TQ, D)

    def make(fn):
        def inner(q_, k_, v_):  # scalar, its gradient w.r.t. q is the "inner gradient" of TTT
            return (fn(q_, k_, v_, W, QP, KP) * c.to(q_.dtype)).sum()

        def outer(q_, k_, v_):  # a functional of the inner gradient, differentiated again
            gq, gk = torch.func.grad(inner, argnums=(0, 1))(q_, k_, v_)
            return (gq * c2.to(q_.dtype)).sum() + gk.square().sum()

        return torch.func.grad(outer, argnums=(0, 1, 2))

    got = make(swa_attention)(q, k, v)
    ref = make(swa_reference)(q.double(), k.double(), v.double())
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert all(e < TOL for e in errs), errs


# --- attention over a KV cache then a block: TTT's suffix ---------------------------------------------------------

# (B, H, Tq, Tc, D, window, q_pos0); the cache's first key sits at q_pos0 - Tc
CACHED = [
    pytest.param(1, 2, 13, 21, 16, 20, 21, id="cache-21-ragged-boundary"),
    pytest.param(2, 1, 19, 35, 32, 24, 10, id="cache-partly-negative"),
    pytest.param(1, 2, 16, 32, 16, 48, 32, id="tile-aligned-boundary-window-beyond-cache"),
    pytest.param(1, 1, 9, 40, 80, 30, 100, id="D80"),
]


@pytest.mark.parametrize("B,H,TQ,TC,D,W,QP", CACHED)
def test_cached_attention_inner_gradient_then_outer(monkeypatch, B, H, TQ, TC, D, W, QP):
    """The kernels (which give dK, dV of the block's keys only to the inner gradient) against the reference."""
    starts = []
    backward = function.swa_backward
    monkeypatch.setattr(function, "swa_backward", lambda *a: starts.append(a[-1]) or backward(*a))
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D)
    kc, vc = fresh_randn(B, H, TC, D), fresh_randn(B, H, TC, D)
    cot = [fresh_randn(B, H, TQ, D) for _ in range(5)] + [fresh_randn(B, H, TC + TQ, D) for _ in range(2)]
    got = inner_then_outer(swa_attention_cached, q, k, v, kc, vc, cot, W, QP)
    ref = inner_then_outer(cached_reference, *(t.double() for t in (q, k, v, kc, vc)), cot, W, QP)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert all(e < TOL for e in errs), errs
    assert TC in starts and 0 in starts, starts  # the inner backward skipped the cache, the outer one did not


@pytest.mark.parametrize("used", ["v", "k", "q"])
def test_cached_attention_with_one_inner_gradient_used(used):
    """Only one of the inner gradients gq, gk, gv enters the outer loss (the others' cotangents reach the double
    backward as None) while gK, gV cover the block's keys only."""
    B, H, TQ, TC, D, W, QP = 1, 2, 13, 21, 16, 20, 21
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D)
    kc, vc = fresh_randn(B, H, TC, D), fresh_randn(B, H, TC, D)
    cot = [fresh_randn(B, H, TQ, D)] + [fresh_randn(B, H, TQ, D) if n == used else None for n in "qkv"]
    cot += [None, None, None]
    got = inner_then_outer(swa_attention_cached, q, k, v, kc, vc, cot, W, QP)
    ref = inner_then_outer(cached_reference, *(t.double() for t in (q, k, v, kc, vc)), cot, W, QP)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert all(e < TOL for e in errs), errs


def test_cached_attention_chain_appends_to_one_buffer(monkeypatch):
    """Mini-batches in a row, each one's keys the next one's cache (the meta step's pattern): a block is written
    after the cache in the buffer that holds it while there is room (a spy counts the buffers made), a keys view
    once returned never changes, and the outputs, the returned keys and the gradients (each block's inner
    gradient, then the outer gradient of everything) match the concatenating reference. A second call with an
    earlier cache gets a buffer of its own."""
    made = []
    real = function._new_buffer
    monkeypatch.setattr(function, "_new_buffer", lambda *a: made.append(1) or real(*a))
    B, H, b, D, W, n = 1, 2, 8, 16, 20, 4  # keys grow 8 -> 32 rows; a buffer holds min(2 (cache + b), W + b)
    qs, ks, vs = ([fresh_randn(B, H, b, D) for _ in range(n)] for _ in range(3))
    cot = [[fresh_randn(B, H, b, D) for _ in range(4)] for _ in range(n)]
    last_cot = fresh_randn(B, H, n * b, D)

    def chain(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in qs + ks + vs]
        q, k, v = leaves[:n], leaves[n:2 * n], leaves[2 * n:]
        keys, values, total, seen = k[0], v[0], 0, []
        for t in range(1, n):
            o, keys, values = fn(q[t], keys, values, k[t], v[t], W, t * b, 0)
            seen.append((keys, values))
            inner = torch.autograd.grad((o * cot[t][0].to(dtype)).sum(), (q[t], k[t], v[t]), create_graph=True)
            total = total + (o * cot[t][0].to(dtype)).sum()
            total = total + sum((g * c.to(dtype)).sum() for g, c in zip(inner, cot[t][1:]))
        total = total + (keys * last_cot.to(dtype)).sum() + (values * last_cot.to(dtype)).sum()
        grads = torch.autograd.grad(total, leaves[1:])  # q[0]: the first block's queries attend in no call here
        return [x.detach().clone() for x, _ in seen], grads, (q, k, v, seen)

    got_keys, got_grads, (q, k, v, seen) = chain(swa_attention_cached, torch.float32)
    assert len(made) == 2, made  # mini-batch 2 appended to mini-batch 1's buffer; 3 found no room
    ref_keys, ref_grads, _ = chain(lambda *a: cached_reference(*a[:5], *a[5:]), torch.float64)
    for a, r in zip(got_keys, ref_keys):
        assert torch.equal(a.double(), r.to(torch.float32).double())
    errs = [rel_err(a, r) for a, r in zip(got_grads, ref_grads)]
    assert all(e < TOL for e in errs), errs
    # mini-batch 2 again, on mini-batch 1's keys (as a recomputation would): a buffer of its own
    with torch.no_grad():
        o2, keys2, _ = swa_attention_cached(q[2], *seen[0], fresh_randn(B, H, b, D), v[2], W, 2 * b, 0)
    assert len(made) == 3 and torch.equal(seen[1][0], got_keys[1]) and torch.equal(keys2[:, :, :2 * b], seen[0][0])
    del seen, keys2, o2
    assert not function._BUFFERS  # a buffer dies with its last view (no reference cycle keeps it)


def test_cached_attention_forward_and_bad_cache():
    q, k, v = fresh_randn(1, 2, 10, 16), fresh_randn(1, 2, 10, 16), fresh_randn(1, 2, 10, 16)
    kc, vc = fresh_randn(1, 2, 7, 16), fresh_randn(1, 2, 7, 16)
    o, keys, values = swa_attention_cached(q, kc, vc, k, v, 12, 7, 0)
    ref = cached_reference(q, kc, vc, k, v, 12, 7, 0)
    assert rel_err(o, ref[0]) < TOL and torch.equal(keys, ref[1]) and torch.equal(values, ref[2])
    with pytest.raises(ValueError, match="batch and head dim"):
        swa_attention_cached(q, fresh_randn(1, 2, 7, 32), fresh_randn(1, 2, 7, 32), k, v, 12, 7, 0)
    with pytest.raises(ValueError, match="dtype mismatch"):
        swa_attention_cached(q, kc.double(), vc, k, v, 12, 7, 0)


# (B, H, Tq, Tc, D, window, q_pos0): attention over a constant cache and a block read where they lie (inference)
SPLIT = [
    pytest.param(1, 2, 16, 32, 16, 32, 32, id="aligned-cache-window-W"),  # prefill in chunks of W
    pytest.param(2, 1, 13, 21, 32, 20, 21, id="boundary-inside-a-tile"),
    # a tile across the cache/block boundary that is otherwise wholly visible: each source must still mask it
    pytest.param(1, 1, 32, 24, 16, 64, 24, id="visible-tile-across-the-boundary"),
    pytest.param(1, 2, 19, 35, 16, 24, 10, id="cache-partly-negative"),
    pytest.param(1, 1, 9, 40, 80, 30, 100, id="D80-split-head"),
    pytest.param(1, 2, 7, 0, 32, 5, 0, id="empty-cache"),
    pytest.param(1, 2, 1, 23, 16, 9, 23, id="one-query"),
    pytest.param(1, 1, 40, 16, 16, 70, 16, id="window-beyond-everything"),
    # the inference step's rings (W = Tc, b = 16, a whole number of 16-row tiles): early (positions below 0), later
    pytest.param(1, 2, 16, 48, 16, 48, 16, id="ring-early"),
    pytest.param(1, 1, 16, 48, 80, 48, 96, id="ring-D80"),
]


def _ring(t, rot):
    """The cache t (position order) stored as a ring whose first key sits at row rot."""
    return t.roll(rot, 2)


@pytest.mark.parametrize("B,H,TQ,TC,D,W,QP", SPLIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_forward_vs_reference(B, H, TQ, TC, D, W, QP, dtype):
    q, k, v = (fresh_randn(B, H, TQ, D, dtype=dtype) for _ in range(3))
    kc, vc = fresh_randn(B, H, TC, D, dtype=dtype), fresh_randn(B, H, TC, D, dtype=dtype)
    ref = cached_reference(*(t.double() for t in (q, kc, vc, k, v)), W, QP, QP - TC)[0]
    # fp16 operands: inputs rounded to 1e-3 relative, fp32 accumulation; a misplaced key is off by O(1)
    tol = TOL if dtype == torch.float32 else 2e-3
    # a ring from row rot: rotated in the kernels by whole 16-row tiles (the interpreter's), else rolled first
    for rot in sorted({0, TC // 3, max(TC - 1, 0)} | set(range(16, TC, 16) if TC % 16 == 0 else [])):
        with torch.no_grad():
            o = swa_attention_split(q, _ring(kc, rot), _ring(vc, rot), k, v, W, QP, QP - TC, rot=rot)
        assert rel_err(o, ref) < tol, rot


@pytest.mark.parametrize("B,H,TQ,TC,D,W,QP", SPLIT)
def test_split_gradient_vs_reference(B, H, TQ, TC, D, W, QP):
    """The inner gradient's pattern: dq, dk, dv of the block (the cache a constant), for a ring, through torch.func
    as the inference step takes it."""
    q, k, v, do = (fresh_randn(B, H, TQ, D) for _ in range(4))
    kc, vc = fresh_randn(B, H, TC, D), fresh_randn(B, H, TC, D)
    rot = 16 if TC % 16 == 0 and TC > 16 else TC // 3

    def loss(q, k, v, kc, vc, fn):
        return (fn(q, kc, vc, k, v) * do.to(q.dtype)).sum()

    ours = lambda q, kc, vc, k, v: swa_attention_split(q, kc, vc, k, v, W, QP, QP - TC, rot=rot)  # noqa: E731
    theirs = lambda q, kc, vc, k, v: cached_reference(q, kc, vc, k, v, W, QP, QP - TC)[0]  # noqa: E731
    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, _ring(kc, rot), _ring(vc, rot), ours)
    want = torch.func.grad(loss, argnums=(0, 1, 2))(*(t.double() for t in (q, k, v, kc, vc)), theirs)
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert all(e < TOL for e in errs), errs


def test_ring_rotates_in_the_kernels(monkeypatch):
    """A ring of whole tiles reaches the kernels unrolled (no copy), else it is rolled first."""
    from ttt_e2e.kernels.swa import backward, forward
    seen = []
    for mod in (forward, backward):
        real = mod.unroll_ring
        monkeypatch.setattr(mod, "unroll_ring", lambda k, v, r, n, real=real: seen.append(real(k, v, r, n)[2]) or
                            real(k, v, r, n))
    q, k, v, do = (fresh_randn(1, 1, 16, 16).requires_grad_() for _ in range(4))
    tile = max(common.forward_tile(16, 1, 16, q.device, q.dtype).block_n,
               common.tile_config("bwd_dq", 16, q.device, q.dtype).block_n)  # 16 in the interpreter, 32 on a GPU
    for tc, rot in ((3 * tile, 2 * tile), (3 * tile, 8)):
        kc, vc = fresh_randn(1, 1, tc, 16), fresh_randn(1, 1, tc, 16)
        torch.autograd.grad(swa_attention_split(q, kc, vc, k, v, tc, tc, 0, rot=rot), (q, k, v), do)
    # forward, dq: rotated in the kernels; then rolled first (8 rows is not a whole tile)
    assert seen == [2 * tile, 2 * tile, 0, 0], seen


def test_split_non_contiguous_and_refuses_a_cache_gradient():
    B, H, TQ, TC, D, W = 1, 3, 11, 26, 32, 15  # the model's (B, T, H, D) layout viewed as (B, H, T, D)
    q, k, v = (fresh_randn(B, TQ, H, D).transpose(1, 2) for _ in range(3))
    kc, vc = (fresh_randn(B, TC, H, D).transpose(1, 2) for _ in range(2))
    o = swa_attention_split(q, kc, vc, k, v, W, TC, 0)
    assert rel_err(o, cached_reference(q, kc, vc, k, v, W, TC, 0)[0]) < TOL
    with pytest.raises(ValueError, match="cache as a constant"):
        swa_attention_split(q, kc.requires_grad_(), vc, k, v, W, TC, 0)
    with pytest.raises(ValueError, match="rot must lie"):
        swa_attention_split(q, kc.detach(), vc, k, v, W, TC, 0, rot=TC)


def test_third_order_raises():
    q, k, v = (fresh_randn(1, 1, 8, 16).requires_grad_() for _ in range(3))
    o = swa_attention(q, k, v, 4)
    (dq,) = torch.autograd.grad(o.square().sum(), (q,), create_graph=True)
    (ddq,) = torch.autograd.grad(dq.square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="third-order"):  # autograd wraps the NotImplementedError
        torch.autograd.grad(ddq.sum(), (q,))


def test_bad_inputs_raise_value_error():
    q = fresh_randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="window"):
        swa_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="head dim 24"):
        x = fresh_randn(1, 2, 8, 24)
        swa_attention(x, x, x, 4)
    with pytest.raises(ValueError, match="dtype mismatch"):
        swa_attention(q, q.double(), q, 4)
    with pytest.raises(ValueError, match="batch and head dim"):
        swa_attention(q, fresh_randn(2, 2, 8, 32), fresh_randn(2, 2, 8, 32), 4)
    with pytest.raises(ValueError, match="k's 3 heads must divide q's 2"):
        swa_attention(q, fresh_randn(1, 3, 8, 32), fresh_randn(1, 3, 8, 32), 4)
    with pytest.raises(ValueError, match="same shape"):
        swa_attention(q, q, fresh_randn(1, 2, 9, 32), 4)
    with pytest.raises(ValueError, match="4-D"):
        swa_attention(q[0], q[0], q[0], 4)
    for scale in (0.0, -0.5, "1"):  # the forward takes the row max of the unscaled scores: needs scale > 0
        with pytest.raises(ValueError, match="scale must be a number > 0"):
            swa_attention(q, q, q, 4, scale=scale)


# --- the reference itself ---------------------------------------------------------------------------------------

def test_reference_matches_sdpa_full_causal():
    q, k, v = (torch.randn(2, 3, 50, 16, dtype=torch.float64) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(swa_reference(q, k, v, window=50), ref) < 1e-12
    assert rel_err(swa_reference(q, k, v, window=10**9), ref) < 1e-12


@pytest.mark.parametrize("TQ,TK,W,QP,KP", [(13, 13, 4, 0, 0), (7, 19, 12, 5, -7), (9, 14, 3, 20, 13)])
def test_reference_matches_explicit_loop(TQ, TK, W, QP, KP):
    q, k, v = torch.randn(2, TQ, 8, dtype=torch.float64), torch.randn(2, TK, 8, dtype=torch.float64), \
        torch.randn(2, TK, 8, dtype=torch.float64)
    scale = 0.3
    out = torch.zeros_like(q)
    for i in range(TQ):
        qp = QP + i
        js = [j for j in range(TK) if qp - W < KP + j <= qp and KP + j >= 0]
        if js:
            w = torch.softmax(scale * q[:, i:i + 1] @ k[:, js].transpose(-1, -2), dim=-1)
            out[:, i] = (w @ v[:, js])[:, 0]
    assert rel_err(swa_reference(q, k, v, W, QP, KP, scale=scale), out) < 1e-12
    mask = swa_mask(TQ, TK, W, QP, KP)
    assert mask.sum() == sum(1 for i in range(TQ) for j in range(TK) if QP + i - W < KP + j <= QP + i and KP + j >= 0)


def test_head_split():
    """Column blocks of the forward and backward kernels: two powers of two, the tail at least 16, else one block."""
    assert [common.head_split(d) for d in (16, 32, 64, 80, 96, 128)] == [
        (16, 0), (32, 0), (64, 0), (64, 16), (64, 32), (128, 0)]
    assert common.head_split(48) == (32, 16) and common.head_split(72) == (128, 0)


def test_forward_tile_rule(monkeypatch):
    """128-row forward tiles at head dim 64 on a GPU when their grid covers every SM once; else the table's."""
    monkeypatch.setattr(common, "_num_sms", lambda index: 132)
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    table = common.tile_config("fwd", 64, gpu, bf16)
    assert table.block_m == 64
    assert common.forward_tile(1024, 32, 64, gpu, bf16) == common.FWD_WIDE  # 8 x 32 = 256 programs
    assert common.forward_tile(1024, 12, 64, gpu, bf16) == table  # 8 x 12 = 96
    assert common.forward_tile(32768, 12, 64, gpu, bf16) == common.FWD_WIDE
    assert common.forward_tile(32768, 32, 128, gpu, bf16) == common.tile_config("fwd", 128, gpu, bf16)
    split = common.tile_config("fwd", 80, gpu, bf16)  # 80 = 64 + 16: its own tiles, for blocks and long prompts
    assert split == common._GPU_CONFIGS["fwd"][80] != table
    assert common.forward_tile(1024, 32, 80, gpu, bf16) == common.forward_tile(32768, 32, 80, gpu, bf16) == split
    assert common.tile_config("dbwd_row", 80, gpu, bf16) == common.tile_config("dbwd_row", 128, gpu, bf16)  # padded
    assert common.forward_tile(32768, 32, 64, gpu, torch.float32) == common.tile_config("fwd", 64, gpu, torch.float32)
    cpu = torch.device("cpu")
    assert common.forward_tile(32768, 32, 64, cpu, bf16) == common.tile_config("fwd", 64, cpu)
    monkeypatch.setitem(common.CONFIG_OVERRIDES, "fwd", table)  # a tuning override wins
    assert common.forward_tile(1024, 32, 64, gpu, bf16) == table


PARTS_CASES = [c for c in CASES if c.id in ("prefix-W1-diagonal-only", "prefix-T70-W30-D96-interior-tiles",
                                           "suffix-some-cache-negative", "negative-cache-window-beyond-everything",
                                           "suffix-D80-ragged", "suffix-full-cache-D64")]


@pytest.fixture
def key_parts_spy(monkeypatch):
    """Counts the launches that merged or summed key parts (parts.py), so a test knows the parts were in effect."""
    from ttt_e2e.kernels.swa import backward, forward

    calls = []
    for mod, name in ((forward, "merge_forward"), (backward, "sum_parts")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=f"{mod.__name__}.{name}": calls.append(_n)
                            or _real(*a))
    return calls


@pytest.mark.parametrize("nparts", [2, 3, 5])
@pytest.mark.parametrize("B,H,TQ,TK,D,W,QP,KP", PARTS_CASES)
def test_key_parts_vs_reference(monkeypatch, key_parts_spy, nparts, B, H, TQ, TK, D, W, QP, KP):
    """Each query tile's keys split over several programs (some parts empty at 5) in the forward and dQ: forward,
    backward and double backward still equal the reference."""
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", nparts)
    test_fwd_bwd_double_bwd_vs_reference(B, H, TQ, TK, D, W, QP, KP)
    # the forward's merge and dQ's sum (the double backward's own kernels take no parts)
    assert sorted(set(key_parts_spy)) == ["ttt_e2e.kernels.swa.backward.sum_parts",
                                          "ttt_e2e.kernels.swa.forward.merge_forward"], key_parts_spy


@pytest.mark.parametrize("nparts", [2, 4])
def test_key_parts_with_rows_that_see_no_key(monkeypatch, key_parts_spy, nparts):
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", nparts)
    test_rows_with_no_visible_key_give_zero_not_nan()
    test_double_backward_with_missing_cotangents(("q", "v"))
    assert "ttt_e2e.kernels.swa.forward.merge_forward" in key_parts_spy


@pytest.mark.parametrize("B,H,TQ,TC,D,W,QP", [c for c in SPLIT if c.id in ("ring-early", "ring-D80", "one-query")])
def test_key_parts_with_two_sources_and_rings(monkeypatch, key_parts_spy, B, H, TQ, TC, D, W, QP):
    """Parts across the cache/block boundary and a rotated ring (the inference step's kernels)."""
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", 3)
    test_split_forward_vs_reference(B, H, TQ, TC, D, W, QP, torch.float32)
    test_split_gradient_vs_reference(B, H, TQ, TC, D, W, QP)
    assert "ttt_e2e.kernels.swa.forward.merge_forward" in key_parts_spy
    assert "ttt_e2e.kernels.swa.backward.sum_parts" in key_parts_spy


def test_key_parts_rule(monkeypatch):
    """Parts only on a GPU, only where the grid leaves more than a tenth of the SM slots empty: enough to fill
    them, at most MAX_KEY_PARTS, each at least 4 key tiles."""
    monkeypatch.setattr(common, "_num_sms", lambda index: 132)
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", None)
    gpu = torch.device("cuda", 0)
    assert common.key_parts("fwd", 192, 9216, 64, gpu) == 2  # 125M suffix: 12 heads x 16 tiles, 264 slots
    assert common.key_parts("bwd_dq", 192, 9216, 64, gpu) == 2
    assert common.key_parts("fwd", 512, 9216, 64, gpu) == 1  # 32 heads: full already
    assert common.key_parts("fwd", 256, 9216, 64, gpu) == 1  # 3B inner step: 97% of the slots, full enough
    assert common.key_parts("fwd", 237, 9216, 64, gpu) == 2  # just under 90%
    assert common.key_parts("fwd", 12, 9216, 64, gpu) == common.MAX_KEY_PARTS
    assert common.key_parts("fwd", 100, 512, 64, gpu) == 2  # 8 key tiles: parts of at least 4
    assert common.key_parts("fwd", 192, 200, 64, gpu) == 1
    assert common.key_parts("fwd", 200, 9216, 64, gpu, num_warps=8) == 1  # 8-warp programs: 132 slots
    assert common.key_parts("fwd", 12, 9216, 64, torch.device("cpu")) == 1
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", 1)
    assert common.key_parts("fwd", 12, 9216, 64, gpu) == 1


@pytest.mark.parametrize("B,H,TQ,TC,D,W,QP", SPLIT)
def test_descriptor_loads_equal_pointer_loads(monkeypatch, B, H, TQ, TC, D, W, QP):
    """The forward's key/value tiles through TMA descriptors (16-bit inputs, aligned layouts: the default) and
    through pointers: the same bits, for a cache (a ring where it is whole tiles) then a block, in the model's
    (B, T, H, D) layout; fp32 and a misaligned layout take no descriptors."""
    from ttt_e2e.kernels.swa import forward
    qkv = fresh_randn(B, TQ, 3, H, D, dtype=torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    kc, vc = (fresh_randn(B, TC, H, D, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    rot = 16 if TC % 16 == 0 and TC > 16 else 0
    kc, vc = _ring(kc, rot), _ring(vc, rot)
    assert (common.key_descriptors((kc, vc, k, v), 16, *common.head_split(D)) is None) == (TC == 0)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(forward, "USE_DESCRIPTORS", on)
        outs.append(forward.swa_forward(q, kc, vc, W, QP, QP - TC, D ** -0.5, k, v, rot))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    odd = fresh_randn(B, H, TQ, D + 1, dtype=torch.float16)[..., 1:]  # 2 bytes off, rows 2 (D + 1) bytes apart
    assert common.key_descriptors((k.float(), v, k, v), 16, *common.head_split(D)) is None
    assert common.key_descriptors((odd, v, k, v), 16, *common.head_split(D)) is None


# --- grouped-query attention ---------------------------------------------------------------------------------------
# k, v with Hkv heads, query head h reading kv head h // (H // Hkv); the reference repeats K/V (expand_kv), the
# kernels read them in place, and dk, dv (and the double backward's grad k, grad v) come back with Hkv heads, each
# the sum over its group's query heads. Cases with two or more kv heads tell h // group from h % Hkv.

def _compare_gqa(B, H, HKV, TQ, TK, D, W, QP, KP, used="qkv"):
    q, k, v = fresh_randn(B, H, TQ, D), fresh_randn(B, HKV, TK, D), fresh_randn(B, HKV, TK, D)
    do = fresh_randn(B, H, TQ, D)
    cot = tuple(fresh_randn(*x.shape) if n in used else None for n, x in zip("qkv", (q, k, v)))
    got = _run_all(swa_attention, q, k, v, do, cot, W, QP, KP, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, QP, KP, torch.float64)
    for n, a, b in zip(NAMES, got, ref):
        assert a.shape == b.shape, (n, a.shape, b.shape)  # dk, dv, grad k, grad v: Hkv heads
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs
    for n, a, b in zip(NAMES, got, ref):
        if used != "qkv" and b.norm() == 0:  # a missing cotangent's terms are skipped, not computed as zeros
            assert a.abs().max() == 0, n


# (B, H, Hkv, Tq, Tk, D, window, q_pos0, k_pos0)
GQA_CASES = [
    pytest.param(1, 2, 2, 20, 45, 16, 16, 30, 5, id="g1-tq-ne-tk-offsets"),
    pytest.param(2, 4, 2, 37, 37, 16, 10, 0, 0, id="g2-prefix-T37-W10"),
    pytest.param(1, 4, 1, 20, 44, 32, 24, 20, -4, id="g4-one-kv-head-suffix-cache-negative"),
    pytest.param(1, 8, 2, 33, 33, 16, 1, 0, 0, id="g4-W1-diagonal-only"),
    pytest.param(1, 4, 2, 18, 43, 80, 25, 7, -18, id="g2-D80-ragged"),
    pytest.param(1, 6, 2, 40, 64, 32, 100, 0, -24, id="g3-window-beyond-everything"),
]


@pytest.mark.parametrize("B,H,HKV,TQ,TK,D,W,QP,KP", GQA_CASES)
def test_gqa_fwd_bwd_double_bwd_vs_reference(B, H, HKV, TQ, TK, D, W, QP, KP):
    _compare_gqa(B, H, HKV, TQ, TK, D, W, QP, KP)


@pytest.mark.parametrize("used", ["k", "qv"])
def test_gqa_double_backward_with_missing_cotangents(used):
    _compare_gqa(1, 4, 2, 21, 40, 32, 22, 19, -3, used)


def test_gqa_key_parts(monkeypatch):
    """The forward's and dQ's key range split over programs (parts.py) with query heads reading shared kv heads."""
    monkeypatch.setattr(common, "KEY_PARTS_OVERRIDE", 3)
    _compare_gqa(1, 4, 2, 40, 70, 32, 30, 30, 0)


def test_gqa_model_layout():
    """q, dO as the model's (B, T, H, D) views, k, v as (B, T, Hkv, D) views: read by their strides, and every
    output in that layout (dk, dv and grad k, grad v with Hkv heads)."""
    B, H, HKV, T, D, W = 2, 4, 2, 27, 32, 9
    q, do = (fresh_randn(B, T, H, D).transpose(1, 2) for _ in range(2))
    k, v, gk, gv = (fresh_randn(B, T, HKV, D).transpose(1, 2) for _ in range(4))
    cot = (fresh_randn(B, T, H, D).transpose(1, 2), gk, gv)
    got = _run_all(swa_attention, q, k, v, do, cot, W, 0, 0, torch.float32)
    ref = _run_all(swa_reference, q, k, v, do, cot, W, 0, 0, torch.float64)
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref)}
    assert all(e < TOL for e in errs.values()), errs
    for n, a in zip(NAMES, got):
        assert a.stride(1) < a.stride(2), (n, a.stride())  # heads inside time


def test_gqa_cached_inner_gradient_then_outer():
    """TTT's suffix pattern with kv heads: the inner gradient (cache a constant, dK, dV of the block only), then
    the outer gradient w.r.t. everything, cache included, through the double backward."""
    B, H, HKV, TQ, TC, D, W, QP = 1, 4, 2, 13, 21, 16, 20, 21
    q = fresh_randn(B, H, TQ, D)
    k, v, kc, vc = fresh_randn(B, HKV, TQ, D), fresh_randn(B, HKV, TQ, D), fresh_randn(B, HKV, TC, D), \
        fresh_randn(B, HKV, TC, D)
    cot = [fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D), fresh_randn(B, HKV, TQ, D), fresh_randn(B, HKV, TQ, D),
           fresh_randn(B, H, TQ, D), fresh_randn(B, HKV, TC + TQ, D), fresh_randn(B, HKV, TC + TQ, D)]
    got = inner_then_outer(swa_attention_cached, q, k, v, kc, vc, cot, W, QP)
    ref = inner_then_outer(cached_reference, *(t.double() for t in (q, k, v, kc, vc)), cot, W, QP)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    assert all(e < TOL for e in errs), errs


# (B, H, Hkv, Tq, Tc, D, window, q_pos0): a constant cache (a ring) and a block, read where they lie
GQA_SPLIT = [
    pytest.param(1, 4, 2, 16, 48, 16, 48, 16, id="g2-ring-early"),
    pytest.param(1, 4, 1, 13, 21, 32, 20, 21, id="g4-boundary-inside-a-tile"),
]


@pytest.mark.parametrize("B,H,HKV,TQ,TC,D,W,QP", GQA_SPLIT)
def test_gqa_split_vs_reference(B, H, HKV, TQ, TC, D, W, QP):
    """Forward for several ring rotations (whole tiles: rotated in the kernels; else rolled first), and the inner
    gradient (dq, and dk, dv of the block with Hkv heads) through torch.func."""
    q, do = fresh_randn(B, H, TQ, D), fresh_randn(B, H, TQ, D)
    k, v, kc, vc = (fresh_randn(B, HKV, n, D) for n in (TQ, TQ, TC, TC))
    ref = cached_reference(*(t.double() for t in (q, kc, vc, k, v)), W, QP, QP - TC)[0]
    for rot in (0, 16 if TC % 16 == 0 else TC // 3):
        with torch.no_grad():
            o = swa_attention_split(q, _ring(kc, rot), _ring(vc, rot), k, v, W, QP, QP - TC, rot=rot)
        assert rel_err(o, ref) < TOL, rot

    def loss(q, k, v, kc, vc, fn):
        return (fn(q, kc, vc, k, v) * do.to(q.dtype)).sum()

    rot = 16 if TC % 16 == 0 else TC // 3
    ours = lambda q, kc, vc, k, v: swa_attention_split(q, kc, vc, k, v, W, QP, QP - TC, rot=rot)  # noqa: E731
    theirs = lambda q, kc, vc, k, v: cached_reference(q, kc, vc, k, v, W, QP, QP - TC)[0]  # noqa: E731
    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v, _ring(kc, rot), _ring(vc, rot), ours)
    want = torch.func.grad(loss, argnums=(0, 1, 2))(*(t.double() for t in (q, k, v, kc, vc)), theirs)
    assert [g.shape[1] for g in got] == [H, HKV, HKV]
    errs = [rel_err(a, b) for a, b in zip(got, want)]
    assert all(e < TOL for e in errs), errs


def test_gqa_bad_heads_raise_value_error():
    q, k = fresh_randn(1, 6, 8, 16), fresh_randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="k's 4 heads must divide q's 6"):
        swa_attention(q, k, k, 4)
    kc, k2 = fresh_randn(1, 3, 5, 16), fresh_randn(1, 2, 8, 16)
    for fn in (swa_attention_cached, swa_attention_split):
        with pytest.raises(ValueError, match="the cache has 3 kv heads, the block's keys 2"):
            fn(q, kc, kc, k2, k2, 4, 5, 0)


def test_gqa_descriptor_loads(monkeypatch):
    """16-bit keys and values go through TMA descriptors (indexed by kv head) in the forward: the same bits as
    the pointer loads, and the reference's output, for a ring cache then a block with 2 query heads per kv head."""
    from ttt_e2e.kernels.swa import forward
    B, H, HKV, TQ, TC, D, W, QP, rot = 1, 4, 2, 16, 48, 16, 48, 16, 16
    q = fresh_randn(B, TQ, H, D, dtype=torch.float16).transpose(1, 2)
    k, v, kc, vc = (fresh_randn(B, n, HKV, D, dtype=torch.float16).transpose(1, 2) for n in (TQ, TQ, TC, TC))
    assert common.key_descriptors((kc, vc, k, v), 16, *common.head_split(D)) is not None
    outs = []
    for on in (True, False):
        monkeypatch.setattr(forward, "USE_DESCRIPTORS", on)
        outs.append(forward.swa_forward(q, _ring(kc, rot), _ring(vc, rot), W, QP, QP - TC, D ** -0.5, k, v, rot))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref = cached_reference(*(t.double() for t in (q, kc, vc, k, v)), W, QP, QP - TC)[0]
    assert rel_err(outs[0][0], ref) < 2e-3  # fp16 operands (as test_split_forward_vs_reference)


@pytest.mark.parametrize("nparts", [2, 4])
def test_gqa_group_parts(monkeypatch, nparts):
    """Each group's query heads split over several programs in dK/dV and the double backward's grad K/V (fp32
    partial sums, added after by sum_parts), in the model's layout: still the reference's results."""
    from ttt_e2e.kernels.swa import backward, double_backward
    monkeypatch.setattr(common, "GROUP_PARTS_OVERRIDE", nparts)
    calls = []
    for mod in (backward, double_backward):
        monkeypatch.setattr(mod, "sum_parts", lambda p, o, _m=mod.__name__, _r=mod.sum_parts: calls.append(_m)
                            or _r(p, o))
    test_gqa_model_layout()
    _compare_gqa(1, 8, 2, 20, 44, 32, 24, 20, -4, "kv")
    assert sorted(set(calls)) == ["ttt_e2e.kernels.swa.backward", "ttt_e2e.kernels.swa.double_backward"], calls


@pytest.mark.parametrize("nparts", [1, 2])
def test_column_orders_same_bits(monkeypatch, nparts):
    """The column kernels' two grid orders (key tiles fastest, or kv heads and parts fastest: common.column_grid)
    compute every program alike: the same bits for dK/dV and the double backward's grad K/V, batch 2 included."""
    B, H, HKV, TQ, TK, D, W, QP, KP = 2, 4, 2, 20, 44, 16, 24, 20, -4
    q, k, v, do = (fresh_randn(B, h, t, D) for h, t in ((H, TQ), (HKV, TK), (HKV, TK), (H, TQ)))
    cot = (fresh_randn(B, H, TQ, D), fresh_randn(B, HKV, TK, D), fresh_randn(B, HKV, TK, D))
    monkeypatch.setattr(common, "GROUP_PARTS_OVERRIDE", nparts)
    grids = []
    real_grid = common.column_grid
    for mod in ("backward", "double_backward"):
        monkeypatch.setattr(f"ttt_e2e.kernels.swa.{mod}.column_grid",
                            lambda *a: grids.append(real_grid(*a)) or grids[-1])
    outs = {}
    for order in ("tile", "head"):
        monkeypatch.setattr(common, "COLUMN_ORDER", order)
        outs[order] = _run_all(swa_attention, q, k, v, do, cot, W, QP, KP, torch.float32)
    assert {tm for _, tm in grids} == {True, False}, grids
    for n, a, b in zip(NAMES, outs["tile"], outs["head"]):
        assert torch.equal(a, b), n


def test_column_grid(monkeypatch):
    """Key-tile-major unless the key tiles overflow the grid's y dimension; a bad order named."""
    monkeypatch.setattr(common, "COLUMN_ORDER", "tile")
    assert common.column_grid(128, 8, 2) == ((16, 128), True)
    assert common.column_grid(70000, 8, 1) == ((70000, 8, 1), False)
    monkeypatch.setattr(common, "COLUMN_ORDER", "head")
    assert common.column_grid(128, 8, 2) == ((128, 8, 2), False)
    monkeypatch.setattr(common, "COLUMN_ORDER", "rows")
    with pytest.raises(ValueError, match="column order must be"):
        common.column_grid(128, 8, 2)


def test_group_parts_rule(monkeypatch):
    """Parts only for groups, on a GPU, where the programs give fewer than GROUP_WAVES per slot: the fewest
    (a divisor of the group) that do, else the whole group."""
    monkeypatch.setattr(common, "_num_sms", lambda index: 132)
    monkeypatch.setattr(common, "GROUP_PARTS_OVERRIDE", None)
    gpu = torch.device("cuda", 0)
    assert common.group_parts(10, 1, gpu) == 1  # multi-head attention
    assert common.group_parts(1000, 4, gpu) == 1  # 528 slots x 2 waves reached alone
    assert common.group_parts(256, 4, gpu) == 4  # 2 x 256 < 528 <= 4 x 256
    assert common.group_parts(300, 4, gpu) == 2
    assert common.group_parts(100, 4, gpu) == 4 and common.group_parts(100, 6, gpu) == 6
    assert common.group_parts(128, 4, gpu, num_warps=8) == 4 and common.group_parts(140, 4, gpu, num_warps=8) == 2
    assert common.group_parts(10, 4, torch.device("cpu")) == 1
    # long rows (LONG_ROWS query rows per key tile or more): the whole group, however full the grid
    assert common.group_parts(1000, 4, gpu, rows=common.LONG_ROWS) == 4
    assert common.group_parts(1000, 4, gpu, rows=common.LONG_ROWS - 1) == 1
    assert common.group_parts(10, 1, gpu, rows=10**6) == 1
    monkeypatch.setattr(common, "GROUP_PARTS_OVERRIDE", 3)
    assert common.group_parts(10, 4, gpu) == 2 and common.group_parts(10, 6, gpu) == 3
    assert common.group_parts(10, 4, gpu, rows=common.LONG_ROWS) == 2  # the override wins


@pytest.mark.parametrize("TQ,TK,W,QP,KP", [(20, 20, 8, 0, 0), (12, 44, 24, 24, 0)])
def test_dkdv_group_parts_rows(monkeypatch, TQ, TK, W, QP, KP):
    """dK/dV asks group_parts with a key tile's query rows: the window plus a key tile, at most the queries."""
    from ttt_e2e.kernels.swa import backward
    asked = []
    monkeypatch.setattr(backward, "group_parts",
                        lambda programs, group, device, num_warps=4, rows=0: asked.append(rows) or 1)
    q, do = fresh_randn(1, 4, TQ, 16), fresh_randn(1, 4, TQ, 16)
    k, v = (fresh_randn(1, 2, TK, 16).requires_grad_() for _ in "kv")
    torch.autograd.grad(swa_attention(q, k, v, W, QP, KP), (k, v), do)
    assert asked == [min(TQ, W + common.tile_config("bwd_dkdv", 16, q.device, q.dtype).block_n)]
