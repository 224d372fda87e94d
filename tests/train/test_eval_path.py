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


def test_evaluation_counts_only_unmasked_targets():
    """The validation loss is the mean over the targets make_batch keeps (a BOS target is masked). Here a loss
    of 1 on every kept target and 100 on every BOS target: with the mask the mean is exactly 1, and a position
    whose targets are all BOS is nan in the curve; were the mask dropped, the BOS targets would raise the mean."""
    import torch

    from ttt_e2e.data import WindowDataset
    from ttt_e2e.train.distributed import DistInfo
    from ttt_e2e.train.evaluate import evaluate

    bos, T = 0, 8
    stream = np.arange(4 * T + 1) % 7 + 1  # tokens 1..7, windows i*T .. i*T + T (neighbours share a token) ...
    stream[4::T] = bos  # ... and a BOS at position 4 of every window: the target of position 3, always masked
    val = WindowDataset(stream, T)

    def loss_fn(inputs, targets, mask, ilr):
        return {"token_losses": torch.where(targets == bos, 100.0, 1.0)}

    r = evaluate(loss_fn, val, bos, batch_size=2, max_windows=4, ilr_mult=1.0,
                 info=DistInfo(0, 1, 0, torch.device("cpu")), autocast=lambda: __import__("contextlib").nullcontext(),
                 path="training")
    assert r.windows == 4 and r.tokens == 4 * (T - 1)
    assert r.loss == 1.0
    assert np.isnan(r.loss_by_position[3]) and all(x == 1.0 for i, x in enumerate(r.loss_by_position) if i != 3)


def test_validation_uses_the_backed_off_inner_lr(compose, tmp_path, metrics):
    """Under the rollback policy the inner lr is backed off; the trainer's validation must use the inner lr the
    run trains with then, which the checkpoint's saved config carries: its last val_loss equals eval.py's loss of
    the final checkpoint on the same windows. Were the back-off left out of the validation, the trainer would
    evaluate with the original inner lr and the two would differ (meta mode: the inner loop runs in evaluation)."""
    run = tmp_path / "run"
    train(compose(**{"optim.spike_policy": "rollback", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
                     "optim.spike_rollback_after": 1, "optim.spike_snapshot_every": 2, "optim.spike_max_rollbacks": 100,
                     "optim.spike_backoff_ilr": 0.25, "ttt.inner_lr": 1.0, "training.steps": 6,
                     "training.checkpoint_every": 0, "training.eval_every": 0}), run)
    last = [r for r in metrics(run) if "loss" in r][-1]
    assert last["rollbacks"] > 0 and last["ilr"] < 1.0  # the run did back off
    # the trainer's validation: eval_batches x global_batch_size = 4 windows, in micro-batches of 4
    got = evaluate_checkpoint(str(run), windows=4, batch_size=4, device="cpu")
    assert last["val_loss"] == pytest.approx(got["loss"], rel=1e-6)
