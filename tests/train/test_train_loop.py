"""The loop in-process on a tiny model: meta training learns, metrics are complete, the token cache is reused,
params-only initialization (extension runs), pretrain mode, loggers."""
import logging
import math
import sys

import pytest

from ttt_e2e.config import ConfigError
from ttt_e2e.train.optim import lr_at
from ttt_e2e.train.trainer import train


def test_meta_training_lowers_loss_and_logs_every_metric(compose, tmp_path, metrics):
    cfg = compose(**{"training.steps": 8})
    r = train(cfg, tmp_path / "run")
    assert r.step == 8
    assert r.last_loss < r.first_loss - 0.2, (r.first_loss, r.last_loss)
    assert r.last_val_loss < r.first_val_loss - 0.2, (r.first_val_loss, r.last_val_loss)
    records = metrics(tmp_path / "run")
    assert records[0] == {"step": 0, "val_loss": r.first_val_loss}
    steps = records[1:]
    assert [s["step"] for s in steps] == list(range(1, 9))
    n_mb = cfg.model.seq_length // cfg.ttt.mini_batch_size
    for s in steps:
        # an inner step after every mini-batch but the last (whose update no loss reads)
        assert len(s["minibatch_losses"]) == n_mb and len(s["inner_grad_norm_by_minibatch"]) == n_mb - 1
        for k in ("loss", "grad_norm", "inner_grad_norm", "lr", "ilr", "tokens_per_s", "mfu"):
            assert math.isfinite(s[k]) and s[k] > 0, (k, s[k])
        assert s["tokens"] == s["step"] * 4 * 64
        assert s["lr"] == pytest.approx(lr_at(s["step"] - 1, 8, cfg.optim))
        assert s["ilr"] == pytest.approx(cfg.ttt.ilr_multiplier(s["step"] - 1))
    assert steps[0]["ilr"] == pytest.approx(0.1) and steps[-1]["ilr"] == 1.0  # inner-lr warmup over 2 steps
    assert steps[-1]["lr"] == pytest.approx(cfg.optim.min_lr)  # cosine ends at min_lr
    assert [s.get("val_loss") is not None for s in steps] == [False] * 3 + [True] + [False] * 3 + [True]
    assert (tmp_path / "run" / "config.yaml").read_text().count("train_mode: meta") == 1
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_second_run_reuses_the_token_cache(compose, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ttt_e2e.data")
    cache = tmp_path / "cache"
    for i in range(2):
        train(compose(**{"training.steps": 1, "data.cache_dir": cache, "training.eval_batches": 1}), tmp_path / f"r{i}")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ttt_e2e.data")]
    assert sum("token cache miss" in m for m in messages) == 1
    assert sum("token cache hit" in m for m in messages) == 1
    assert messages.index(next(m for m in messages if "miss" in m)) < messages.index(
        next(m for m in messages if "hit" in m))


def test_extension_starts_from_params_only(compose, tmp_path, metrics):
    """load_part=params: the pretrained weights, but step 0, a fresh optimizer and schedule (warmup again)."""
    base = {"ttt.ilr_warmup_steps": 0, "training.eval_every": 0}
    a = train(compose(**base, **{"training.steps": 4}), tmp_path / "pre")
    b_cfg = compose(**base, **{"training.steps": 3, "optim.lr": 4e-4, "training.init_from": tmp_path / "pre",
                               "training.load_part": "params"})
    b = train(b_cfg, tmp_path / "ext")
    rec = metrics(tmp_path / "ext")
    # Same weights, same validation windows, same inner lr: the extension's step-0 val loss is the pretrain's last.
    assert rec[0] == {"step": 0, "val_loss": a.last_val_loss}
    assert [r["step"] for r in rec[1:]] == [1, 2, 3] and b.step == 3
    assert rec[1]["lr"] == pytest.approx(lr_at(0, 3, b_cfg.optim))  # a fresh schedule, from its warmup


def test_pretrain_mode_full_attention_learns(compose, tmp_path):
    cfg = compose(**{"ttt.train_mode": "pretrain", "model.prime_mlp": "false", "model.window": "null",
                     "ttt.mini_batch_size": 64, "training.steps": 6})
    r = train(cfg, tmp_path / "fa")
    assert r.last_loss < r.first_loss - 0.2


def test_logger_none_works_without_wandb_installed(compose, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    r = train(compose(**{"training.steps": 1}), tmp_path / "none")
    assert r.step == 1
    with pytest.raises(ConfigError, match="wandb is not installed.*logger=none"):
        train(compose(**{"training.steps": 1, "logger": "wandb"}), tmp_path / "wandb")


@pytest.mark.slow
def test_wandb_offline_run_is_written(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = train(compose(**{"training.steps": 2, "logger": "wandb"}), tmp_path / "w")
    assert r.step == 2
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_torch_compile_matches_eager(compose, tmp_path, metrics, mode):
    """training.compile=true compiles the blocks that run as plain modules (the prefix; the suffix too in
    pretrain mode); the losses stay those of eager mode up to fusion rounding."""
    import torch._dynamo

    base = {"ttt.train_mode": mode, "training.steps": 2, "training.eval_every": 0}
    train(compose(**base), tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train(compose(**base, **{"training.compile": "true"}), tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was really compiled
    eager = [r["loss"] for r in metrics(tmp_path / "eager") if "loss" in r]
    compiled = [r["loss"] for r in metrics(tmp_path / "compiled") if "loss" in r]
    assert len(eager) == 2 and compiled == pytest.approx(eager, rel=1e-5)
