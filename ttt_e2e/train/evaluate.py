"""Validation loss: a fixed set of held-out windows (the head of the val split), mean and by token position.

The by-position curve is the paper's loss-vs-context plot: the loss of the token at position i of a window,
averaged over windows (for meta mode, with the inner loop run over the window as at training time).
The mean is token-weighted over all evaluated tokens.

Path (`path`): "engine" computes the same per-token losses in memory constant in the context length, through the
inference engine's prefill with its CUDA graphs for a meta model (ttt_e2e/eval/stream_loss.py); "training" calls
the trainer's loss module (the training-mode loss, eagerly, no_grad), whose memory grows with the window; "auto"
takes engine wherever it applies: a bare or DDP-wrapped LossModule, not FSDP2-sharded parameters (only the
wrapper's own forward gathers them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.data import DataError, WindowDataset, make_batch
from ttt_e2e.eval.stream_loss import StreamLoss
from ttt_e2e.model.transformer import Transformer

from .distributed import DistInfo, all_reduce_sum
from .parallel import LossModule, unwrap

PATHS = ("auto", "engine", "training")


@dataclass
class EvalResult:
    loss: float  # token-weighted mean over the evaluated windows
    loss_by_position: list[float]  # (T,) mean loss at each position of a window (nan where always masked)
    tokens: int  # counted (unmasked) target tokens
    windows: int


def engine_target(loss_fn) -> Optional[tuple[Transformer, TTTConfig, Kernels]]:
    """(model, ttt, kernels) of the trainer's loss module when the engine path can serve it: a LossModule, bare or
    inside DDP (its .module; evaluation needs no collective per forward). None where the parameters are sharded
    (FSDP2: only its own forward gathers them, so that path keeps the training-mode loss through the wrapper) or
    where the engine cannot run the model (meta mode without a sliding window)."""
    from torch.distributed.tensor import DTensor

    module = unwrap(loss_fn)
    if not isinstance(module, LossModule):
        return None
    if any(isinstance(p, DTensor) for p in module.model.parameters()):
        return None
    if module.ttt.train_mode == "meta" and module.model.cfg.window is None:
        return None
    return module.model, module.ttt, module.kernels


@torch.no_grad()
def evaluate(loss_fn, val: WindowDataset, bos_id: int, batch_size: int, max_windows: int, ilr_mult: float,
             info: DistInfo, autocast, path: str = "auto") -> EvalResult:
    """loss_fn(input_ids, targets, mask, ilr_mult) -> dict with token_losses (B, T): the trainer's loss module
    (bare, DDP or FSDP2). Every rank runs the same number of forward calls (FSDP2 gathers parameters
    collectively), on disjoint windows. autocast() gives the precision context. path: see the module docstring."""
    if path not in PATHS:
        raise ValueError(f"evaluation path must be one of {', '.join(PATHS)}, got {path!r}")
    target = engine_target(loss_fn) if path != "training" else None
    if path == "engine" and target is None:
        raise ValueError("the engine evaluation path needs an unsharded LossModule (bare or in DDP) whose model "
                         "the inference engine runs (meta mode needs model.window); use path=training")
    if target is None:
        return _evaluate(loss_fn, val, bos_id, batch_size, max_windows, ilr_mult, info, autocast)
    model, ttt, kernels = target
    with StreamLoss(model, ttt, bos_id, kernels=kernels) as stream:  # its graphs and memory go with the evaluation
        return _evaluate(stream, val, bos_id, batch_size, max_windows, ilr_mult, info, autocast)


def _evaluate(loss_fn, val, bos_id, batch_size, max_windows, ilr_mult, info, autocast) -> EvalResult:
    n = min(len(val), max_windows) // info.world_size
    if n < 1:
        raise DataError(f"the validation split has {len(val)} windows, fewer than the {info.world_size} ranks; "
                        f"raise data.val_fraction")
    start = info.rank * n
    T = val.seq_length
    sums = torch.zeros(T, dtype=torch.float64, device=info.device)
    counts = torch.zeros(T, dtype=torch.float64, device=info.device)
    for i in range(start, start + n, batch_size):
        windows = val.batch(range(i, min(i + batch_size, start + n)))
        inputs, targets, mask = (t.to(info.device) for t in make_batch(windows, bos_id))
        with autocast():
            out = loss_fn(inputs, targets, mask, ilr_mult)
        m = mask.to(torch.float64)
        sums += (out["token_losses"].to(torch.float64) * m).sum(0)
        counts += m.sum(0)
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    by_pos = (sums / counts).tolist()  # 0/0 = nan where every window masks the position
    total = counts.sum().item()
    return EvalResult(sums.sum().item() / max(total, 1.0), by_pos, int(total), n * info.world_size)
