"""A converted Llama-3.2-1B-shaped model on one GPU (issue 34): its meta-training step at T = 8192 against the
source's pretraining step, and its generation latency per token after a 32K prompt.

    python -m benchmarks.inference.hf_llama [--steps 8] [--context 32768] [--decode 32] [--out DIR]

The source is `transformers.LlamaForCausalLM` with Llama-3.2-1B's config (hidden 2048, 16 layers, 32 heads on 8 kv
heads, head dim 64, intermediate 8192, vocab 128256, tied head, RoPE theta 5e5 with llama3 scaling, factor 32) and
random weights (no download), converted in memory by the converter's own functions (`ttt_e2e.convert.hf`:
model_config, to_ours): window 8192, the last 4 blocks with MLP', mini-batches of 1024.

  check     the converted model's bf16 logits at T = 1024 against the source's (relative max difference), through
            the attention the run uses
  steps     one optimizer step as the trainer takes it (sequence_loss -> backward -> clip -> AdamW), captured as a
            CUDA graph and replayed (ttt_e2e/cuda_graph.py), median of --steps replays (CUDA events): the source's
            function in pretrain mode (no MLP', full causal attention through SDPA: the baseline), the converted
            model in pretrain mode, and in meta mode with train.py's settings (meta_ttt; meta_remat: the inner
            steps recomputed in the outer backward); the ratio meta / baseline is the issue's figure (target 1.8x)
  generate  a --context prompt through the inference engine (CUDA graphs), then --decode greedy tokens: prefill us
            per token, decode ms per token (median; the first decoded token also takes the last prompt mini-batch's
            inner step, so the mean is given too)

Grouped-query attention goes through the Triton kernels where they have it (checked first against the
materialized reference on a small GQA shape); where they do not, the model runs as its exact MHA equivalent (each
kv head's K/V projection repeated over its query heads), and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from triton.testing import do_bench

from benchmarks.core.env import environment
from benchmarks.core.models import HF_CONFIGS, hf_configs
from benchmarks.core.records import write_json

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.convert import hf
from ttt_e2e.cuda_graph import GraphedStep
from ttt_e2e.inference import InferenceGraphs, feed, start
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

LLAMA_32_1B = HF_CONFIGS["llama-3.2-1b"]
T, W, B_MINI = 8192, 8192, 1024
def meta_ttt(**overrides) -> TTTConfig:
    """The meta step as train.py takes it: TTTConfig's remat_inner default, conf/config.yaml's (every inner step
    kept for the outer backward; tests hold the three equal). "meta_remat" overrides it: recomputed instead."""
    return TTTConfig(train_mode="meta", mini_batch_size=B_MINI, inner_lr=1.0, ilr_init=1.0, **overrides)


def cuda_ms_once(fn) -> float:
    """One call's milliseconds (a replay, to size do_bench's run)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def gqa_kernels_ok() -> bool:
    """Whether the Triton attention reads Hkv < H heads in place: it says so (kernels/swa's docstring; kernels
    without GQA would index kv heads past the tensor, which may fault and poison the CUDA context), and its forward
    and backward agree with the reference on a small GQA shape."""
    import ttt_e2e.kernels.swa as swa
    from ttt_e2e.kernels.swa import swa_attention
    from ttt_e2e.kernels.swa.reference import swa_reference

    if "grouped-query" not in (swa.__doc__ or "").lower():
        return False

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 256, 64, device="cuda", generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 256, 64, device="cuda", generator=g, requires_grad=True) for _ in range(2))
    try:
        out = swa_attention(q, k, v, 64, 0, 0)
        want = swa_reference(q, k, v, 64, 0, 0)
        got_g = torch.autograd.grad(out.sum(), (q, k, v))
        want_g = torch.autograd.grad(want.sum(), (q, k, v))
    except Exception:  # noqa: BLE001 -- kernels that refuse Hkv < H
        return False
    return out.shape == want.shape and (out - want).abs().max() < 1e-2 and all(
        a.shape == b.shape and (a - b).abs().max() < 1e-2 for a, b in zip(got_g, want_g))


def as_mha(sd: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The same function with every query head's own K/V (each kv head's rows repeated over its group)."""
    H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    out = dict(sd)
    for name, w in sd.items():
        if name.endswith("attn.wqkv.weight"):
            q, k, v = w.split((H * D, Hkv * D, Hkv * D))
            rep = lambda t: t.view(Hkv, D, -1).repeat_interleave(H // Hkv, 0).reshape(H * D, -1)  # noqa: E731
            out[name] = torch.cat((q, rep(k), rep(v)))
    return out, replace(cfg, n_kv_heads=None)


def converted(gqa: bool):
    """(state dict on the GPU, ModelConfig) of the source converted by ttt_e2e.convert.hf, and the source (fp32)."""
    import transformers

    src_cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA_32_1B.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        source = transformers.LlamaForCausalLM(src_cfg).eval()  # fp32: the check compares in fp32 first
    mcfg = hf_configs("llama-3.2-1b", T, W)[1]
    sd = hf.to_ours(source.state_dict(), mcfg)
    if not gqa:
        sd, mcfg = as_mha(sd, mcfg)
    return sd, mcfg, source


def build(mcfg: ModelConfig, sd: dict | None) -> Transformer:
    with torch.device("cuda"):
        model = Transformer(mcfg)
    if sd is not None:
        model.load_state_dict(sd)
    return model


def step_ms(model: Transformer, ttt: TTTConfig, steps: int) -> dict:
    """One trainer step captured as a CUDA graph, replayed: median ms, peak GiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True,
                            capturable=True)
    ids = torch.randint(0, model.cfg.vocab_size, (1, T + 1), device="cuda")

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sequence_loss(model, x, y, None, ttt).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    torch.cuda.reset_peak_memory_stats()
    graphed = GraphedStep(step, ids[:, :-1], ids[:, 1:], warmup=2, zero_grad=lambda: opt.zero_grad(set_to_none=True))
    first = cuda_ms_once(lambda: graphed(ids[:, :-1], ids[:, 1:]))
    # triton's do_bench: CUDA events around each replay, L2 flushed between them, about `steps` replays
    times = do_bench(lambda: graphed(ids[:, :-1], ids[:, 1:]), warmup=first, rep=steps * first, return_mode="all")
    loss = graphed.static_outputs.item()
    out = dict(ms=statistics.median(times), ms_all=times, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               loss=loss)
    del graphed, opt
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return out


def generation(model: Transformer, context: int, n_decode: int) -> dict:
    ttt = meta_ttt()
    model.eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), device="cuda")
    graphs = InferenceGraphs()
    out = {}
    for run in ("warm-up", "timed"):  # the first run captures the graphs and compiles the kernels
        with torch.no_grad():  # the engine runs in the model's compute dtype (bf16 autocast on CUDA) itself
            state = start(model, ttt, 1, graphs=graphs)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = feed(state, prompt)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            decode = []
            for _ in range(n_decode if run == "timed" else 4):
                tok = logits.argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                logits = feed(state, tok)
                torch.cuda.synchronize()
                decode.append(time.perf_counter() - t0)
        out = dict(context=context, prefill_us_per_token=prefill / context * 1e6,
                   decode_ms_median=statistics.median(decode) * 1e3, decode_ms_mean=statistics.mean(decode) * 1e3,
                   decode_ms_all=[d * 1e3 for d in decode], inner_steps=len(state.losses))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--parts", default="check,baseline,meta,generate",
                   help="of check, baseline, pretrain (the converted model in pretrain mode), meta, meta_remat (the "
                   "inner steps recomputed in the outer backward), generate")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("hf_llama: needs a CUDA GPU (a 1B model's steps and generation, CUDA-graphed)", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    env = environment("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "source": "LlamaForCausalLM, Llama-3.2-1B config, random weights", "T": T, "window": W,
              "mini_batch": B_MINI, "suffix_len": 4}
    t0 = time.perf_counter()
    out_file = Path(args.out) / "hf_llama.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)

    def report(key, value):
        result[key] = value
        print(json.dumps({key: {k: v for k, v in value.items() if not k.endswith("_all")}
                          if isinstance(value, dict) else value, "at_s": round(time.perf_counter() - t0, 1)}),
              flush=True)
        write_json(out_file, result, env)

    gqa = gqa_kernels_ok()
    report("attention", "GQA kernels (8 kv heads read in place)" if gqa else
           "MHA equivalent: the Triton kernels here have no GQA, K/V projections repeated to 32 heads")
    sd, mcfg, source = converted(gqa)
    model = build(mcfg, sd)
    del sd
    report("converted_s", round(time.perf_counter() - t0, 1))
    if "check" in parts:
        # fp32 (TF32 off): the conversion itself; bf16 autocast: ours and the source's own bf16 run, each against
        # the source in fp32 (a random 16-layer net amplifies rounding: the source's bf16 run is the yardstick)
        torch.backends.cuda.matmul.allow_tf32 = False
        ids = torch.randint(0, mcfg.vocab_size, (1, 256), device="cuda")

        def vs(a, b):
            return dict(rel_max_diff=((a - b).abs().max() / b.abs().max()).item(),
                        argmax_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item())

        with torch.no_grad():
            ref = source(ids).logits.float()
            fp32 = vs(model(ids).float(), ref)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ours_bf16 = vs(model(ids).float(), ref)
            source_bf16 = vs(source.to(torch.bfloat16)(ids).logits.float(), ref)
        report("check", dict(fp32=fp32, ours_bf16=ours_bf16, source_bf16=source_bf16))
    del source
    torch.cuda.empty_cache()
    if "baseline" in parts:  # the source's function: no MLP', full causal attention through SDPA, pretrain mode
        base = build(hf_configs("llama-3.2-1b", T, W)[0], None)
        report("baseline_pretrain_step", step_ms(base, TTTConfig(train_mode="pretrain", mini_batch_size=T),
                                                 args.steps))
        del base
        torch.cuda.empty_cache()
    if "pretrain" in parts:
        report("converted_pretrain_step", step_ms(model, TTTConfig(train_mode="pretrain", mini_batch_size=B_MINI),
                                                  args.steps))
    for part, key, ttt in (("meta", "converted_meta_step", meta_ttt()),
                           ("meta_remat", "converted_meta_step_remat_inner", meta_ttt(remat_inner=True))):
        if part in parts:
            report(key, dict(step_ms(model, ttt, args.steps), remat_inner=ttt.remat_inner))
    if "baseline_pretrain_step" in result and "converted_meta_step" in result:
        report("meta_over_baseline", result["converted_meta_step"]["ms"] / result["baseline_pretrain_step"]["ms"])
    if "baseline_pretrain_step" in result and "converted_meta_step_remat_inner" in result:
        report("meta_remat_over_baseline",
               result["converted_meta_step_remat_inner"]["ms"] / result["baseline_pretrain_step"]["ms"])
    if "generate" in parts:
        report("generate", generation(model, args.context, args.decode))
    print(f"\n{result['device']}, {result['date']}, {result['attention']}")
    print("| what | figure |\n|---|---|")
    for name, c in result.get("check", {}).items():
        print(f"| logits vs the source in fp32: {name} | rel max diff {c['rel_max_diff']:.2e}, argmax agree "
              f"{c['argmax_agree']:.3f} |")
    for key, label in (("baseline_pretrain_step", "source pretrain step (SDPA, no MLP') ms"),
                       ("converted_pretrain_step", "converted, pretrain mode ms"),
                       ("converted_meta_step", "converted, meta step ms"),
                       ("converted_meta_step_remat_inner", "converted, meta step, inner steps recomputed, ms")):
        if key in result:
            print(f"| {label} | {result[key]['ms']:.1f} (peak {result[key]['peak_gib']:.1f} GiB) |")
    if "meta_over_baseline" in result:
        print(f"| meta / source pretrain | {result['meta_over_baseline']:.2f}x |")
    if "meta_remat_over_baseline" in result:
        print(f"| meta (inner steps recomputed) / source pretrain | {result['meta_remat_over_baseline']:.2f}x |")
    if "generate" in result:
        g = result["generate"]
        print(f"| prefill at {g['context']} | {g['prefill_us_per_token']:.1f} us/token |")
        print(f"| decode after {g['context']} | {g['decode_ms_median']:.2f} ms/token median, "
              f"{g['decode_ms_mean']:.2f} mean ({g['inner_steps']} inner steps) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
