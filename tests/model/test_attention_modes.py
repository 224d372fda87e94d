"""The three attention modes of the seam agree with each other and with PyTorch's SDPA."""
import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_model
from ttt_e2e.model.attention import attend


def _qkv(B=2, H=3, T=21, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]


def test_full_attention_equals_sdpa_causal():
    q, k, v = _qkv()
    out = attend(q, k, v, window=q.shape[2], backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [1, 4, 7, 21, 40])
def test_sliding_window_equals_an_explicit_loop(window):
    q, k, v = _qkv(seed=window)
    out = attend(q, k, v, window=window, backend="torch")
    for i in range(q.shape[2]):
        lo = max(0, i - window + 1)
        s = q[:, :, i:i + 1] @ k[:, :, lo:i + 1].mT / q.shape[-1] ** 0.5
        torch.testing.assert_close(out[:, :, i:i + 1], s.softmax(-1) @ v[:, :, lo:i + 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,b", [(10, 6), (6, 6), (4, 6), (30, 6)])
def test_suffix_in_minibatches_with_kv_cache_equals_one_shot(window, b):
    model = tiny_model(window=window)
    W = model.cfg.window
    h = torch.randn(2, model.cfg.seq_length, model.cfg.d_model, dtype=torch.float64)
    one_shot, _ = model.suffix(h)
    caches, chunks = None, []
    for t in range(h.shape[1] // b):
        out, kvs = model.suffix(h[:, t * b:(t + 1) * b], t * b, caches)
        caches = [(k[:, :, -W:], v[:, :, -W:]) for k, v in kvs]
        chunks.append(out)
    torch.testing.assert_close(torch.cat(chunks, 1), one_shot, rtol=1e-12, atol=1e-12)


def test_sdpa_backend_serves_full_causal_only():
    q, k, v = _qkv(seed=3)
    torch.testing.assert_close(attend(q, k, v, window=q.shape[2], backend="sdpa"),
                               attend(q, k, v, window=q.shape[2], backend="torch"), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="supports only full causal"):
        attend(q, k, v, window=4, backend="sdpa")


def test_shared_rope_angles_within_one_pass_only():
    """Inside shared_rope_angles() layers at the same positions get the first one's cos/sin (the same tensors),
    other positions their own; outside, every call computes them (no memo outlives its pass)."""
    from ttt_e2e.model.rope import DevicePos, angles, shared_rope_angles
    a = b = lambda pos0, T, device: angles(pos0, T, device, 8, 10000.0)  # noqa: E731  two layers' calls
    with shared_rope_angles():
        first = a(5, 7, "cpu")
        assert b(5, 7, "cpu") is first
        assert b(6, 7, "cpu") is not first
        assert angles(5, 7, "cpu", 16, 10000.0) is not first  # another head dim
        dev = DevicePos(5, torch.tensor(5))  # a device position: its own entry, never the int's
        assert a(dev, 7, "cpu") is not first
        torch.testing.assert_close(a(dev, 7, "cpu")[0], first[0])
    again = a(5, 7, "cpu")
    assert again is not first and a(5, 7, "cpu") is not again
    torch.testing.assert_close(again, first)
