"""Two source trees of this project timed in one call, alternating: did a change cost speed?

    git archive 78f8db3 --prefix=.base/ | tar x          # the tree before the change
    python -m benchmarks.train.versions .base . --labels base new --out versions_out

Each tree runs in its own subprocess (two versions of the package cannot share one process), with PYTHONPATH
at that tree; a bare tree (no `ttt_e2e/kernels` link to its top-level `kernels/`) gets the folder mounted as the
subpackage at import, so nothing is written into it. Processes alternate A B B A (--rounds 2), so that a drift
of the machine (clock, temperature) falls on both trees alike. Each process measures, on one GPU:
  step  125M and 1B: the `fa` pretrain step (cuDNN full attention) and the `e2e` meta step (T = 8192, b = 1024,
        W = 8192, every activation kept, as RESULTS.md's figures), bf16 autocast, fp32 AdamW, each captured whole
        as a CUDA graph and replayed (benchmarks/train/meta_step.py --graph's path): ms per step, median of --steps
        replays (CUDA events);
  prefill  the 3B TTT prefill of a 128K prompt with CUDA graphs (benchmarks/inference/latency.py's path): seconds,
        median of --prefill-reps runs after a warm-up prompt that captures every graph.
Reported per (target, tree): the median over processes of each process's median, and the spread: the range of
the per-process medians and the largest in-process relative spread (max - min over median of the repeats).
The last lines are a table; --out gets versions.json with every repeat. About 5-6 minutes on an H100.

    python -m benchmarks.train.versions .base . --tiny --device cpu     # every code path at toy sizes, CPU
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["125m fa", "125m e2e", "1b fa", "1b e2e", "3b prefill 128K"]


# ---------------------------------------------------------------------------------------------- worker side


def _timing():
    """This checkout's benchmarks/core/timing.py, loaded by path: the worker imports the package of the tree it
    times, but both trees are timed by the same code."""
    path = Path(__file__).resolve().parents[1] / "core" / "timing.py"
    spec = importlib.util.spec_from_file_location("_benchmark_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_tree(tree: Path):
    """Import ttt_e2e from `tree` (first on sys.path through PYTHONPATH) with its kernels/ as ttt_e2e.kernels."""
    import ttt_e2e

    if not (tree / "ttt_e2e" / "kernels").exists():  # a bare tree: mount kernels/ as the subpackage
        spec = importlib.util.spec_from_file_location("ttt_e2e.kernels", tree / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(tree / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["ttt_e2e.kernels"] = module
        spec.loader.exec_module(module)
        ttt_e2e.kernels = module
    import ttt_e2e.kernels

    for mod in (ttt_e2e, ttt_e2e.kernels):
        if not Path(mod.__file__).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"{mod.__name__} imported from {mod.__file__}, not from {tree}")


def _step_ms(size: str, mode: str, device: str, steps: int, tiny: bool) -> list[float]:
    """ms of each replayed training step (forward, backward, clip, AdamW), the trainer's step."""
    import torch

    from ttt_e2e.config import ModelConfig, TTTConfig
    from ttt_e2e.model.sizes import paper_config
    from ttt_e2e.model.transformer import Transformer
    from ttt_e2e.ttt.meta import sequence_loss

    if tiny:
        T, b = 64, 16
        mcfg = ModelConfig(vocab_size=258, n_layers=3, d_model=32, n_heads=2, mlp_width=48, suffix_len=1,
                           seq_length=T, window=None if mode == "fa" else 32, prime_mlp=mode == "e2e")
    else:
        T, b = 8192, 1024
        mcfg = (paper_config(size, "fa", T, attention_backend="sdpa") if mode == "fa"
                else paper_config(size, "e2e", T, window=8192))
    tcfg = (TTTConfig(train_mode="pretrain", mini_batch_size=T) if mode == "fa"
            else TTTConfig(train_mode="meta", mini_batch_size=b, ilr_init=1.0, remat_inner=False))
    torch.manual_seed(0)
    model = Transformer(mcfg, tcfg).to(device)
    cuda = device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda,
                            capturable=cuda)
    ids = torch.randint(0, mcfg.vocab_size, (1, T + 1), device=device)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    def step():
        with autocast:
            loss = sequence_loss(model, x, y, None, tcfg).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    timing = _timing()
    if not cuda:  # no graphs off CUDA: the eager step on the wall clock (the code path, not a figure)
        def eager():
            opt.zero_grad(set_to_none=True)
            step()

        return timing.host_ms(eager, steps, warmup=1)
    side = torch.cuda.Stream()  # warm-up on a side stream (kernels compiled, optimizer state made), then capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    opt.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients at every replay
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = timing.cuda_ms(graph.replay, steps, warmup=2)
    del graph, model, opt
    torch.cuda.empty_cache()
    return times


def _prefill_s(device: str, reps: int, tiny: bool) -> list[float]:
    """Seconds of each TTT prefill of the prompt (3B, 128K, CUDA graphs; tiny: a toy model, 256 tokens)."""
    import torch

    from ttt_e2e.config import ModelConfig, TTTConfig
    from ttt_e2e.inference import InferenceGraphs, feed, start
    from ttt_e2e.model.sizes import paper_config
    from ttt_e2e.model.transformer import Transformer

    if tiny:
        cfg = ModelConfig(vocab_size=258, n_layers=4, d_model=64, n_heads=4, mlp_width=160, suffix_len=2,
                          seq_length=256, window=64, attention_backend="torch")
        n, warm, b, chunk, dtype = 256, 256, 16, 128, torch.float32
    else:
        cfg = paper_config("3b", "e2e")
        n, warm, b, chunk, dtype = 128 * 1024, 32 * 1024, 1024, None, torch.bfloat16
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    ttt = TTTConfig(train_mode="meta", mini_batch_size=b)
    graphs = InferenceGraphs(capture=device == "cuda")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def prefill(length: int) -> float:
        prompt = torch.randint(0, cfg.vocab_size, (1, length), device=device)
        state = start(model, ttt, 1, prefill_chunk=chunk, graphs=graphs)
        sync()
        t0 = time.perf_counter()
        feed(state, prompt)
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        prefill(warm)  # past 3 W: compiles the kernels and captures every inner-step graph
        return [prefill(n) for _ in range(reps)]


def worker(args) -> None:
    tree = Path(args.tree)
    _import_tree(tree)
    import torch

    device = args.device
    res = {"tree": str(tree), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "times": {}}
    for target in args.targets:
        try:
            if target.endswith("prefill 128K"):
                res["times"][target] = {"unit": "s", "runs": _prefill_s(device, args.prefill_reps, args.tiny)}
            else:
                size, mode = target.split()
                res["times"][target] = {"unit": "ms", "runs": _step_ms(size, mode, device, args.steps, args.tiny)}
        except Exception as e:  # noqa: BLE001 -- one failed target is a result to report, not the end of the run
            res["times"][target] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"[{tree}] {target}: {res['times'][target]}", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------- driver side


def _spread(runs: list[float]) -> float:
    return (max(runs) - min(runs)) / statistics.median(runs)


def summarize(procs: dict[str, list[dict]], labels: list[str]) -> dict:
    out = {}
    for target in TARGETS:
        row = {}
        for label in labels:
            meds, inner, errors, unit = [], [], [], None
            for p in procs[label]:
                t = p["times"].get(target)
                if t is None:
                    continue
                if "error" in t:
                    errors.append(t["error"])
                    continue
                unit = t["unit"]
                meds.append(statistics.median(t["runs"]))
                inner.append(_spread(t["runs"]))
            if meds:
                row[label] = dict(unit=unit, median=statistics.median(meds), process_medians=meds,
                                  between_processes=(max(meds) - min(meds)) / statistics.median(meds),
                                  within_process=max(inner))
            elif errors:
                row[label] = dict(error=errors[0])
        if row:
            out[target] = row
    return out


def table(summary: dict, labels: list[str]) -> str:
    a, b = labels
    lines = [f"| target | {a} | {b} | {b} / {a} | spread between processes ({a}; {b}) | within a process |",
             "|---|---|---|---|---|---|"]
    for target, row in summary.items():
        cells = []
        for label in labels:
            r = row.get(label, {})
            cells.append(r["error"][:60] if "error" in r else
                         f"{r['median']:.4g} {r['unit']}" if r else "-")
        ok = all("median" in row.get(l, {}) for l in labels)
        ratio = f"{row[b]['median'] / row[a]['median']:.3f}" if ok else "-"
        between = "; ".join(f"{100 * row[l]['between_processes']:.1f}%" for l in labels) if ok else "-"
        within = f"{100 * max(row[l]['within_process'] for l in labels):.1f}%" if ok else "-"
        lines.append(f"| {target} | {cells[0]} | {cells[1]} | {ratio} | {between} | {within} |")
    return "\n".join(lines)


def driver(args) -> None:
    trees = [Path(t).resolve() for t in args.trees]
    for t in trees:
        if not (t / "ttt_e2e" / "__init__.py").exists() or not (t / "kernels").is_dir():
            sys.exit(f"{t} is not a source tree of this project (no ttt_e2e/__init__.py or kernels/)")
    labels = args.labels or [t.name or str(t) for t in trees]
    order = []
    for r in range(args.rounds):  # A B B A A B ...
        order += [0, 1] if r % 2 == 0 else [1, 0]
    procs: dict[str, list[dict]] = {label: [] for label in labels}
    t_start, longest = time.time(), 0.0
    for i in order:
        if args.budget_s and time.time() - t_start + longest > args.budget_s:
            print(f"skipping the remaining processes: {args.budget_s} s budget", file=sys.stderr)
            break
        env = dict(os.environ, PYTHONPATH=str(trees[i]))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(trees[i]),
               "--device", args.device, "--steps", str(args.steps), "--prefill-reps", str(args.prefill_reps),
               "--targets", *args.targets] + ["--tiny"] * args.tiny
        t0 = time.time()
        # cwd outside both trees: the worker must import the tree of PYTHONPATH, not the current directory's
        proc = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
        longest = max(longest, time.time() - t0)
        sys.stderr.write(proc.stderr[-3000:])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{labels[i]}: the worker failed (exit {proc.returncode})", file=sys.stderr)
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        res["wall_s"] = time.time() - t0
        procs[labels[i]].append(res)
    summary = summarize(procs, labels)
    device = next((p["device"] for ps in procs.values() for p in ps), "?")
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device, trees=[str(t) for t in trees], labels=labels,
                steps=args.steps, prefill_reps=args.prefill_reps, order=[labels[i] for i in order],
                wall_s=time.time() - t_start)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        from benchmarks.core.records import write_json  # the driver's side: this checkout's package

        write_json(Path(args.out, "versions.json"), dict(meta=meta, summary=summary, processes=procs),
                   device=args.device)
    print(f"\n{device}, {meta['date']}, {len(order)} processes in {meta['wall_s']:.0f} s "
          f"(order {' '.join(meta['order'])}); step: ms per CUDA-graph replay (median of {args.steps}), prefill: "
          f"s per 128K prompt (median of {args.prefill_reps}); the median over processes of their medians")
    print(table(summary, labels))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="*", help="two source trees: before, after")
    p.add_argument("--labels", nargs=2)
    p.add_argument("--rounds", type=int, default=2, help="each round runs one process per tree (order alternates)")
    p.add_argument("--steps", type=int, default=10, help="timed replays per training step")
    p.add_argument("--prefill-reps", type=int, default=3, help="timed 128K prefills per process")
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU smoke test of every code path)")
    p.add_argument("--budget-s", type=float, default=340, help="start no process that may end past this")
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if len(args.trees) != 2:
        p.error("give two source trees (before, after)")
    driver(args)


if __name__ == "__main__":
    main()
