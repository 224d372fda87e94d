"""Bad input: each case stops with a clear one-line error naming the problem, and nothing already written is
lost (checkpoints, metrics, config of an existing run stay as they were)."""
import hashlib
from pathlib import Path

import pytest
import torch

from ttt_e2e.config import ConfigError
from ttt_e2e.data import DataError
from ttt_e2e.train.checkpoint import CheckpointError
from ttt_e2e.train.trainer import TrainingStopped, train


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and ".hydra" not in p.parts}


def _missing(d: Path) -> Path:
    return d / "no_such_corpus.txt"


def _empty_file(d: Path) -> Path:
    (d / "empty.txt").write_text("")
    return d / "empty.txt"


def _empty_folder(d: Path) -> Path:
    (d / "empty_dir").mkdir()
    return d / "empty_dir"


def _short_file(d: Path) -> Path:
    (d / "short.txt").write_text("def f(): pass\n")  # 14 bytes + BOS/EOS < seq_length + 1 = 65 tokens
    return d / "short.txt"


@pytest.mark.parametrize("make_source, expected", [
    (_missing, "does not exist"), (_empty_file, "is empty"), (_empty_folder, "holds no"),
    (_short_file, "fewer than the seq_length + 1"),
], ids=["missing", "empty-file", "empty-folder", "shorter-than-one-sequence"])
def test_bad_dataset(compose, tmp_path, make_source, expected):
    source = make_source(tmp_path)
    with pytest.raises(DataError) as e:
        train(compose(**{"data.source": source, "data.max_docs": "null"}), tmp_path / "run")
    assert expected in _one_line(e)


def test_unknown_tokenizer(compose, tmp_path):
    with pytest.raises(DataError) as e:
        train(compose(**{"data.tokenizer": "./no_such_tokenizer"}), tmp_path / "run")
    assert "unknown tokenizer './no_such_tokenizer'" in _one_line(e)


def test_seq_length_not_divisible_by_mini_batch(compose, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(compose(**{"ttt.mini_batch_size": 24}), tmp_path / "run")
    assert "model.seq_length=64 is not divisible by ttt.mini_batch_size=24" in _one_line(e)


def test_incompatible_checkpoint_names_keys_and_shapes(compose, tmp_path):
    pre = tmp_path / "pre"
    train(compose(**{"training.steps": 2, "training.checkpoint_every": 1}), pre)
    before = _snapshot(pre)
    wider = {"model.d_model": 48, "model.n_heads": 2}
    # As the init of a new run ...
    with pytest.raises(CheckpointError) as e:
        train(compose(**wider, **{"training.init_from": pre, "training.load_part": "params"}), tmp_path / "new")
    msg = _one_line(e)
    assert "does not fit this model" in msg and "shape mismatches [" in msg
    assert "prefix.0.attn.wqkv.weight: checkpoint (96, 32) vs model (144, 48)" in msg and "(+22 more)" in msg
    # ... and when resuming its own run dir with another architecture (or prime MLP removed: missing keys).
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(compose(**wider), pre)
    with pytest.raises(CheckpointError) as e:
        train(compose(**{"model.prime_mlp": "false", "ttt.train_mode": "pretrain"}), pre)
    assert "unexpected keys [suffix.blocks.0.post_prime_norm.weight, suffix.blocks.0.pre_prime_norm.weight, " \
           "suffix.blocks.0.prime.w13, suffix.blocks.0.prime.w2]" in _one_line(e)
    assert _snapshot(pre) == before


def test_resume_false_refuses_a_run_dir_with_checkpoints(compose, tmp_path):
    run = tmp_path / "run"
    train(compose(**{"training.steps": 1}), run)
    before = _snapshot(run)
    with pytest.raises(CheckpointError) as e:
        train(compose(**{"training.steps": 2, "training.resume": "false"}), run)
    assert "already holds checkpoints" in _one_line(e)
    assert _snapshot(run) == before
    with pytest.raises(CheckpointError, match="training.resume=true but .* holds no checkpoint"):
        train(compose(**{"training.resume": "true"}), tmp_path / "fresh")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(compose, tmp_path, metrics):
    run = tmp_path / "run"
    # lr 1e30: the first update blows the weights up, so the second step's loss is NaN.
    with pytest.raises(TrainingStopped) as e:
        train(compose(**{"optim.lr": 1e30, "optim.min_lr": 0, "training.steps": 6,
                         "training.checkpoint_every": 1}), run)
    msg = _one_line(e)
    assert msg.startswith("non-finite loss at step 2: training stopped; last good checkpoint kept: ")
    good = run / "checkpoints" / "step_00000001"
    assert msg.endswith(str(good)) and e.value.step == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == good.name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", good.name]
    weights = torch.load(good / "model.pt")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in metrics(run)] == [0, 1]


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_status(tiny_args, run_cli, tmp_path):
    p = run_cli(["train.py", *tiny_args(tmp_path / "a", **{"data.source": tmp_path / "missing.txt"})], check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: data source '{tmp_path / 'missing.txt'}' does not exist"
    p = run_cli(["train.py", *tiny_args(tmp_path / "b", **{"optim.lr": 1e30, "optim.min_lr": 0,
                                                          "training.checkpoint_every": 1})], check=False)
    assert p.returncode == 3, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: non-finite loss at step 2: training stopped")
    assert (tmp_path / "b" / "checkpoints" / "step_00000001" / "model.pt").is_file()
