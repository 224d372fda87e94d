"""What each token may see: causality across mini-batches, and the window with and without TTT."""
import torch

from tiny import meta, tiny_batch, tiny_model
from ttt_e2e.ttt.meta import sequence_loss


def _token_losses(model, ids, targets, mask, ttt):
    with torch.no_grad():  # the inner gradient is a torch.func transform: it runs without the outer graph
        return sequence_loss(model, ids, targets, mask, ttt).token_losses


def test_meta_mode_is_causal_across_minibatches():
    model = tiny_model()
    ids, targets, mask = tiny_batch(model)
    ttt = meta()
    base = _token_losses(model, ids, targets, mask, ttt)
    for t in (3, 6, 7, 13, 20):  # inside, at the start of, and past mini-batch boundaries (b = 6)
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % model.cfg.vocab_size
        out = _token_losses(model, ids2, targets, mask, ttt)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().max() > 1e-6  # the change is seen from t on


def test_swa_without_ttt_ignores_tokens_beyond_the_receptive_field_but_ttt_does_not():
    # One block per side so the receptive field of plain SWA is exactly the window: token 0 is visible to
    # positions < W only. b = W so that token 0 sits in an earlier mini-batch than the positions >= W.
    model = tiny_model(n_layers=2, suffix_len=1, window=6, seq_length=24)
    ids, targets, mask = tiny_batch(model, seed=2)
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] + 1) % model.cfg.vocab_size
    W = model.cfg.window
    for mode, ttt in (("pretrain", meta(train_mode="pretrain", mini_batch_size=6)),
                      ("meta, eta = 0", meta(inner_lr=0.0, mini_batch_size=6))):
        a, b = _token_losses(model, ids, targets, mask, ttt), _token_losses(model, ids2, targets, mask, ttt)
        assert (a[:, :W] - b[:, :W]).abs().max() > 1e-6, mode
        torch.testing.assert_close(a[:, 2 * W - 1:], b[:, 2 * W - 1:], rtol=0, atol=1e-12, msg=mode)
    ttt = meta(mini_batch_size=6)
    a, b = _token_losses(model, ids, targets, mask, ttt), _token_losses(model, ids2, targets, mask, ttt)
    assert (a[:, 2 * W - 1:] - b[:, 2 * W - 1:]).abs().max() > 1e-6  # through the inner weights
