"""The outer training loop (docs/METHOD.md section 3), for either train mode.

The run's plan is resolved once (plan.py) and picks the micro-step (step.py: eager, or graphed; the same for one
GPU, DDP and FSDP2). One step: the rank's share of the global batch, in micro-batches (gradient accumulation,
the gradients reduced once, after the last) -> sequence_loss (the inner loop lives there) -> backward (the
meta-gradient in meta mode) -> clip -> the spike guard's verdict (apply, skip, roll back to a snapshot, or stop:
spikes.py) -> AdamW -> schedule. The inner-lr multiplier of step s is
ttt.ilr_multiplier(s) (times the spike policy's back-off), s = optimizer steps already taken.
"""
from __future__ import annotations

import gc
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ttt_e2e.config import Config
from ttt_e2e.model.transformer import Transformer

from .checkpoint import Checkpointer, CheckpointError, load_checkpoint, load_file, resolve_checkpoint
from .data import TrainData, build_data
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown
from .evaluate import evaluate
from .flops import flops_per_token, peak_flops
from .metrics import build_loggers, require_wandb
from .optim import build_optimizer, build_scheduler
from .parallel import LossModule
from .plan import RunPlan, check_config, resolve_plan
from .precision import autocast, param_dtype
from .spikes import SNAPSHOT_FILE, Action, SpikeGuard, backed_off
from .step import Parallel, build

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The spike policy ended the run (a non-finite loss or gradient, too many skipped steps in a row, or more
    spikes after the last allowed rollback); nothing was saved after the last good checkpoint."""

    def __init__(self, step: int, what: str, checkpoint: Optional[Path]):
        self.step, self.checkpoint = step, checkpoint
        kept = f"last good checkpoint kept: {checkpoint}" if checkpoint else "no checkpoint had been written yet"
        super().__init__(f"{what} at step {step}: training stopped; {kept}")


@dataclass
class TrainResult:
    is_main: bool  # rank 0 (the one that reports)
    run_dir: Path
    step: int
    first_loss: Optional[float]  # of the first step this invocation ran
    last_loss: Optional[float]
    first_val_loss: Optional[float]
    last_val_loss: Optional[float]
    checkpoint: Optional[Path]


def train(cfg: Config, run_dir: str | Path) -> TrainResult:
    """Train per cfg, writing checkpoints/, metrics.jsonl and config.yaml under run_dir (rank 0's, on all ranks)."""
    cfg.validate()
    check_config(cfg)
    if cfg.log.logger == "wandb":
        require_wandb()  # fail before any work, not after the data is tokenized
    info = init_distributed(cfg.training.device, need_group=cfg.training.distributed == "fsdp",
                            cpu_and_cuda=cfg.training.fsdp_cpu_offload)
    try:
        plan = resolve_plan(cfg, info, group=torch.distributed.is_initialized())
        result = _train(cfg, Path(broadcast_object(str(run_dir))), plan)
        # Every rank done before any tears its process group down: a gloo rank whose peer had already left was
        # seen to abort at exit ("terminate called without an active exception") after a complete run.
        barrier()
        return result
    finally:
        # The FSDP2 modules of _train sit in reference cycles (through their hooks) that hold the process group.
        # Left to the interpreter's exit, they would destroy it during finalization, where a gloo rank aborted
        # twice in ~20 test runs ("terminate called without an active exception", after a complete run; not
        # reproduced on demand). Collected here, they go while the group and the interpreter are whole
        # (~7,000 objects in the 2-rank test).
        gc.collect()
        shutdown()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _restore(cfg: Config, ckpt: Checkpointer, model, optimizer, scheduler, sampler, guard: SpikeGuard) -> int:
    """The step to start from: resume this run dir (the spike guard's state too), or start from
    training.init_from, or fresh (0)."""
    own = ckpt.latest()
    resume = cfg.training.resume if cfg.training.resume is not None else own is not None
    if resume:
        if own is None:
            raise CheckpointError(f"training.resume=true but {ckpt.dir} holds no checkpoint")
        state = load_checkpoint(own, model, optimizer, scheduler, sampler, part="all")
        if "spikes" in state:  # absent in checkpoints of older code: the guard starts afresh
            guard.load_state_dict(state["spikes"])
        snapshot = load_file(own, SNAPSHOT_FILE)
        if snapshot is not None:
            guard.load_snapshot(snapshot, model)
        log.info("resumed from %s at step %d", own, state["step"])
        return state["step"]
    if own is not None:
        raise CheckpointError(f"{ckpt.dir} already holds checkpoints (latest {own.name}) but training.resume=false: "
                              f"set training.resume=true to continue that run, or choose another hydra.run.dir")
    if cfg.training.init_from:
        src = resolve_checkpoint(cfg.training.init_from)
        state = load_checkpoint(src, model, optimizer, scheduler, sampler, part=cfg.training.load_part)
        step = state["step"] if cfg.training.load_part == "all" else 0
        log.info("initialized from %s (load_part=%s, source step %d)", src, cfg.training.load_part, state["step"])
        return step
    return 0


def _grad_norm(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _write_config(cfg: Config, run_dir: Path) -> None:
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(run_dir / "config.yaml")


@dataclass
class StepStats:
    """One step's statistics, summed over micro-batches, then averaged over them and the ranks (finish)."""
    loss: torch.Tensor  # () the outer loss
    minibatch_losses: torch.Tensor  # (T / b,) the loss of each mini-batch (the paper's loss-by-position curve)
    inner_grad_norms: torch.Tensor  # (T / b - 1,) meta mode: the inner gradient's norm at each inner step

    @classmethod
    def zeros(cls, n_minibatches: int, device: torch.device) -> "StepStats":
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(n_minibatches), z(n_minibatches - 1))

    def add(self, out: dict) -> None:
        self.loss += out["loss"].detach().double()
        self.minibatch_losses += out["minibatch_losses"].double()
        if "inner_grad_norm" in out:
            self.inner_grad_norms += out["inner_grad_norm"].double()

    def finish(self, n: int) -> None:
        """The mean over n = micro-batches x ranks (one all-reduce for all three)."""
        flat = torch.cat([self.loss[None], self.minibatch_losses, self.inner_grad_norms])
        all_reduce_sum(flat).div_(n)
        self.loss, self.minibatch_losses, self.inner_grad_norms = flat.split(
            [1, len(self.minibatch_losses), len(self.inner_grad_norms)])
        self.loss = self.loss[0]


@dataclass
class Run:
    """What a step needs, built once."""
    cfg: Config
    plan: RunPlan
    model: Transformer  # (FSDP2: sharded)
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: TrainData
    guard: SpikeGuard
    ckpt: Checkpointer


def _train(cfg: Config, run_dir: Path, plan: RunPlan) -> TrainResult:
    tc = cfg.training
    if plan.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:  # one rank reports; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    info = DistInfo(plan.rank, plan.world_size, 0, plan.device)
    _seed_everything(tc.seed)  # the same initial model on every rank
    data = build_data(cfg, info)
    model = Transformer(cfg.model).to(dtype=param_dtype(cfg.model), device=plan.device)
    n_params = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(model, cfg.ttt.train_mode)
    amp = lambda: autocast(cfg.model, plan.device)  # noqa: E731
    # The run's kernel choice, resolved once: the loss module sets the model's modules from it and passes it to
    # every loss, the evaluation's included
    loss_module = LossModule(model, cfg.ttt, plan.kernels)
    par = build(plan, cfg, loss_module, amp, data.accumulation)
    optimizer = build_optimizer(model.parameters(), cfg.optim, fused=plan.fused_optimizer)
    scheduler = build_scheduler(optimizer, tc.steps, cfg.optim)
    ckpt = Checkpointer(run_dir / "checkpoints", tc.keep_last, plan.is_main)
    barrier()  # rank 0 has cleared leftovers of killed saves before anyone looks for checkpoints
    guard = SpikeGuard(cfg.optim)
    start = _restore(cfg, ckpt, model, optimizer, scheduler, data.sampler, guard)
    guard.start(start, model, optimizer)
    if plan.is_main:  # only now: a run refused above (bad checkpoint, ...) leaves the run dir as it was
        _write_config(cfg, run_dir)
    loggers = build_loggers(cfg, run_dir, start if start > 0 else None, plan.is_main)
    tokens_per_step = tc.global_batch_size * cfg.model.seq_length
    peak = peak_flops(plan.device, cfg.log.peak_tflops) * plan.world_size
    if plan.is_main:
        log.info("model: %.2fM parameters, %s mode, %d rank(s) x %d micro-batch x %d accumulation%s%s; %s; run dir "
                 "%s", n_params / 1e6, cfg.ttt.train_mode, plan.world_size, data.micro_batch_size, data.accumulation,
                 ", CUDA graph" if plan.graph and plan.capture else "",
                 ", fused kernels" if plan.kernels.elementwise and plan.device.type == "cuda" else "",
                 plan.describe(), run_dir)
    run = Run(cfg, plan, model, par, optimizer, scheduler, data, guard, ckpt)

    def run_eval(step: int) -> Optional[float]:
        if data.val is None:
            return None
        r = evaluate(par.eval_module(), data.val, data.tokenizer.bos_id, data.micro_batch_size,
                     tc.eval_batches * tc.global_batch_size, cfg.ttt.eval_ilr_multiplier(step) * guard.ilr_scale,
                     info, amp)
        return r.loss

    result = TrainResult(plan.is_main, run_dir, start, None, None, None, None, ckpt.latest())
    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not (plan.is_main and tc.progress),
               dynamic_ncols=True)
    try:
        if start == 0 and start < tc.steps:
            result.first_val_loss = run_eval(0)
            if result.first_val_loss is not None:
                loggers.log({"step": 0, "val_loss": result.first_val_loss})
        step = start
        while step < tc.steps:
            metrics = _train_step(run, step)
            step += 1
            dt = metrics.pop("_time")
            record = {"step": step, **metrics, "tokens": step * tokens_per_step, "step_time_s": dt,
                      "tokens_per_s": tokens_per_step / dt, "mfu": fpt * tokens_per_step / dt / peak}
            result.first_loss = record["loss"] if result.first_loss is None else result.first_loss
            result.last_loss = record["loss"]
            last = step == tc.steps
            if last or (tc.eval_every and step % tc.eval_every == 0):
                record["val_loss"] = result.last_val_loss = run_eval(step)
            if last or step % tc.log_every == 0 or "val_loss" in record:
                loggers.log(record)
            if tc.save_checkpoints and (last or (tc.checkpoint_every and step % tc.checkpoint_every == 0)):
                result.checkpoint = ckpt.save(step, model, optimizer, scheduler, data.sampler,
                                              backed_off(cfg, guard.ilr_scale), {"spikes": guard.state_dict()},
                                              guard.checkpoint_files(model, plan.is_main))
            bar.set_postfix(loss=f"{record['loss']:.3f}", **({"val": f"{record['val_loss']:.3f}"}
                                                             if record.get("val_loss") is not None else {}))
            bar.update(1)
        result.step = step
    finally:
        bar.close()
        loggers.close()
    return result


def _train_step(run: Run, step: int) -> dict:
    """One optimizer step (step = steps already taken). Returns the step's metrics (averaged over ranks)."""
    cfg, plan, guard, micro = run.cfg, run.plan, run.guard, run.parallel.micro_step
    t0 = time.perf_counter()
    ilr = cfg.ttt.ilr_multiplier(step) * guard.ilr_scale
    batches = run.data.next_micro_batches()
    stats = StepStats.zeros(cfg.model.seq_length // cfg.ttt.mini_batch_size, plan.device)
    micro.begin()
    for i, (x, y, m) in enumerate(batches):
        stats.add(micro(x, y, m, ilr, last=i == len(batches) - 1))
    micro.end()
    stats.finish(len(batches) * plan.world_size)
    loss = stats.loss.item()
    # optim.spike_policy's verdict: apply, skip, roll back or stop (spikes.py)
    grad_norm = _grad_norm(run.parallel.params, cfg.optim.grad_clip) if math.isfinite(loss) else math.nan
    verdict = guard.judge(loss, grad_norm)
    if verdict.action is Action.STOP:
        raise TrainingStopped(step + 1, verdict.why, run.ckpt.latest())
    lr = run.scheduler.get_last_lr()[0]
    if verdict.action is Action.APPLY:
        run.optimizer.step()
    run.scheduler.step()
    micro.zero_grad()
    guard.after(verdict, step + 1, run.model, run.optimizer, run.scheduler)
    record = {"loss": loss, "minibatch_losses": stats.minibatch_losses.tolist(), "grad_norm": grad_norm, "lr": lr,
              "ilr": cfg.ttt.inner_lr * ilr, "skipped": guard.skipped, "skipped_steps": guard.total,
              "rollbacks": guard.rollbacks, "cuda_graph": micro.captured}
    if cfg.ttt.train_mode == "meta" and len(stats.inner_grad_norms):
        inner = stats.inner_grad_norms
        record.update(inner_grad_norm=inner.mean().item(), inner_grad_norm_by_minibatch=inner.tolist())
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
        record["max_memory_gib"] = torch.cuda.max_memory_allocated(plan.device) / 2**30  # this rank, since start
    record["_time"] = time.perf_counter() - t0
    return record
