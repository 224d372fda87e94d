"""On a GPU: evaluation through the engine's captured CUDA graphs equals the training-mode loss in bf16, sees weights
changed in place between evaluations, and lets its graphs go when it returns."""
import gc
import weakref

import numpy as np
import pytest
import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.data import WindowDataset, make_batch
from ttt_e2e.eval import stream_loss
from ttt_e2e.inference import InferenceGraphs
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train.distributed import DistInfo
from ttt_e2e.train.evaluate import evaluate
from ttt_e2e.train.parallel import LossModule
from ttt_e2e.ttt.meta import sequence_loss

BOS = 1


def _model():
    # T = 4 W: the step rings wrap; 16 mini-batches; fp32 parameters, bf16 autocast (as trained and evaluated)
    cfg = ModelConfig(vocab_size=512, n_layers=3, d_model=128, n_heads=2, mlp_width=256, prime_mlp_width=192,
                      suffix_len=2, seq_length=1024, window=256, attention_backend="triton",
                      compute_dtype="bfloat16", init_std=0.1)
    torch.manual_seed(0)
    return Transformer(cfg).cuda().eval()


@pytest.mark.gpu
def test_graphed_engine_losses_equal_training_bf16():
    """Tolerance: the engine and the training step run the same bf16 computation in another order (the prefix in
    chunks, the first suffix block's attention per mini-batch instead of hoisted, graphed steps), so they differ by
    bf16 rounding, which the inner steps carry forward. The bound is that rounding's own size, measured here: the
    training loss in bf16 against the same loss in fp32. The two bf16 paths must differ by at most 3x (max over
    tokens) and 2x (mean over tokens) what bf16 differs from fp32, and far less than what the inner loop changes
    (the same losses without inner steps), so that a wrong step cannot pass."""
    model = _model()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=64, inner_lr=0.5, inner_grad_clip=1.0)
    windows = torch.randint(2, 512, (2, 1025), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    windows[:, 100::97] = BOS
    inputs, targets, mask = make_batch(windows, BOS)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = sequence_loss(model, inputs, targets, mask, ttt).token_losses
            frozen = sequence_loss(model, inputs, targets, mask, ttt, ilr_mult=0.0).token_losses
        ref32 = sequence_loss(model, inputs, targets, mask, ttt).token_losses
        with stream_loss.StreamLoss(model, ttt, BOS) as fn, torch.autocast("cuda", dtype=torch.bfloat16):
            assert fn.use_graphs
            got = fn(inputs, targets, mask, 1.0)["token_losses"]
            again = fn(inputs, targets, mask, 1.0)["token_losses"]  # every step replayed
    m = mask
    err, noise, effect = ((a - b).abs()[m] for a, b in ((got, ref), (ref, ref32), (ref, frozen)))
    print(f"engine-train bf16: max {err.max():.3e} mean {err.mean():.3e}; bf16-fp32 train: max {noise.max():.3e} "
          f"mean {noise.mean():.3e}; inner-loop effect: mean {effect.mean():.3e}")
    assert err.max() <= 3 * noise.max() and err.mean() <= 2 * noise.mean()
    assert effect.mean() > 5 * err.mean()
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # replay == the eager first pass of the capture


@pytest.mark.gpu
def test_validation_sees_updated_weights_and_frees_its_graphs(monkeypatch):
    """evaluate() twice with the weights changed in place in between (as AdamW changes them): each time equal to
    the training path on the same weights, and the graphs of each evaluation are gone once it returns."""
    model = _model()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=64, inner_lr=0.5, inner_grad_clip=1.0)
    stream = np.random.default_rng(0).integers(2, 512, 4 * 1024 + 1)
    stream[::300] = BOS
    val = WindowDataset(stream, 1024)
    info = DistInfo(0, 1, 0, torch.device("cuda"))
    made = []

    class Tracked(InferenceGraphs):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(stream_loss, "InferenceGraphs", Tracked)
    lm = LossModule(model, ttt)
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    means = []
    for _ in range(2):
        ref = evaluate(lm, val, BOS, 2, 4, 1.0, info, amp, "training")
        got = evaluate(lm, val, BOS, 2, 4, 1.0, info, amp, "engine")
        assert len(made) == 1
        gc.collect()
        assert made.pop()() is None  # the evaluation's graphs (and their memory pool) were let go
        assert abs(got.loss - ref.loss) < 5e-3
        means.append(got.loss)
        with torch.no_grad():
            for p in model.suffix.parameters():
                p.mul_(1.2)
    assert abs(means[1] - means[0]) > 2e-2
