"""Evaluation through the constant-memory path equals the training-mode loss: per token, per mini-batch, and the
mean and by-position curve of evaluate() (float64 tiny models on the CPU: exact to rounding)."""
import numpy as np
import pytest
import torch

from tiny import meta, tiny_model
from ttt_e2e.config import Kernels
from ttt_e2e.data import WindowDataset, make_batch
from ttt_e2e.eval import stream_loss
from ttt_e2e.eval.stream_loss import StreamLoss, baseline_token_losses, meta_token_losses
from ttt_e2e.inference import InferenceGraphs
from ttt_e2e.train.distributed import DistInfo
from ttt_e2e.train.evaluate import engine_target, evaluate
from ttt_e2e.train.parallel import LossModule
from ttt_e2e.ttt.meta import sequence_loss

TOL = dict(rtol=1e-12, atol=1e-12)
BOS = 3


def _windows(model, B, seed=1):
    """make_batch of B random windows in which some targets are BOS (masked, in training and here)."""
    T = model.cfg.seq_length
    windows = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    windows[:, 5::7] = BOS
    return make_batch(windows, BOS)


# window 10 with b = 6: the engine's step caches are position-ordered buffers; window 12: rings (W a multiple of b)
@pytest.mark.parametrize("window,graphs", [(10, False), (12, True)], ids=["plain-W10", "static-buffers-W12"])
def test_meta_engine_losses_equal_training(window, graphs):
    """A batch of 2 windows of 6 mini-batches, BOS targets masked: the engine's per-token and per-mini-batch
    losses equal sequence_loss's at ilr_mult 0.8 (graphs: the code the CUDA graphs capture, run eagerly)."""
    model = tiny_model(seq_length=36, window=window)
    ttt = meta()
    inputs, targets, mask = _windows(model, 2)
    assert not mask.all() and mask.sum() > 0.7 * mask.numel()
    ref = sequence_loss(model, inputs, targets, mask, ttt, ilr_mult=0.8)
    tok, per_mb = meta_token_losses(model, ttt, inputs, targets, mask, BOS, ilr_mult=0.8,
                                    graphs=InferenceGraphs(capture=False) if graphs else None, prefill_chunk=12)
    assert tok.shape == (2, 36) and per_mb.shape == (2, 6)
    torch.testing.assert_close(tok, ref.token_losses, **TOL)
    torch.testing.assert_close(per_mb.mean(0), ref.minibatch_losses, **TOL)
    # Not vacuous: the inner loop changed the later losses (eta 0 gives others)
    frozen = sequence_loss(model, inputs, targets, mask, ttt, ilr_mult=0.0).token_losses
    assert (tok[:, 12:] - frozen[:, 12:]).abs().max() > 1e-3


def test_stream_loss_keeps_one_graph_set_per_batch_size(monkeypatch):
    """Within one evaluation the graphs of a batch size are made once and reused (each set a stream and a capture
    of every step), a smaller last batch gets its own; close() lets them go. capture=False on the CPU."""
    model, ttt = tiny_model(seq_length=24, window=12), meta()
    made = []
    monkeypatch.setattr(stream_loss, "InferenceGraphs", lambda: made.append(InferenceGraphs(capture=False)) or made[-1])
    inputs, targets, mask = _windows(model, 2)
    ref = sequence_loss(model, inputs, targets, mask, ttt).token_losses
    with StreamLoss(model, ttt, BOS, graphs=True) as fn:
        for rows in (slice(0, 2), slice(0, 2), slice(1, 2)):
            tok = fn(inputs[rows], targets[rows], mask[rows], 1.0)["token_losses"]
            torch.testing.assert_close(tok, ref[rows], **TOL)
        assert len(made) == 2 and len(fn._graphs) == 2
    assert fn._graphs == {}


def test_meta_engine_refuses_what_it_cannot_compute():
    model = tiny_model(seq_length=24)
    ttt = meta()
    inputs, targets, mask = _windows(model, 2)
    other = mask.clone()
    other[0, 0] = not other[0, 0]
    with pytest.raises(ValueError, match="masks exactly the targets equal to BOS"):
        meta_token_losses(model, ttt, inputs, targets, other, BOS)
    with pytest.raises(ValueError, match="shifted by one"):
        meta_token_losses(model, ttt, inputs, targets.roll(1, 1), targets.roll(1, 1) != BOS, BOS)
    with pytest.raises(ValueError, match="not divisible"):
        meta_token_losses(model, ttt, inputs[:, :20], targets[:, :20], mask[:, :20], BOS)


@pytest.mark.parametrize("window", [None, 10], ids=["fa", "swa"])
def test_baseline_losses_equal_training(window):
    """Pretrain mode: the one-pass forward with the head in chunks (5: not a divisor of T) = the training loss."""
    model = tiny_model(seq_length=36, window=window, prime_mlp=False)
    ttt = meta(train_mode="pretrain")
    inputs, targets, mask = _windows(model, 2)
    ref = sequence_loss(model, inputs, targets, mask, ttt)
    tok, per_mb = baseline_token_losses(model, inputs, targets, mask, ttt.mini_batch_size, chunk=5)
    torch.testing.assert_close(tok, ref.token_losses, **TOL)
    torch.testing.assert_close(per_mb.mean(0), ref.minibatch_losses, **TOL)


class _Wrapper(torch.nn.Module):  # stands in for DDP: the LossModule is its .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_engine_target_unwraps_and_declines():
    model, ttt = tiny_model(), meta()
    lm = LossModule(model, ttt, Kernels(elementwise=False))
    assert engine_target(lm) == (model, ttt, Kernels(elementwise=False))  # the loss module's kernels with it
    assert engine_target(_Wrapper(lm)) == (model, ttt, Kernels(elementwise=False))
    assert engine_target(lambda *a: None) is None  # not a loss module: its own call, the training path
    full = tiny_model(window=None)
    assert engine_target(LossModule(full, ttt)) is None  # meta without a window: the engine cannot run it
    assert engine_target(LossModule(full, meta(train_mode="pretrain"))) == (full, meta(train_mode="pretrain"),
                                                                            Kernels.of(full.cfg))


def _val(model, n_windows=5, seed=2):
    T = model.cfg.seq_length
    stream = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, n_windows * T + 1)
    stream[::11] = BOS
    return WindowDataset(stream, T)


@pytest.mark.parametrize("mode", ["meta", "pretrain"])
def test_evaluate_same_curve_through_both_paths(mode, monkeypatch):
    """evaluate(): the mean and the by-position curve equal through the engine and the training-mode loss (3
    windows in batches of 2: a smaller last batch), auto takes the engine; then the weights change in place (as
    the optimizer changes them between evaluations) and the next evaluation sees the new ones."""
    model = tiny_model(seq_length=24, prime_mlp=mode == "meta")
    lm = _Wrapper(LossModule(model, meta(train_mode=mode)))
    val = _val(model)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    used = []
    monkeypatch.setattr(stream_loss.StreamLoss, "close", lambda self: used.append(self))

    def run(path):
        return evaluate(lm, val, BOS, 2, 3, 0.5, info, lambda: torch.autocast("cpu", enabled=False), path)

    means = []
    for i in range(2):
        ref, got = run("training"), run("engine")
        if i == 0:
            assert run("auto").loss == got.loss
        assert len(used) == 2 - i and all(isinstance(u, StreamLoss) for u in used)
        used.clear()
        assert (got.tokens, got.windows) == (ref.tokens, ref.windows) and ref.windows == 3
        assert got.loss == pytest.approx(ref.loss, rel=1e-12)
        np.testing.assert_allclose(got.loss_by_position, ref.loss_by_position, rtol=1e-12, atol=1e-12)
        means.append(got.loss)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
    assert abs(means[0] - means[1]) > 1e-3  # the second evaluation saw the changed weights


def test_evaluate_bad_path():
    model = tiny_model(window=None)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    val = _val(model)
    with pytest.raises(ValueError, match="must be one of auto, engine, training"):
        evaluate(LossModule(model, meta()), val, BOS, 2, 2, 1.0, info, None, "fast")
    with pytest.raises(ValueError, match="needs an unsharded LossModule"):
        evaluate(LossModule(model, meta()), val, BOS, 2, 2, 1.0, info, None, "engine")


def test_engine_target_declines_sharded_parameters():
    """Parameters that are DTensors (FSDP2's shards) are gathered only by the wrapper's own forward: the training
    path (one process group of one rank, gloo, stands in for the sharded job)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model, ttt = tiny_model(), meta()
        mesh = init_device_mesh("cpu", (1,))
        model.wte.weight = torch.nn.Parameter(distribute_tensor(model.wte.weight.detach(), mesh, [Shard(0)]))
        assert engine_target(_Wrapper(LossModule(model, ttt))) is None
    finally:
        dist.destroy_process_group()
