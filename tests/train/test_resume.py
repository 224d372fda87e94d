"""A run killed with SIGKILL after it wrote a checkpoint, then started again on the same run dir, continues
exactly: its metrics.jsonl equals an uninterrupted run's, bit for bit (CPU, one thread), and so do the weights."""
import signal
import time

import pytest
import torch

COMPARED = ("step", "loss", "minibatch_losses", "grad_norm", "lr", "ilr", "inner_grad_norm",
            "inner_grad_norm_by_minibatch", "val_loss", "tokens")


def _history(records):
    return [{k: r[k] for k in COMPARED if k in r} for r in records]


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, tiny_args, run_cli, popen_cli, metrics):
    steps = 14
    args = dict(**{"training.steps": steps, "training.checkpoint_every": 3, "training.eval_every": 5,
                   "training.keep_last": 2})
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli(["train.py", *tiny_args(full, **args)])

    proc = popen_cli(["train.py", *tiny_args(killed, **args)])
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out[-2000:]}"
    killed_at = int(latest.read_text().strip().split("_")[-1])
    assert 3 <= killed_at < steps
    # Before any resume, two fresh processes must already agree; if not, the fault is not in resuming.
    fresh = [r for r in _history(metrics(killed)) if r["step"] <= killed_at]
    assert fresh == _history(metrics(full))[:len(fresh)], (
        "two fresh processes disagree before any resume: training is not deterministic across processes "
        "(e.g. iterating a set of parameter names, whose order depends on PYTHONHASHSEED)")

    resumed = run_cli(["train.py", *tiny_args(killed, **args)])
    assert f"resumed from {killed / 'checkpoints' / f'step_{killed_at:08d}'}" in resumed.stdout + resumed.stderr

    assert _history(metrics(killed)) == _history(metrics(full))
    a = torch.load(full / "checkpoints" / f"step_{steps:08d}" / "model.pt")
    b = torch.load(killed / "checkpoints" / f"step_{steps:08d}" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_last=2: only the two newest checkpoints remain, and nothing half-written is visible.
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["latest", f"step_{steps - 2:08d}", f"step_{steps:08d}"]
