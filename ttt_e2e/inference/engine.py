"""Prefill and decoding: one `feed` for both, so that a token is processed the same way wherever it comes from.

    state = start(model, ttt, batch_size)
    logits = feed(state, prompt_ids)        # prefill: any length >= 1, logits of the last token
    logits = feed(state, next_ids)          # decode: (B, 1), or more tokens at once (continued prefill)

Per token (docs/METHOD.md section 4): the prefix blocks run over it with their KV caches (in chunks of up to
`prefill_chunk` tokens); the suffix blocks then handle it in mini-batches of b with the current inner weights phi.

When TTT steps happen. As in training, the step on mini-batch t (inputs at positions tb .. tb+b-1) needs its b
targets, the last of which is the token at (t+1)b. So the step is taken as soon as that token is known, and
before that token's own logits are computed, which then use phi_{t+1}, exactly as in training. Concretely:
- a full mini-batch whose targets all lie in the tokens being fed runs `inner_step` directly (one forward and one
  backward through the suffix, the loss l_t computed before the update: the training computation, reused);
- any other tokens, including the final partial mini-batch of a prompt (and always the prompt's last token, whose
  target is not known yet), run the suffix forward only, with phi_t: their keys/values enter the KV caches and
  the last token gives the logits. They wait in a pending buffer; once it holds b tokens and the next token
  arrives (generated or fed), the step runs on them: the suffix re-run over those b tokens with the caches from
  before them, loss, gradient, clip, SGD. No partial steps: every logit equals the training-time (meta mode)
  logit for the same tokens, whatever the prompt length or the way the tokens are split between calls.

Baselines (ttt None or train_mode pretrain): no inner loop, every block runs with its trained weights; window
None is full attention with a growing KV cache.

With `graphs` (an InferenceGraphs, the default of `generate` on a GPU) the inner steps and the decoding of single
tokens replay CUDA graphs (graphs.py); the prefix over prompt chunks stays eager (few, large kernels). On a GPU
a prompt of several chunks runs each next chunk's prefix on a second stream while the current chunk's inner steps
run (`_Ahead`): the prefix never depends on the suffix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.func import functional_call

from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.model.rope import DevicePos, shared_rope_angles
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.precision import autocast_dtype
from ttt_e2e.ttt.inner import inner_step
from ttt_e2e.ttt.settings import InnerSettings

from .graphs import InferenceGraphs, phi_c_or_none, step_scope
from .kv_cache import KVCache

DEFAULT_CHUNK = 8192  # prefix tokens per forward in prefill: bounds activation memory independently of context


@dataclass
class InferenceState:
    model: Transformer
    batch_size: int
    caches: list[KVCache]  # one per block: prefix blocks, then suffix blocks
    chunk: int
    b: int = 0  # mini-batch size; 0: no TTT
    settings: Optional[InnerSettings] = None  # eta, clip, window, kernels of the inner steps (TTT only)
    bos_id: Optional[int] = None  # targets equal to it carry no loss (as in training)
    theta: dict = field(default_factory=dict)  # the suffix's non-inner weights
    phi: dict = field(default_factory=dict)  # inner weights, (B, ...) each: one copy per sequence; a view of the
    # weights until the first step, then the state's own tensors, updated in place by each later step
    phi_dec: dict = field(default_factory=dict)  # phi in the compute dtype, for decoding (cast once per step)
    base: Optional[list] = None  # suffix (k, v) caches from before the pending mini-batch, in position order
    pending_h: Optional[torch.Tensor] = None  # (B, b, d) prefix outputs of the pending tokens
    pending_ids: Optional[torch.Tensor] = None  # (B, b)
    n_pending: int = 0
    pos: int = 0  # tokens consumed: the next token sits at this position
    losses: list = field(default_factory=list)  # l_t (B,) of every step taken, in order
    token_losses: list = field(default_factory=list)  # (B, b) of every step taken
    autocast: Optional[torch.dtype] = None
    graphs: Optional[InferenceGraphs] = None
    stepped_to: Optional[int] = None  # the suffix caches of the inner step ending here, still to be copied into
    # the suffix KVCaches (only the forward-only and decoding passes read those)
    side: Optional[object] = None  # SideStream (or SerialSide): a long prompt's next prefix chunk runs on it

    @property
    def ttt(self) -> bool:
        return self.b > 0

    @property
    def suffix_caches(self) -> list[KVCache]:
        return self.caches[self.model.cfg.n_prefix:]


def start(model: Transformer, ttt: Optional[TTTConfig], batch_size: int, *, bos_id: Optional[int] = None,
          ilr_mult: float = 1.0, prefill_chunk: Optional[int] = None, inner_dtype: Optional[torch.dtype] = None,
          reserve: int = 0, graphs: Optional[InferenceGraphs] = None,
          overlap_prefix: Optional[bool] = None, kernels: Optional[Kernels] = None) -> InferenceState:
    """A fresh state for `batch_size` sequences. ttt None or train_mode pretrain: a baseline without TTT.
    inner_dtype: dtype of phi; default float32 for half-precision weights (docs/METHOD.md: fp32 inner state), else the
    weights' dtype. reserve: positions to allocate up front in growing (full attention) caches. graphs: replay
    the inner steps and single-token decoding as CUDA graphs; the state takes them over from any earlier one.
    overlap_prefix: in a prompt of more than one prefix chunk, run each next chunk's prefix on a side stream
    while the current chunk's inner steps run (default: on a GPU, with TTT; on the CPU the same order of work,
    serially). kernels: the inner steps' cross-entropy and SGD update (config.py: Kernels), the same as the model's
    own modules use; default Kernels.of(model.cfg), the model's own default."""
    cfg = model.cfg
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    use_ttt = ttt is not None and ttt.train_mode == "meta"
    chunk = prefill_chunk or DEFAULT_CHUNK
    if use_ttt:
        if ttt.mini_batch_size < 1:
            raise ValueError(f"ttt.mini_batch_size must be >= 1, got {ttt.mini_batch_size}")
        if cfg.suffix_len < 1 or not cfg.prime_mlp:
            raise ValueError("TTT inference needs suffix blocks with MLP' (model.suffix_len >= 1, prime_mlp)")
        if cfg.window is None:
            raise ValueError("TTT inference needs a sliding-window model (model.window set); full attention is "
                             "only supported for baselines (ttt None or train_mode pretrain)")
        chunk = max(ttt.mini_batch_size, chunk // ttt.mini_batch_size * ttt.mini_batch_size)
    caches = [KVCache(cfg.window) for _ in range(cfg.n_layers)]
    for c in caches:
        c.reserve(reserve)
    param = next(model.parameters())
    state = InferenceState(model, batch_size, caches, chunk, bos_id=bos_id,
                           autocast=autocast_dtype(cfg, param.device, param.dtype))
    if use_ttt:
        params = dict(model.suffix.named_parameters())
        inner = model.suffix.inner_names()  # a list: a fixed order of summation in the grad norm
        p_dtype = next(model.parameters()).dtype
        inner_dtype = inner_dtype or (torch.float32 if p_dtype in (torch.bfloat16, torch.float16) else p_dtype)
        kernels = Kernels.of(cfg) if kernels is None else kernels
        state.b, state.settings = ttt.mini_batch_size, InnerSettings.build(model, ttt, kernels, ilr_mult)
        state.theta = {n: p.detach() for n, p in params.items() if n not in inner}
        state.phi = {n: params[n].detach().to(inner_dtype).expand(batch_size, *params[n].shape) for n in inner}
        state.phi_dec = _decode_copy(state)
    device = next(model.parameters()).device
    if use_ttt and (device.type == "cuda" if overlap_prefix is None else overlap_prefix):
        state.side = SideStream(device) if device.type == "cuda" else SerialSide()
    if graphs is not None:
        if graphs.capture and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a GPU (or InferenceGraphs(capture=False))")
        graphs.claim(state)
        state.graphs = graphs
    return state


@torch.no_grad()
def feed(state: InferenceState, ids: torch.Tensor) -> torch.Tensor:
    """Process ids (B, n), n >= 1, the tokens at positions state.pos .. ; returns the logits (B, vocab) of the
    last one (float32 or the weights' dtype, whichever is wider)."""
    _check_ids(state, ids)
    try:
        with _autocast(state):
            logits = _feed(state, ids)
    except torch.OutOfMemoryError as e:
        raise MemoryError(f"out of memory at context position {state.pos} (batch {state.batch_size}); use a "
                          f"shorter context, a smaller batch or a smaller prefill chunk ({state.chunk})") from e
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _feed(state: InferenceState, ids: torch.Tensor) -> torch.Tensor:
    L, P = state.model.cfg.n_layers, state.model.cfg.n_prefix
    n, b, i, logits, ahead = ids.shape[1], state.b, 0, None, None
    while i < n:  # each pass handles ids[:, i:j], the tokens at positions state.pos ..
        if state.ttt and state.n_pending == b:  # the pending mini-batch is full and ids[:, i] is its last target
            targets = torch.cat((state.pending_ids[:, 1:], ids[:, i:i + 1]), 1)
            _inner_step(state, state.pending_h, targets, state.pos - b)
            state.n_pending = 0
        if n - i == 1 and _can_graph_decode(state):
            j = i + 1
            logits = _decode_graphed(state, ids[:, i:j])
        elif not state.ttt:  # baseline: every block alike, chunk by chunk
            j = min(n, i + state.chunk)
            logits = _logits(state, _blocks(state, state.model.wte(ids[:, i:j]), 0, L))
        elif state.n_pending == 0 and i + b < n:  # whole mini-batches whose targets are all in ids: train on them
            j = _train_end(state, i, n)
            h = ahead.take() if ahead is not None else _blocks(state, state.model.wte(ids[:, i:j]), 0, P)
            ahead = None
            if state.side is not None and j + b < n:  # the next pass trains too: its prefix runs meanwhile
                ahead = _Ahead(state, ids[:, j:_train_end(state, j, n)], state.pos + j - i)
            for m in range(0, j - i, b):
                _inner_step(state, h[:, m:m + b], ids[:, i + m + 1:i + m + b + 1], state.pos + m)
        else:  # suffix forward only with phi_t; the tokens wait in the pending buffer for their step
            j = min(n, i + b - state.n_pending)
            _sync_suffix_caches(state)
            h = _blocks(state, state.model.wte(ids[:, i:j]), 0, P)
            logits = _logits(state, _blocks(state, h, P, L))
            _add_pending(state, h, ids[:, i:j])
        state.pos += j - i
        i = j
    return logits  # the last pass is never a training one (it needs a token after it), so this is set


def _train_end(state: InferenceState, i: int, n: int) -> int:
    """End of the training pass that starts at ids[:, i]: whole mini-batches whose targets (the token after
    each input) are all in the n ids, at most a prefix chunk of them."""
    return i + min((n - 1 - i) // state.b, state.chunk // state.b) * state.b


class _Ahead:
    """The prefix blocks over the next training pass's tokens, run on the side stream while the current
    stream runs this pass's inner steps. The prefix does not depend on the suffix, and each inner step is
    hundreds of kernels of 1K tokens whose tails and memory-bound stretches leave the SMs part-idle: the
    prefix's large kernels fill some of that (benchmarks/inference/prefill_overlap.py; figures in RESULTS.md).
    The prefix KV caches are touched by the side stream only, in order, until the last look-ahead is taken."""

    def __init__(self, state: InferenceState, ids: torch.Tensor, pos: int):
        with state.side.ahead():
            self.h = _blocks(state, state.model.wte(ids), 0, state.model.cfg.n_prefix, pos)
        self.side = state.side

    def take(self) -> torch.Tensor:
        self.side.join(self.h)
        return self.h


_SIDE_STREAMS: dict = {}  # device -> the one side stream of all states on it


class SideStream:
    """The second CUDA stream of `_Ahead`: one per device, shared by every state. The caching allocator reuses a
    freed block only on the stream it was allocated on, so a new stream per prompt (torch hands out its pooled
    streams in turn) left each prompt's look-ahead memory unusable to the next: every prompt reserved its
    look-ahead memory anew, until the allocator ran out and emptied its cache (and a long prompt after that stalled
    in the graph replays; benchmarks/RESULTS.md)."""

    def __init__(self, device: torch.device):
        self.device = device  # the model's, which need not be the current device
        key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
        if key not in _SIDE_STREAMS:
            _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
        self.stream = _SIDE_STREAMS[key]

    def ahead(self):
        # After everything enqueued so far: the previous prefix pass, and every read of memory that the side
        # stream's allocator may now hand out again
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def join(self, h: torch.Tensor) -> None:
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        h.record_stream(main)  # allocated on the side stream, read on this one


class SerialSide:
    """The same order of work without a second stream (CPU): what the tests of the look-ahead run."""

    def ahead(self):
        return contextlib.nullcontext()

    def join(self, h: torch.Tensor) -> None:
        pass


def _blocks(state: InferenceState, x: torch.Tensor, lo: int, hi: int, pos: Optional[int] = None) -> torch.Tensor:
    """Blocks lo..hi-1 over x at positions pos.. (default state.pos), each with its KVCache; suffix blocks with
    phi."""
    pos = state.pos if pos is None else pos
    blocks = [*state.model.prefix, *state.model.suffix.blocks]
    with shared_rope_angles():
        for layer in range(lo, hi):
            block, cache = blocks[layer], state.caches[layer]
            if state.ttt and layer >= state.model.cfg.n_prefix:  # the current inner weights phi replace MLP'
                name = f"blocks.{layer - state.model.cfg.n_prefix}.prime."
                phi = {f"prime.{w}": state.phi_dec[name + w] for w, _ in block.prime.named_parameters()}
                x = functional_call(block, phi, (x, pos, cache))[0]
            else:
                x = block(x, pos, cache)[0]
    return x


def _can_graph_decode(state: InferenceState) -> bool:
    if state.graphs is None or any(c.k is None for c in state.caches):
        return False  # no graphs, or the caches are not allocated yet (nothing fed so far)
    if any(c.window is None and c.n >= c.k.shape[2] for c in state.caches):
        return False  # a full-attention buffer must grow first (eagerly; the next token captures anew)
    return not state.ttt or (state.pending_h is not None and state.n_pending == state.pos % state.b)


def _decode_graphed(state: InferenceState, ids: torch.Tensor) -> torch.Tensor:
    """One token per sequence through the decoding graph; then the host-side counters it cannot advance."""
    _sync_suffix_caches(state)
    P, L = state.model.cfg.n_prefix, state.model.cfg.n_layers

    def forward(ids: torch.Tensor, pos: DevicePos) -> torch.Tensor:
        h = _blocks(state, state.model.wte(ids), 0, P, pos)
        if state.ttt:
            slot = (pos.tensor % state.b).view(1)
            state.pending_h.index_copy_(1, slot, h.to(state.pending_h.dtype))
            state.pending_ids.index_copy_(1, slot, ids)
        return _logits(state, _blocks(state, h, P, L, pos))

    logits = state.graphs.decode(state, ids, forward)
    for cache in state.caches:
        cache.n += 1
    state.n_pending += state.ttt
    return logits


def _logits(state: InferenceState, x: torch.Tensor) -> torch.Tensor:
    """Logits of the last position only: the head is the largest matmul, the other positions need none."""
    return state.model.suffix.ln_f(x[:, -1]) @ state.model.head_weight().T


def _inner_step(state: InferenceState, h: torch.Tensor, targets: torch.Tensor, pos0: int) -> None:
    """The training inner step (ttt/inner.py) on the mini-batch at pos0, from the caches before it."""
    mask = torch.ones_like(targets, dtype=torch.bool) if state.bos_id is None else targets != state.bos_id
    if state.graphs is not None:  # phi and the suffix caches are updated in place, in the graphs' buffers
        l_t, tok = state.graphs.inner_step(state, h, targets, mask, pos0)
    else:
        # In place from the second step on: before the first, phi is a view of the model's weights (never written)
        out = (state.phi, state.phi_dec) if state.losses else None
        with step_scope():
            l_t, tok, phi, state.base, _, _ = inner_step(
                state.model.suffix, state.theta, state.model.head_weight(), state.phi, state.base, h, targets,
                mask, pos0, state.settings, phi_c=phi_c_or_none(state.phi_dec, h), out=out)
        if out is None:
            state.phi = phi
            state.phi_dec = _decode_copy(state)
    state.stepped_to = pos0 + state.b
    state.losses.append(l_t)
    state.token_losses.append(tok)


def _sync_suffix_caches(state: InferenceState) -> None:
    """Copy the suffix keys of the last inner step into the suffix KVCaches, once, before they are read. The keys
    the step computed with phi_t are the ones training carries on with; they replace those that decoding wrote for
    the same positions (equal up to rounding, computed token by token)."""
    n = state.stepped_to
    if n is None:
        return
    for i, cache in enumerate(state.suffix_caches):
        cache.reset(*(state.graphs.suffix_cache(i, n) if state.graphs is not None else state.base[i]), n)
    state.stepped_to = None


def _add_pending(state: InferenceState, h: torch.Tensor, ids: torch.Tensor) -> None:
    if state.pending_h is None:
        state.pending_h = h.new_empty(h.shape[0], state.b, h.shape[2])
        state.pending_ids = ids.new_empty(ids.shape[0], state.b)
    n, T = state.n_pending, h.shape[1]
    state.pending_h[:, n:n + T] = h
    state.pending_ids[:, n:n + T] = ids
    state.n_pending += T


def _decode_copy(state: InferenceState) -> dict:
    if state.autocast is None:
        return state.phi
    return {n: p.to(state.autocast) for n, p in state.phi.items()}


def _autocast(state: InferenceState):
    if state.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(next(state.model.parameters()).device.type, dtype=state.autocast)


def _check_ids(state: InferenceState, ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"token ids must be a (batch, length) tensor, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.shape[0] != state.batch_size:
        raise ValueError(f"got a batch of {ids.shape[0]} sequences for a state of batch size {state.batch_size}")
    if ids.shape[1] < 1:
        raise ValueError("empty prompt: need at least one token (e.g. BOS)")
    vocab = state.model.cfg.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab}): wrong tokenizer?")
    device = state.model.wte.weight.device
    if ids.device != device:
        raise ValueError(f"token ids are on {ids.device}, the model on {device}")
