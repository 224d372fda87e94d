"""The micro-step: one micro-batch's forward and backward, chosen once from the run's plan (plan.py).

Two implementations of one interface, which DDP, FSDP2 and a lone process share:

    step.begin()                      before a step's first micro-batch
    out = step(x, y, m, ilr, last)    forward + backward of one micro-batch; its gradient added to .grad
    step.end()                        after the last: the gradients are every rank's mean
    step.zero_grad()                  after the optimizer step

- EagerMicroStep: the wrapped module (DDP, FSDP2 or bare) called eagerly; the wrapper reduces the gradients
  during the last micro-batch's backward (its sync skipped on the others).
- GraphedMicroStep (graphed.py): the unwrapped loss captured as a CUDA graph; the gradients reduced after the
  last micro-batch, outside the graph; under FSDP2 on a replica whose whole parameters come from the shards
  (sharded.py).

`build` makes the wrapper and the micro-step together, since the graphed FSDP2 step needs the model before it is
sharded (its replica is a copy of it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ttt_e2e.config import Config

from .graphed import GraphedMicroStep
from .parallel import LossModule, parallelize
from .plan import RunPlan


def _no_sync(wrapped, sync: bool):
    """Skip the gradient reduction on all but the last micro-batch of a step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def off():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


class EagerMicroStep:
    captured = False  # (the graphed step's: whether it replays a graph)

    def __init__(self, wrapped: nn.Module, params: list[torch.Tensor], amp: Callable, n_micro: int):
        self.wrapped, self.params, self.amp, self.n_micro = wrapped, params, amp, n_micro

    def begin(self) -> None:
        pass

    def __call__(self, x, y, m, ilr: float, last: bool = True) -> dict:
        with _no_sync(self.wrapped, last):
            with self.amp():
                out = self.wrapped(x, y, m, ilr)
            (out["loss"] / self.n_micro).backward()
        return {k: v.detach() for k, v in out.items()}

    def end(self) -> None:
        pass

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


@dataclass
class Parallel:
    wrapped: nn.Module  # DDP, FSDP2-sharded or bare
    params: list[torch.Tensor]  # the parameters the optimizer steps (FSDP2: the sharded ones), taken once
    micro_step: EagerMicroStep | GraphedMicroStep

    def eval_module(self) -> nn.Module:
        """What the evaluation calls: the wrapped module, or under graphed FSDP2 the replica with its whole
        parameters made current, which needs no FSDP2 gathers and which the inference engine's path evaluates
        in memory constant in the context (evaluate.py) rather than the training-mode loss."""
        bridge = getattr(self.micro_step, "bridge", None)
        if bridge is None:
            return self.wrapped
        bridge.gather()
        return self.micro_step.module


def build(plan: RunPlan, cfg: Config, loss_module: LossModule, amp: Callable, n_micro: int) -> Parallel:
    template = None
    if plan.graph and plan.parallel == "fsdp":
        from .sharded import replica_of

        template = replica_of(loss_module.model)
    wrapped = parallelize(loss_module, cfg, plan)
    params = list(loss_module.model.parameters())
    if not plan.graph:
        return Parallel(wrapped, params, EagerMicroStep(wrapped, params, amp, n_micro))
    if template is None:  # one process or DDP: the graph runs the unwrapped module itself
        return Parallel(wrapped, params, GraphedMicroStep(loss_module, amp, n_micro, capture=plan.capture))
    from .sharded import ShardBridge

    bridge = ShardBridge(loss_module.model, template)
    replica = LossModule(bridge.replica, cfg.ttt, plan.kernels)
    return Parallel(wrapped, params, GraphedMicroStep(replica, amp, n_micro, capture=plan.capture, bridge=bridge))
