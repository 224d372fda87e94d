"""The TTT-E2E loss in plain PyTorch, one page: what `sequence_loss` (ttt/meta.py) computes, without its speed.

    for each sequence, for each mini-batch t of b tokens:
        l_t = loss of the model with inner weights phi_t on mini-batch t (attending to the earlier keys)
        phi_{t+1} = phi_t - eta * clip(grad_phi l_t)
    outer loss = mean over sequences and mini-batches of l_t, differentiated through every grad_phi l_t

No kernels, no rematerialization, no hoisting, no casts, materialized attention, one sequence at a time: the
reference the fast path is tested against in float64 (tests/ttt/test_naive.py), and the method to read first
(docs/method.md). It reads the model's parameters by name and nothing else of its code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.func import grad


def rms_norm(P, name, x, eps):
    w = P.get(f"{name}.weight")  # absent: the norm is switched off (an identity)
    return x if w is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def frequencies(D, cfg, device):
    """theta^(-2i/D), with Llama 3's scaling where cfg has it (written as Hugging Face's _compute_llama3_parameters)."""
    inv = cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)
    if cfg.rope_scaling is None:
        return inv
    f, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_positions
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)


def rope(x, pos, cfg):
    """Rotate interleaved pairs of x (T, H, D) by the angles of positions pos (stored in fp32, as the model's)."""
    angle = pos.double()[:, None, None] * frequencies(x.shape[-1], cfg, x.device)
    cos, sin = angle.cos().float().to(x.dtype), angle.sin().float().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2)


def mlp(P, name, x):  # SwiGLU, w13 = cat(w1, w3)
    a, b = (x @ P[f"{name}.w13"].T).chunk(2, -1)
    return (F.silu(a) * b) @ P[f"{name}.w2"].T


def block(P, name, x, pos, past, cfg):
    """x (T, d) at positions pos; past: this block's (keys, values) of earlier positions. Returns (x, kv)."""
    norm = lambda which, h: rms_norm(P, f"{name}.{which}", h, cfg.norm_eps)  # noqa: E731
    T, H, Hkv, D = x.shape[0], cfg.n_heads, cfg.kv_heads, cfg.head_dim
    qkv = (norm("pre_attn_norm", x) @ P[f"{name}.attn.wqkv.weight"].T).view(T, H + 2 * Hkv, D)
    q, k, v = qkv.split((H, Hkv, Hkv), 1)
    q, k = rope(norm("attn.q_norm", q), pos, cfg), rope(norm("attn.k_norm", k), pos, cfg)
    k, v = (k, v) if past is None else (torch.cat((past[0], k)), torch.cat((past[1], v)))
    k_pos = torch.arange(int(pos[-1]) + 1 - len(k), int(pos[-1]) + 1, device=x.device)
    visible = (k_pos[None] <= pos[:, None]) & (k_pos[None] > pos[:, None] - cfg.attention_window)
    ks, vs = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # query head h: kv head h // (H/Hkv)
    scores = torch.einsum("qhd,khd->hqk", q, ks) / math.sqrt(D)
    attn = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, -math.inf).softmax(-1), vs)
    x = x + norm("post_attn_norm", attn.reshape(T, -1) @ P[f"{name}.attn.wo.weight"].T)
    if f"{name}.prime.w13" in P:  # MLP': the inner weights phi
        x = x + norm("post_prime_norm", mlp(P, f"{name}.prime", norm("pre_prime_norm", x)))
    x = x + norm("post_mlp_norm", mlp(P, f"{name}.mlp", norm("pre_mlp_norm", x)))
    return x, (k, v)


def naive_sequence_loss(model, input_ids, targets, mask, ttt, ilr_mult: float = 1.0) -> torch.Tensor:
    """The outer loss (a scalar) of `sequence_loss(model, input_ids, targets, mask, ttt, ilr_mult)`."""
    cfg, P = model.cfg, dict(model.named_parameters())
    b, T, eta = ttt.mini_batch_size, input_ids.shape[1], ttt.inner_lr * ilr_mult
    head = P.get("lm_head.weight", P["wte.weight"])
    suffix = [f"suffix.blocks.{i}" for i in range(cfg.suffix_len)]
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    losses = []
    for x, y, m in zip(input_ids, targets, mask):  # TTT trains on each context on its own
        pos = torch.arange(T, device=x.device)
        h = P["wte.weight"][x]
        for i in range(cfg.n_prefix):  # no inner weights: the whole sequence at once
            h, _ = block(P, f"prefix.{i}", h, pos, None, cfg)
        phi = {n: p for n, p in P.items() if n.startswith("suffix.") and ".prime." in n}
        past = [None] * len(suffix)
        for t in range(T // b):
            mb = slice(t * b, (t + 1) * b)

            def loss(phi):  # l_t as a function of phi_t; the earlier keys are constants of it
                z, kvs = h[mb], []
                for name, kv in zip(suffix, past):
                    z, kv = block({**P, **phi}, name, z, pos[mb], kv, cfg)
                    kvs.append(kv)
                logits = rms_norm(P, "suffix.ln_f", z, cfg.norm_eps) @ head.T
                tok = F.cross_entropy(logits, y[mb], reduction="none")
                l_t = (tok * m[mb]).sum() / m[mb].sum().clamp(min=1)
                return l_t, (l_t, kvs)

            if ttt.train_mode == "meta" and t < T // b - 1:  # (the last update would reach no loss)
                g, (l_t, past) = grad(loss, has_aux=True)(phi)
                # the global norm over all of phi (+ tiny: a finite derivative at an all-masked mini-batch's g = 0)
                norm = torch.sqrt(sum((g_n ** 2).sum() for g_n in g.values()) + torch.finfo(h.dtype).tiny)
                scale = torch.clamp(ttt.inner_grad_clip / norm, max=1.0) if ttt.inner_grad_clip > 0 else 1.0
                phi = {n: phi[n] - eta * scale * g[n] for n in phi}
            else:
                l_t, (_, past) = loss(phi)
            losses.append(l_t)
    return torch.stack(losses).mean()
