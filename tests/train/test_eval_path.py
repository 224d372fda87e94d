"""eval.py on a tiny trained meta checkpoint: the engine path (the default) and the training-mode loss give the same
numbers; a bad path= is a one-line error."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ttt_e2e.eval.context_curve import evaluate_checkpoint
from ttt_e2e.train.trainer import train


REPO = Path(__file__).resolve().parents[2]


def _eval_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_checkpoint_same_numbers_through_both_paths(compose, tmp_path, capsys):
    run = tmp_path / "run"
    train(compose(**{"training.steps": 2, "training.eval_every": 0, "training.checkpoint_every": 2}), run)
    # 3 windows in batches of 2 (a smaller last batch); 4 mini-batches of 16 per window, the inner loop at the
    # checkpoint's step-2 inner-lr multiplier
    got = evaluate_checkpoint(str(run), windows=3, batch_size=2, device="cpu")
    ref = evaluate_checkpoint(str(run), windows=3, batch_size=2, device="cpu", eval_path="training")
    assert got["eval_path"] == "auto" and ref["eval_path"] == "training" and got["train_mode"] == "meta"
    assert got["tokens"] == ref["tokens"] > 150 and got["windows"] == 3
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    np.testing.assert_allclose(got["loss_by_position"], ref["loss_by_position"], rtol=1e-5, atol=1e-5)

    cli = _eval_cli()
    out = tmp_path / "e"
    assert cli.main([f"checkpoint={run}", "windows=3", "batch_size=2", "device=cpu", "path=engine",
                     f"out={out}"]) == 0
    assert json.loads((out / "eval.json").read_text())["checkpoints"][0]["loss"] == pytest.approx(got["loss"],
                                                                                                  rel=1e-12)
    capsys.readouterr()
    assert cli.main([f"checkpoint={run}", "path=fast", f"out={tmp_path / 'bad'}"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: evaluation path must be one of auto, engine, training, got 'fast'"
