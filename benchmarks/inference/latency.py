"""Inference latency vs context: TTT-E2E against full attention (SDPA cuDNN / FlashAttention-2) and SWA.

The 3B configuration of docs/METHOD.md section 5 with random weights in bf16 (TTT-E2E: MLP width 5632, suffix of 8
blocks with MLP'; baselines: width 6912, no MLP'), batch 1, W = 8192, b = 1024. Per method and context:
  prefill   the whole prompt through `ttt_e2e.inference.feed` (TTT: the inner loop with its steps; prefix chunks
            of 8192 tokens; FA: one causal SDPA pass over the prompt, the KV cache kept for decoding);
  decode    `--decode` tokens one by one after that prompt (default b = 1024: exactly one TTT step inside,
            so the mean is the cost per token averaged over a b-token period).
Times are wall clock around CUDA-synchronized calls. A context that does not fit is recorded as such.
By default inference replays CUDA graphs (ttt_e2e/inference/graphs.py: every TTT inner step, every decoded
token; one InferenceGraphs per method, kept across prompts as a server would, captured during a warm-up prompt
long enough to reach every graph); --no-graphs runs everything eagerly.

Extrapolation to 2M (method printed with the results): prefill time T(n) fitted by least squares,
FA: T = a n + c n^2 (attention is quadratic), TTT/SWA: T = a n (constant cost per token); decode time per token
FA: a + c n (reads the whole KV cache), TTT/SWA: the mean over contexts.

  python -m benchmarks.inference.latency --out benchmarks/latency.json --plot benchmarks/latency.png --write-results
  python -m benchmarks.inference.latency --methods fa-cudnn fa-flash --out fa.json      # in parts (each < 10 min) ...
  python -m benchmarks.inference.latency --methods ttt swa --merge fa.json --write-results   # ... summarized together
  python -m benchmarks.inference.latency --tiny          # CPU smoke test at toy sizes, a few seconds

No hydra/omegaconf/wandb/datasets here: the GPU machine has none of them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
import time
from pathlib import Path

import torch

from ttt_e2e.config import ModelConfig, TTTConfig
from ttt_e2e.inference import InferenceGraphs, check_memory, feed, start
from ttt_e2e.model.sizes import paper_config

from benchmarks.core.models import build as core_build, tiny_config
from benchmarks.core.env import describe, environment
from benchmarks.core.records import write_json

K = 1024
CONTEXTS = [8 * K, 32 * K, 128 * K, 512 * K, 1024 * K]
METHODS = ["ttt", "swa", "fa-cudnn", "fa-flash"]
TARGETS = {"prefill_speedup_128k": 2.7, "prefill_flatness": 1.15, "decode_vs_swa": 1.3}


def model_config(method: str, tiny: bool) -> ModelConfig:
    variant = "e2e" if method == "ttt" else "swa" if method == "swa" else "fa"
    return tiny_config(variant) if tiny else paper_config("3b", variant)


def build(method: str, tiny: bool, device: str, dtype: torch.dtype):
    # allocate and init the weights in bf16 on the GPU directly: 3B in seconds
    model = core_build(model_config(method, tiny), device=device, dtype=dtype, seed=None).eval()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=16 if tiny else 1024) if method == "ttt" else None
    return model, ttt


def sdpa_backend(method: str, device: str):
    """FA baselines pin SDPA's backend for the prefill; on the CPU there is only the math one. Decoding in a
    CUDA graph attends over the whole preallocated buffer with a mask of the written slots, which the FA2 kernel
    does not take: SDPA's memory-efficient kernel is allowed after the named one, as the fallback."""
    if device != "cuda" or not method.startswith("fa"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    first = SDPBackend.CUDNN_ATTENTION if method == "fa-cudnn" else SDPBackend.FLASH_ATTENTION
    return sdpa_kernel([first, SDPBackend.EFFICIENT_ATTENTION], set_priority=True)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(model, ttt, method, n, n_decode, device, chunk, graphs=None):
    """Prefill n random tokens, then decode n_decode; returns seconds (prefill, [per decode token])."""
    vocab = model.cfg.vocab_size
    prompt = torch.randint(0, vocab, (1, n), device=device)
    fa = method.startswith("fa")
    # FA prefill is one causal SDPA pass (the cuDNN / FA2 kernels), so its chunk is the whole prompt.
    state = start(model, ttt, 1, prefill_chunk=n if fa else chunk, reserve=n + n_decode if fa else 0, graphs=graphs)
    elem = 2 if device == "cuda" else 4
    check_memory(model, ttt, 1, n + n_decode, state.chunk, elem)
    sync(device)
    t0 = time.perf_counter()
    logits = feed(state, prompt)
    sync(device)
    prefill = time.perf_counter() - t0
    decode = []
    for _ in range(n_decode):
        tok = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = feed(state, tok)
        sync(device)
        decode.append(time.perf_counter() - t0)
    return prefill, decode


def measure(args, device, dtype):
    results = []
    for method in args.methods:
        model, ttt = build(method, args.tiny, device, dtype)
        n_decode = args.decode or (ttt.mini_batch_size if ttt else (16 if args.tiny else 1024))
        if method.startswith("fa"):
            n_decode = min(n_decode, 8 if args.tiny else 256)  # its per-token cost is ~flat over this range
        graphs = None if args.no_graphs else InferenceGraphs(capture=device == "cuda")
        with sdpa_backend(method, device), torch.no_grad():
            # Warm-up: compiles the kernels and captures the graphs (TTT: past 2 W, so every step graph exists).
            warm = max(args.contexts[0], 3 * model.cfg.window + 1) if ttt else args.contexts[0]
            run_one(model, ttt, method, warm, min(n_decode, 8), device, args.chunk, graphs)
            for n in args.contexts:
                row = {"method": method, "context": n}
                try:
                    # Short prompts (a quarter second at 8K) vary by up to a third from run to run (host-side:
                    # the eager prefix chunk and last mini-batch): there, one run with decoding and more
                    # prefill-only runs; the median and the fastest are both kept (the flatness target divides
                    # by the shortest context's time)
                    prefill, decode = run_one(model, ttt, method, n, n_decode, device, args.chunk, graphs)
                    extra = (args.short_reps if n <= 32 * K else args.long_reps) - 1
                    runs = sorted([prefill] + [run_one(model, ttt, method, n, 0, device, args.chunk, graphs)[0]
                                               for _ in range(extra)])
                    prefill = runs[len(runs) // 2]
                    row.update(prefill_s=prefill, prefill_per_token_us=1e6 * prefill / n,
                               prefill_min_per_token_us=1e6 * runs[0] / n, prefill_runs_s=runs,
                               decode_ms=1e3 * sum(decode) / len(decode), decode_max_ms=1e3 * max(decode),
                               decode_tokens=len(decode))
                except (MemoryError, torch.OutOfMemoryError) as e:
                    row["error"] = f"does not fit: {str(e).splitlines()[0][:160]}"
                results.append(row)
                print(json.dumps(row), flush=True)
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                if "error" in row:
                    break  # longer contexts will not fit either
        del model, graphs
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def _lstsq(cols, y):
    """Least squares with non-negative coefficients (costs cannot be negative; noise can make a free fit so):
    the free fit if it is non-negative, else the better single-term fit."""
    Y = torch.tensor(y, dtype=torch.float64)[:, None]

    def fit(idx):
        A = torch.tensor([cols[i] for i in idx], dtype=torch.float64).T
        x = torch.linalg.lstsq(A, Y).solution
        coef = [0.0] * len(cols)
        for i, c in zip(idx, x.flatten().tolist()):
            coef[i] = c
        return coef, float((A @ x - Y).pow(2).sum())

    coef, _ = fit(range(len(cols)))
    if min(coef) >= 0 or len(cols) == 1:
        return coef
    return min((fit([i]) for i in range(len(cols))), key=lambda f: f[1])[0]


def extrapolate(rows, method, n_target):
    """(prefill s, decode ms per token) at n_target: measured if there, else from the fits in the module doc."""
    ok = [r for r in rows if r["method"] == method and "error" not in r]
    if not ok:
        return None, None
    hit = [r for r in ok if r["context"] == n_target]
    if hit:
        return hit[0]["prefill_s"], hit[0]["decode_ms"]
    n = [float(r["context"]) for r in ok]
    if method.startswith("fa") and len(ok) >= 2:
        a, c = _lstsq([n, [x * x for x in n]], [r["prefill_s"] for r in ok])
        da, dc = _lstsq([[1.0] * len(n), n], [r["decode_ms"] for r in ok])
        return a * n_target + c * n_target ** 2, da + dc * n_target
    (a,) = _lstsq([n], [r["prefill_s"] for r in ok])
    return a * n_target, sum(r["decode_ms"] for r in ok) / len(ok)


def summarize(rows, big: int, mid: int) -> dict:
    s = {}
    fa = [m for m in ("fa-cudnn", "fa-flash") if any(r["method"] == m and "error" not in r for r in rows)]
    for label, n in (("128k" if mid == 128 * K else str(mid), mid), ("2M" if big == 2048 * K else str(big), big)):
        ttt_p, ttt_d = extrapolate(rows, "ttt", n)
        swa_p, swa_d = extrapolate(rows, "swa", n)
        for m in fa:
            fa_p, fa_d = extrapolate(rows, m, n)
            if ttt_p and fa_p:
                s[f"prefill_speedup_vs_{m}_{label}"] = fa_p / ttt_p
                s[f"decode_speedup_vs_{m}_{label}"] = fa_d / ttt_d
        if ttt_p and swa_p:
            s[f"prefill_ttt_over_swa_{label}"] = ttt_p / swa_p
    ttt = [r for r in rows if r["method"] == "ttt" and "error" not in r]
    if ttt:
        per = [r["prefill_per_token_us"] for r in ttt]
        s["prefill_flatness_ttt"] = max(per) / min(per)
        if all("prefill_min_per_token_us" in r for r in ttt):  # the same from each context's fastest prefill
            fast = [r["prefill_min_per_token_us"] for r in ttt]
            s["prefill_flatness_ttt_fastest"] = max(fast) / min(fast)
        swa = {r["context"]: r["decode_ms"] for r in rows if r["method"] == "swa" and "error" not in r}
        both = [(r["decode_ms"], swa[r["context"]]) for r in ttt if r["context"] in swa]
        if both:
            s["decode_ttt_over_swa"] = sum(a for a, _ in both) / sum(b for _, b in both)
    return s


def markdown(rows, summary, meta) -> str:
    lines = [f"Measured on {describe(meta)}: `{meta['command']}`. "
             f"3B config (docs/METHOD.md section 5), random weights, bf16, batch 1, W = 8192, b = 1024. "
             + ("CUDA graphs for every TTT inner step and decoded token (captured during a warm-up prompt; a new "
                "prompt's first token captures its decoding graph anew, counted in its decode mean and max). "
                if meta.get("graphs") else "Eager (no CUDA graphs). ") +
             "Wall clock of CUDA-synchronized calls. Decode = mean per token over the tokens after the prompt "
             "(TTT: one b-token period, its TTT step included; `max` is the slowest token, the one with the step).",
             "", "| method | context | prefill (s) | prefill us/token | decode ms/token | decode max ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['context']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['method']} | {r['context']} | {r['prefill_s']:.3f} | "
                         f"{r['prefill_per_token_us']:.2f} | {r['decode_ms']:.2f} | {r['decode_max_ms']:.2f} |")
    lines += ["", "Ratios (values at 2M are extrapolated where not measured: prefill time fitted as a n + c n^2 "
              "for FA and a n for TTT/SWA, least squares over the measured contexts; FA decode per token fitted "
              "as a + c n, TTT/SWA decode the mean over contexts):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in summary.items()]
    t = TARGETS
    checks = [("prefill_speedup_vs_fa-cudnn_128k", ">=", t["prefill_speedup_128k"]),
              ("prefill_speedup_vs_fa-flash_128k", ">=", t["prefill_speedup_128k"]),
              ("prefill_flatness_ttt", "<=", t["prefill_flatness"]), ("decode_ttt_over_swa", "<=", t["decode_vs_swa"])]
    lines += ["", "Targets: " + "; ".join(
        f"{k} {op} {v}: {'met' if (summary[k] >= v if op == '>=' else summary[k] <= v) else 'NOT met'} "
        f"({summary[k]:.2f})" for k, op, v in checks if k in summary)]
    if meta.get("plot"):
        lines += ["", f"![latency vs context]({meta['plot']})"]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m in sorted({r["method"] for r in rows}):
        ok = [r for r in rows if r["method"] == m and "error" not in r]
        n = [r["context"] for r in ok]
        a.plot(n, [r["prefill_per_token_us"] for r in ok], "o-", label=m)
        b.plot(n, [r["decode_ms"] for r in ok], "o-", label=m)
    for ax, title in ((a, "prefill time per token (us)"), (b, "decode time per token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


def write_results(text: str, path: Path):
    """Replace (or append) the `## Inference latency` section of RESULTS.md, leaving the others alone."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    section = "## Inference latency\n\n" + text
    pattern = re.compile(r"^## Inference latency\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: section + "\n", old, count=1) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + section
    path.write_text(new)
    print(f"updated {path} (## Inference latency)", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--contexts", nargs="+", type=int, help="prompt lengths (default 8K..1M; tiny: 256..2048)")
    p.add_argument("--decode", type=int, help="decode tokens per run (default: b for TTT/SWA, 256 for FA)")
    p.add_argument("--chunk", type=int, help="prefill prefix chunk (default 8192; tiny 128)")
    p.add_argument("--out", help="JSON with every row and the summary")
    p.add_argument("--plot", help="PNG of latency vs context")
    p.add_argument("--merge", nargs="*", default=[], help="JSON files of earlier runs whose other methods to add")
    p.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md (GPU runs only)")
    p.add_argument("--no-graphs", action="store_true", help="eager inference, no CUDA graphs")
    p.add_argument("--short-reps", type=int, default=15,
                   help="prefills of each context up to 32K (one of them with decoding), median and fastest kept")
    p.add_argument("--long-reps", type=int, default=1, help="the same for the contexts above 32K")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        sys.exit("no GPU: the 3B benchmark needs one (use --tiny for a CPU smoke test)")
    args.contexts = args.contexts or ([128, 256, 512] if args.tiny else CONTEXTS)
    args.chunk = args.chunk or (64 if args.tiny else 8192)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = measure(args, device, dtype)
    for path in args.merge:  # rows of methods not measured now, from earlier parts of the same benchmark
        rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["method"] not in args.methods] + rows
    mid, big = (256, 4096) if args.tiny else (128 * K, 2048 * K)
    summary = summarize(rows, big, mid)
    env = environment(device)
    meta = {"plot": args.plot, "graphs": not args.no_graphs,
            "command": "python -m benchmarks.inference.latency " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = markdown(rows, summary, {**env, **meta})
    print(text)
    if args.out:
        write_json(args.out, {"meta": meta, "rows": rows, "summary": summary}, env)
    if args.plot:
        plot(rows, args.plot)
    if args.write_results:
        if device != "cuda":
            sys.exit("--write-results: RESULTS.md only takes GPU measurements")
        write_results(text, Path(__file__).parents[1] / "RESULTS.md")


if __name__ == "__main__":
    main()
