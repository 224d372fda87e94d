"""Whole-step CUDA graph capture: one replay runs forward, the inner loop, the outer backward and the optimizer.

A meta step issues tens of thousands of small kernels (every op of every inner step, its backward, the
recomputation, the double backward), and launching them from Python costs more than running them: the step is
host-bound. Its shapes are static (the KV cache lengths depend only on the mini-batch index) and it has no host
syncs, so it can be captured once and replayed. Requirements (checked by capture, not here): no `.item()` or
other syncs in the step, an optimizer built with `capturable=True`, gradients set to None before capture (so the
captured backward assigns them rather than accumulating), and inputs copied into the static buffers.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, step: Callable[..., torch.Tensor], *example_inputs: torch.Tensor, warmup: int = 3,
                 zero_grad: Callable[[], None] | None = None):
        """step(*inputs) -> outputs (tensors). Runs `warmup` eager steps on a side stream (compiles Triton
        kernels, sizes the allocator), then captures one. zero_grad is called before each eager step and before
        capture (set_to_none, so the captured backward writes fresh gradients on every replay)."""
        self.static_inputs = [x.clone() for x in example_inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                if zero_grad:
                    zero_grad()
                step(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if zero_grad:
            zero_grad()
        torch.cuda.empty_cache()  # the eager warm-up's cached blocks would otherwise sit beside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = step(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs
