"""from-hf: a Hugging Face `LlamaForCausalLM` or `Qwen3ForCausalLM` (a local folder or a Hub id, safetensors
weights) into one of our checkpoints, a TTT-E2E model that computes the source's function exactly while the context
fits in the window and before any inner step (docs/METHOD.md section 8):

- the same projections, norms (pre-norm RMSNorm only: model.post_norm=false; Qwen3's QK-norm), grouped-query
  attention (model.n_kv_heads), head width, RoPE theta and Llama 3's rope_scaling, tied or untied head, norm eps;
- RoPE: Hugging Face rotates the pairs (x_i, x_{i + D/2}) of a head, we rotate (x_2i, x_2i+1) with the same
  frequency i, so the rows of each q and k head (and the QK-norm scales) are reordered to put their pair i at
  (2i, 2i+1): the rotated q.k, and so the attention, is unchanged (v and the output projection stay as they are);
- attention becomes sliding-window (W);
- the last N blocks get MLP' (the inner weights) between attention and MLP: a copy of the block's MLP input side
  (its pre-norm scale, w1, w3) and a zero output projection w2, so it adds exactly 0 until the first inner step.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from ttt_e2e.config import Config, ConfigError, ModelConfig, TTTConfig

from .layout import ConvertError
from .load import is_hub_id, snapshot, with_overrides
from .pretrained_dir import read_safetensors
from .steps import write_step

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM")
DEFAULT_WINDOW = 8192  # the paper's W
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]


def source_dir(src: str, log=None) -> Path:
    """The local folder of src: itself, or the Hub snapshot of a repo id ("owner/name")."""
    if is_hub_id(src):
        if log:
            log(f"downloading {src} from the Hugging Face Hub")
        return snapshot(src, HUB_FILES)
    p = Path(src).expanduser()
    if not (p / "config.json").is_file():
        raise ConvertError(f"{src} is not a Hugging Face model folder (no config.json)")
    return p


def _rope(hf: dict) -> dict:
    """Our RoPE settings from either spelling: transformers 5's rope_parameters, or rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind != "llama3":
        raise ConvertError(f"rope_type {kind!r} is not supported (default or llama3)")
    try:
        return dict(rope_theta=theta, rope_scaling="llama3", rope_factor=float(params["factor"]),
                    rope_low_freq_factor=float(params["low_freq_factor"]),
                    rope_high_freq_factor=float(params["high_freq_factor"]),
                    rope_original_max_positions=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConvertError(f"rope_scaling llama3 without {e.args[0]}") from None


def model_config(hf: dict, window: Optional[int], suffix_len: Optional[int]) -> Config:
    """Our Config for the source's config.json; what it cannot express is refused."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ConvertError(f"architecture {arch!r} is not supported: from-hf converts {' and '.join(ARCHITECTURES)}")
    refuse = [(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu)"),
              (bool(hf.get("attention_bias")), "attention_bias=true (our projections have no bias)"),
              (bool(hf.get("mlp_bias")), "mlp_bias=true (our MLPs have no bias)"),
              (bool(hf.get("use_sliding_window")) or any(t != "full_attention" for t in hf.get("layer_types") or []),
               "sliding-window layers in the source (use_sliding_window / layer_types)")]
    for bad, what in refuse:
        if bad:
            raise ConvertError(f"{arch} with {what} is not supported")
    try:
        d, H, L = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        head_dim = int(hf.get("head_dim") or d // H)
        n = max(1, L // 4) if suffix_len is None else suffix_len  # the paper's suffix: a quarter of the blocks
        W = DEFAULT_WINDOW if window is None else window
        model = ModelConfig(
            vocab_size=int(hf["vocab_size"]), n_layers=L, d_model=d, n_heads=H,
            n_kv_heads=int(hf.get("num_key_value_heads") or H), attn_head_dim=None if head_dim * H == d else head_dim,
            mlp_width=int(hf["intermediate_size"]), suffix_len=n, prime_mlp=n > 0, seq_length=W, window=W,
            qk_norm=arch == "Qwen3ForCausalLM", pre_norm=True, post_norm=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)), **_rope(hf))
        # the paper's extension recipe: the full inner lr from the first step, mini-batches of 1024 (or the window);
        # no suffix: the sliding-window baseline, trained without TTT
        ttt = TTTConfig(train_mode="meta" if n else "pretrain", mini_batch_size=min(1024, W), inner_lr=1.0,
                        ilr_init=1.0, ilr_warmup_steps=0)
        model.validate()
        ttt.validate(model)
    except KeyError as e:
        raise ConvertError(f"config.json has no {e.args[0]}") from None
    except (ConfigError, TypeError, ValueError) as e:
        raise ConvertError(f"the source's config does not fit: {e}") from None
    return Config(model=model, ttt=ttt)


def pair_order(head_dim: int) -> torch.Tensor:
    """0, D/2, 1, D/2 + 1, ...: where our (2i, 2i + 1) RoPE pair finds Hugging Face's (i, i + D/2)."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), 1).flatten()


def _interleave_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The rows of each of the heads of a projection (heads * head_dim, d) in our RoPE pair order."""
    return w.view(heads, head_dim, -1)[:, pair_order(head_dim)].reshape(w.shape)


def to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (fp32) of the source's; missing or unexpected tensors are refused."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer some exports keep
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a tied head may be saved as a copy of the embedding
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ConvertError(f"missing tensor {name} in the source's weights")
        used.add(name)
        return sd[name].float()

    H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    out = {"wte.weight": take("model.embed_tokens.weight"), "suffix.ln_f.weight": take("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        src = f"model.layers.{i}."
        ours = f"prefix.{i}." if i < cfg.n_prefix else f"suffix.blocks.{i - cfg.n_prefix}."
        attn = src + "self_attn."
        out[ours + "attn.wqkv.weight"] = torch.cat((_interleave_rows(take(attn + "q_proj.weight"), H, D),
                                                    _interleave_rows(take(attn + "k_proj.weight"), Hkv, D),
                                                    take(attn + "v_proj.weight")))
        out[ours + "attn.wo.weight"] = take(attn + "o_proj.weight")
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                out[ours + f"attn.{norm}.weight"] = take(attn + f"{norm}.weight")[pair_order(D)]
        out[ours + "pre_attn_norm.weight"] = take(src + "input_layernorm.weight")
        out[ours + "pre_mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
        w13 = torch.cat((take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")))
        out[ours + "mlp.w13"], out[ours + "mlp.w2"] = w13, take(src + "mlp.down_proj.weight")
        if i >= cfg.n_prefix and cfg.prime_mlp:  # MLP': the MLP's input side, a zero output (adds 0 until the
            # first inner step)
            out[ours + "prime.w13"] = w13.clone()
            out[ours + "pre_prime_norm.weight"] = out[ours + "pre_mlp_norm.weight"].clone()
            out[ours + "prime.w2"] = torch.zeros(cfg.d_model, cfg.prime_width)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ConvertError(f"unexpected tensors in the source's weights: {', '.join(unexpected[:4])}"
                           + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else ""))
    return out


def _tokenizer_writer(folder: Path, log=None):
    """A function that saves the source's tokenizer into a folder, or None where the source has none."""
    if not any(folder.glob("tokenizer*")):
        if log:
            log(f"no tokenizer in {folder}: data.tokenizer is left as it is (--set data.tokenizer=...)")
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ConvertError(f"cannot read the tokenizer in {folder}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None
    if tok.bos_token is None and tok.eos_token is not None:  # Qwen3's: documents only end, with <|endoftext|>
        tok.bos_token = tok.eos_token  # our data and prompts start with BOS (ttt_e2e/data)
        if log:
            log(f"the tokenizer has no BOS token: its EOS {tok.eos_token!r} serves as BOS in the saved copy")
    return lambda dst: tok.save_pretrained(str(dst))


def from_hf(src: str, dst, window: Optional[int] = None, suffix_len: Optional[int] = None,
            overrides: Sequence[str] = (), log=None) -> Path:
    """Convert the Hugging Face model src into our checkpoint dir dst (which must not exist)."""
    dst = Path(dst)
    if dst.exists():
        raise ConvertError(f"{dst} already exists: remove it or choose another destination")
    folder = source_dir(str(src), log)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg = model_config(hf, window, suffix_len)
    tokenizer = _tokenizer_writer(folder, log)
    if tokenizer is not None:
        cfg.data.tokenizer = "tokenizer"  # the copy inside the checkpoint (load() resolves it there)
    cfg = with_overrides(cfg, overrides)
    if cfg.model.prime_mlp and cfg.model.prime_width != cfg.model.mlp_width:
        raise ConvertError(f"model.prime_mlp_width={cfg.model.prime_mlp_width}: MLP' starts as a copy of the "
                           f"block's MLP input side, so it has the MLP's width {cfg.model.mlp_width}")
    model_cfg = model_config(hf, cfg.model.window, cfg.model.suffix_len).model
    for name in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "attn_head_dim", "mlp_width",
                 "prime_mlp", "qk_norm", "pre_norm", "post_norm", "tie_embeddings", "norm_eps", "rope_theta",
                 "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_positions"):
        if getattr(cfg.model, name) != getattr(model_cfg, name):
            raise ConvertError(f"--set model.{name}: the source's function fixes it ({getattr(model_cfg, name)})")
    sd = to_ours(read_safetensors(folder), cfg.model)
    # parameters only: state.pt has no optimizer, so training.load_part=all refuses it and load_part=params takes it
    write_step(dst, sd, {"step": 0, "config": asdict(cfg), "converted_from": str(src)},
               folders={"tokenizer": tokenizer} if tokenizer else None)
    return dst
