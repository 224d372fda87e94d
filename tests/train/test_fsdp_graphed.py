"""The graphed micro-step under FSDP2 (train/sharded.py: whole parameters gathered from the shards, the captured
forward+backward on them, the mean gradient handed back to the shards) on 2 gloo CPU ranks, where the capture
itself cannot run: the plan's capture=False runs the same code eagerly (the same replica, buckets, reduction and
scatter). It must train what eager FSDP2 and DDP train.

Tolerance on the fp32 weights after 3 AdamW steps: atol 1e-6 / rtol 1e-5, as tests/train/test_distributed.py
allows FSDP2 against one process (the reductions sum in another order; seen here: bitwise against DDP, ~1e-7
against eager FSDP2). A dropped micro-batch, a gradient summed rather than averaged or a shard given another
rank's rows moves the weights by ~1e-3; stale whole parameters (no gather after the optimizer step) change the
second step's loss at the 1e-3 level."""
import dataclasses
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.train.conftest import read_metrics

STEPS = 3
COMMON = {"training.steps": STEPS, "training.global_batch_size": 4, "training.micro_batch_size": 1,
          "training.eval_every": 0, "training.checkpoint_every": 0}


def _worker(rank: int, world: int, port: int, cfg, run_dir: str, graphed: bool):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="localhost",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from ttt_e2e.train import trainer

    if graphed:  # the graphed micro-step's code, without the capture (a CPU has none)
        resolve = trainer.resolve_plan
        trainer.resolve_plan = lambda *a, **k: dataclasses.replace(resolve(*a, **k), graph=True, capture=False)
    trainer.train(cfg, run_dir)


def _run(cfg, run_dir, graphed: bool, world: int = 2):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, cfg, str(run_dir), graphed), nprocs=world)


def _weights(run_dir, step=STEPS):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "model.pt")


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _val_losses(run_dir):
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_graphed_fsdp2_equals_eager_fsdp2_and_ddp_on_two_ranks(compose, tmp_path, mode):
    runs = {"graphed": ("fsdp", True), "fsdp": ("fsdp", False), "ddp": ("ddp", False)}
    for name, (dist_, graphed) in runs.items():
        cfg = compose(**COMMON, **{"training.distributed": dist_, "ttt.train_mode": mode})
        _run(cfg, tmp_path / name, graphed)
    g = _weights(tmp_path / "graphed")
    for ref in ("fsdp", "ddp"):
        w = _weights(tmp_path / ref)
        assert g.keys() == w.keys()
        for k in g:
            torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{ref} {k}: {m}")
        assert _losses(tmp_path / "graphed") == pytest.approx(_losses(tmp_path / ref), rel=1e-6)
        # the validation (before the first step and after the last) on the replica, its whole parameters gathered
        # first: a stale replica would give the first step's weights' loss at the end
        assert _val_losses(tmp_path / "graphed") == pytest.approx(_val_losses(tmp_path / ref), rel=1e-6)
    assert len(_losses(tmp_path / "graphed")) == STEPS


@pytest.mark.slow
@pytest.mark.parametrize("dist_", ["fsdp", "ddp"])
def test_graphed_resume_from_a_mid_run_checkpoint_is_exact(compose, tmp_path, dist_):
    """A run restarted from its step-2 checkpoint (the later one removed, as if killed) ends bitwise where the
    uninterrupted run ended: under FSDP2 the replica's whole parameters come from the resumed shards, not the
    initial ones; under either, the gradient buckets (the parameters' .grad) exist only after the optimizer state
    was loaded (torch.distributed.checkpoint would otherwise leave it uninitialized and fail)."""
    cfg = compose(**{**COMMON, "training.steps": 4, "training.checkpoint_every": 2, "training.distributed": dist_})
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(cfg, full, graphed=True)
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    _run(cfg, resumed, graphed=True)
    assert _losses(resumed) == _losses(full)
    a, b = _weights(full, 4), _weights(resumed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _bridge_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ttt_e2e.train.sharded import ShardBridge, replica_of

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        template = replica_of(model)
        fully_shard(model)
        bridge = ShardBridge(model, template)
        with torch.no_grad():  # an optimizer step on the shards, then the gather that the next step begins with
            for p in model.parameters():
                p.to_local().add_(1.0)
        bridge.gather()
        whole = {n: p.detach().clone() for n, p in bridge.replica.named_parameters()}
        for n, w in bridge.replica.named_parameters():  # a whole gradient whose rows are their indices
            w.grad = torch.arange(w.shape[0], dtype=w.dtype)[:, None].expand_as(w).contiguous() if w.dim() > 1 \
                else torch.arange(w.shape[0], dtype=w.dtype)
        bridge.scatter_grads()
        torch.save({"full": full, "whole": whole,
                    "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_bridge_gathers_and_hands_back_uneven_shards(tmp_path):
    """2 ranks, parameters of 5 and 3 rows (FSDP2 gives rank 0 three rows and rank 1 two, then two and one):
    the replica's whole parameters are the shards' current values, and each shard's gradient is its own rows
    of the whole gradient (a wrong row offset puts another rank's rows there)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    mp.spawn(_bridge_worker, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        for n, p in r["full"].items():
            torch.testing.assert_close(r["whole"][n], p + 1.0, rtol=0, atol=0)
            rows = torch.arange(p.shape[0], dtype=p.dtype)
            assert torch.equal(r["grads"][n], rows[:, None].expand_as(p) if p.dim() > 1 else rows), n
