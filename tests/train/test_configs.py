"""conf/: every experiment composes onto the typed schema, validates, and carries docs/METHOD.md section 5's numbers."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from ttt_e2e.config import ConfigError
from ttt_e2e.model.sizes import PAPER_SIZES, paper_config
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train.hydra_store import register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"
# docs/METHOD.md section 5, training columns (the model columns are ttt_e2e.model.sizes.PAPER_SIZES): lr, steps, batch
TABLE = {"125m": (3e-3, 4800, 64), "350m": (1.5e-3, 13500, 64), "760m": (1.25e-3, 29000, 64),
         "1b": (1e-3, 50000, 64), "3b": (8e-4, 52000, 128)}


def _paper_model(size, variant, seq_length):
    """paper_config, spelled as the experiments spell it (MLP' width explicit; fa through SDPA)."""
    extra = ({"prime_mlp_width": PAPER_SIZES[size].e2e_mlp_width} if variant == "e2e" else
             {"attention_backend": "sdpa"} if variant == "fa" else {})
    return paper_config(size, variant, seq_length, **extra)


def _compose(*overrides, hydra=False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
    return cfg if hydra else OmegaConf.to_object(cfg)


def test_python_and_train_py_take_the_same_meta_step():
    """A user calling sequence_loss with a plain TTTConfig gets the step train.py takes (inner steps kept), not the
    recomputed one."""
    from ttt_e2e.config import TTTConfig

    assert _compose().ttt.remat_inner is TTTConfig().remat_inner is False


def test_default_is_the_tiny_experiment():
    default = _compose()
    assert default == _compose("+experiment=tiny")
    default.validate()
    assert (default.ttt.train_mode, default.data.source, default.data.tokenizer) == ("meta", "stdlib", "bytes")
    assert default.model.prime_mlp and default.model.suffix_len >= 1


@pytest.mark.parametrize("size", TABLE)
def test_pretrain_experiments(size):
    lr, steps, batch = TABLE[size]
    we, wb = PAPER_SIZES[size].e2e_mlp_width, PAPER_SIZES[size].mlp_width
    n_params = {}
    for variant in ("e2e", "fa", "swa"):
        cfg = _compose(f"+experiment={size}/pretrain/{variant}")
        cfg.validate()
        m, t = cfg.model, cfg.ttt
        assert m == _paper_model(size, variant, 8192)
        assert (cfg.optim.lr, cfg.training.steps, cfg.training.global_batch_size) == (lr, steps, batch)
        assert cfg.data.tokenizer == "meta-llama/Meta-Llama-3-8B" and cfg.training.init_from is None
        assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.warmup_fraction, cfg.optim.min_lr,
                cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 0.1, 1e-5, 1.0)
        if variant == "e2e":
            assert (m.mlp_width, m.prime_width, m.prime_mlp, m.window) == (we, we, True, 8192)
            assert (t.train_mode, t.mini_batch_size, t.ilr_init, t.ilr_warmup_steps) == ("meta", 1024, 0.1, steps // 10)
        else:
            assert (m.mlp_width, m.prime_mlp, t.train_mode) == (wb, False, "pretrain")
            assert m.window == (None if variant == "fa" else 8192)
            assert t.mini_batch_size == (8192 if variant == "fa" else 1024)
        with torch.device("meta"):
            n_params[variant] = sum(p.numel() for p in Transformer(m).parameters())
    # E2E shrinks every MLP so that adding MLP' keeps the parameter count of the baselines.
    assert n_params["fa"] == n_params["swa"]
    assert abs(n_params["e2e"] / n_params["fa"] - 1) < 0.015


@pytest.mark.parametrize("size, phase, seq, batch", [(s, "extension", 32768, 32) for s in TABLE]
                         + [("3b", "extension_128k", 131072, 16)])
def test_extension_experiments(size, phase, seq, batch):
    for variant in ("e2e", "fa", "swa"):
        name = f"+experiment={size}/{phase}/{variant}"
        with pytest.raises(ConfigError, match="training.load_part=params needs training.init_from"):
            _compose(name).validate()  # needs the pretrained checkpoint ...
        with pytest.raises(ConfigError, match="data.source is empty"):
            _compose(name, "training.init_from=/ckpt").validate()  # ... and the books corpus
        cfg = _compose(name, "training.init_from=/ckpt", "data.source=/books")
        cfg.validate()
        assert (cfg.model.seq_length, cfg.training.global_batch_size, cfg.training.steps, cfg.optim.lr) == (
            seq, batch, 120, 4e-4)
        assert (cfg.training.load_part, cfg.training.init_from) == ("params", "/ckpt")
        assert cfg.model == _paper_model(size, variant, seq)
        if variant == "e2e":
            assert (cfg.ttt.train_mode, cfg.ttt.ilr_init, cfg.ttt.ilr_warmup_steps) == ("meta", 1.0, 0)
            assert cfg.ttt.ilr_multiplier(0) == 1.0


def test_typos_and_wrong_types_are_rejected_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose("training.stepz=3")
    with pytest.raises(ConfigCompositionException, match="training.steps=many"):
        _compose("training.steps=many")


def test_launchers_and_loggers():
    slurm = _compose("launcher=slurm", hydra=True)
    assert "submitit" in slurm.hydra.launcher._target_.lower() and slurm.hydra.launcher.tasks_per_node == 8
    assert "basic" in _compose(hydra=True).hydra.launcher._target_.lower()
    assert _compose("logger=none").log.logger == "none"
    assert (_compose().log.logger, _compose().log.wandb_mode) == ("wandb", "offline")
