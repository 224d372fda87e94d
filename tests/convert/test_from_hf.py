"""python -m ttt_e2e.convert from-hf on tiny random Hugging Face models built with transformers (no download): the
converted model's logits equal the source's (fp32) while the context fits in the window, in pretrain mode and in
meta mode before the first inner step, and those of the source run with a sliding-window mask beyond it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_e2e.convert.__main__ import main as convert_main
from ttt_e2e.inference import feed, start
from ttt_e2e.pretrained import load_pretrained
from ttt_e2e.ttt.meta import sequence_loss

transformers = pytest.importorskip("transformers")

W = 16  # the converted model's window
ATOL = 1e-4


def _randomize(model, seed: int):
    """Weights far from the init (std 0.02 gives near-uniform attention, where a wrong kv-head mapping or RoPE
    barely shows): linears and embeddings ~ N(0, 0.3), norm scales 1 + N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def llama(path: Path):
    """GQA (4 query heads on 2 kv heads), Llama 3's rope_scaling (all three bands at head dim 8, theta 1000,
    original length 16), an untied head, a norm eps large enough that a wrong one shows."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=0.05, tie_word_embeddings=False, attn_implementation="eager",
        rope_theta=1000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = _randomize(transformers.LlamaForCausalLM(cfg), 0)
    model.save_pretrained(path)
    return model


def qwen3(path: Path):
    """GQA (4 on 2), a head width of its own (16, not 32 / 4), QK-norm, a tied head."""
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=0.02, tie_word_embeddings=True, rope_theta=500.0,
        attn_implementation="eager")
    model = _randomize(transformers.Qwen3ForCausalLM(cfg), 1)
    model.save_pretrained(path)
    return model


def convert(tmp_path: Path, src: Path, *extra: str) -> Path:
    dst = tmp_path / "converted"
    assert convert_main(["from-hf", str(src), str(dst), "--window", str(W), "--suffix-len", "1", "--set",
                         "model.seq_length=32", "ttt.mini_batch_size=8", *extra]) == 0
    return dst


def sliding_window_logits(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """The source model with an additive (1, 1, T, T) mask: query i sees keys i - window < j <= i."""
    i = torch.arange(ids.shape[1])
    visible = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    with torch.no_grad():
        return model(ids, attention_mask=torch.where(visible, 0.0, float("-inf"))[None, None]).logits


def _check_equal(source, dst: Path, vocab: int):
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(2))
    model, cfg = load_pretrained(dst, ["model.attention_backend=torch"])
    with torch.no_grad():
        theirs = source(ids[:, :W]).logits
        # pretrain mode (no inner loop), T <= W
        assert (model(ids[:, :W]) - theirs).abs().max() < ATOL
        # meta mode before the first inner step: the inference engine with a mini-batch as long as the context,
        # token by token (each position's logits), and the training loss's first mini-batch (b = 8)
        meta = cfg.ttt.__class__(**{**cfg.ttt.__dict__, "mini_batch_size": W})
        state = start(model, meta, batch_size=2)
        engine = torch.stack([feed(state, ids[:, t:t + 1]) for t in range(W)], 1)
        assert not state.losses and (engine - theirs).abs().max() < ATOL
        loss = sequence_loss(model, ids[:, :W], ids[:, 1:W + 1], None, cfg.ttt)
        want = torch.nn.functional.cross_entropy(source(ids[:, :W + 1]).logits[:, :8].flatten(0, 1),
                                                 ids[:, 1:9].flatten(), reduction="none").view(2, 8)
        assert (loss.token_losses[:, :8] - want).abs().max() < ATOL
        # T > W: the source with a sliding-window mask
        assert (model(ids) - sliding_window_logits(source, ids, W)).abs().max() < ATOL
        assert (model(ids) - source(ids).logits).abs().max() > 100 * ATOL  # the window does matter here


def test_llama_converts_exactly(tmp_path):
    source = llama(tmp_path / "llama")
    dst = convert(tmp_path, tmp_path / "llama")
    saved = json.loads((dst / "meta.json").read_text())["config"]["model"]
    assert (saved["n_kv_heads"], saved["rope_scaling"], saved["tie_embeddings"], saved["post_norm"]) == (
        2, "llama3", False, False)
    _check_equal(source, dst, 64)


def test_qwen3_converts_exactly(tmp_path):
    source = qwen3(tmp_path / "qwen3")
    dst = convert(tmp_path, tmp_path / "qwen3")
    saved = json.loads((dst / "meta.json").read_text())["config"]["model"]
    assert (saved["n_kv_heads"], saved["attn_head_dim"], saved["qk_norm"], saved["tie_embeddings"]) == (
        2, 16, True, True)
    _check_equal(source, dst, 64)


def test_the_tokenizer_travels_with_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "llama"
    llama(src)
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", *(f"w{i}" for i in range(62))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(src)
    dst = convert(tmp_path, src)
    moved = tmp_path / "moved"
    dst.rename(moved)  # the checkpoint finds its tokenizer wherever it lies
    _, cfg = load_pretrained(moved)
    assert Path(cfg.data.tokenizer) == (moved / "tokenizer").resolve()
    from ttt_e2e.data import build_tokenizer
    assert build_tokenizer(cfg.data.tokenizer).encode("w3 w5") == [5, 7]


def test_a_tokenizer_without_bos_gets_its_eos_as_bos(tmp_path, capsys):
    """Qwen3's tokenizer has no BOS; our documents and prompts start with one: its EOS serves."""
    from tokenizers import Tokenizer, models

    src = tmp_path / "qwen3"
    qwen3(src)
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(63)}}, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(src)
    capsys.readouterr()
    _, cfg = load_pretrained(convert(tmp_path, src))
    assert "serves as BOS" in capsys.readouterr().err
    from ttt_e2e.data import build_tokenizer
    t = build_tokenizer(cfg.data.tokenizer)
    assert t.bos_id == t.eos_id == 0


@pytest.mark.parametrize("change, error", [
    ({"architectures": ["MistralForCausalLM"]}, "architecture 'MistralForCausalLM' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_sources_are_refused_in_one_line(tmp_path, capsys, change, error):
    src = tmp_path / "llama"
    llama(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    capsys.readouterr()  # transformers' own output while saving
    assert convert_main(["from-hf", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and len(err.splitlines()) == 1
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".tmp-*"))


def test_settings_that_change_the_function_are_refused(tmp_path, capsys):
    src = tmp_path / "llama"
    llama(src)
    assert convert_main(["from-hf", str(src), str(tmp_path / "dst"), "--set", "model.norm_eps=1e-6"]) == 2
    assert "model.norm_eps" in capsys.readouterr().err and not (tmp_path / "dst").exists()


@pytest.mark.parametrize("variant, suffix", [("e2e", "1"), ("swa", "0")])
def test_the_extension_recipe_starts_from_a_converted_model(tmp_path, variant, suffix):
    """conf/experiment/hf/extension/{e2e,swa}.yaml: composed with a converted model as training.init_from, the
    architecture comes from its saved config, and training starts from its weights."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ttt_e2e.train.hydra_store import register_configs
    from ttt_e2e.train.trainer import train

    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    dst = tmp_path / "converted"
    assert convert_main(["from-hf", str(tmp_path / "llama"), str(dst), "--window", "16", "--suffix-len", suffix]) == 0
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        composed = compose(config_name="config", overrides=[
            f"+experiment=hf/extension/{variant}", f"training.init_from={dst}", "model.seq_length=32",
            "ttt.mini_batch_size=8", f"data.source={text}", "data.tokenizer=bytes", f"data.cache_dir={tmp_path}/c",
            "training.steps=1", "training.global_batch_size=2", "training.micro_batch_size=null",
            "training.eval_every=0", "training.progress=false", "logger=none"])
    run = OmegaConf.to_object(composed)
    converted = load_pretrained(dst)[1].model
    assert run.model == converted.__class__(**{**converted.__dict__, "seq_length": 32})
    assert (run.ttt.train_mode, run.model.prime_mlp) == (("meta", True) if variant == "e2e" else ("pretrain", False))
    r = train(run, tmp_path / "run")
    assert r.step == 1 and np.isfinite(r.last_loss)


def test_the_extension_recipe_needs_a_checkpoint(capsys):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ttt_e2e.train.hydra_store import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        composed = compose(config_name="config", overrides=["+experiment=hf/extension/e2e"])
    with pytest.raises(OmegaConfBaseException, match="init_from"):
        OmegaConf.to_object(composed)


def test_a_hub_id_that_cannot_be_downloaded_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # these machines reach no Hub: fail fast, as they would
    assert convert_main(["from-hf", "no-such-owner/no-such-model", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no checkpoint at 'no-such-owner/no-such-model'") and not (tmp_path / "dst").exists()
