"""A run's plan: every choice of how a step runs, resolved once into one frozen value, and the rules between them.

The choices are the device and the process group (distributed.py), the data-parallel wrapper (none, DDP or
FSDP2), the micro-step (eager or graphed: train/step.py), compile, the kernels and the precision. The rules of
which combinations work live here and nowhere else:

- training.cuda_graph=None is on for CUDA, under DDP and FSDP2 alike, unless training.compile (the two do not
  compose: compile's own graphs and ours) or training.fsdp_cpu_offload (the parameters the graph reads would live
  in CPU memory and the optimizer runs there) turns it off; the log's plan line says which and why. An explicit
  true that cannot work (CPU device, compile, offload) is a one-line ConfigError before any work.
- Under FSDP2 the graphed micro-step never runs FSDP2's hooks: the parameters are gathered once per step before
  the first micro-batch (on one rank: no copy at all, the graph reads the shards themselves), the captured
  forward+backward runs on the whole parameters, and the mean gradient is reduced to each rank's shard after the
  last micro-batch, outside the graph (train/sharded.py). So no FSDP2 setting (reshard_after_forward, prefetch)
  is inside a capture; the price is that the parameters and gradients are whole on every rank during the step,
  as reshard_after_forward=False keeps them (the optimizer state stays sharded).
- FSDP2 with compile: pretrain mode only.
- model.fused_kernels=None: on, but the elementwise kernels off for eager meta-mode training (use_fused_kernels).
- AdamW fused under FSDP2 on CUDA (its DTensor shards make each foreach op a host-side dispatch over every one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ttt_e2e.config import Config, ConfigError, Kernels

from .distributed import DistInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    device: torch.device
    rank: int
    world_size: int
    parallel: str  # "none" (one process, no group) | "ddp" | "fsdp"
    graph: bool  # the graphed micro-step (captured on CUDA; capture=False runs its code eagerly, CPU tests)
    capture: bool
    why_eager: Optional[str]  # where graph is False on CUDA: the reason (logged)
    compile: bool
    cpu_offload: bool
    kernels: Kernels
    train_mode: str
    fused_optimizer: bool  # torch's fused AdamW: under FSDP2 on CUDA, where every foreach op of the default
    # implementation would be dispatched over every DTensor shard on the host, once per op; fused it is once

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        step = "CUDA graph" if self.graph and self.capture else "graphed code, eager" if self.graph else "eager"
        why = f" ({self.why_eager})" if self.why_eager else ""
        return f"{self.parallel}, {step}{why}{', compile' if self.compile else ''}"


def check_config(cfg: Config) -> None:
    """The combinations refused before any work (the single-setting checks are the config's validate)."""
    tc = cfg.training
    if tc.fsdp_cpu_offload and tc.distributed != "fsdp":
        raise ConfigError("training.fsdp_cpu_offload=true needs training.distributed=fsdp")
    if tc.cuda_graph and tc.compile:
        raise ConfigError("training.cuda_graph=true does not compose with training.compile=true; choose one")
    if tc.cuda_graph and tc.fsdp_cpu_offload:
        raise ConfigError("training.cuda_graph=true does not compose with training.fsdp_cpu_offload=true (the graph "
                          "would read parameters in CPU memory); drop one of them")
    if tc.distributed == "fsdp" and tc.compile and cfg.ttt.train_mode == "meta":
        raise ConfigError("training.compile=true with training.distributed=fsdp is offered in pretrain mode only "
                          "(not tested with the meta-mode sharding); drop training.compile")


def use_cuda_graph(cfg: Config, device: torch.device) -> tuple[bool, Optional[str]]:
    """training.cuda_graph resolved: (on, why not where the default turned it off on CUDA)."""
    tc = cfg.training
    if tc.cuda_graph is None:
        if device.type != "cuda":
            return False, None
        if tc.compile:
            return False, "training.compile=true"
        if tc.fsdp_cpu_offload:
            return False, "training.fsdp_cpu_offload=true"
        return True, None
    if tc.cuda_graph and device.type != "cuda":
        raise ConfigError(f"training.cuda_graph=true needs a CUDA device (training.device resolved to {device.type})")
    return bool(tc.cuda_graph), None if tc.cuda_graph or device.type != "cuda" else "training.cuda_graph=false"


def use_fused_kernels(cfg: Config, graph: bool) -> Kernels:
    """model.fused_kernels resolved for training (the rule outside training: Kernels.of). Measured on an H100
    (benchmarks/RESULTS.md): the kernels cut the GPU time of every step, but an eager meta step is host-bound, and
    each small kernel call under torch.func costs more host time than the PyTorch ops it replaces; so None turns
    the elementwise ones off exactly there. The cross-entropy kernels replace a dozen passes over (tokens,
    vocabulary) tensors per call and stay on."""
    if cfg.model.fused_kernels is not None:
        return Kernels.of(cfg.model)
    return Kernels(elementwise=graph or cfg.ttt.train_mode != "meta", cross_entropy=True)


def resolve_plan(cfg: Config, info: DistInfo, group: bool) -> RunPlan:
    """group: whether a process group exists (init_distributed made one)."""
    tc = cfg.training
    graph, why = use_cuda_graph(cfg, info.device)
    if tc.fsdp_cpu_offload and info.device.type != "cuda":
        raise ConfigError("training.fsdp_cpu_offload=true offloads from a GPU to the CPU: it needs a CUDA device "
                          f"(training.device resolved to {info.device.type})")
    parallel = tc.distributed if group else "none"
    if why and tc.cuda_graph is None and info.rank == 0:  # the default turned the graphs off: say so, once
        log.warning("training.cuda_graph: off (%s); the step runs eagerly", why)
    return RunPlan(device=info.device, rank=info.rank, world_size=info.world_size, parallel=parallel, graph=graph,
                   capture=graph, why_eager=why, compile=tc.compile, cpu_offload=tc.fsdp_cpu_offload,
                   kernels=use_fused_kernels(cfg, graph), train_mode=cfg.ttt.train_mode,
                   fused_optimizer=parallel == "fsdp" and info.device.type == "cuda")
