"""What the data-parallel wrappers wrap, and the wrapping.

`sequence_loss` calls the model's pieces (wte, prefix blocks, suffix, head) directly rather than
`Transformer.forward`, so the wrappers must wrap a module whose forward *is* the loss: `LossModule`. Its
forward is where DDP prepares gradient reduction and where FSDP2's root unit gathers wte and ln_f.

FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per block plus the root) is offered for
train_mode=pretrain only. In meta mode the inner loop calls the suffix through `torch.func.functional_call`
with per-sequence MLP' weights phi_t; FSDP2's pre-forward hook then installs its own all-gathered parameters
in each block, overriding the substitution, so every inner update is silently dropped (checked on 2 CPU ranks:
the "meta" loss came out equal to the pretrain loss, and the gradients wrong). `check_parallel_config`
refuses the combination with a ConfigError instead.
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from ttt_e2e.config import Config, ConfigError, TTTConfig
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from .distributed import DistInfo

_FIELDS = ("loss", "minibatch_losses", "token_losses", "inner_grad_norm")


class LossModule(nn.Module):
    def __init__(self, model: Transformer, ttt: TTTConfig):
        super().__init__()
        self.model = model
        self.ttt = ttt

    def forward(self, input_ids, targets, mask, ilr_mult: float) -> dict:
        # A dict of tensors (not the LossOutput dataclass): the wrappers traverse outputs as pytrees.
        out = sequence_loss(self.model, input_ids, targets, mask, self.ttt, ilr_mult)
        return {k: getattr(out, k) for k in _FIELDS if getattr(out, k) is not None}


def check_parallel_config(cfg: Config) -> None:
    if cfg.training.distributed == "fsdp" and cfg.ttt.train_mode == "meta":
        raise ConfigError("training.distributed=fsdp does not compose with ttt.train_mode=meta: FSDP2's all-gather "
                          "hooks override the inner loop's torch.func.functional_call substitution of MLP', which "
                          "would silently drop every inner update; use training.distributed=ddp")


def compile_blocks(model: Transformer, train_mode: str) -> None:
    """torch.compile each block that runs as a plain module call: the prefix always; the suffix only in pretrain
    mode (in meta mode it runs under torch.func.grad with substituted weights, possibly inside the remat
    autograd Function, and stays eager). Per block, graphs stay small and identical across blocks (compiled once)."""
    for block in model.prefix:
        block.compile()
    if train_mode == "pretrain":
        for block in model.suffix.blocks:
            block.compile()


def parallelize(loss_module: LossModule, cfg: Config, info: DistInfo) -> nn.Module:
    """The module the loop calls: loss_module itself (one process), DDP around it, or FSDP2-sharded in place."""
    if cfg.training.compile:
        compile_blocks(loss_module.model, cfg.ttt.train_mode)
    if info.world_size == 1 and cfg.training.distributed == "ddp":
        return loss_module
    if cfg.training.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Blocks return their (keys, values) as views; nothing modifies them in place, which is what the warning
        # is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        model = loss_module.model
        # One unit per block (gathered just before it runs, freed after), then the root for wte and ln_f.
        for block in (*model.prefix, *model.suffix.blocks):
            fully_shard(block)
        fully_shard(loss_module)
        return loss_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(loss_module, device_ids=ids)


def unwrap(module: nn.Module) -> LossModule:
    return module.module if hasattr(module, "module") and isinstance(module.module, LossModule) else module
