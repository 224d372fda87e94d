"""Checkpoint files: atomic writes, a `latest` that only names complete checkpoints, pruning, path resolution."""
import pytest
import torch

from ttt_e2e.config import Config, ModelConfig
from ttt_e2e.data import StatefulSampler
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train import checkpoint as ckpt_mod
from ttt_e2e.train.checkpoint import (Checkpointer, CheckpointError, latest_checkpoint, load_checkpoint,
                                      resolve_checkpoint)
from ttt_e2e.train.optim import build_optimizer, build_scheduler


def _state(seed=0):
    cfg = Config(model=ModelConfig(d_model=32, n_heads=2, mlp_width=64, n_layers=2, seq_length=64, window=32))
    torch.manual_seed(seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, 10, cfg.optim)
    model(torch.randint(0, 258, (1, 64))).sum().backward()
    opt.step()  # so that the optimizer has state (exp_avg, ...) to save
    return cfg, model, opt, sched, StatefulSampler(100, 4, seed=0)


def test_save_prune_and_latest(tmp_path):
    cfg, model, opt, sched, sampler = _state()
    ck = Checkpointer(tmp_path / "ck", keep_last=2, is_main=True)
    for step in (1, 2, 3):
        ck.save(step, model, opt, sched, sampler, cfg)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert ck.latest() == tmp_path / "ck" / "step_00000003"
    # Paths accepted by training.init_from / eval.py: step dir, checkpoints dir, run dir.
    assert resolve_checkpoint(str(tmp_path / "ck")) == ck.latest()
    assert resolve_checkpoint(str(tmp_path / "ck" / "step_00000002")).name == "step_00000002"
    (tmp_path / "run").mkdir()
    (tmp_path / "ck").rename(tmp_path / "run" / "checkpoints")
    assert resolve_checkpoint(str(tmp_path / "run")).name == "step_00000003"
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, monkeypatch):
    cfg, model, opt, sched, sampler = _state()
    ck = Checkpointer(tmp_path, keep_last=1, is_main=True)
    ck.save(1, model, opt, sched, sampler, cfg)
    real_save = torch.save

    def dies_on_state(obj, f):  # model.pt gets written, then the process "dies" writing state.pt
        if "optimizer" in obj:
            raise KeyboardInterrupt("killed")
        real_save(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", dies_on_state)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, model, opt, sched, sampler, cfg)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists() and any(tmp_path.glob(".tmp-step_00000002-*"))
    Checkpointer(tmp_path, keep_last=1, is_main=True)  # the next start clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_missing_pointer_falls_back_to_the_newest_complete_dir(tmp_path):
    cfg, model, opt, sched, sampler = _state()
    ck = Checkpointer(tmp_path, keep_last=3, is_main=True)
    ck.save(1, model, opt, sched, sampler, cfg)
    ck.save(2, model, opt, sched, sampler, cfg)
    (tmp_path / "latest").unlink()  # killed between the dir rename and the pointer update
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_load_restores_everything_and_params_only_restores_weights(tmp_path):
    cfg, model, opt, sched, sampler = _state(seed=0)
    for _ in range(3):
        sampler.next_batch()
        sched.step()
    path = Checkpointer(tmp_path, 2, True).save(3, model, opt, sched, sampler, cfg)
    _, model2, opt2, sched2, sampler2 = _state(seed=1)
    load_checkpoint(path, model2, opt2, sched2, sampler2, part="all")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert sampler2.next_batch() == sampler.next_batch() and sched2.last_epoch == 3
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    _, model3, opt3, sched3, sampler3 = _state(seed=2)
    load_checkpoint(path, model3, part="params")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model3.state_dict().values()))
    assert sched3.last_epoch == 0 and sampler3.position == 0


def test_truncated_checkpoint_file_is_reported(tmp_path):
    cfg, model, opt, sched, sampler = _state()
    path = Checkpointer(tmp_path, 2, True).save(1, model, opt, sched, sampler, cfg)
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*state.pt"):
        load_checkpoint(path, model, opt, sched, sampler)


def _split_like_the_old_format(path):
    """Rewrite a checkpoint as the code before the fused projections saved it: wq, wk, wv and w1, w3 as separate
    matrices (model and optimizer moments), in the order named_parameters gave them then."""
    model_sd = torch.load(path / "model.pt", weights_only=True)
    state = torch.load(path / "state.pt", weights_only=True)
    osd = state["optimizer"]

    def split(key):
        if key.endswith("attn.wqkv.weight"):
            return [key[:-len("wqkv.weight")] + f"w{c}.weight" for c in "qkv"]
        if key.endswith(".w13"):
            return [key[:-3] + "w1", key[:-3] + "w3"]
        return None

    new_sd, new_state = {}, {}
    for key, t in model_sd.items():
        names = split(key)
        new_sd.update(zip(names, t.chunk(len(names))) if names else [(key, t)])
    for key, st in osd["state"].items():
        names = split(key)
        if not names:
            new_state[key] = st
            continue
        for i, n in enumerate(names):
            new_state[n] = {k: v.chunk(len(names))[i] if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
    for g in osd["param_groups"]:
        names = [n for key in g["params"] for n in (split(key) or [key])]
        for n in [n for n in names if n.endswith(".w3")]:  # the old order: w1, w2, w3
            names.remove(n)
            names.insert(names.index(n[:-1] + "2") + 1, n)
        g["params"] = names
    osd["state"] = new_state
    state["format"] = 1  # what that code wrote (convert/steps.py: migrate)
    torch.save(new_sd, path / "model.pt")
    torch.save(state, path / "state.pt")
    return new_sd


def test_checkpoint_from_before_the_fused_projections_resumes_exactly(tmp_path):
    """A checkpoint with separate wq, wk, wv and w1, w3 (the format before they were fused) loads: the fused
    matrices and their AdamW moments are the parts joined, so the next optimizer step gives the same weights."""
    cfg, model, opt, sched, sampler = _state(seed=0)
    path = Checkpointer(tmp_path, 2, True).save(1, model, opt, sched, sampler, cfg)
    old = _split_like_the_old_format(path)
    assert "prefix.0.attn.wk.weight" in old and "suffix.blocks.0.mlp.w3" in old and not any("w13" in k for k in old)
    _, model2, opt2, sched2, sampler2 = _state(seed=1)
    load_checkpoint(path, model2, opt2, sched2, sampler2, part="all")
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for m, o in ((model, opt), (model2, opt2)):  # one more step from the same state: the same weights
        o.zero_grad(set_to_none=True)
        m(torch.randint(0, 258, (1, 64), generator=torch.Generator().manual_seed(5))).sum().backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
