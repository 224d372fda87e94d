"""RoPE angles of absolute positions, and what code captured in a CUDA graph needs of them (inference/graphs.py).

    cos, sin = rope_angles(positions, head_dim, theta, scaling)
    cos, sin = angles(pos0, T, device, head_dim, theta, scaling)    # positions pos0 .. pos0 + T - 1
    with shared_rope_angles(): ...                           # the layers of one pass compute them once
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: Optional[tuple] = None, device=None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies theta^(-2i/head_dim), fp64. scaling (ModelConfig.rope_scale): None, or
    ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions), Llama 3's rule (as Hugging Face
    computes it): wavelengths above original / low_freq_factor slowed by factor, below original / high_freq_factor
    kept, and the band between interpolated linearly in original / wavelength."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is None:
        return inv_freq
    _, factor, low, high, original = scaling
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)  # 0 at and above the low band, 1 below high
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim/2) for absolute positions (computed in fp64 then cast: positions reach
    millions, where fp32 angles lose digits); scaling: see inv_frequencies."""
    inv_freq = inv_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


class DevicePos(int):
    """A start position that is also a device tensor, for code captured in a CUDA graph: the int drives what a
    graph bakes in (shapes, the kernels' masks, which only need positions relative to the cache), the 0-d int64
    tensor drives what must follow the position at every replay (the RoPE angles)."""

    tensor: torch.Tensor

    def __new__(cls, value: int, tensor: torch.Tensor):
        pos = super().__new__(cls, value)
        pos.tensor = tensor
        return pos


def positions(pos0: int, T: int, device) -> torch.Tensor:
    if isinstance(pos0, DevicePos):
        return pos0.tensor + torch.arange(T, device=device)
    return torch.arange(pos0, pos0 + T, device=device)


_SHARED_ANGLES: list[dict] = []  # a stack of memos, one per open shared_rope_angles()


@contextlib.contextmanager
def shared_rope_angles():
    """Within it the attention layers share the RoPE angles of the same positions: the first computes them, the
    others reuse them (~7 small kernels per layer fewer; a 3B prefill chunk's 24 layers and an inner step's 8 all
    sit at one set of positions). For one pass at a time: a memo never outlives it, so none can hand out tensors
    of another pass (or of another CUDA graph's capture)."""
    _SHARED_ANGLES.append({})
    try:
        yield
    finally:
        _SHARED_ANGLES.pop()


def angles(pos0: int, T: int, device, head_dim: int, theta: float,
           scaling: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions pos0 .. pos0 + T - 1 (shared within a shared_rope_angles())."""
    memo = _SHARED_ANGLES[-1] if _SHARED_ANGLES else None
    key = (int(pos0), id(pos0.tensor) if isinstance(pos0, DevicePos) else None, T, device, head_dim, theta, scaling)
    if memo is not None and key in memo:
        return memo[key]
    out = rope_angles(positions(pos0, T, device), head_dim, theta, scaling)
    if memo is not None:
        memo[key] = out
    return out
