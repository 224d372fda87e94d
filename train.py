"""Train a TTT-E2E model (or a full/sliding-window attention baseline). Configs: conf/ (Hydra).

    python train.py                                   # tiny TTT-E2E on the Python stdlib, a few minutes on CPU
    python train.py +experiment=125m/pretrain/e2e     # docs/METHOD.md section 5 configs: <size>/pretrain/{e2e,fa,swa},
                                                      #   <size>/extension/..., 3b/extension_128k/...
    python train.py +experiment=125m/pretrain/e2e optim.lr=2e-3 training.steps=100 data.source=/data/dclm
    python train.py +experiment=125m/extension/e2e training.init_from=outputs/<pretrain run dir> data.source=/data/books
    python train.py -m optim.lr=1e-3,3e-3             # sweep (one job after another; multirun/<date>/<time>/<n>)
    python train.py logger=none                       # no wandb (metrics.jsonl is always written)
    torchrun --nproc_per_node=8 train.py +experiment=125m/pretrain/e2e             # DDP, one process per GPU
    torchrun --nproc_per_node=8 train.py +experiment=125m/pretrain/fa training.distributed=fsdp   # FSDP2
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=$JOB \
        train.py +experiment=3b/pretrain/e2e hydra.run.dir=/shared/runs/3b_e2e   # multi-node (shared run dir)
    python train.py -m launcher=slurm +experiment=760m/pretrain/e2e hydra.launcher.partition=gpu   # Slurm

A run writes into its Hydra output dir (outputs/<date>/<time>/, or hydra.run.dir=...): config.yaml (resolved),
metrics.jsonl, checkpoints/step_*/ and checkpoints/latest, train.log, wandb/ (offline). Run again with the same
hydra.run.dir to resume from its latest checkpoint (training.resume=null: automatic; true: required; false:
refuse). training.init_from=<checkpoint> training.load_part=params starts from pretrained weights only.
Exit status: 0 done, 2 bad config/data/checkpoint (one-line error), 3 non-finite loss (one line with the step;
in a -m sweep that job's line is printed and the other jobs go on).
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ttt_e2e.config import ConfigError
from ttt_e2e.data import DataError
from ttt_e2e.train.checkpoint import CheckpointError
from ttt_e2e.train.hydra_store import register_configs
from ttt_e2e.train.trainer import TrainingStopped, train

register_configs()


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig):
    try:
        cfg = OmegaConf.to_object(dcfg)  # the typed ttt_e2e.config.Config
        result = train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, CheckpointError, OmegaConfBaseException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # In a sweep, a job that diverged (too large a learning rate, say) is one of its results, not the end of
            # the sweep: its siblings still run (the launcher would stop every job on an exit)
            return float("nan")
        sys.exit(3)
    if not result.is_main:
        return result.last_val_loss
    print(f"done: step {result.step}; train loss {_fmt(result.first_loss)} (first step) -> "
          f"{_fmt(result.last_loss)} (last); val loss {_fmt(result.first_val_loss)} (start) -> "
          f"{_fmt(result.last_val_loss)} (end); checkpoint {result.checkpoint}; run dir {result.run_dir}",
          flush=True)
    return result.last_val_loss  # what a Hydra sweeper would optimize


if __name__ == "__main__":
    main()
