"""The reference's parameter layout (github test-time-training/e2e, equinox `MetaModel`) and ours, both ways.

Reference: one array per parameter, keyed by its path as `jax.tree_util.keystr` prints it; the blocks' parameters
stacked over all layers on axis 0 (`h.blocks.*`), the suffix blocks' MLP' and its norms stacked over the suffix
layers (`h.prime_storage.*`); matrices (in, out). Ours (`Transformer.state_dict()`): per block, matrices (out, in)
like nn.Linear, q, k, v fused into `attn.wqkv.weight` (3d, d) and each MLP's W1, W3 into `w13` (2 hidden, d).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from ttt_e2e.config import Config, ConfigError, ModelConfig, TTTConfig


class ConvertError(ValueError):
    """A checkpoint cannot be converted; the one-line message names what and why."""


ROOT = ".language_model.model."
BLOCKS, PRIME = ROOT + "h.blocks.", ROOT + "h.prime_storage."
WTE, LN_F, LM_HEAD = ROOT + "wte.weight", ROOT + "ln_f.weight", ".language_model.lm_head.weight"
INNER_SPEC = ["language_model.**.suffix_blocks.feed_forward_prime.**"]  # their spec_inner: MLP' is phi

# (reference names, stacked over layers, joined in this order along our dim 0) -> our name within a block.
# Each 2-D part is transposed: (in, out) there, (out, in) here.
BLOCK_MAP = (
    (("seq_modeling_block.wq.weight", "seq_modeling_block.wk.weight", "seq_modeling_block.wv.weight"),
     "attn.wqkv.weight"),
    (("seq_modeling_block.wo.weight",), "attn.wo.weight"),
    (("seq_modeling_block.q_norm.weight",), "attn.q_norm.weight"),
    (("seq_modeling_block.k_norm.weight",), "attn.k_norm.weight"),
    (("feed_forward.w1.weight", "feed_forward.w3.weight"), "mlp.w13"),
    (("feed_forward.w2.weight",), "mlp.w2"),
    (("seq_norm.weight",), "pre_attn_norm.weight"),
    (("seq_post_norm.weight",), "post_attn_norm.weight"),
    (("ffn_norm.weight",), "pre_mlp_norm.weight"),
    (("ffn_post_norm.weight",), "post_mlp_norm.weight"),
)
PRIME_MAP = (
    (("feed_forward_prime.w1.weight", "feed_forward_prime.w3.weight"), "prime.w13"),
    (("feed_forward_prime.w2.weight",), "prime.w2"),
    (("ffn_prime_norm.weight",), "pre_prime_norm.weight"),
    (("ffn_prime_post_norm.weight",), "post_prime_norm.weight"),
)


def _block_name(cfg: ModelConfig, layer: int) -> str:
    return f"prefix.{layer}." if layer < cfg.n_prefix else f"suffix.blocks.{layer - cfg.n_prefix}."


def _layers(cfg: ModelConfig, stacked: str) -> list[int]:
    return list(range(cfg.n_layers)) if stacked == BLOCKS else list(range(cfg.n_prefix, cfg.n_layers))


def _entries(cfg: ModelConfig):
    """(stacked prefix, reference names, our name within a block) for every stacked group."""
    for stacked, table in ((BLOCKS, BLOCK_MAP), (PRIME, PRIME_MAP)):
        for refs, ours in table:
            yield stacked, refs, ours


def our_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our state dict's names and shapes for cfg (a model built on the meta device: no memory, no init cost)."""
    from ttt_e2e.model.transformer import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def to_ours(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The reference's arrays (checked by `check_reference`) -> our state dict for cfg. Reference norms that cfg's
    model does not have (qk_norm, pre_norm or post_norm false: the reference keeps their unused gains) are dropped."""
    want = our_shapes(cfg)
    sd = {"wte.weight": _tensor(flat[WTE]), "suffix.ln_f.weight": _tensor(flat[LN_F])}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = _tensor(flat[LM_HEAD].T)
    for stacked, refs, ours in _entries(cfg):
        for i in _layers(cfg, stacked):
            name = _block_name(cfg, i) + ours
            if name in want:
                sd[name] = _tensor(np.concatenate([_oriented(flat[stacked + r][i - _first(cfg, stacked)])
                                                   for r in refs]))
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:  # the tables above and the model disagree: a bug here, not bad input
        raise AssertionError(f"layout tables out of date: missing {missing[:3]}, extra {extra[:3]}")
    return sd


def to_reference(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our state dict -> the reference's arrays; the inverse of `to_ours` (norms our model lacks: gains of 1)."""
    flat = {WTE: _array(sd["wte.weight"]), LN_F: _array(sd["suffix.ln_f.weight"])}
    if not cfg.tie_embeddings:
        flat[LM_HEAD] = _array(sd["lm_head.weight"]).T.copy()
    for stacked, refs, ours in _entries(cfg):
        layers = _layers(cfg, stacked)
        per_layer = []
        for i in layers:
            name = _block_name(cfg, i) + ours
            t = _array(sd[name]) if name in sd else np.ones(cfg.head_dim if "q_norm" in ours or "k_norm" in ours
                                                             else cfg.d_model, np.float32)
            per_layer.append([_oriented(p) for p in np.split(t, len(refs))])
        for j, r in enumerate(refs):
            flat[stacked + r] = np.ascontiguousarray(np.stack([parts[j] for parts in per_layer]))
    return flat


def _first(cfg: ModelConfig, stacked: str) -> int:
    return 0 if stacked == BLOCKS else cfg.n_prefix


def _oriented(a: np.ndarray) -> np.ndarray:
    return a.T if a.ndim == 2 else a


def _tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 (orbax restores it so): same bits as torch's
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # restored arrays may be read-only


def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # installed with jax / orbax, the only readers of such arrays

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ---------------------------------------------------------------------------------------------------------------
# The model config: dimensions from the shapes, the rest from the reference's config.json where there is one.

# What the authors' released TTT-E2E checkpoints were trained with (their configs/experiment/*/*-e2e*.yaml), for a
# checkpoint without a config.json beside it.
RELEASED = {"model": {"sliding_window_size": 8192, "mini_batch_size": 1024, "rope_theta": 500000.0,
                      "rms_norm_eps": 1e-6, "seq_modeling_block": "SWA", "qk_norm": True, "pre_norm": True,
                      "post_norm": True, "prime": True},
            "training": {"seq_length": 8192, "train_mode": "meta", "ilr_init": 1.0, "ilr_warmup_steps": 0,
                         "optimizer_inner": {"optimizer_type": "sgd", "lr": 1.0, "clip_gradient": 1.0},
                         "spec_inner": INNER_SPEC}}


def _shape(flat, key) -> tuple:
    if key not in flat:
        raise ConvertError(f"missing key {key}")
    return tuple(flat[key].shape)


def model_config(flat: dict[str, np.ndarray], ref: Optional[dict]) -> Config:
    """Our Config for the reference arrays `flat` and the reference's config (its config.json: {"model": {...},
    "training": {...}} with the names of its ttt/config.py; None: the released checkpoints' settings)."""
    if not any(k.startswith(PRIME) for k in flat):
        raise ConvertError(f"not a TTT-E2E checkpoint: no {PRIME}* arrays (the MLP' that test-time training "
                           f"updates); a baseline (prime=false) has nothing to learn at test time")
    V, d = _shape(flat, WTE)
    L, _, hidden = _shape(flat, BLOCKS + "feed_forward.w1.weight")
    S, _, prime_hidden = _shape(flat, PRIME + "feed_forward_prime.w1.weight")
    head_dim = _shape(flat, BLOCKS + "seq_modeling_block.q_norm.weight")[-1]
    m, t = dict((ref or RELEASED)["model"]), dict((ref or RELEASED)["training"])
    for field, value in (("vocab_size", V), ("hidden_size", d), ("num_hidden_layers", L), ("suffix_len", S),
                         ("num_attention_heads", d // head_dim)):
        if field in m and m[field] != value:
            raise ConvertError(f"config.json says model.{field}={m[field]} but the weights have {value}")
    if m.get("prime", True) is False:
        raise ConvertError("config.json says model.prime=false: not a TTT-E2E model")
    block = m.get("seq_modeling_block", "SWA")
    if block not in ("SWA", "self_attention"):
        raise ConvertError(f"model.seq_modeling_block={block!r} is not supported (SWA or self_attention)")
    inner = t.get("optimizer_inner", {})
    if inner.get("optimizer_type", "sgd") != "sgd":
        raise ConvertError(f"training.optimizer_inner.optimizer_type={inner['optimizer_type']!r}: the inner "
                           f"loop here is SGD")
    if list(t.get("spec_inner", INNER_SPEC)) != INNER_SPEC:
        raise ConvertError(f"training.spec_inner={t['spec_inner']}: here the inner weights are exactly "
                           f"{INNER_SPEC}")
    seq_length = t.get("seq_length", m.get("seq_len", RELEASED["training"]["seq_length"]))
    lr = float(inner.get("lr", 1.0))
    ilr_init, warmup = float(t.get("ilr_init", lr)), int(t.get("ilr_warmup_steps", 0))
    if lr == 0 and ilr_init != 0 and warmup > 0:
        raise ConvertError(f"inner lr 0 with ilr_init {ilr_init} over {warmup} warm-up steps: the reference's inner "
                           f"lr is nonzero during that warm-up, which no multiple of a zero inner lr gives")
    try:
        model = ModelConfig(
            vocab_size=V, n_layers=L, d_model=d, n_heads=d // head_dim, mlp_width=hidden,
            prime_mlp_width=prime_hidden, suffix_len=S, prime_mlp=True, seq_length=seq_length,
            window=m.get("sliding_window_size", 8192) if block == "SWA" else None,
            qk_norm=m.get("qk_norm", True), pre_norm=m.get("pre_norm", True), post_norm=m.get("post_norm", True),
            tie_embeddings=LM_HEAD not in flat, rope_theta=float(m.get("rope_theta", 500000.0)),
            norm_eps=float(m.get("rms_norm_eps", 1e-6)))
        # their ilr_init is an inner learning rate, ours a multiplier of it
        ttt = TTTConfig(train_mode=str(t.get("train_mode", "meta")), mini_batch_size=m.get("mini_batch_size", 1024),
                        inner_lr=lr, inner_grad_clip=float(inner.get("clip_gradient", 1.0)),
                        # (a zero inner lr stays zero whatever its multiplier: 1)
                        ilr_init=ilr_init / lr if lr else 1.0, ilr_warmup_steps=warmup)
        model.validate()
        ttt.validate(model)
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"the checkpoint's config does not fit: {e}") from None
    return Config(model=model, ttt=ttt)


def reference_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The reference's names and shapes for a model of cfg."""
    d, L, S, hd = cfg.d_model, cfg.n_layers, cfg.suffix_len, cfg.head_dim
    h, hp = cfg.mlp_width, cfg.prime_width
    shapes = {WTE: (cfg.vocab_size, d), LN_F: (d,)}
    if not cfg.tie_embeddings:
        shapes[LM_HEAD] = (d, cfg.vocab_size)
    mats = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d)}
    for name, shape in mats.items():
        shapes[f"{BLOCKS}seq_modeling_block.{name}.weight"] = (L, *shape)
    for name in ("q_norm", "k_norm"):
        shapes[f"{BLOCKS}seq_modeling_block.{name}.weight"] = (L, hd)
    for name, shape, prime_shape in (("w1", (d, h), (d, hp)), ("w3", (d, h), (d, hp)), ("w2", (h, d), (hp, d))):
        shapes[f"{BLOCKS}feed_forward.{name}.weight"] = (L, *shape)
        shapes[f"{PRIME}feed_forward_prime.{name}.weight"] = (S, *prime_shape)
    for name in ("seq_norm", "seq_post_norm", "ffn_norm", "ffn_post_norm"):
        shapes[f"{BLOCKS}{name}.weight"] = (L, d)
    for name in ("ffn_prime_norm", "ffn_prime_post_norm"):
        shapes[f"{PRIME}{name}.weight"] = (S, d)
    return shapes


def check_reference(flat: dict[str, np.ndarray], cfg: ModelConfig) -> None:
    """Every array the reference model of cfg has is there with its shape, and nothing else."""
    want = reference_shapes(cfg)
    for key in sorted(want):
        if key not in flat:
            raise ConvertError(f"missing key {key}")
    for key in sorted(flat):
        if key not in want:
            raise ConvertError(f"unexpected key {key} (shape {tuple(flat[key].shape)})")
        if tuple(flat[key].shape) != want[key]:
            raise ConvertError(f"wrong shape for {key}: {tuple(flat[key].shape)}, expected {want[key]} "
                               f"from the other arrays")
        if not np.issubdtype(flat[key].dtype, np.floating) and flat[key].dtype.name != "bfloat16":
            raise ConvertError(f"{key} has dtype {flat[key].dtype}, expected floating point")


def reference_config(cfg: Config) -> dict:
    """The reference's config.json for our cfg (the fields that matter; names as in its ttt/config.py)."""
    m, t = cfg.model, cfg.ttt
    return {
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_width,
                  "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
                  "mini_batch_size": t.mini_batch_size,
                  "sliding_window_size": m.window if m.window is not None else m.seq_length,
                  "seq_len": m.seq_length, "rope_theta": m.rope_theta, "rms_norm_eps": m.norm_eps,
                  "seq_modeling_block": "SWA" if m.window is not None else "self_attention",
                  "prime": m.prime_mlp, "suffix_len": m.suffix_len, "qk_norm": m.qk_norm, "pre_norm": m.pre_norm,
                  "post_norm": m.post_norm, "tie_word_embeddings": m.tie_embeddings},
        "training": {"train_mode": t.train_mode, "seq_length": m.seq_length,
                     "optimizer_inner": {"optimizer_type": "sgd", "lr": t.inner_lr,
                                         "clip_gradient": t.inner_grad_clip},
                     "ilr_init": t.ilr_init * t.inner_lr, "ilr_warmup_steps": t.ilr_warmup_steps,
                     "spec_inner": INNER_SPEC},
        "converted_by": "ttt_e2e.convert to-jax", "ttt_e2e_config": asdict(cfg),
    }
