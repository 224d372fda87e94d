"""The reference's training recipe as config switches (issue 26), each against the reference's formula, and the
paper configs choosing it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ttt_e2e.config import ModelConfig, OptimConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train.optim import build_optimizer, lr_at

CONF = Path(__file__).resolve().parents[2] / "conf"


def optax_warmup_cosine(step: int, peak: float, warmup: int, decay_steps: int, end: float) -> float:
    """optax.warmup_cosine_decay_schedule(init_value=0, ...) at `step`, from optax's definition: a linear
    schedule from 0 to peak over warmup steps joined to cosine_decay_schedule(peak, decay_steps - warmup,
    alpha=end / peak) at step - warmup."""
    if step < warmup:
        return peak * step / warmup
    d = decay_steps - warmup
    c = 0.5 * (1 + math.cos(math.pi * min(step - warmup, d) / d))
    return peak * ((1 - end / peak) * c + end / peak)


def test_reference_schedule_is_optax_warmup_cosine():
    cfg = OptimConfig(lr=3e-3, min_lr=1e-5, warmup_fraction=0.1, reference_schedule=True)
    total = 50
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(optax_warmup_cosine(step, 3e-3, 5, total, 1e-5), abs=1e-12)
    assert lr_at(0, total, cfg) == 0.0  # the first update moves nothing
    ours = OptimConfig(lr=3e-3, min_lr=1e-5, warmup_fraction=0.1)
    assert lr_at(0, total, ours) == pytest.approx(3e-3 / 5)  # ours: lr (step + 1) / warmup
    assert lr_at(total - 1, total, ours) == pytest.approx(1e-5)  # ours reaches min_lr at the last step


def test_reference_ilr_warmup():
    ours = TTTConfig(ilr_init=0.1, ilr_warmup_steps=10)
    ref = TTTConfig(ilr_init=0.1, ilr_warmup_steps=10, reference_ilr_warmup=True)
    assert [ours.ilr_multiplier(s) for s in (0, 5, 9, 10)] == pytest.approx([0.1, 0.55, 0.91, 1.0])
    assert [ref.ilr_multiplier(s) for s in (0, 5, 9, 10, 100)] == pytest.approx([0.19, 0.64, 1.0, 1.0, 1.0])
    # ilr_init is an absolute inner lr there: inner lr 2 starting at 0.1 is a multiplier of 0.05 at "step -1"
    ref2 = TTTConfig(inner_lr=2.0, ilr_init=0.1, ilr_warmup_steps=10, reference_ilr_warmup=True)
    assert ref2.ilr_multiplier(0) == pytest.approx((0.1 + 1.9 * 0.1) / 2)
    assert TTTConfig(inner_lr=0.0, ilr_warmup_steps=10, reference_ilr_warmup=True).ilr_multiplier(0) == 1.0


def test_eval_full_ilr():
    ttt = TTTConfig(ilr_init=0.1, ilr_warmup_steps=10)
    assert ttt.eval_ilr_multiplier(3) == ttt.ilr_multiplier(3) == pytest.approx(0.37)
    ttt.eval_full_ilr = True
    assert ttt.eval_ilr_multiplier(3) == 1.0 and ttt.ilr_multiplier(3) == pytest.approx(0.37)


def test_decay_norms_decays_every_parameter():
    model = Transformer(ModelConfig(d_model=32, n_heads=2, n_layers=2, mlp_width=64, seq_length=32, window=16))
    gains = {id(p) for p in model.parameters() if p.dim() == 1}
    assert gains  # RMSNorm gains exist
    for decay_norms in (False, True):
        opt = build_optimizer(model.parameters(), OptimConfig(decay_norms=decay_norms))
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert (gains <= decayed) == decay_norms
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # and it acts: one AdamW step with zero gradients shrinks the gains by lr * weight_decay
    opt = build_optimizer(model.parameters(), OptimConfig(decay_norms=True, lr=0.1, weight_decay=0.5))
    gain = next(p for p in model.parameters() if p.dim() == 1)
    before = gain.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(gain.detach(), before * (1 - 0.1 * 0.5))


def test_trainer_and_eval_py_evaluate_with_the_switched_ilr(compose, tmp_path, monkeypatch):
    """The trainer's validation and eval.py's curve get eval_ilr_multiplier(step): 1 with eval_full_ilr, else the
    warm-up value of the step."""
    import ttt_e2e.eval.context_curve as cc
    import ttt_e2e.train.trainer as trainer

    seen = []

    def spy(real):
        def call(*args):
            seen.append(args[5])  # evaluate(loss_fn, val, bos, batch, windows, ilr_mult, info, amp)
            return real(*args)
        return call

    monkeypatch.setattr(trainer, "evaluate", spy(trainer.evaluate))
    monkeypatch.setattr(cc, "evaluate", spy(cc.evaluate))
    for full in (False, True):
        seen.clear()
        run = tmp_path / str(full)
        cfg = compose(**{"ttt.ilr_warmup_steps": 10, "ttt.ilr_init": 0.1, "ttt.eval_full_ilr": str(full).lower(),
                         "training.steps": 2, "training.eval_every": 1})
        trainer.train(cfg, run)
        cc.evaluate_checkpoint(str(run), windows=1, batch_size=1, device="cpu")
        want = [1.0] * 4 if full else [pytest.approx(0.1), pytest.approx(0.19), pytest.approx(0.28),
                                       pytest.approx(0.28)]
        assert seen == want, (full, seen)


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                                        for p in (CONF / "experiment").glob("*/*/*.yaml")))
def test_paper_configs_use_the_reference_recipe(path, tmp_path):
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ttt_e2e.config import Config
    from ttt_e2e.convert.steps import write_step
    from ttt_e2e.train.hydra_store import register_configs

    overrides = [f"+experiment={path}"]
    if path.startswith("hf/"):  # these read the architecture from the converted checkpoint they start from
        write_step(tmp_path / "converted", {}, {"step": 0, "config": asdict(Config())})
        overrides.append(f"training.init_from={tmp_path / 'converted'}")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    assert cfg.optim.reference_schedule and cfg.optim.decay_norms
    assert cfg.ttt.reference_ilr_warmup and cfg.ttt.eval_full_ilr
