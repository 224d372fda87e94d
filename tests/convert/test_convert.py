"""ttt_e2e.convert and save/load_pretrained: exact round trips, checkpoints our tools take, and refusals (one
line, exit status 2, nothing at DST)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_e2e.config import Config, DataConfig, LogConfig, ModelConfig, TrainConfig, TTTConfig
from ttt_e2e.convert import from_jax, orbax_io, to_jax
from ttt_e2e.convert.__main__ import main as convert_main
from ttt_e2e.convert.layout import PRIME, reference_config, to_reference
from ttt_e2e.convert.load import PretrainedTransformer
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.pretrained import load_pretrained
from ttt_e2e.train.checkpoint import CheckpointError, load_checkpoint
from ttt_e2e.ttt.meta import sequence_loss

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_tiny"
needs_orbax = pytest.mark.skipif(not orbax_io.available(), reason="orbax-checkpoint not installed (pip install "
                                 "'ttt-e2e[jax]')")


def _npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_round_trip_npz_is_exact(tmp_path):
    ours = from_jax(FIXTURE / "weights.npz", tmp_path / "ours")
    to_jax(ours, tmp_path / "back.npz")
    assert _same_arrays(_npz(tmp_path / "back.npz"), _npz(FIXTURE / "weights.npz"))
    # from-jax finds the config to-jax wrote beside the .npz: the same model and settings again
    again = from_jax(tmp_path / "back.npz", tmp_path / "again")
    assert json.loads((again / "meta.json").read_text())["config"] == json.loads((ours / "meta.json").read_text())[
        "config"]


@needs_orbax
def test_round_trip_orbax_is_exact(tmp_path):
    ours = from_jax(FIXTURE / "orbax" / "4799", tmp_path / "ours")  # one step dir
    assert json.loads((ours / "meta.json").read_text())["step"] == 4799
    to_jax(ours, tmp_path / "back")
    flat, step = orbax_io.read(tmp_path / "back")
    assert step == 4799 and _same_arrays(flat, _npz(FIXTURE / "weights.npz"))


def test_save_pretrained_load_pretrained_exact(tmp_path):
    model, cfg = load_pretrained(from_jax(FIXTURE / "weights.npz", tmp_path / "ours"))
    model.save_pretrained(tmp_path / "hf", config=cfg)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")  # config: the model's own settings
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tokens = torch.from_numpy(np.load(FIXTURE / "tokens.npy")).long()[None]
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = sequence_loss(model, x, y, y != 1, cfg.ttt).loss
    for d in ("hf", "sharded"):
        loaded, cfg2 = load_pretrained(tmp_path / d)
        assert (cfg2.model, cfg2.ttt) == (cfg.model, cfg.ttt)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(sequence_loss(loaded, x, y, y != 1, cfg2.ttt).loss, loss)
    hub = PretrainedTransformer.from_pretrained(tmp_path / "sharded")  # huggingface_hub's entry point, same loader
    assert all(torch.equal(v, hub.state_dict()[k]) for k, v in model.state_dict().items())
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a partial download
    with pytest.raises(CheckpointError, match="cannot read the weights") as e:
        load_pretrained(tmp_path / "sharded")
    assert "\n" not in str(e.value)


def test_converted_checkpoint_is_params_only(tmp_path):
    ours = from_jax(FIXTURE / "weights.npz", tmp_path / "ours")
    model, cfg = load_pretrained(ours)
    with pytest.raises(CheckpointError, match="load_part=params"):
        load_checkpoint(ours, Transformer(cfg.model), part="all")
    load_checkpoint(ours, Transformer(cfg.model), part="params")


# ----------------------------------------------------------------------------------------------------------------
# A converted model in our tools: generate.py, eval.py, training.init_from (a random model with a byte vocabulary)

def _random_reference(tmp_path: Path) -> Path:
    mcfg = ModelConfig(vocab_size=260, n_layers=2, d_model=32, n_heads=2, mlp_width=48, prime_mlp_width=40,
                       suffix_len=1, seq_length=64, window=32)
    ttt = TTTConfig(mini_batch_size=16, ilr_init=1.0)
    torch.manual_seed(0)
    flat = to_reference(Transformer(mcfg).state_dict(), mcfg)
    src = tmp_path / "ref"
    src.mkdir()
    np.savez(src / "weights.npz", **flat)
    (src / "config.json").write_text(json.dumps(reference_config(Config(model=mcfg, ttt=ttt))))
    return src / "weights.npz"


def test_converted_model_runs_in_generate_eval_and_training(tmp_path, monkeypatch, capsys):
    ckpt = from_jax(_random_reference(tmp_path), tmp_path / "ours", tokenizer="bytes")
    model, cfg = load_pretrained(ckpt)
    model.save_pretrained(tmp_path / "hf", config=cfg, max_shard_size="50KB")  # also a save_pretrained dir
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))

    from ttt_e2e.inference.cli import main as generate_main
    completions = []
    for path in (ckpt, tmp_path / "hf"):
        generate_main(["--checkpoint", str(path), "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu",
                       "--no-stop-at-eos"])
        out = capsys.readouterr()
        assert "4 new tokens" in out.err
        completions.append(out.out)
    assert completions[0] == completions[1]

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    monkeypatch.chdir(tmp_path)
    import eval as eval_cli
    assert eval_cli.main([f"checkpoint={ckpt}", f"checkpoint={tmp_path / 'hf'}", f"data.source={text}",
                          f"data.cache_dir={tmp_path / 'cache'}", "windows=2", "batch_size=2", "device=cpu"]) == 0
    converted, hf = json.loads((tmp_path / "eval_out" / "eval.json").read_text())["checkpoints"]
    assert converted["train_mode"] == "meta" and np.isfinite(converted["loss"])
    assert hf["loss_by_position"] == converted["loss_by_position"]

    from ttt_e2e.train.trainer import train
    base = dict(model=ModelConfig(**json.loads((ckpt / "meta.json").read_text())["config"]["model"]),
                ttt=TTTConfig(mini_batch_size=16), data=DataConfig(source=str(text), tokenizer="bytes",
                                                                   cache_dir=str(tmp_path / "cache")),
                log=LogConfig(logger="none"))
    tc = dict(steps=1, global_batch_size=2, eval_every=0, progress=False, init_from=str(ckpt))
    r = train(Config(**base, training=TrainConfig(**tc, load_part="params")), tmp_path / "run")
    assert r.step == 1 and np.isfinite(r.last_loss)
    with pytest.raises(CheckpointError, match="load_part=params"):
        train(Config(**base, training=TrainConfig(**tc, load_part="all")), tmp_path / "run_all")


# ----------------------------------------------------------------------------------------------------------------
# Refusals

def _refused(capsys, argv, dst: Path, match: str) -> None:
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert not dst.exists() and not list(dst.parent.glob(f".tmp-{dst.name}*"))


def _broken_npz(tmp_path: Path, edit) -> Path:
    flat = _npz(FIXTURE / "weights.npz")
    edit(flat)
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    np.savez(d / "weights.npz", **flat)
    shutil.copy(FIXTURE / "config.json", d / "config.json")
    return d / "weights.npz"


W1 = ".language_model.model.h.blocks.feed_forward.w1.weight"
WO = ".language_model.model.h.blocks.seq_modeling_block.wo.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda f: f.pop(WO), f"missing key {WO}"),
    (lambda f: f.update({WO: f[WO][:, :, :32]}), f"wrong shape for {WO}"),
    (lambda f: f.update({".language_model.model.extra.weight": np.ones(3, np.float32)}), "unexpected key"),
    (lambda f: [f.pop(k) for k in list(f) if k.startswith(PRIME)], "not a TTT-E2E checkpoint"),
])
def test_refuses_what_it_cannot_map(tmp_path, capsys, edit, match):
    src = _broken_npz(tmp_path, edit)
    _refused(capsys, ["from-jax", str(src), str(tmp_path / "dst")], tmp_path / "dst", match)


def test_refuses_a_partial_download(tmp_path, capsys):
    data = (FIXTURE / "weights.npz").read_bytes()
    (tmp_path / "weights.npz").write_bytes(data[: len(data) // 2])
    _refused(capsys, ["from-jax", str(tmp_path / "weights.npz"), str(tmp_path / "dst")], tmp_path / "dst",
             "truncated or partial download")


@needs_orbax
def test_refuses_an_orbax_dir_missing_its_data(tmp_path, capsys):
    src = tmp_path / "orbax"
    shutil.copytree(FIXTURE / "orbax", src)
    for d in src.rglob("d"):  # the OCDBT data files, as an interrupted copy leaves them
        shutil.rmtree(d)
    _refused(capsys, ["from-jax", str(src), str(tmp_path / "dst")], tmp_path / "dst", "cannot restore orbax item")


def test_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    assert convert_main(["from-jax", str(FIXTURE / "weights.npz"), str(tmp_path / "dst")]) == 2
    assert "already exists" in capsys.readouterr().err and not any((tmp_path / "dst").iterdir())


# ----------------------------------------------------------------------------------------------------------------
# The inner learning rate: the reference's ilr_init is an absolute inner lr, ours a multiplier of inner_lr

def _with_training(tmp_path: Path, **training) -> Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    shutil.copy(FIXTURE / "weights.npz", d / "weights.npz")
    ref = json.loads((FIXTURE / "config.json").read_text())
    inner = training.pop("lr", None)
    if inner is not None:
        ref["training"]["optimizer_inner"]["lr"] = inner
    ref["training"].update(training)
    (d / "config.json").write_text(json.dumps(ref))
    return d / "weights.npz"


@pytest.mark.parametrize("lr, ilr_init, warmup", [(0.5, 0.1, 10), (2.0, 0.5, 4), (0.25, 0.25, 0)])
def test_inner_lr_and_its_warm_up_convert_both_ways(tmp_path, lr, ilr_init, warmup):
    ours = from_jax(_with_training(tmp_path, lr=lr, ilr_init=ilr_init, ilr_warmup_steps=warmup), tmp_path / "ours")
    _, cfg = load_pretrained(ours)
    t = cfg.ttt
    assert t.inner_lr == lr and t.ilr_warmup_steps == warmup
    # the inner lr of the first outer step is the reference's ilr_init, of the last warm-up step its lr
    assert t.inner_lr * t.ilr_multiplier(0) == pytest.approx(ilr_init)
    assert t.inner_lr * t.ilr_multiplier(warmup) == pytest.approx(lr)
    to_jax(ours, tmp_path / "back.npz")
    back = json.loads((tmp_path / "back.config.json").read_text())["training"]
    assert back["optimizer_inner"]["lr"] == lr and back["ilr_init"] == pytest.approx(ilr_init)


def test_a_zero_inner_lr_converts_or_is_refused_in_one_line(tmp_path, capsys):
    ours = from_jax(_with_training(tmp_path, lr=0.0, ilr_init=0.0, ilr_warmup_steps=10), tmp_path / "ours")
    _, cfg = load_pretrained(ours)
    assert cfg.ttt.inner_lr * cfg.ttt.ilr_multiplier(0) == 0 and cfg.ttt.inner_lr * cfg.ttt.ilr_multiplier(20) == 0
    # a warm-up from a nonzero ilr_init towards 0: the reference's inner lr is not 0 on the way, ours would be
    (tmp_path / "x").mkdir()
    src = _with_training(tmp_path / "x", lr=0.0, ilr_init=0.1, ilr_warmup_steps=10)
    _refused(capsys, ["from-jax", str(src), str(tmp_path / "dst")], tmp_path / "dst", "inner lr 0 with ilr_init 0.1")


def test_without_a_config_the_released_checkpoints_settings(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    shutil.copy(FIXTURE / "weights.npz", tmp_path / "src" / "weights.npz")
    assert convert_main(["from-jax", str(tmp_path / "src" / "weights.npz"), str(tmp_path / "ours")]) == 0
    assert "released checkpoints' settings assumed" in capsys.readouterr().err
    _, cfg = load_pretrained(tmp_path / "ours")
    m, t = cfg.model, cfg.ttt
    assert (m.window, m.seq_length, m.rope_theta, m.norm_eps, m.qk_norm, m.pre_norm, m.post_norm) == (
        8192, 8192, 500000.0, 1e-6, True, True, True)
    assert (t.train_mode, t.mini_batch_size, t.inner_lr, t.inner_grad_clip, t.ilr_warmup_steps) == (
        "meta", 1024, 1.0, 1.0, 0)
    assert t.inner_lr * t.ilr_multiplier(0) == 1.0
    # the dimensions come from the arrays
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.suffix_len) == (64, 64, 4, 4, 2)


def test_the_format_version_decides_the_migration(tmp_path):
    """Format 1 (q, k, v as separate matrices, or already fused) is migrated; the current format is read as it is
    (parts there are not guessed at), and a newer one is refused in one line."""
    ours = from_jax(FIXTURE / "weights.npz", tmp_path / "ours")
    model, _ = load_pretrained(ours)
    sd = torch.load(ours / "model.pt", weights_only=True)
    state = torch.load(ours / "state.pt", weights_only=True)
    assert state["format"] == 2
    key = "prefix.0.attn.wqkv.weight"
    parts = dict(zip(("wq", "wk", "wv"), sd.pop(key).chunk(3)))
    sd.update({key.replace("wqkv", p): t for p, t in parts.items()})
    torch.save(sd, ours / "model.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_pretrained(ours)
    torch.save({**state, "format": 1}, ours / "state.pt")
    assert torch.equal(load_pretrained(ours)[0].state_dict()[key], model.state_dict()[key])
    torch.save({**state, "format": 3}, ours / "state.pt")
    with pytest.raises(CheckpointError, match="has format 3, this code reads 2 and older") as e:
        load_pretrained(ours)
    assert "\n" not in str(e.value)
