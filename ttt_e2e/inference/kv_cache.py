"""The keys/values one attention layer keeps for decoding.

Sliding window W: a ring of W slots, position p in slot p % W. A query at position p sees exactly the positions
p-W+1..p, which are the ring's contents once p's own key is written, so a decoding step attends to every slot
without a mask, in whatever order the slots hold them (softmax attention does not care about key order; the
positions are already baked into the keys by RoPE). Memory and time per token stay constant.

Full attention (window None): a buffer that grows (capacity doubles, or is reserved up front), O(context).

Every buffer is (B, Hkv, slots, D) in shape (Hkv: the model's key/value heads, fewer than its query heads under
grouped-query attention; never repeated) but token-major in memory, (B, slots, Hkv, D), the model's own layout for
k and v: storing a chunk's keys is then a copy of whole rows of H D (at full bandwidth; into head-major buffers it
was a transposing copy at half of it; benchmarks/RESULTS.md), and it is the layout SDPA's decoding
kernels take without a copy. The attention kernels read either layout by its strides.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ttt_e2e.model.attention import attend, attend_over_cache
from ttt_e2e.model.rope import DevicePos

# Window standing for "no window" in the attention seam (positions are far below it; the kernels clamp it).
FULL = 1 << 40


def copy_keys_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) moved as 8-byte words where both views allow it (contiguous head dim, 8-byte aligned rows):
    torch's strided copy moves one element per lane, and 2-byte ones from v's rows (strided inside the fused QKV
    output) ran at half of HBM bandwidth (benchmarks/RESULTS.md)."""
    if dst.dtype == src.dtype and dst.element_size() < 8:
        try:
            dst, src = dst.view(torch.int64), src.view(torch.int64)
        except RuntimeError:  # a size, stride or offset that is not a whole number of words: the plain copy
            pass
    dst.copy_(src)


def _token_major(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether k and v (B, H, T, D) are token-major with whole rows of H D, as the ring's buffers are."""
    return all(t.stride(-1) == 1 and t.stride(1) == t.shape[-1] and t.stride(2) >= t.shape[1] * t.shape[-1]
               for t in (k, v))


def token_major_zeros(like: torch.Tensor, B: int, H: int, slots: int, D: int) -> torch.Tensor:
    """Zeros of shape (B, H, slots, D) laid out as (B, slots, H, D), in like's dtype and device."""
    return like.new_zeros(B, slots, H, D).transpose(1, 2)


class KVCache:
    def __init__(self, window: Optional[int]):
        if window is not None and window < 1:
            raise ValueError(f"KVCache window must be >= 1 or None, got {window}")
        self.window = window
        self.k: Optional[torch.Tensor] = None  # (B, Hkv, slots, D)
        self.v: Optional[torch.Tensor] = None
        self.n = 0  # positions written so far: the next key is position n
        self._reserve = 0

    def reserve(self, n_positions: int) -> None:
        """Full attention: allocate room for this many positions at the first write (no regrowth later)."""
        self._reserve = n_positions

    @property
    def length(self) -> int:
        """How many keys are held (and visible to the next query)."""
        return self.n if self.window is None else min(self.n, self.window)

    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the keys/values (B, H, T, D) of positions n .. n+T-1."""
        T = k.shape[2]
        if self.k is None:
            slots = self.window if self.window is not None else max(self._reserve, T, 16)
            # Zeros, not garbage: decoding in a CUDA graph reads every slot and masks the unwritten ones, and a
            # masked NaN would still poison the weighted sum (0 * NaN).
            self.k = token_major_zeros(k, *k.shape[:2], slots, k.shape[3])
            self.v = token_major_zeros(v, *v.shape[:2], slots, v.shape[3])
        if self.window is None:
            if self.n + T > self.k.shape[2]:  # grow by doubling: amortized O(1) per token
                self._grow(max(2 * self.k.shape[2], self.n + T))
            copy_keys_(self.k[:, :, self.n:self.n + T], k)
            copy_keys_(self.v[:, :, self.n:self.n + T], v)
        else:
            W = self.window
            m = min(T, W)  # of a chunk longer than the window only the last W keys survive
            start = (self.n + T - m) % W
            first = min(m, W - start)  # the part before the ring wraps around
            copy_keys_(self.k[:, :, start:start + first], k[:, :, T - m:T - m + first])
            copy_keys_(self.v[:, :, start:start + first], v[:, :, T - m:T - m + first])
            copy_keys_(self.k[:, :, :m - first], k[:, :, T - m + first:])
            copy_keys_(self.v[:, :, :m - first], v[:, :, T - m + first:])
        self.n += T

    def visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held key/value, in slot order (views, no copy). Before the ring is full its slots 0..n-1 hold
        positions 0..n-1; after, all W slots are in use."""
        L = self.length
        return self.k[:, :, :L], self.v[:, :, :L]

    def ordered(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The held keys/values in position order (the last min(n, W) positions), as the model's `cache`
        argument expects; None before the first write. Views of the buffers where those hold them in order (no
        wrap yet, or a ring that has just wrapped exactly: prefill in chunks of W), else copies."""
        if self.k is None:
            return None, None
        if self.window is None or self.n <= self.window or self.n % self.window == 0:
            return self.visible()  # in position order already (a ring that has just wrapped exactly)
        s = self.n % self.window  # slot of the oldest held position, n - W
        return (torch.cat((self.k[:, :, s:], self.k[:, :, :s]), 2),
                torch.cat((self.v[:, :, s:], self.v[:, :, :s]), 2))

    def reset(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Replace the contents by the position-ordered keys/values of the last positions before n."""
        if k.shape[2] != min(n, self.window if self.window is not None else n):
            raise ValueError(f"KVCache.reset: got {k.shape[2]} keys for {n} positions and window {self.window}")
        self.n = n - k.shape[2]
        self.append(k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0: int, backend: str) -> torch.Tensor:
        """Attention of the queries at positions pos0.. (this chunk's q (B, H, T, D), k and v (B, Hkv, T, D)) over
        the held keys then the chunk's own; the chunk's keys/values are then stored. Called by the model's
        Attention."""
        T = q.shape[2]
        if T == 1 and isinstance(pos0, DevicePos):
            return self._attend_in_graph(q, k, v, pos0.tensor)
        pos0 = int(pos0)
        if T == 1:
            # Decoding: once its own key is in, every held key is visible to the query, so this is plain
            # unmasked attention: SDPA's flash/cuDNN decoding kernels on a GPU.
            self.append(k, v)
            return F.scaled_dot_product_attention(q, *self.visible(), enable_gqa=k.shape[1] != q.shape[1])
        rot = 0
        if self.window is not None and self.n > self.window and self.n % self.window:
            # A wrapped ring: the kernels read it in place from its oldest slot (no position-ordered copy)
            ck, cv, rot = self.k, self.v, self.n % self.window
        else:
            ck, cv = self.ordered()
        adopt = self.window is not None and T == self.window and self.n % T == 0 and _token_major(k, v)
        if ck is None and self.window is None:
            # Full attention from position 0: plain causal SDPA (the cuDNN / FlashAttention baselines).
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        elif ck is None:
            o = attend(q, k, v, window=self.window or FULL, q_pos0=pos0, k_pos0=pos0, backend=backend)
        else:
            o = attend_over_cache(q, ck, cv, k, v, window=self.window or FULL, q_pos0=pos0,
                                  k_pos0=pos0 - ck.shape[2], rot=rot, backend=backend)
        if adopt:
            # A chunk of exactly W positions from a multiple of W fills every slot in order (position p in slot
            # p % W): its own k and v become the ring, no copy (a full-bandwidth pass saved). v is a view of
            # the fused QKV output, which it keeps alive (a window's q and k more per layer).
            self.k, self.v = k, v
            self.n += T
        else:
            self.append(k, v)
        return o

    def _attend_in_graph(self, q, k, v, pos: torch.Tensor) -> torch.Tensor:
        """Decoding inside a CUDA graph: the slot to write and the slots to read follow the device position `pos`,
        so one graph serves every position (the caller advances `n` after each replay). A query sees the slots
        written so far: 0..pos before a ring wraps (or in a growing buffer), all of them after."""
        S = self.k.shape[2]
        slot = (pos % S if self.window is not None else pos).view(1)
        self.k.index_copy_(2, slot, k)
        self.v.index_copy_(2, slot, v)
        written = (torch.arange(S, device=q.device) <= pos).view(1, 1, 1, S)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=written, enable_gqa=k.shape[1] != q.shape[1])

    def _grow(self, slots: int) -> None:
        k = token_major_zeros(self.k, *self.k.shape[:2], slots, self.k.shape[3])
        v = token_major_zeros(self.v, *self.v.shape[:2], slots, self.v.shape[3])
        k[:, :, :self.n], v[:, :, :self.n] = self.k[:, :, :self.n], self.v[:, :, :self.n]
        self.k, self.v = k, v


class StepRing:
    """A suffix block's keys/values for the graphed inner step (graphs.py): the W positions before the mini-batch
    in a ring of W slots, position p in slot p % W (as KVCache). The attention kernels read it in place, and the
    step then writes its b keys over the b oldest: no window-long copy nor concatenation per step. The slots of
    positions below 0 hold zeros (masked by position). W must be a multiple of b, so a mini-batch's slots never
    wrap around."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # (B, H, W, D), token-major in memory (token_major_zeros)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos0, backend: str) -> torch.Tensor:
        W, p = self.k.shape[2], int(pos0)  # a replayed graph keeps its int: only p % W must hold (graphs.py)
        return attend_over_cache(q, self.k, self.v, k, v, window=W, q_pos0=p, k_pos0=p - W, rot=p % W,
                                 backend=backend)

    def write(self, k: torch.Tensor, v: torch.Tensor, pos0: int) -> None:
        """After the step: the mini-batch's keys/values (B, H, b, D), positions pos0.., into their slots."""
        s = pos0 % self.k.shape[2]
        copy_keys_(self.k[:, :, s:s + k.shape[2]], k)
        copy_keys_(self.v[:, :, s:s + v.shape[2]], v)

    def ordered(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of the last min(n, W) positions before n, in position order."""
        W = self.k.shape[2]
        if n <= W:
            return self.k[:, :, :n], self.v[:, :, :n]
        return self.k.roll(-(n % W), 2), self.v.roll(-(n % W), 2)
