"""What the data-parallel wrappers wrap, and the wrapping.

`sequence_loss` calls the model's pieces (wte, prefix blocks, suffix, head) directly rather than
`Transformer.forward`, so the wrappers must wrap a module whose forward *is* the loss: `LossModule`. Its
forward is where DDP prepares gradient reduction and where FSDP2's root unit gathers wte and ln_f.

FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded over the ranks.
Pretrain mode: one unit per block (gathered just before it runs, freed after), then the root unit (wte, ln_f).
Meta mode: the inner loop calls the suffix through `torch.func.functional_call` with per-sequence MLP' weights
phi_t; a suffix block that were its own unit would have its pre-forward hook install the all-gathered parameters,
overriding the substitution, and every inner update would be silently dropped (seen on 2 CPU ranks: the "meta"
loss came out equal to the pretrain loss). So in meta mode only the PREFIX blocks are units; the suffix blocks stay
in the root unit with wte and ln_f, which gathers them once per step at LossModule.forward, before the inner loop,
and reduce-scatters their gradients after the outer backward. No hook fires inside functional_call. The suffix
(a quarter of the blocks at 3B) and the embedding are then whole on every GPU for the step; the prefix is
gathered block by block. tests/train/test_distributed.py checks FSDP2 meta on 2 ranks against one process (as
it does DDP meta), tests/train/test_parallel_config.py FSDP2 in one process.

training.fsdp_cpu_offload: FSDP2's CPUOffloadPolicy keeps the sharded parameters, their gradients and the AdamW
state in (pinned) CPU memory and runs the optimizer there; each unit is copied to the GPU when gathered. This is
what lets one GPU meta-train the 3B model (`python train.py training.distributed=fsdp training.fsdp_cpu_offload=true`).
Mixed precision is autocast as without FSDP (parameters fp32).

Under a CUDA graph (the default on CUDA) none of FSDP2's hooks run in training: the graphed micro-step runs on a
replica with whole parameters gathered from these shards once per step and hands the gradients back to them
(sharded.py); the sharding above still holds the parameters between steps, the optimizer state and the
checkpoints, and serves the evaluation.
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from ttt_e2e.config import Config, Kernels, TTTConfig
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from .graphed import broadcast_parameters
from .plan import RunPlan

_FIELDS = ("loss", "minibatch_losses", "token_losses", "inner_grad_norm")


class LossModule(nn.Module):
    """The loss of `model` under `ttt` with `kernels` (default Kernels.of(model.cfg)): the one holder of a run's
    kernel choice, which it sets on the model's own modules here and passes to every loss (and the evaluation's
    engine path reads from it), so that the two cannot differ."""

    def __init__(self, model: Transformer, ttt: TTTConfig, kernels: Kernels | None = None):
        super().__init__()
        self.model = model
        self.ttt = ttt
        self.kernels = Kernels.of(model.cfg) if kernels is None else kernels
        model.use_fused_kernels(self.kernels.elementwise)

    def forward(self, input_ids, targets, mask, ilr_mult: float) -> dict:
        # A dict of tensors (not the LossOutput dataclass): the wrappers traverse outputs as pytrees.
        out = sequence_loss(self.model, input_ids, targets, mask, self.ttt, ilr_mult, self.kernels)
        return {k: getattr(out, k) for k in _FIELDS if getattr(out, k) is not None}


def compile_blocks(model: Transformer, train_mode: str) -> None:
    """torch.compile each block that runs as a plain module call: the prefix always; the suffix only in pretrain
    mode (in meta mode it runs under torch.func.grad with substituted weights, possibly inside the remat
    autograd Function, and stays eager). Per block, graphs stay small and identical across blocks (compiled once)."""
    for block in model.prefix:
        block.compile()
    if train_mode == "pretrain":
        for block in model.suffix.blocks:
            block.compile()


def parallelize(loss_module: LossModule, cfg: Config, plan: RunPlan) -> nn.Module:
    """The module the evaluation calls (and the eager micro-step): loss_module itself (no process group), DDP
    around it (but not under the graphed micro-step, which reduces the gradients itself: rank 0's parameters are
    broadcast instead, as DDP's constructor does), or FSDP2-sharded in place."""
    if plan.compile:
        compile_blocks(loss_module.model, cfg.ttt.train_mode)
    if plan.parallel == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        # Blocks return their (keys, values) as views; nothing modifies them in place, which is what the warning
        # is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        offload = CPUOffloadPolicy() if plan.cpu_offload else OffloadPolicy()
        model = loss_module.model
        units = model.prefix if cfg.ttt.train_mode == "meta" else (*model.prefix, *model.suffix.blocks)
        for block in units:
            fully_shard(block, offload_policy=offload)
        fully_shard(loss_module, offload_policy=offload)
        return loss_module
    if plan.parallel == "none":
        return loss_module
    if plan.graph:
        broadcast_parameters(loss_module)
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [plan.device.index] if plan.device.type == "cuda" else None
    return DDP(loss_module, device_ids=ids)


def unwrap(module: nn.Module) -> LossModule:
    return module.module if hasattr(module, "module") and isinstance(module.module, LossModule) else module
