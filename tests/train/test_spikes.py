"""optim.spike_policy: the SpikeGuard's verdicts, the trainer skipping (not applying) a skipped step, rolling back
to a snapshot with the inner lr backed off, and resuming with the guard's state."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from ttt_e2e.config import ConfigError, OptimConfig
from ttt_e2e.train.checkpoint import read_config
from ttt_e2e.train.spikes import APPLY, Action, SpikeGuard, Verdict
from ttt_e2e.train.trainer import TrainingStopped, train


def _guard(**kw) -> SpikeGuard:
    return SpikeGuard(OptimConfig(**{"spike_policy": "skip", "spike_min_history": 3, "spike_factor": 10.0,
                                     "spike_max_consecutive": 3, **kw}))


def test_skip_policy_skips_non_finite_and_far_above_median_then_recovers():
    g = _guard()
    # history warm-up: large norms are accepted while fewer than spike_min_history are known
    for n in (50.0, 2.0, 3.0):
        assert g.judge(1.0, n) == APPLY and not g.skipped
    v = g.judge(1.0, 30.1)  # > 10 x median(50, 2, 3) = 30
    assert v.action is Action.SKIP and v.why == "gradient norm 30.1 > 10 x median 3" and g.skipped
    assert g.judge(1.0, 29.9) == APPLY and not g.skipped  # just under: accepted, enters the history
    assert g.judge(math.nan, 1.0) == Verdict(Action.SKIP, "non-finite loss") and g.skipped
    assert g.judge(1.0, math.inf) == Verdict(Action.SKIP, "non-finite gradient norm") and g.skipped
    assert g.total == 3 and g.in_a_row == 2
    assert g.judge(1.0, 1.0) == APPLY and not g.skipped and g.in_a_row == 0
    # skipped norms never enter the history: median of (50, 2, 3, 29.9, 1.0) = 3
    assert list(g.history) == [50.0, 2.0, 3.0, 29.9, 1.0]
    assert g.judge(1.0, 31.0).action is Action.SKIP and g.skipped


def test_skip_policy_stops_after_max_consecutive():
    g = _guard()
    assert g.judge(1.0, math.nan).action is Action.SKIP and g.judge(1.0, math.nan).action is Action.SKIP
    v = g.judge(math.inf, 1.0)
    assert v.action is Action.STOP and v.why.startswith("non-finite loss, 3 skipped steps in a row") and g.total == 3


def test_stop_policy_stops_only_on_non_finite():
    g = SpikeGuard(OptimConfig(spike_min_history=1))
    for n in (1.0, 1e12, 1.0):  # a finite spike is left to the clip
        assert g.judge(1.0, n) == APPLY and not g.skipped
    assert g.judge(1.0, math.inf) == Verdict(Action.STOP, "non-finite gradient norm")
    assert g.judge(math.nan, 1.0) == Verdict(Action.STOP, "non-finite loss")


def test_bad_settings_are_refused():
    for kw, msg in (({"spike_policy": "clip"}, "optim.spike_policy must be stop, skip or rollback"),
                    ({"spike_backoff_ilr": 0.0}, r"optim.spike_backoff_ilr must be in \(0, 1\]"),
                    ({"spike_backoff_lr": 1.5}, r"optim.spike_backoff_lr must be in \(0, 1\]"),
                    ({"spike_max_rollbacks": -1}, "optim.spike_max_rollbacks must be >= 0"),
                    ({"spike_snapshot_every": 0}, "optim.spike_snapshot_every must be >= 1"),
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
    with pytest.raises(TrainingStopped) as e:
        train(compose(**{"optim.lr": 1e30, "optim.min_lr": 0, "optim.spike_policy": "skip",
                         "optim.spike_max_consecutive": 3, "training.steps": 8}), tmp_path / "run")
    assert str(e.value).startswith("non-finite loss, 3 skipped steps in a row (optim.spike_max_consecutive) "
                                   "at step 4: training stopped")
    assert [r["skipped"] for r in metrics(tmp_path / "run") if "skipped" in r] == [False, True, True]


def _adamw_step(model, opt, scale: float) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)
    opt.step()


def test_rollback_restores_the_snapshot_in_place_and_backs_off():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = _guard(spike_policy="rollback", spike_snapshot_every=2, spike_rollback_after=2, spike_max_rollbacks=1,
               spike_backoff_ilr=0.5, spike_backoff_lr=0.25, spike_max_consecutive=10)
    ids = [id(p) for p in model.parameters()]
    g.start(0, model, opt)  # snapshot of step 0: no optimizer state yet
    kept = {}
    for step, norm in enumerate((1.0, 1.0, 1.0, 1.0), 1):  # accepted: snapshots after steps 2 and 4
        assert g.judge(1.0, norm) == APPLY and not g.skipped
        _adamw_step(model, opt, step)
        g.after(APPLY, step, model, opt, sched)
        kept[step] = ([p.detach().clone() for p in model.parameters()],
                      [opt.state[p]["exp_avg"].clone() for p in model.parameters()])
    assert g.snapshot.step == 4
    assert g.judge(1.0, 1.0) == APPLY and not g.skipped  # an accepted step after the snapshot moves the weights
    _adamw_step(model, opt, 5)
    g.after(APPLY, 5, model, opt, sched)
    v = g.judge(1.0, 1e6)  # one spike: not yet
    assert v.action is Action.SKIP and g.skipped
    g.after(v, 6, model, opt, sched)
    assert g.rollbacks == 0
    v = g.judge(1.0, math.nan)  # the second since the snapshot: roll back
    assert v == Verdict(Action.ROLL_BACK, "non-finite gradient norm") and g.skipped
    g.after(v, 7, model, opt, sched)
    assert g.rollbacks == 1
    params, moments = kept[4]
    for p, want, m in zip(model.parameters(), params, moments):
        assert torch.equal(p, want) and torch.equal(opt.state[p]["exp_avg"], m)
    assert [id(p) for p in model.parameters()] == ids  # in place: a CUDA graph's tensors stay valid
    assert g.ilr_scale == 0.5 and sched.base_lrs == [0.025] and opt.param_groups[0]["lr"] == 0.025
    assert g.snapshot.step == 4 and g.since_snapshot == 0
    # spikes again before a new snapshot: the one rollback allowed is spent, so the run stops
    v = g.judge(1.0, math.inf)
    assert v.action is Action.SKIP
    g.after(v, 8, model, opt, sched)
    v = g.judge(1.0, math.inf)
    assert v.action is Action.STOP and v.why.startswith("2 spikes since the last snapshot after 1 rollbacks")


def test_rollback_to_a_fresh_start_drops_the_optimizer_state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    g = _guard(spike_policy="rollback", spike_snapshot_every=5, spike_rollback_after=1)
    w0 = [p.detach().clone() for p in model.parameters()]
    g.start(0, model, opt)
    assert g.judge(1.0, 1.0) == APPLY
    _adamw_step(model, opt, 1.0)
    g.after(APPLY, 1, model, opt, sched)
    v = g.judge(1.0, math.nan)
    assert v.action is Action.ROLL_BACK
    g.after(v, 2, model, opt, sched)
    assert g.rollbacks == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0)) and not opt.state


def test_trainer_rolls_back_and_saves_the_backed_off_inner_lr(compose, tmp_path, metrics):
    """Every step above the running median is a spike; one spike rolls back. The weights after a rollback equal
    those of the snapshot's step (every second accepted step); checkpoints carry the backed-off inner lr."""
    run = tmp_path / "run"
    train(compose(**{"optim.spike_policy": "rollback", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
                     "optim.spike_rollback_after": 1, "optim.spike_snapshot_every": 2, "optim.spike_max_rollbacks": 100,
                     "optim.spike_backoff_ilr": 0.5, "ttt.inner_lr": 1.0, "training.steps": 12,
                     "training.checkpoint_every": 1, "training.keep_last": 100, "training.eval_every": 0}), run)
    records = [r for r in metrics(run) if "skipped" in r]
    assert records[-1]["rollbacks"] == sum(r["skipped"] for r in records) > 0
    ckpt = lambda s: run / "checkpoints" / f"step_{s:08d}"  # noqa: E731
    snap, accepted, last_good, checked, distinct = 0, 0, 0, 0, 0  # the guard's bookkeeping, replayed
    for r in records:
        assert read_config(ckpt(r["step"])).ttt.inner_lr == 0.5 ** r["rollbacks"]
        if not r["skipped"]:
            last_good, accepted = r["step"], accepted + 1
            if accepted == 2:  # spike_snapshot_every
                snap, accepted = r["step"], 0
            continue
        accepted = 0
        if snap > 0:  # rolled back: the weights of the snapshot's step (step 0 has no checkpoint to compare)
            got, want = torch.load(ckpt(r["step"]) / "model.pt"), torch.load(ckpt(snap) / "model.pt")
            assert all(torch.equal(got[k], want[k]) for k in got), (r["step"], snap)
            checked, distinct = checked + 1, distinct + (snap != last_good)
            last_good = snap
    assert checked > 0 and distinct > 0  # distinct: a skip alone would have kept the last accepted step's weights


def _resume_at_4(compose, tmp_path, kw) -> tuple:
    """(uninterrupted run dir, the same run resumed from its step-4 checkpoint)."""
    kw = {**kw, "training.steps": 8, "training.checkpoint_every": 4, "training.keep_last": 10,
          "training.eval_every": 0}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(compose(**kw), whole)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    (resumed / "metrics.jsonl").write_text("")
    train(compose(**kw), resumed)
    return whole, resumed


def test_resume_keeps_the_skip_history(compose, tmp_path):
    """Resumed from its step-4 checkpoint, a skip-policy run makes the same decisions as the uninterrupted run, so
    its step-8 weights are the same: the guard's history travels in the checkpoint."""
    whole, resumed = _resume_at_4(compose, tmp_path, {
        "optim.spike_policy": "skip", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
        "optim.spike_max_consecutive": 100})
    state = torch.load(whole / "checkpoints" / "step_00000004" / "state.pt", weights_only=False)
    assert len(state["spikes"]["history"]) > 0  # the guard had judged steps: a fresh guard would differ
    a, b = (torch.load(r / "checkpoints" / "step_00000008" / "model.pt") for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_rollback_back_off(compose, tmp_path, metrics):
    """The back-off of the rollbacks before step 4 holds after the resume."""
    whole, resumed = _resume_at_4(compose, tmp_path, {
        "optim.spike_policy": "rollback", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
        "optim.spike_window": 1, "optim.spike_rollback_after": 1, "optim.spike_snapshot_every": 1, "optim.spike_max_rollbacks": 100})
    state = torch.load(whole / "checkpoints" / "step_00000004" / "state.pt", weights_only=False)
    assert state["spikes"]["rollbacks"] > 0 and state["spikes"]["ilr_scale"] < 1
    first = [r for r in metrics(resumed) if "skipped" in r][0]
    want = [r for r in metrics(whole) if r.get("step") == first["step"] == 5][0]
    assert (first["skipped"], first["rollbacks"], first["ilr"]) == (want["skipped"], want["rollbacks"], want["ilr"])


def test_resume_rolls_back_to_the_saved_snapshot(compose, tmp_path, metrics):
    """The snapshot travels in the checkpoint: resumed from step 4, whose snapshot is older than step 4, a
    rollback-policy run rolls back to that same snapshot and ends bitwise where the uninterrupted run ended."""
    whole, resumed = _resume_at_4(compose, tmp_path, {
        "optim.spike_policy": "rollback", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
        "optim.spike_window": 64, "optim.spike_rollback_after": 1, "optim.spike_snapshot_every": 3,
        "optim.spike_max_rollbacks": 100, "optim.spike_max_consecutive": 100})
    saved = torch.load(whole / "checkpoints" / "step_00000004" / "snapshot.pt")
    later = [r for r in metrics(whole) if r.get("step", 0) > 4 and "skipped" in r]
    assert saved["step"] < 4  # a fresh snapshot at the resume would differ from it
    assert later[-1]["rollbacks"] > [r for r in metrics(whole) if r.get("step") == 4][0]["rollbacks"]
    assert [r.get("loss") for r in metrics(resumed)] == [r.get("loss") for r in metrics(whole) if r.get("step", 0) > 4]
    a, b = (torch.load(r / "checkpoints" / "step_00000008" / "model.pt") for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_graphed_rollback_equals_eager_and_resumes_exactly(compose, tmp_path, metrics):
    """On a GPU with the step replayed as a CUDA graph: rolling back restores the very tensors the graph reads, so
    the graphed run makes the same decisions and losses as the eager one, and resuming from the step-4
    checkpoint (its snapshot older than step 4) ends where the uninterrupted graphed run ended."""
    kw = {"optim.spike_policy": "rollback", "optim.spike_factor": 1.0001, "optim.spike_min_history": 1,
          "optim.spike_window": 64, "optim.spike_rollback_after": 1, "optim.spike_snapshot_every": 3,
          "optim.spike_max_rollbacks": 100, "optim.spike_max_consecutive": 100, "training.device": "cuda",
          "model.compute_dtype": "float32", "model.attention_backend": "triton", "model.fused_kernels": "true"}
    whole, resumed = _resume_at_4(compose, tmp_path, {**kw, "training.cuda_graph": "true"})
    eager = tmp_path / "eager"
    train(compose(**{**kw, "training.cuda_graph": "false", "training.steps": 8, "training.checkpoint_every": 4,
                     "training.eval_every": 0}), eager)
    runs = {name: [r for r in metrics(d) if "skipped" in r] for name, d in (("graphed", whole), ("eager", eager))}
    summary = [(r["step"], r["skipped"], r["rollbacks"]) for r in runs["graphed"]]
    assert torch.load(whole / "checkpoints" / "step_00000004" / "snapshot.pt")["step"] < 4, summary
    assert runs["graphed"][-1]["rollbacks"] > runs["graphed"][3]["rollbacks"], summary  # one after the resume
    for e, g in zip(runs["eager"], runs["graphed"]):
        assert (g["skipped"], g["rollbacks"]) == (e["skipped"], e["rollbacks"]), summary
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5, abs=1e-6), (e["step"], summary)
    after = [r for r in metrics(resumed) if "skipped" in r]
    assert [(r["skipped"], r["rollbacks"]) for r in after] == [(r["skipped"], r["rollbacks"])
                                                                for r in runs["graphed"][4:]]
    assert [r["loss"] for r in after] == pytest.approx([r["loss"] for r in runs["graphed"][4:]], rel=1e-6)
