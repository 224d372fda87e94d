"""Rematerialization of one inner step, exact through the gradient-of-a-gradient.

torch.utils.checkpoint does not fit an inner step: the non-reentrant variant runs the step three times (the
inner gradient inside it unpacks its own saved tensors, which triggers a recomputation already in the forward)
and torch.func transforms refuse its saved-tensor hooks; the reentrant variant runs the forward without grad,
where an inner gradient cannot be built. So this Function runs the step once in the forward, keeping nothing
but its inputs, and in the backward runs it again with autograd recording (now the inner gradient is built with
its graph, since the inputs require grad) and takes the vector-Jacobian product of the whole step, inner
gradient included. Every tensor the step reads must be passed in, parameters too, so their gradients flow.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class _Remat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable, out_box: list, *flat: torch.Tensor):
        ctx.fn = fn
        ctx.set_materialize_grads(False)  # outputs the loss does not use (metrics) cost no backward
        ctx.autocast = _autocast_state()
        ctx.save_for_backward(*flat)
        with torch.no_grad():  # torch.func.grad inside fn still differentiates: it is a transform, not autograd
            out_flat, out_spec = tree_flatten(fn(*flat))
        out_box.append(out_spec)
        return tuple(out_flat)

    @staticmethod
    def backward(ctx, *grad_outs: torch.Tensor):
        flat = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        inputs = [_detach(x, n) for x, n in zip(flat, needs)]
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for device, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            outs, _ = tree_flatten(ctx.fn(*inputs))
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
        wrt = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                     if pairs and wrt else [None] * len(wrt))
        return (None, None, *(next(grads) if x.requires_grad else None for x in inputs))


def remat(fn: Callable, *args: Any):
    """fn(*args), recomputed in the backward instead of stored. args and outputs are pytrees whose tensor leaves
    are the inputs and outputs; other leaves of args (None, numbers) pass through as constants."""
    flat, spec = tree_flatten(args)
    is_tensor = [isinstance(x, torch.Tensor) for x in flat]

    def call(*tensors):
        it = iter(tensors)
        return fn(*tree_unflatten([next(it) if t else x for x, t in zip(flat, is_tensor)], spec))

    out_box: list = []
    out_flat = _Remat.apply(call, out_box, *(x for x, t in zip(flat, is_tensor) if t))
    return tree_unflatten(list(out_flat), out_box[0])


def _detach(x: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    y = x.detach().requires_grad_(requires_grad)
    for name in ("_weight_grad", "_gain_grad"):  # a shared weight or gain (model/linear.py, kernels/rmsnorm): the
        if hasattr(x, name):                     # recomputed uses defer to it as well
            setattr(y, name, getattr(x, name))
    return y


def _autocast_state():
    return [(dev, torch.get_autocast_dtype(dev)) for dev in ("cuda", "cpu") if torch.is_autocast_enabled(dev)]
