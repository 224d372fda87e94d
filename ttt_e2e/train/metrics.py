"""Metric sinks: metrics.jsonl in the run dir (always) and wandb (optional, imported only when chosen).

metrics.jsonl holds one JSON object per logged step. On resume from step s it is cut back to the records with
step <= s (atomically), so the file is always one consistent history: records a killed run wrote after its last
checkpoint are replaced by the resumed run's.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ttt_e2e.config import Config, ConfigError


def _clean(v):
    """JSON has no NaN/inf: write them as strings so a reader sees them rather than choking."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JsonlLogger:
    def __init__(self, path: str | Path, resume_step: Optional[int]):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")  # a fresh run: records of an earlier attempt without checkpoints are void
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def require_wandb():
    """The wandb module; imported only here, so that logger=none works without wandb installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.logger=wandb but wandb is not installed: pip install wandb, or set logger=none") from None
    return wandb


class WandbLogger:
    def __init__(self, cfg: Config, run_dir: Path):
        wandb = require_wandb()
        # A stable id per run dir, so a resumed run appends to the same wandb run.
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(project=cfg.log.project, entity=cfg.log.entity, name=cfg.log.name or run_dir.name,
                              dir=str(run_dir), mode=cfg.log.wandb_mode, config=asdict(cfg), id=run_id,
                              resume="allow")

    def log(self, record: dict) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if "minibatch_losses" in record:  # the loss-by-mini-batch curve as separate series
            scalars.update({f"minibatch_loss/{i}": v for i, v in enumerate(record["minibatch_losses"])})
        self.run.log(scalars, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Loggers:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_loggers(cfg: Config, run_dir: Path, resume_step: Optional[int], is_main: bool) -> Loggers:
    if not is_main:
        return Loggers([])
    sinks: list = [JsonlLogger(run_dir / "metrics.jsonl", resume_step)]
    if cfg.log.logger == "wandb":
        sinks.append(WandbLogger(cfg, run_dir))
    return Loggers(sinks)
