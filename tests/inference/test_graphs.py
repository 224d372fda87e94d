"""The CUDA-graph path of inference (graphs.py) computes what the plain path computes.

On the CPU the graphs' static-buffer code runs eagerly (capture=False): fixed-size suffix caches with masked
slots below position 0, positions read from device tensors, in-place updates, the decoding slots chosen on the
device. That is everything a captured graph replays, checked exactly (float64). The GPU test adds the capture.
"""
import pytest
import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.inference import InferenceGraphs, feed, start
from ttt_e2e.inference.engine import _decode_graphed
from ttt_e2e.inference.kv_cache import StepRing
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

TOL = dict(rtol=1e-10, atol=1e-10)


def _decode_all(model, ttt, tokens, prompt_len, graphs=None, reserve=0):
    state = start(model, ttt, tokens.shape[0], graphs=graphs, reserve=reserve)
    out = [feed(state, tokens[:, :prompt_len])]
    for p in range(prompt_len, tokens.shape[1]):
        out.append(feed(state, tokens[:, p:p + 1]))
    return torch.stack(out, 1), state


@pytest.mark.parametrize("prompt_len", [1, 9, 16, 30])
@pytest.mark.parametrize("window", [16, 12], ids=["ring-caches", "ordered-caches"])  # b 8: W % b == 0 or not
def test_graph_path_equals_plain_path(make_model, meta_ttt, prompt_len, window, monkeypatch):
    """Prefill then decode over many mini-batch boundaries, past the window (b 8, 56 tokens): logits, inner
    losses and the final phi equal the plain path's; single tokens went through the decoding graph; the step's
    caches were rings where W is a multiple of b."""
    model = make_model(window=window)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 56), generator=torch.Generator().manual_seed(5))
    ref, ref_state = _decode_all(model, meta_ttt, tokens, prompt_len)
    calls = []
    monkeypatch.setattr("ttt_e2e.inference.engine._decode_graphed",
                        lambda *a: calls.append(1) or _decode_graphed(*a))
    graphs = InferenceGraphs(capture=False)
    got, state = _decode_all(model, meta_ttt, tokens, prompt_len, graphs=graphs)
    assert isinstance(graphs.base[0], StepRing) == (window % meta_ttt.mini_batch_size == 0)
    assert len(calls) == tokens.shape[1] - prompt_len
    torch.testing.assert_close(got, ref, **TOL)
    assert len(state.losses) == len(ref_state.losses) == (tokens.shape[1] - 1) // meta_ttt.mini_batch_size
    torch.testing.assert_close(torch.stack(state.losses), torch.stack(ref_state.losses), **TOL)
    for n in ref_state.phi:
        torch.testing.assert_close(state.phi[n], ref_state.phi[n], **TOL)


def test_ring_caches_through_the_kernels():
    """The step's ring caches read in place by the Triton kernels (the interpreter on a CPU, fp32): a prompt past
    the window, then decoding over step boundaries, against the plain path (caches concatenated)."""
    cfg = ModelConfig(vocab_size=37, n_layers=3, d_model=32, n_heads=2, mlp_width=48, prime_mlp_width=40,
                      suffix_len=2, seq_length=64, window=32, attention_backend="triton", compute_dtype="float32",
                      init_std=0.2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ttt = TTTConfig(train_mode="meta", mini_batch_size=16, inner_lr=0.5, inner_grad_clip=1.0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 90), generator=torch.Generator().manual_seed(3))
    ref, ref_state = _decode_all(model, ttt, tokens, 70)
    graphs = InferenceGraphs(capture=False)
    got, state = _decode_all(model, ttt, tokens, 70, graphs=graphs)
    assert isinstance(graphs.base[0], StepRing)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(state.losses), torch.stack(ref_state.losses), rtol=1e-5, atol=1e-5)


def test_graph_prefill_losses_equal_training(make_model, meta_ttt):
    model = make_model()
    T, B, bos = 48, 2, 5
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(6))
    tokens[:, ::7] = bos
    ref = sequence_loss(model, tokens[:, :-1], tokens[:, 1:], tokens[:, 1:] != bos, meta_ttt)
    state = start(model, meta_ttt, B, bos_id=bos, graphs=InferenceGraphs(capture=False))
    feed(state, tokens)
    torch.testing.assert_close(torch.cat(state.token_losses, 1), ref.token_losses, **TOL)


@pytest.mark.parametrize("window", [16, None])
def test_graph_decoding_of_baselines(make_model, window):
    """SWA (ring buffer, wrapping) and full attention (growing buffer: a token that needs the buffer to grow
    runs eagerly, then decoding resumes in the graph path)."""
    model = make_model(window=window, suffix_len=0, prime_mlp=False)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 45), generator=torch.Generator().manual_seed(7))
    ref, _ = _decode_all(model, None, tokens, 3)
    got, _ = _decode_all(model, None, tokens, 3, graphs=InferenceGraphs(capture=False))
    torch.testing.assert_close(got, ref, **TOL)


def test_graphs_reused_by_a_new_state(make_model, meta_ttt):
    """A second state takes the graphs over and starts clean; the first one may no longer use them."""
    model = make_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(8))
    ref, _ = _decode_all(model, meta_ttt, tokens, 20)
    graphs = InferenceGraphs(capture=False)
    _, first = _decode_all(model, meta_ttt, tokens, 30, graphs=graphs)
    got, _ = _decode_all(model, meta_ttt, tokens, 20, graphs=graphs)
    torch.testing.assert_close(got, ref, **TOL)
    with pytest.raises(RuntimeError, match="another inference state"):
        feed(first, tokens[:, :9])


def test_graphs_baking_in_another_inner_lr_are_dropped(make_model, meta_ttt):
    """A step graph bakes the inner learning rate in: a state with the same one keeps the captured step graphs,
    a state with another one drops them (a stand-in entry shows which; nothing is captured on the CPU), and
    still computes with its own rate."""
    model = make_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 33), generator=torch.Generator().manual_seed(9))
    graphs = InferenceGraphs(capture=False)
    feed(start(model, meta_ttt, 1, graphs=graphs), tokens)
    captured = ("step", 0)
    graphs._graphs[captured] = "a step graph"
    start(model, meta_ttt, 1, graphs=graphs)
    assert captured in graphs._graphs
    other = TTTConfig(**{**meta_ttt.__dict__, "inner_lr": 0.1})
    state = start(model, other, 1, graphs=graphs)
    assert captured not in graphs._graphs
    torch.testing.assert_close(feed(state, tokens), feed(start(model, other, 1), tokens), **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_captured_graphs_on_gpu(autocast):
    """Captured and replayed on a GPU with the Triton kernels: a prompt past the window then decoding over
    several TTT steps, against the plain path (fp32: tight; bf16 autocast: the rounding of two orders of ops)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = ModelConfig(vocab_size=512, n_layers=3, d_model=128, n_heads=2, mlp_width=256, prime_mlp_width=192,
                      suffix_len=2, seq_length=512, window=256, attention_backend="triton",
                      compute_dtype="bfloat16" if autocast else "float32", init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().eval()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=64, inner_lr=0.5, inner_grad_clip=1.0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 600), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(10))
    ref, ref_state = _decode_all(model, ttt, tokens, 300)
    graphs = InferenceGraphs()
    got, state = _decode_all(model, ttt, tokens, 300, graphs=graphs)
    again, _ = _decode_all(model, ttt, tokens, 300, graphs=graphs)  # every step and token replayed
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # replay == the eager first pass, bit for bit
    torch.testing.assert_close(torch.stack(state.losses), torch.stack(ref_state.losses), **tol)
    assert len(graphs._graphs) >= 3  # step graphs below and past W, and the decoding graph


@pytest.mark.gpu
def test_prefix_ahead_on_a_side_stream_gpu(monkeypatch):
    """A prompt of several prefix chunks on a GPU: each next chunk's prefix runs on the side stream while the
    inner steps replay on the current one. Same kernels on the same inputs, so the same bits as without."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ttt_e2e.inference import engine
    cfg = ModelConfig(vocab_size=512, n_layers=3, d_model=128, n_heads=2, mlp_width=256, prime_mlp_width=192,
                      suffix_len=2, seq_length=512, window=256, attention_backend="triton",
                      compute_dtype="bfloat16", init_std=0.1)
    torch.manual_seed(0)
    model = Transformer(cfg).cuda().eval()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=64, inner_lr=0.5, inner_grad_clip=1.0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 700), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(11))
    taken = []
    take = engine._Ahead.take
    monkeypatch.setattr(engine._Ahead, "take", lambda self: taken.append(1) or take(self))
    runs = {}
    for overlap in (False, True):
        graphs = InferenceGraphs()
        for _ in range(2):  # the first prompt captures the step graphs, the second replays them
            state = start(model, ttt, 2, prefill_chunk=128, graphs=graphs, overlap_prefix=overlap)
            logits = feed(state, tokens[:, :650])
            logits = torch.stack([logits, feed(state, tokens[:, 650:651])])  # then a decoded token
        runs[overlap] = (logits, torch.stack(state.losses), state.phi)
    assert len(taken) == 2 * 4  # passes at 128, 256, 384, 512 of each prompt (the first: 0..127)
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)
    for n in runs[False][2]:
        torch.testing.assert_close(runs[True][2][n], runs[False][2][n], rtol=0, atol=0)


def test_states_share_one_side_stream(monkeypatch):
    """Every state's look-ahead on a device runs on one stream: the caching allocator reuses a freed block only on
    the stream that allocated it, and torch hands out its pooled streams in turn, so a stream per state left each
    prompt's look-ahead memory unusable to the next (a 3B 32K prompt reserved 4.9 GB more each time). A fake
    stream class stands in for CUDA's, so this runs anywhere."""
    from ttt_e2e.inference import engine
    made = []

    class FakeStream:
        def __init__(self, device):
            made.append(device)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(engine, "_SIDE_STREAMS", {})
    a, b = engine.SideStream(torch.device("cuda")), engine.SideStream(torch.device("cuda", 0))
    c = engine.SideStream(torch.device("cuda", 1))
    assert a.stream is b.stream and c.stream is not a.stream and len(made) == 2
