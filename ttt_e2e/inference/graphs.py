"""CUDA graphs for inference: the TTT inner step and the decoding step, each replayed instead of launched op by op.

Eagerly, one inner step is thousands of small kernels (the suffix forward, its backward through torch.func, the
clip, the SGD update) and one decoded token over a 3B model about 1,500: launching them costs several times more
than running them. Both become static once what changes between calls lives in device memory:

- Inner step. The suffix caches are fixed-size buffers of the W keys/values before the mini-batch, the slots of
  positions below 0 zero-filled and masked by the kernels (k_pos >= 0); RoPE reads the position from a device
  tensor (`DevicePos`); the kernels' masks need positions only relative to the cache, except for which slots are
  below 0, which differs while the position is below W. Where W is a multiple of b, each cache is a ring of W
  slots (`StepRing`) that the kernels read in place and the step writes its b keys into; which slots those are
  (position mod W) is baked into the graph, so there is one graph per mini-batch start t*b < W and one per
  start modulo W after that (2 W / b in all). Otherwise the caches are position-ordered buffers, the step
  concatenates them with its keys and copies the last W back: one graph per start below W and one for every
  step after. The graph reads and updates in place the inner weights phi and those caches, which this object
  owns while it serves a state.
- Decoding (one token for every sequence). The ring-buffer slot to write and the slots to read follow the device
  position (`KVCache._attend_in_graph`), and so does the slot of the pending TTT buffer. One graph per set of
  cache buffers (a new inference state captures its own on its first token).

The first call with a given key runs eagerly on the capture stream (that compiles the Triton kernels and sizes
the memory pool) and is then captured; later calls replay. Every graph shares one memory pool: they never run at
once and keep nothing in it between replays (results are copied into buffers allocated outside the pool).
With capture=False (the CPU, and the tests that check this path against the plain one) the same static-buffer
code runs eagerly.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Optional

import torch

from ttt_e2e.model.rope import DevicePos, shared_rope_angles
from ttt_e2e.model.layers import compute_dtype, first_order_only
from ttt_e2e.ttt.inner import inner_step

from .kv_cache import StepRing, token_major_zeros


@contextlib.contextmanager
def step_scope():
    """What an inference inner step runs under, graphed or eager: its blocks share one set of RoPE angles, and
    nothing differentiates it twice (the fused norm kernels with their first-order backward)."""
    with shared_rope_angles(), first_order_only():
        yield


def phi_c_or_none(phi_dec: dict, h: torch.Tensor) -> Optional[dict]:
    """phi_dec as the inner step's phi_c where it holds phi in the dtype the step computes in (saving the step a
    cast of phi), else None (the step casts). They differ only without autocast when phi's dtype is not the
    weights' (inner_dtype), phi_dec then being phi itself."""
    dtype = compute_dtype(h)
    return phi_dec if all(p.dtype == dtype for p in phi_dec.values()) else None


class InferenceGraphs:
    """Serves one inference state at a time: `start(..., graphs=g)` hands it to the new state (its phi and
    suffix caches then live in buffers owned here). Keep one per model and batch size to pay each capture once."""

    def __init__(self, capture: Optional[bool] = None):
        self.capture = torch.cuda.is_available() if capture is None else capture
        self.owner = None
        self._graphs: dict = {}
        self._signature = None  # (model, batch size, eta, clip): what the step graphs bake in
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream = torch.cuda.Stream() if self.capture else None
        self.phi: dict[str, torch.Tensor] = {}
        self.phi_dec: dict[str, torch.Tensor] = {}
        self.base: list = []  # per suffix block: a StepRing, or (k, v) in position order (W not a multiple of b)
        self._step_in: Optional[dict] = None
        self._dec_in: Optional[dict] = None

    # ---- ownership --------------------------------------------------------------------------------------------
    def claim(self, state) -> None:
        """Make this the graphs of `state` (just started): reset the buffers to its initial phi and empty caches."""
        s = state.settings
        signature = (id(state.model), state.batch_size, None if s is None else (s.eta, s.clip))
        if signature != self._signature:  # other shapes or baked-in constants: start over
            self._graphs.clear()
            self.phi, self.phi_dec, self.base, self._step_in = {}, {}, [], None
            self._signature = signature
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] == "step"}  # decode graphs name old caches
        self._dec_in = None
        self.owner = state
        if not state.ttt:
            return
        if not self.phi:
            self.phi = {n: torch.empty_like(p) for n, p in state.phi.items()}  # materialized: phi starts expanded
            # phi_dec is phi itself without autocast: one buffer, which the step then writes once
            self.phi_dec = (self.phi if state.phi_dec is state.phi else
                            {n: torch.empty_like(p) for n, p in state.phi_dec.items()})
        for n in self.phi:
            self.phi[n].copy_(state.phi[n])
            self.phi_dec[n].copy_(state.phi_dec[n])
        for c in self.base:
            for t in ((c.k, c.v) if isinstance(c, StepRing) else c):
                t.zero_()
        state.phi, state.phi_dec = self.phi, self.phi_dec

    def _check(self, state) -> None:
        if self.owner is not state:
            raise RuntimeError("these InferenceGraphs now serve another inference state (start() with the same "
                               "graphs hands them over); use one InferenceGraphs per live state")

    # ---- the inner step ---------------------------------------------------------------------------------------
    def inner_step(self, state, h: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, pos0: int):
        """The inner step on the mini-batch at pos0 (a multiple of b): updates phi and the suffix caches in place;
        returns l_t (B,) and the token losses (B, b), fresh tensors."""
        self._check(state)
        W = state.model.cfg.window
        if self._step_in is None:
            self._allocate_step(state, h)
        s = self._step_in
        s["h"].copy_(h)
        s["targets"].copy_(targets)
        s["mask"].copy_(mask)
        s["pos"].fill_(pos0)
        rings = isinstance(self.base[0], StepRing)
        # From W on the cache holds no position below 0: one graph, or one per ring phase. A replayed graph keeps
        # the int it was captured with, which is valid for any later step of its key (see above).
        key = ("step", pos0 if pos0 < W else W + (pos0 % W if rings else 0))
        pos = DevicePos(pos0, s["pos"])
        phi_c = phi_c_or_none(self.phi_dec, s["h"])

        def step():
            # phi and phi_dec updated in place: no cast of phi nor copies of the new one into these buffers
            with step_scope():
                l_t, tok, _, caches_next, _, _ = inner_step(
                    state.model.suffix, state.theta, state.model.head_weight(), self.phi, self.base, s["h"],
                    s["targets"], s["mask"], pos, state.settings, phi_c=phi_c, out=(self.phi, self.phi_dec))
            for c, (k_next, v_next) in zip(self.base, caches_next):
                if rings:  # the step's own keys (Attention returns those for a cache object)
                    c.write(k_next, v_next, pos0)
                else:
                    c[0].copy_(k_next)
                    c[1].copy_(v_next)
            s["loss"].copy_(l_t)
            s["tok"].copy_(tok)

        self._run(key, step, state)
        return s["loss"].clone(), s["tok"].clone()

    def suffix_cache(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffix block i's keys/values of the last min(n, W) positions before n (after the step ending at n)."""
        if isinstance(self.base[i], StepRing):
            return self.base[i].ordered(n)
        k, v = self.base[i]
        held = min(n, k.shape[2])
        return k[:, :, k.shape[2] - held:], v[:, :, v.shape[2] - held:]

    def _allocate_step(self, state, h: torch.Tensor) -> None:
        cfg, B, b = state.model.cfg, state.batch_size, state.b
        # The keys' dtype is what the attention projections give under the state's autocast.
        kv_dtype = state.autocast or next(state.model.parameters()).dtype
        out = torch.promote_types(torch.float32, h.dtype)  # the losses are at least fp32
        like = h.new_empty((), dtype=kv_dtype)
        shape = (B, cfg.kv_heads, cfg.window, cfg.head_dim)
        pair = lambda: (token_major_zeros(like, *shape), token_major_zeros(like, *shape))  # noqa: E731
        self.base = [StepRing(*pair()) if cfg.window % b == 0 else pair() for _ in range(cfg.suffix_len)]
        self._step_in = {"h": torch.empty_like(h), "targets": h.new_empty(B, b, dtype=torch.long),
                         "mask": h.new_empty(B, b, dtype=torch.bool), "pos": h.new_zeros((), dtype=torch.long),
                         "loss": h.new_empty(B, dtype=out), "tok": h.new_empty(B, b, dtype=out)}

    # ---- decoding ---------------------------------------------------------------------------------------------
    def decode(self, state, ids: torch.Tensor, forward: Callable) -> torch.Tensor:
        """One token (B, 1) at state.pos through `forward(ids, pos) -> logits`, which must take the graph-safe
        paths for a DevicePos (the engine's). Returns its logits; the caller advances the host-side counters."""
        self._check(state)
        if self._dec_in is None:
            self._dec_in = {"ids": ids.new_empty(ids.shape), "pos": ids.new_zeros((), dtype=torch.long)}
        s = self._dec_in
        s["ids"].copy_(ids)
        s["pos"].fill_(state.pos)
        # Every cache buffer's address and layout: a prefill chunk may have put new tensors in place of a ring
        # (KVCache.attend adopts a W-long chunk's k and v), whose graph must not be one naming freed memory
        buffers = tuple((t.data_ptr(), t.stride()) for c in state.caches for t in (c.k, c.v))
        if state.ttt:
            buffers += (state.pending_h.data_ptr(), state.pending_ids.data_ptr())
        if ("decode", buffers) not in self._graphs:  # the earlier decoding graphs name buffers no longer in use
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != "decode"}
        pos = DevicePos(state.pos, s["pos"])

        return self._run(("decode", buffers), lambda: forward(s["ids"], pos), state).clone()

    # ---- capture / replay -------------------------------------------------------------------------------------
    def _run(self, key, fn: Callable[[], Optional[torch.Tensor]], state) -> Optional[torch.Tensor]:
        """fn() now: eagerly, or by replaying its graph. Returns fn's output (for a replay, the graph's static
        output, overwritten by the next replay of any graph: copy what must stay)."""
        if not self.capture:
            return fn()
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            return out
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            result = fn()  # the real call, eagerly: it warms up what the capture needs
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # Autocast's cast cache would hold graph-pool tensors past the capture: off while capturing.
        no_cache = (torch.autocast("cuda", dtype=state.autocast, cache_enabled=False) if state.autocast
                    else contextlib.nullcontext())
        # No garbage collection while capturing: the step's autograd (torch.func) leaves reference cycles, and a
        # collection inside the capture could free the eager call's tensors in the middle of it. One bf16 capture
        # of the GPU test failed once on the H100 ("operation failed due to a previous error during capture"),
        # after earlier tests in the same process; not reproduced on demand, cause not established. This takes
        # away the one source of mid-capture work that does not come from the step itself.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream), no_cache:
                out = fn()  # recorded, not run: the eager call above already did this call's work
        finally:
            if gc_was_on:
                gc.enable()
        self._graphs[key] = (graph, out)
        return result
