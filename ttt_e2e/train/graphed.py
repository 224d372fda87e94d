"""training.cuda_graph: one micro-batch's forward and backward captured as a CUDA graph and replayed every step.

A meta-mode step launches tens of thousands of small kernels (every op of every inner step, its backward and
double backward) and is host-bound on an H100; its shapes are static and it has no host syncs, so one capture
serves the whole run. What changes between steps lives in device memory: the micro-batch (copied into static
buffers) and the inner-lr multiplier (a 0-d tensor; the outer lr is the optimizer's, which stays eager with the
clip and the non-finite checks). The gradients are allocated before capture, so the captured backward
accumulates into them (gradient accumulation works unchanged; the trainer zeroes them in place each step).

The warm-up calls (kernel compilation, allocator sizing) run the real forward/backward on the first batch and
their gradients are zeroed: they change no state, so a graphed run computes what an eager one computes.
"""
from __future__ import annotations

from typing import Callable

import torch

from ttt_e2e.config import Config, ConfigError

from .distributed import DistInfo


def use_fused_kernels(cfg: Config, graph: bool) -> tuple[bool, bool]:
    """model.fused_kernels resolved to (elementwise kernels, cross-entropy kernels). Measured on an H100
    (benchmarks/RESULTS.md): the kernels cut the GPU time of every step, but an eager meta step is host-bound, and
    each small kernel call under torch.func costs more host time than the PyTorch ops it replaces; so None turns
    the elementwise ones off exactly there. The cross-entropy kernels replace a dozen passes over (tokens,
    vocabulary) tensors per call and stay on. Eager 125M meta trainer: 0.672 s/step so, 0.736 with every op in
    PyTorch, 0.946 with every kernel."""
    if cfg.model.fused_kernels is not None:
        return cfg.model.fused_kernels, cfg.model.fused_kernels
    return graph or cfg.ttt.train_mode != "meta", True


def use_cuda_graph(cfg: Config, info: DistInfo) -> bool:
    """training.cuda_graph resolved: None is on for one CUDA rank without training.compile; an explicit true that
    cannot work is a ConfigError."""
    if cfg.training.cuda_graph is None:
        return info.device.type == "cuda" and info.world_size == 1 and not cfg.training.compile
    if not cfg.training.cuda_graph:
        return False
    if info.device.type != "cuda":
        raise ConfigError("training.cuda_graph=true needs a CUDA device (training.device resolved to "
                          f"{info.device.type})")
    if info.world_size > 1:
        raise ConfigError("training.cuda_graph=true is single-GPU only: the DDP/FSDP2 gradient reductions are not "
                          f"captured; got {info.world_size} ranks (drop cuda_graph, or run one rank)")
    return True


class GraphedMicroStep:
    """Called like the eager micro-step; captures at the first call (with that micro-batch as the example)."""

    def __init__(self, wrapped: torch.nn.Module, params: list[torch.nn.Parameter], amp: Callable, n_micro: int,
                 warmup: int = 2):
        self.wrapped, self.amp, self.n_micro, self.warmup = wrapped, amp, n_micro, warmup
        self.params = [p for p in params if p.requires_grad]
        self.graph = None
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def _forward_backward(self) -> dict:
        with self.amp():
            out = self.wrapped(self.x, self.y, self.m, self.ilr)
        (out["loss"] / self.n_micro).backward()
        return {k: v.detach() for k, v in out.items()}

    def _capture(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> None:
        self.x, self.y, self.m = x.clone(), y.clone(), m.clone()
        self.ilr = torch.zeros((), dtype=torch.float32, device=x.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(stream)
        self.zero_grad()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward_backward()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad.zero_()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, ilr: float) -> dict:
        """The micro-batch's outputs (static tensors: read them before the next call); its gradient is added."""
        if self.graph is None:
            self._capture(x, y, m)
        if x.shape != self.x.shape:
            raise ValueError(f"training.cuda_graph: micro-batch of shape {tuple(x.shape)}, captured "
                             f"{tuple(self.x.shape)} (every micro-batch must have the same shape)")
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.m.copy_(m, non_blocking=True)
        self.ilr.fill_(ilr)
        self.graph.replay()
        return self.out
