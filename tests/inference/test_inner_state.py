"""The inner weights phi across inference steps, updated in place (eagerly from the second step on, in the
graphs' buffers always): the model's own weights, which phi starts as a view of, are never written, and the
decoding copy phi_dec stays phi in the compute dtype."""
import pytest
import torch

from ttt_e2e.config import ModelConfig
from ttt_e2e.inference import InferenceGraphs, feed, start
from ttt_e2e.model.transformer import Transformer


def _feed_tokens(state, tokens, prompt_len, each=None):
    feed(state, tokens[:, :prompt_len])
    for p in range(prompt_len, tokens.shape[1]):
        feed(state, tokens[:, p:p + 1])
        if each is not None:
            each(state)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("batch", [1, 2])  # at 1 the expanded view of the weights is writable (no stride-0 error)
def test_inner_steps_never_write_the_models_weights(make_model, meta_ttt, graphs, batch):
    model = make_model()  # float64 throughout: phi has the weights' dtype, so it starts as a view of them
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, 40), generator=torch.Generator().manual_seed(11))
    state = start(model, meta_ttt, batch, graphs=InferenceGraphs(capture=False) if graphs else None)
    _feed_tokens(state, tokens, 20)
    assert len(state.losses) == 4
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    assert all(state.phi[n].data_ptr() != p.data_ptr() for n, p in model.suffix.named_parameters() if n in state.phi)


@pytest.mark.parametrize("graphs", [False, True])
def test_decoding_copy_is_phi_in_the_compute_dtype_after_every_step(meta_ttt, graphs):
    """bf16 autocast on the CPU: phi fp32, phi_dec bf16, the one handed to the next step as its phi_c."""
    cfg = ModelConfig(vocab_size=37, n_layers=3, d_model=32, n_heads=4, mlp_width=48, prime_mlp_width=40,
                      suffix_len=2, seq_length=48, window=16, attention_backend="torch", compute_dtype="bfloat16",
                      init_std=0.2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(12))
    state = start(model, meta_ttt, 2, graphs=InferenceGraphs(capture=False) if graphs else None)
    steps = []

    def check(state):
        if len(state.losses) > len(steps):
            steps.append(1)
            for n, p in state.phi.items():
                assert p.dtype == torch.float32 and state.phi_dec[n].dtype == torch.bfloat16
                torch.testing.assert_close(state.phi_dec[n], p.to(torch.bfloat16), rtol=0, atol=0)

    _feed_tokens(state, tokens, 13, check)
    assert len(steps) == 4  # the prefill's step (targets up to token 8) and three while decoding
