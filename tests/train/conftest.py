"""Fixtures for the trainer tests: a tiny model (d_model 32, seq 64) on 20 stdlib files, a token cache shared
by the session, runners for train.py / eval.py / torchrun in subprocesses, and Hydra composition in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "model.d_model": 32, "model.n_heads": 2, "model.mlp_width": 64, "model.prime_mlp_width": 64,
    "model.n_layers": 2, "model.suffix_len": 1, "model.seq_length": 64, "model.window": 32,
    "ttt.mini_batch_size": 16, "ttt.ilr_warmup_steps": 2, "data.max_docs": 20,
    "training.global_batch_size": 4, "training.steps": 8, "training.eval_every": 4, "training.checkpoint_every": 4,
    "training.eval_batches": 1, "training.progress": "false", "logger": "none",
}


def _env() -> dict:
    env = dict(os.environ)
    # One thread per process: deterministic, and two ranks on two cores do not oversubscribe.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture
def tiny_args(token_cache):
    """tiny_args(run_dir, **{"training.steps": 3}) -> the override list for a tiny run in run_dir."""
    def make(run_dir=None, **overrides) -> list[str]:
        kv = {**TINY, "data.cache_dir": token_cache, **overrides}
        args = [f"{k}={v}" for k, v in kv.items()]
        return args + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])
    return make


@pytest.fixture
def run_cli():
    """run_cli(["train.py", ...]) -> CompletedProcess (text). check=True asserts exit status 0."""
    def run(args: list[str], check: bool = True, timeout: float = 300):
        cmd = [sys.executable, *map(str, args)]
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        if check:
            assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p
    return run


@pytest.fixture
def popen_cli():
    def start(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return start


@pytest.fixture
def compose(tiny_args):
    """compose(**overrides) -> the typed Config of a tiny run, composed by Hydra from conf/ in-process."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ttt_e2e.train.hydra_store import register_configs

    register_configs()

    def make(*extra: str, **overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=tiny_args(None, **overrides) + list(extra))
        return OmegaConf.to_object(cfg)
    return make


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture
def metrics():
    return read_metrics
