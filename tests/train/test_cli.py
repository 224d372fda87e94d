"""The command lines: a 2-job Hydra multirun, and eval.py comparing two checkpoints in one JSON and one plot."""
import json
import math

import pytest

from ttt_e2e.train.trainer import train


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path, tiny_args, run_cli, metrics):
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_args(None, **{"training.steps": 2, "training.eval_every": 0})]
    p = run_cli(["train.py", "-m", "training.seed=0,1", *args, f"hydra.sweep.dir={sweep}"])
    assert p.stdout.count("done: step 2") == 2
    losses = []
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        assert "seed: " + job in (sweep / job / "config.yaml").read_text()
        losses.append([r["loss"] for r in metrics(sweep / job) if "loss" in r])
    assert losses[0] != losses[1]  # two different initializations, i.e. two real jobs


@pytest.mark.slow
def test_multirun_goes_on_past_a_diverged_job(tmp_path, tiny_args, run_cli, metrics):
    sweep = tmp_path / "sweep"
    args = tiny_args(None, **{"training.steps": 3, "training.eval_every": 0, "training.checkpoint_every": 0})
    p = run_cli(["train.py", "-m", "optim.lr=1e30,3e-3", *args, f"hydra.sweep.dir={sweep}"])
    assert p.stderr.count("error: non-finite loss at step") == 1  # job 0 diverged, said so in one line
    assert not (sweep / "0" / "checkpoints" / "latest").exists()
    assert p.stdout.count("done: step 3") == 1  # and job 1 still ran to its end
    assert (sweep / "1" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert all(math.isfinite(r["loss"]) for r in metrics(sweep / "1") if "loss" in r)


@pytest.mark.slow
def test_eval_writes_json_and_plot_for_two_checkpoints(compose, tmp_path, run_cli):
    run = tmp_path / "run"
    train(compose(**{"training.steps": 4, "training.checkpoint_every": 2}), run)
    out = tmp_path / "eval"
    p = run_cli(["eval.py", f"checkpoint={run / 'checkpoints' / 'step_00000002'}", f"checkpoint={run}",
                 "label=step2", "label=latest", "windows=4", "batch_size=2", f"out={out}"])
    assert "wrote" in p.stdout
    results = json.loads((out / "eval.json").read_text())["checkpoints"]
    assert [r["label"] for r in results] == ["step2", "latest"] and [r["step"] for r in results] == [2, 4]
    for r in results:
        assert r["train_mode"] == "meta" and r["windows"] == 4 and len(r["loss_by_position"]) == 64
        curve = [v for v in r["loss_by_position"] if v is not None]
        assert len(curve) >= 60 and all(math.isfinite(v) for v in curve)
        assert min(curve) <= r["loss"] <= max(curve)
    assert results[1]["loss"] < results[0]["loss"]  # two more steps of training
    png = (out / "loss_by_position.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_eval_bad_checkpoint_is_one_line(tmp_path, run_cli):
    p = run_cli(["eval.py", f"checkpoint={tmp_path / 'nothing'}", f"out={tmp_path / 'e'}"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: no checkpoint at '{tmp_path / 'nothing'}' (expected a step dir with " \
                               f"model.pt, a checkpoints dir or a run dir)"
    assert not (tmp_path / "e").exists()
