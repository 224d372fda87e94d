"""autograd.Functions tying the kernels together, so that grad-of-grad works.

  _SWAttention        forward kernel            backward -> _SWABackward.apply (differentiable)
  _SWACachedAttention the same over cat(cache, block), which it also returns
  _SWASplitAttention  the same over a constant cache (a ring) and the block, read where they lie; its backward
                      (_SWASplitBackward: dq, and dK, dV of the block's keys) is not differentiable again:
                      inference's inner step
  _SWABackward        dq/dk/dv kernels          backward -> _SWADoubleBackward.apply
  _SWADoubleBackward  double-backward kernels   backward -> NotImplementedError (third order)

Each backward is itself an autograd op, so `torch.autograd.grad(..., create_graph=True)` records _SWABackward and a
second grad runs the double-backward kernels. All three use the `setup_context` form (forward without ctx), which
is what torch.func needs to nest `grad(grad(f))`.

_SWABackward takes O and lse as inputs but returns no gradient for them: the double-backward formulas (docs/METHOD.md
section 6, with delta = rowsum(P * dP)) already give the total derivative through Q, K, V, dO, so routing anything
through O or lse as well would count it twice. lse and delta are non-differentiable outputs.

_SWACachedAttention takes the KV cache and the block's keys/values as separate inputs so that its backward sees
whether the cache needs a gradient (`needs_input_grad`, per torch.func level): TTT's inner gradient treats the
cache as a constant, and then dK, dV are computed for the block's keys only (`k_grad_from`), which skips the
cache's key tiles in the backward and its cotangent products in the double backward. It does the concatenation
itself and returns it (the caller's next cache), so the keys it saves are its own output: the double backward's
gradient w.r.t. them comes back through this node as the cotangent of that output, i.e. through the concatenation.
The concatenation appends to a buffer with room for the window (`_append`): mini-batch t writes its block's keys
after the t blocks already there instead of copying all of them again.
"""

import weakref

import torch

from .backward import swa_backward, swa_backward_delta, swa_backward_dkdv, swa_backward_dq
from .common import as_kernel_operand
from .double_backward import swa_double_backward
from .forward import swa_forward


class _SWAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, window, q_pos0, k_pos0, scale):
        q, k, v = (as_kernel_operand(t) for t in (q, k, v))
        return swa_forward(q, k, v, window, q_pos0, k_pos0, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, window, q_pos0, k_pos0, scale = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (window, q_pos0, k_pos0, scale)

    @staticmethod
    def backward(ctx, do, _dlse):
        if do is None:  # o unused downstream
            return None, None, None, None, None, None, None
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, _delta = _SWABackward.apply(q, k, v, o, lse, do, *ctx.args, 0)
        return dq, dk, dv, None, None, None, None


# The key buffers of the caches in flight, by address. A buffer carries its values buffer and how many rows are
# filled (`_values`, `_filled`: attributes, so that nothing refers back to it and it dies with its last view).
_BUFFERS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _holds(kb: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, b: int) -> bool:
    """Whether (k_cache, v_cache) are buffer kb's filled rows, with room for b more after them."""
    tc = k_cache.shape[2]
    return tc == kb._filled and tc + b <= kb.shape[2] and all(
        c.data_ptr() == t.data_ptr() and c.stride() == t.stride() and c.shape[:2] == t.shape[:2]
        for c, t in ((k_cache, kb), (v_cache, kb._values)))


def _new_buffer(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: int) -> torch.Tensor:
    """A key buffer (and its values) of `rows` rows that starts with the cache."""
    B, H, tc, D = k_cache.shape
    kb, vb = k_cache.new_empty((B, H, rows, D)), v_cache.new_empty((B, H, rows, D))
    kb[:, :, :tc].copy_(k_cache)
    vb[:, :, :tc].copy_(v_cache)
    kb._values, kb._filled = vb, tc
    _BUFFERS[kb.data_ptr()] = kb
    return kb


def _append(k_cache, v_cache, k, v, room):
    """cat(k_cache, k), cat(v_cache, v) as views of a buffer: where the cache is the filled head of one (the
    previous mini-batch's keys) with room after it, the block is written there, not the cache copied again; else a
    new buffer takes both, twice as long as they are (amortized: the keys of T / b mini-batches are copied
    O(1) times each), at most room + b rows (room: the longest cache the caller keeps). The rows past a view's end
    are only written once, by the next mini-batch: a view already returned never changes (a second call with the
    same cache gets a new buffer)."""
    tc, b = k_cache.shape[2], k.shape[2]
    kb = _BUFFERS.get(k_cache.data_ptr())
    if kb is None or not _holds(kb, k_cache, v_cache, b):
        kb = _new_buffer(k_cache, v_cache, max(tc + b, min(2 * (tc + b), room + b)))
    vb = kb._values
    # .data: written outside autograd's version counters, whose views of the filled rows earlier nodes saved
    kb.data[:, :, tc:tc + b].copy_(k)
    vb.data[:, :, tc:tc + b].copy_(v)
    kb._filled = tc + b
    return kb[:, :, :tc + b], vb[:, :, :tc + b]


class _SWACachedAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0, scale, room):
        keys, values = _append(k_cache, v_cache, k, v, room)
        o, lse = swa_forward(as_kernel_operand(q), keys, values, window, q_pos0, k_pos0, scale)
        return o, lse, keys, values

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k_cache, _, _, _, window, q_pos0, k_pos0, scale, _ = inputs
        o, lse, keys, values = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, keys, values, o, lse)
        ctx.args = (window, q_pos0, k_pos0, scale)
        ctx.cache_len = k_cache.shape[2]

    @staticmethod
    def backward(ctx, do, _dlse, d_keys, d_values):
        q, keys, values, o, lse = ctx.saved_tensors
        tc = ctx.cache_len
        cache_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        start = 0 if cache_grad else tc  # the first key that needs dK, dV
        dq = dk = dv = None
        if do is not None:
            dq, dk, dv, _delta = _SWABackward.apply(q, keys, values, o, lse, do, *ctx.args, start)
        dk, dv = _add_from(dk, d_keys, start), _add_from(dv, d_values, start)
        split = lambda g, lo, hi: None if g is None else g[:, :, lo:hi]  # noqa: E731
        return (dq, split(dk, 0, tc - start) if ctx.needs_input_grad[1] else None,
                split(dv, 0, tc - start) if ctx.needs_input_grad[2] else None,
                split(dk, tc - start, None), split(dv, tc - start, None), None, None, None, None, None)


class _SWASplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k_cache, v_cache, k, v, window, q_pos0, k_pos0, scale, rot):
        return swa_forward(q, k_cache, v_cache, window, q_pos0, k_pos0, scale, k, v, rot)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k_cache, v_cache, k, v, window, q_pos0, k_pos0, scale, rot = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k_cache, v_cache, k, v, o, lse)
        ctx.args = (window, q_pos0, k_pos0, scale, rot)

    @staticmethod
    def backward(ctx, do, _dlse):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("swa_attention_split: the cache is a constant here (use swa_attention_cached)")
        if do is None:
            return (None,) * 10
        dq, dk, dv = _SWASplitBackward.apply(*ctx.saved_tensors, do, *ctx.args)
        return dq, None, None, dk, dv, None, None, None, None, None


class _SWASplitBackward(torch.autograd.Function):
    """_SWASplitAttention's backward as a node of its own (torch.func hands the kernels plain tensors only
    inside a Function's forward); not differentiable again."""

    @staticmethod
    def forward(q, k_cache, v_cache, k, v, o, lse, do, window, q_pos0, k_pos0, scale, rot):
        do = as_kernel_operand(do)
        delta = swa_backward_delta(o, do)
        dq = swa_backward_dq(q, k_cache, v_cache, do, lse, delta, window, q_pos0, k_pos0, scale, k, v, rot)
        # dK, dV of the block's keys need only the queries that see them (none of the cache)
        dk, dv = swa_backward_dkdv(q, k, v, do, lse, delta, window, q_pos0, k_pos0 + k_cache.shape[2], scale)
        return dq, dk, dv

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("swa_attention_split: no second derivative (inference's inner step needs none)")


def _add_from(g, d_out, start):
    """g (the keys start..) plus the same rows of d_out (every key), either possibly None."""
    if d_out is None:
        return g
    return d_out[:, :, start:] if g is None else g + d_out[:, :, start:]


class _SWABackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, o, lse, do, window, q_pos0, k_pos0, scale, k_grad_from):
        q, k, v, o, do = (as_kernel_operand(t) for t in (q, k, v, o, do))
        delta = swa_backward_delta(o, do)
        dq, dk, dv = swa_backward(q, k, v, do, lse, delta, window, q_pos0, k_pos0, scale, k_grad_from)
        return dq, dk, dv, delta

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, do, window, q_pos0, k_pos0, scale, k_grad_from = inputs
        delta = output[3]
        ctx.mark_non_differentiable(delta)
        # Unused cotangents arrive as None (e.g. only dq enters the outer loss): the kernels then skip their terms
        # instead of multiplying by materialized zeros.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, do, lse, delta)
        ctx.args = (window, q_pos0, k_pos0, scale, k_grad_from)

    @staticmethod
    def backward(ctx, gq, gk, gv, _gdelta):
        nones = (None,) * 5
        if gq is None and gk is None and gv is None:
            return (None,) * 6 + nones
        q, k, v, do, lse, delta = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_do = _SWADoubleBackward.apply(q, k, v, do, lse, delta, gq, gk, gv, *ctx.args)
        return grad_q, grad_k, grad_v, None, None, grad_do, *nones


class _SWADoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, do, lse, delta, gq, gk, gv, window, q_pos0, k_pos0, scale, k_grad_from):
        return swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, window, q_pos0, k_pos0, scale, k_grad_from)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "swa_attention: third-order derivatives are not implemented (the Triton kernels give forward, "
            "backward and double backward); use swa_reference if you need more")
