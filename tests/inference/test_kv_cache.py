"""The W-slot ring: same keys as the last W positions, and decoding attention over it equals recomputing
sliding-window attention over the whole history."""
import pytest
import torch
import torch.nn.functional as F

from ttt_e2e.inference import KVCache
from ttt_e2e.kernels.swa.reference import swa_reference


@pytest.mark.parametrize("window", [1, 5, 8])
def test_ring_holds_last_window(window):
    g = torch.Generator().manual_seed(0)
    cache, ks, vs = KVCache(window), [], []
    for T in (3, 1, 1, 9, 2, 1, 17, 1, 4):  # chunks shorter and longer than the window, wrapping around
        k, v = torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, T, 4, generator=g)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
        allk, allv = torch.cat(ks, 2), torch.cat(vs, 2)
        ok, ov = cache.ordered()
        assert torch.equal(ok, allk[:, :, -window:]) and torch.equal(ov, allv[:, :, -window:].to(ov.dtype))
        assert cache.length == min(allk.shape[2], window)
    for buf in (cache.k, cache.v):  # token-major memory: a chunk's keys are stored as whole rows of H x D
        assert buf.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("window", [None, 6])
def test_decode_attention_over_ring_equals_recompute(window):
    """Token by token: attention of the new query to the cache's contents (slot order, no mask) equals the
    materialized sliding-window attention over the whole history at that position."""
    g = torch.Generator().manual_seed(1)
    B, H, D, N = 2, 3, 8, 20
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    cache = KVCache(window)
    cache.append(k[:, :, :4], v[:, :, :4])  # a prompt, then one token at a time
    for p in range(4, N):
        cache.append(k[:, :, p:p + 1], v[:, :, p:p + 1])
        keys, values = cache.visible()
        got = F.scaled_dot_product_attention(q[:, :, p:p + 1], keys, values)
        ref = swa_reference(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1], window or N, q_pos0=p)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if window is not None:
        assert cache.k.shape[2] == window  # constant memory


def test_reset_replaces_contents():
    g = torch.Generator().manual_seed(2)
    cache = KVCache(4)
    cache.append(torch.randn(1, 1, 7, 2, generator=g), torch.randn(1, 1, 7, 2, generator=g))
    k, v = torch.randn(1, 1, 4, 2, generator=g), torch.randn(1, 1, 4, 2, generator=g)
    cache.reset(k, v, 10)
    assert cache.n == 10 and torch.equal(cache.ordered()[0], k)
    with pytest.raises(ValueError):
        cache.reset(k[:, :, :3], v[:, :, :3], 10)  # a ring must be refilled whole


@pytest.mark.parametrize("chunks", [(8, 8, 8, 8), (5, 11, 3, 13)], ids=["chunks-of-W", "ragged-chunks"])
def test_chunked_prefill_attention_equals_recompute(chunks):
    """Prefill chunk by chunk through the Triton kernels (the interpreter on a CPU), which read the ring and the
    chunk where they lie (in position order after an exact wrap, else the ring reordered first), against the
    materialized sliding-window attention over the whole history."""
    g = torch.Generator().manual_seed(3)
    B, H, D, W, N = 1, 2, 16, 8, sum(chunks)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    cache, p, out = KVCache(W), 0, []
    for T in chunks:
        out.append(cache.attend(q[:, :, p:p + T], k[:, :, p:p + T], v[:, :, p:p + T], p, "triton"))
        p += T
    ref = swa_reference(*(t.double() for t in (q, k, v)), W)
    torch.testing.assert_close(torch.cat(out, 2).double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("D", [16, 6])  # whole 8-byte words per row, and not: the plain copy
def test_keys_copied_as_words_are_the_same_bits(D):
    from ttt_e2e.inference.kv_cache import copy_keys_, token_major_zeros
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 7, 3, 4, D, generator=g).to(torch.bfloat16)
    qkv.view(torch.int16)[0, 0, 2, 0, :2] = torch.tensor([0x7FC1, -1], dtype=torch.int16)  # NaN payloads kept
    ring = token_major_zeros(qkv, 2, 4, 12, D)
    for part in (1, 2):  # k's and v's rows of the fused projection, strided
        src = qkv[:, :, part].transpose(1, 2)
        copy_keys_(ring[:, :, 3:10], src)
        assert torch.equal(ring[:, :, 3:10].view(torch.int16), src.view(torch.int16))
        assert not ring[:, :, :3].any() and not ring[:, :, 10:].any()
