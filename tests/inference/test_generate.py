"""generate(): sampling, stop tokens, TTT vs baseline API, bad input, the command line."""
import subprocess
import sys

import pytest
import torch

from ttt_e2e.config import TTTConfig
from ttt_e2e.inference import feed, generate, sample, start


def test_greedy_matches_step_by_step_argmax(make_model, meta_ttt):
    model = make_model()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    out = generate(model, meta_ttt, prompt, 20)
    state = start(model, meta_ttt, 2)
    logits, ids = feed(state, prompt), []
    for _ in range(20):
        tok = logits.argmax(-1)
        ids.append(tok)
        logits = feed(state, tok[:, None])
    assert out.tokens == torch.stack(ids, 1).tolist()
    assert len(out.state.losses) == (11 + 19 - 1) // meta_ttt.mini_batch_size  # steps during generation too


def test_ttt_changes_generation(make_model, meta_ttt):
    """TTT and the no-TTT baseline go through the same API; they must differ once steps have been taken."""
    model = make_model()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    with_ttt = feed(start(model, meta_ttt, 1), prompt)
    without = feed(start(model, None, 1), prompt)
    pretrain = feed(start(model, TTTConfig(train_mode="pretrain"), 1), prompt)
    assert (with_ttt - without).abs().max() > 1e-3
    torch.testing.assert_close(without, pretrain, rtol=0, atol=0)


def test_sampling_is_seeded_and_top_p_restricts():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    draws = sample(logits, 1.0, 0.8, g)  # nucleus {0, 1}: 0.5 < 0.8 <= 0.8
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    full = sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert set(full.tolist()) == {0, 1, 2, 3}
    assert torch.equal(full, sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0)))
    assert torch.equal(sample(logits, 0.0), torch.zeros(2000, dtype=torch.long))
    assert set(sample(logits, 1.0, 0.3, g).tolist()) == {0}  # top token always kept


def test_stop_tokens(make_model, meta_ttt):
    model = make_model()
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    free = generate(model, meta_ttt, prompt, 12, temperature=1.0, seed=3)
    stop = free.tokens[0][4]  # force a stop at sequence 0's fifth token
    out = generate(model, meta_ttt, prompt, 12, temperature=1.0, seed=3, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:free.tokens[0].index(stop) + 1] and out.finished[0]
    assert out.tokens[1] == free.tokens[1][:len(out.tokens[1])]


def test_bad_input(make_model, meta_ttt):
    model = make_model()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, meta_ttt, [], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, meta_ttt, torch.zeros(2, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, meta_ttt, [1, 2, model.cfg.vocab_size], 4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, meta_ttt, [1, -1], 4)
    with pytest.raises(ValueError, match="same length"):
        generate(model, meta_ttt, [[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="integers"):
        generate(model, meta_ttt, torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match="sliding-window"):
        generate(make_model(window=None), meta_ttt, [1, 2], 4)
    # A full-attention cache for 10^12 positions does not fit anywhere: refused up front, with the numbers.
    with pytest.raises(MemoryError, match="GiB"):
        generate(make_model(window=None), None, [1, 2], 10**12)
    state = start(model, meta_ttt, 2)
    with pytest.raises(ValueError, match="batch"):
        feed(state, torch.zeros(1, 3, dtype=torch.long))


def test_oom_becomes_memory_error(make_model, meta_ttt, monkeypatch):
    import ttt_e2e.inference.engine as engine

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(engine, "_blocks", oom)
    with pytest.raises(MemoryError, match="out of memory at context position 0"):
        feed(start(make_model(), meta_ttt, 1), torch.zeros(1, 3, dtype=torch.long))


def test_command_line(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello, world")
    cmd = [sys.executable, "-m", "ttt_e2e.inference", "--random-init", "--model", "n_layers=2", "window=16",
           "seq_length=32", "d_model=32", "n_heads=2", "mlp_width=32", "--ttt", "mini_batch_size=4",
           "--prompt-file", str(prompt), "--max-new-tokens", "10", "--no-stop-at-eos"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "13 prompt + 10 new tokens" in run.stderr and "5 TTT steps" in run.stderr
    # BOS + 12 bytes, then 9 of the 10 new tokens fed back: 22 tokens, (22 - 1) // 4 = 5 mini-batches with targets
    bad = subprocess.run(cmd[:-5] + ["--prompt", "x", "--model", "vocab_size=100"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "tokenizer" in bad.stderr


def test_generate_py_reports_a_bad_checkpoint_in_one_line(tmp_path):
    """Every loading path's error rule (ttt_e2e/convert/load.py): one line, exit status 2."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "empty").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    for path, says in ((tmp_path / "no" / "such" / "dir", "no checkpoint at"),
                       (tmp_path / "empty", "no checkpoint at"), (tmp_path / "hf", "convert it first")):
        out = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(path), "--prompt", "hi"], cwd=root,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and says in out.stderr, out.stderr[-1500:]
        assert len(out.stderr.strip().splitlines()) == 1
