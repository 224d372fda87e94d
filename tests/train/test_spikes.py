"""optim.spike_policy: the SpikeGuard's verdicts, and the trainer skipping (not applying) a skipped step."""
from __future__ import annotations

import math

import pytest
import torch

from ttt_e2e.config import ConfigError, OptimConfig
from ttt_e2e.train.spikes import SpikeGuard
from ttt_e2e.train.trainer import NonFiniteLossError, train


def _guard(**kw) -> SpikeGuard:
    return SpikeGuard(OptimConfig(**{"spike_policy": "skip", "spike_min_history": 3, "spike_factor": 10.0,
                                     "spike_max_consecutive": 3, **kw}))


def test_skip_policy_skips_non_finite_and_far_above_median_then_recovers():
    g = _guard()
    # history warm-up: large norms are accepted while fewer than spike_min_history are known
    for n in (50.0, 2.0, 3.0):
        assert g.check(1.0, n) is None and not g.skipped
    assert g.check(1.0, 30.1) is None and g.skipped  # > 10 x median(50, 2, 3) = 30
    assert g.check(1.0, 29.9) is None and not g.skipped  # just under: accepted, enters the history
    assert g.check(math.nan, 1.0) is None and g.skipped
    assert g.check(1.0, math.inf) is None and g.skipped
    assert g.total == 3 and g.in_a_row == 2
    assert g.check(1.0, 1.0) is None and not g.skipped and g.in_a_row == 0
    # skipped norms never enter the history: median of (50, 2, 3, 29.9, 1.0) = 3
    assert list(g.history) == [50.0, 2.0, 3.0, 29.9, 1.0]
    assert g.check(1.0, 31.0) is None and g.skipped


def test_skip_policy_stops_after_max_consecutive():
    g = _guard()
    assert g.check(1.0, math.nan) is None and g.check(1.0, math.nan) is None
    why = g.check(math.inf, 1.0)
    assert why.startswith("non-finite loss, 3 skipped steps in a row") and g.total == 3


def test_stop_policy_stops_only_on_non_finite():
    g = SpikeGuard(OptimConfig(spike_min_history=1))
    for n in (1.0, 1e12, 1.0):  # a finite spike is left to the clip
        assert g.check(1.0, n) is None and not g.skipped
    assert g.check(1.0, math.inf) == "non-finite gradient norm"
    assert g.check(math.nan, 1.0) == "non-finite loss"


def test_bad_settings_are_refused():
    for kw, msg in (({"spike_policy": "clip"}, "optim.spike_policy must be stop or skip"),
                    ({"spike_factor": 1.0}, "optim.spike_factor must be > 1"),
                    ({"spike_window": 0}, "optim.spike_window must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            OptimConfig(**kw).validate()


def test_trainer_skips_the_update_of_a_skipped_step(compose, tmp_path, metrics):
    """spike_factor just above 1: every step whose norm exceeds the running median is skipped. The weights of a
    skipped step's checkpoint equal the previous one's; an accepted step changes them."""
    run = tmp_path / "run"
    train(compose(**{"optim.spike_policy": "skip", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
                     "optim.spike_max_consecutive": 100, "training.steps": 8, "training.checkpoint_every": 1,
                     "training.keep_last": 100, "training.eval_every": 0}), run)
    records = [r for r in metrics(run) if "skipped" in r]
    flags = [r["skipped"] for r in records]
    assert True in flags and False in flags[1:], flags  # both kinds happen in this deterministic run
    assert records[-1]["skipped_steps"] == sum(flags)
    weights = {r["step"]: torch.load(run / "checkpoints" / f"step_{r['step']:08d}" / "model.pt") for r in records}
    for r in records[1:]:
        prev, cur = weights[r["step"] - 1], weights[r["step"]]
        same = all(torch.equal(prev[k], cur[k]) for k in cur)
        assert same == r["skipped"], (r["step"], r["skipped"])


def test_trainer_stops_after_consecutive_skips(compose, tmp_path, metrics):
    # lr 1e30: step 1 blows the weights up; every later loss is NaN, skipped, until 3 in a row stop the run.
    with pytest.raises(NonFiniteLossError) as e:
        train(compose(**{"optim.lr": 1e30, "optim.min_lr": 0, "optim.spike_policy": "skip",
                         "optim.spike_max_consecutive": 3, "training.steps": 8}), tmp_path / "run")
    assert str(e.value).startswith("non-finite loss, 3 skipped steps in a row (optim.spike_max_consecutive) "
                                   "at step 4: training stopped")
    assert [r["skipped"] for r in metrics(tmp_path / "run") if "skipped" in r] == [False, True, True]
