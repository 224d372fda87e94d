"""The project's one CUDA-graph capture helper: a step captured once and replayed (the trainer's micro-step,
ttt_e2e/train/graphed.py, and the whole-step benchmark, benchmarks/train/meta_step.py).

A meta step issues tens of thousands of small kernels (every op of every inner step, its backward, the
recomputation, the double backward), and launching them from Python costs more than running them: the step is
host-bound. Its shapes are static (the KV cache lengths depend only on the mini-batch index) and it has no host
syncs, so it can be captured once and replayed. Requirements (checked by capture, not here): no `.item()` or
other syncs in the step, inputs copied into the static buffers, and gradients that exist where the captured
backward should accumulate into them (allocated and zeroed before capture) or are None where it should assign
fresh ones; an optimizer inside the step needs `capturable=True`.
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, step: Callable[..., object], *example_inputs: torch.Tensor, warmup: int = 3,
                 zero_grad: Callable[[], None] | None = None, capture_error_mode: str = "global"):
        """step(*inputs) -> outputs (tensors, or a dict/tuple of them). Runs `warmup` eager steps on a side stream
        (compiles Triton kernels, sizes the allocator; their effect on the gradients is undone by zero_grad), then
        captures one. zero_grad is called before each eager step and before capture. capture_error_mode as
        torch.cuda.graph's: "thread_local" where other threads may touch CUDA meanwhile (NCCL's watchdog)."""
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
        with torch.cuda.graph(self.graph, capture_error_mode=capture_error_mode):
            self.static_outputs = step(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        """Copies inputs into the static buffers (same shapes as the example) and replays; the outputs are the
        static tensors, overwritten by the next replay."""
        for static, x in zip(self.static_inputs, inputs):
            if static.shape != x.shape:
                raise ValueError(f"CUDA graph: input of shape {tuple(x.shape)}, captured {tuple(static.shape)} "
                                 "(a graph replays fixed shapes)")
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs
