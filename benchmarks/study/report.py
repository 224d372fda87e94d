"""The study's report: summaries of results.json, the table (study.md) and the plots; also
`python -m benchmarks.study --render results.json --out DIR` alone."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from .runs import MAIN

COLORS = {"fa": "black", "swa": "tab:blue", "e2e": "tab:red", "tto": "tab:green"}
# the comparisons the study reports over the last quarter of the context, per seed pair: (a, b) is a - b, where
# "tto" is test-time-only TTT at its best inner lr on that corpus and "tto0" the same checkpoint without TTT
COMPARISONS = (("e2e", "swa"), ("fa", "swa"), ("e2e", "tto"), ("tto", "swa"), ("tto", "tto0"), ("e2e", "fa"))


def quarter_means(curve: list) -> list[Optional[float]]:
    n = len(curve)
    out = []
    for q in range(4):
        vals = [v for v in curve[q * n // 4:(q + 1) * n // 4] if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def last_quarter(result: Optional[dict]) -> Optional[float]:
    return quarter_means(result["loss_by_position"])[3] if result else None


def spread(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    return {"by_seed": xs, "mean": statistics.mean(xs) if xs else None,
            "spread": (max(xs) - min(xs)) if len(xs) > 1 else None}


def best_test_time_lr(runs: list[dict], kind: str, corpus: str = "code_val") -> Optional[float]:
    """The grid's inner lr with the lowest last-quarter loss on `corpus`, averaged over the kind's seeds."""
    means = {}
    for r in runs:
        if r["kind"] != kind or not r.get("test_time"):
            continue
        for lr, by_corpus in r["test_time"].items():
            if corpus in by_corpus:
                means.setdefault(float(lr), []).append(last_quarter(by_corpus[corpus]))
    means = {lr: statistics.mean(v) for lr, v in means.items()}
    return min(means, key=means.get) if means else None


def corpora(results: dict) -> list[str]:
    seen = []
    for r in results.get("runs", []):
        for c in r.get("eval") or {}:
            if c not in seen:
                seen.append(c)
    return seen


def curve_of(runs_by_name: dict, who: str, seed: int, corpus: str, best: dict) -> Optional[dict]:
    """The held-out curve of `who` (a kind, "tto" at its best lr on the corpus, "tto0" without TTT)."""
    if who in ("tto", "tto0"):
        r = runs_by_name.get(f"tto_s{seed}")
        if r is None:
            return None
        if who == "tto0":
            return (r.get("eval") or {}).get(corpus)
        lr = best.get(corpus)
        return None if lr is None else ((r.get("test_time") or {}).get(f"{lr:g}") or {}).get(corpus)
    r = runs_by_name.get(f"{who}_s{seed}")
    return None if r is None else (r.get("eval") or {}).get(corpus)


def smoothed(xs: list[float], k: int) -> list[float]:
    """Means of consecutive blocks of k (the last block may be shorter)."""
    return [statistics.mean(xs[i:i + k]) for i in range(0, len(xs), k)]


def training_gap(runs_by_name: dict, a: str, b: str, seeds: list[int], points: int = 40) -> dict:
    """a - b of the training loss over the last quarter of the context, by training tokens (both jobs see the
    same batches: same data seed), per seed, in about `points` blocks of steps."""
    out = {}
    for s in seeds:
        ra, rb = runs_by_name.get(f"{a}_s{s}"), runs_by_name.get(f"{b}_s{s}")
        if not (ra and rb and ra.get("train_last_quarter") and rb.get("train_last_quarter")):
            continue
        diffs = [x - y for x, y in zip(ra["train_last_quarter"], rb["train_last_quarter"])]
        k = max(1, len(diffs) // points)
        out[f"s{s}"] = {"tokens": [min(len(diffs), i + k) * ra["tokens_per_step"] for i in range(0, len(diffs), k)],
                        "gap": [round(g, 4) for g in smoothed(diffs, k)]}
    return out


def summarize(results: dict) -> dict:
    runs = results.get("runs", [])
    by_name = {r["name"]: r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r.get("per_seed")})
    corp = corpora(results)
    best = {c: best_test_time_lr(runs, "tto", c) for c in corp}
    s: dict = {"seeds": seeds, "corpora": corp, "test_time_best_lr": best, "methods": {}, "last_quarter": {},
               "comparisons": {}, "test_time_grid": {}, "training_gap": {}, "sweep": [], "spike_check": []}
    for kind in MAIN:
        rs = [by_name[f"{kind}_s{x}"] for x in seeds if f"{kind}_s{x}" in by_name]
        if rs:
            s["methods"][kind] = {k: [r.get(k) for r in rs] for k in
                                  ("steps", "tokens_per_s", "skipped_steps", "rollbacks", "inner_lr_last")}
    for who in [*(k for k in MAIN if k in s["methods"]), *(["tto0"] if "tto" in s["methods"] else [])]:
        s["last_quarter"][who] = {c: [last_quarter(curve_of(by_name, who, x, c, best)) for x in seeds] for c in corp}
    for a, b in COMPARISONS:
        if a in s["last_quarter"] and b in s["last_quarter"]:
            s["comparisons"][f"{a} - {b}"] = {
                c: spread([None if x is None or y is None else x - y
                           for x, y in zip(s["last_quarter"][a][c], s["last_quarter"][b][c])]) for c in corp}
    for r in runs:
        for lr, by_corpus in (r.get("test_time") or {}).items():
            row = s["test_time_grid"].setdefault(lr, {c: [] for c in corp})
            for c in corp:
                row[c].append(last_quarter(by_corpus.get(c)))
    for a, b in (("fa", "swa"), ("e2e", "swa"), ("tto", "swa")):
        gap = training_gap(by_name, a, b, seeds)
        if gap:
            s["training_gap"][f"{a} - {b}"] = gap
    for r in runs:
        if r["kind"] == "sweep" or r["kind"] == "e2e":
            s["sweep"].append({"name": r["name"], **{k: r.get(k) for k in ("inner_lr", "mini_batch_size", "steps",
                                                                           "skipped_steps", "rollbacks",
                                                                           "inner_lr_last")},
                               **{c: last_quarter((r.get("eval") or {}).get(c)) for c in corp}})
        if r["kind"] == "spikecheck":
            s["spike_check"].append({k: r.get(k) for k in ("name", "steps", "returncode", "killed", "skipped_steps",
                                                          "rollbacks", "inner_lr_last", "grad_norm_max",
                                                          "grad_norm_over_100", "train_loss_first",
                                                          "train_loss_last", "log_tail")})
    return s


def _fmt(xs, nd=3) -> str:
    xs = [x for x in (xs if isinstance(xs, list) else [xs]) if x is not None]
    return " / ".join(f"{x:.{nd}f}" if isinstance(x, float) else str(x) for x in xs) if xs else "n/a"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])


LABELS = {"fa": "fa", "swa": "swa", "e2e": "e2e", "tto": "tto: TTT at test time only (best inner lr)",
          "tto0": "tto without TTT (its training mode)"}


def needle_rows(results: dict) -> list[list]:
    """One row per evaluated run (keyed by name: a run appears once however often it is listed)."""
    rows = {}
    for r in results.get("runs", []):
        n = r.get("needle")
        if n and r["name"] not in rows:
            cells = [f"{statistics.mean(lo):.2f} / {statistics.mean(h):.2f}"
                     for lo, h in zip(n["answer_loss"], n["hit_rate"])]
            label = r["name"] + (f" (inner lr {n['inner_lr']:g})" if n.get("inner_lr") is not None else "")
            rows[r["name"]] = [label, *cells, _fmt(n["control_loss"], 2)]
    return list(rows.values())


def render_markdown(results: dict) -> str:
    s = results["summary"] = summarize(results)
    corp = s["corpora"]
    lines = [f"# Loss-vs-context study: results ({results.get('started', '')}, {results.get('device', '')}, "
             f"commit {results.get('commit')})", "",
             f"Steps per run: {results.get('steps')}, evaluated at step {results.get('evaluated_step')}. Values per seed ({', '.join(f's{x}' for x in s['seeds'])}), "
             f"separated by '/'. Loss in nats per token; last quarter: the last quarter of the context's positions.",
             ""]
    rows = []
    for who, lq in s["last_quarter"].items():
        m = s["methods"].get(who, {})
        rows.append([LABELS[who], _fmt(m.get("steps")), _fmt(m.get("tokens_per_s"), 0),
                     _fmt(m.get("skipped_steps")) + " / " + _fmt(m.get("rollbacks")) if m else "",
                     *(_fmt(lq[c]) for c in corp)])
    lines += _table(["method", "steps", "tokens/s (all jobs sharing the device)", "skipped / rollbacks",
                     *(f"{c} last quarter" for c in corp)], rows)
    lines += ["", "Differences over the last quarter, per seed pair (mean, spread = max - min); tto at its best "
                  "inner lr on each corpus (" + ", ".join(f"{c} {_fmt(lr, 2)}" for c, lr in
                                                        s["test_time_best_lr"].items()) + "):", ""]
    lines += _table(["difference", *corp],
                    [[k, *(f"{_fmt(d[c]['by_seed'], 4)} (mean {_fmt(d[c]['mean'], 4)}, spread "
                           f"{_fmt(d[c]['spread'], 4)})" for c in corp)] for k, d in s["comparisons"].items()])
    if s["test_time_grid"]:
        lines += ["", "Test-time-only TTT: the tto checkpoints evaluated with the inner loop on, last quarter by "
                      "inner lr:", ""]
        lines += _table(["inner lr", *corp], [[lr, *(_fmt(row[c]) for c in corp)]
                                              for lr, row in sorted(s["test_time_grid"].items(),
                                                                    key=lambda kv: float(kv[0]))])
    if s["training_gap"]:
        lines += ["", "Training loss over the last quarter of the context, a - b by training tokens (the same "
                      "batches for both; seeds separated by '/'):", ""]
        for k, by_seed in s["training_gap"].items():
            first = next(iter(by_seed.values()))
            picks = sorted({round(i * (len(first["gap"]) - 1) / 4) for i in range(5)})
            lines.append(f"- {k}: " + ", ".join(
                f"{first['tokens'][i] / 1e6:.3g}M tokens {_fmt([v['gap'][i] for v in by_seed.values()], 3)}"
                for i in picks))
    if s["sweep"] and any(r["name"].startswith("e2e_ilr") for r in s["sweep"]):
        lines += ["", "Sweep (Hydra multirun; inner lr 0 is the ablation) and the main e2e runs:", ""]
        lines += _table(["run", "inner lr", "b", "steps", "skipped", "rollbacks", "inner lr at the end",
                         *(f"{c} last quarter" for c in corp)],
                        [[j["name"], _fmt(j["inner_lr"]), _fmt(j["mini_batch_size"]), j["steps"], j["skipped_steps"],
                          j.get("rollbacks", 0), _fmt(j.get("inner_lr_last")), *(_fmt(j.get(c)) for c in corp)]
                         for j in s["sweep"]])
    if s["spike_check"]:
        lines += ["", "Spike check (issue 26's 128-inner-step run), one run per optim.spike_policy:", ""]
        lines += _table(["run", "steps", "exit", "skipped", "rollbacks", "inner lr at the end",
                         "norm > 100 or non-finite", "max finite norm", "train loss first -> last 5"],
                        [[c["name"], c["steps"], f"{c['returncode']}{' (killed)' if c['killed'] else ''}",
                          c["skipped_steps"], c.get("rollbacks", 0), _fmt(c.get("inner_lr_last")),
                          c["grad_norm_over_100"], _fmt(c["grad_norm_max"], 1),
                          f"{_fmt(c['train_loss_first'])} -> {_fmt(c['train_loss_last'])}"] for c in s["spike_check"]])
    needles = needle_rows(results)
    if needles:
        n0 = next(r["needle"] for r in results["runs"] if r.get("needle"))
        lines += ["", f"Needle in a haystack (code_val haystack, {n0['trials']} trials per cell): answer loss "
                      f"(nats/token, mean over depths {n0['depths']}) / hit rate, and the no-needle control:", ""]
        lines += _table(["run", *(f"length {n}" for n in n0["lengths"]), "control"], needles)
    return "\n".join(lines) + "\n"


def render(results: dict, out: Path) -> None:
    (out / "study.md").write_text(render_markdown(results))
    _plots(results, out)


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ttt_e2e.eval.context_curve import binned

    s = results["summary"]
    runs = results.get("runs", [])
    by_name = {r["name"]: r for r in runs}
    corp = s["corpora"]
    if corp:
        fig, axes = plt.subplots(2, len(corp), figsize=(5.5 * len(corp), 8), sharex="col", squeeze=False)
        for col, c in enumerate(corp):
            ref = [curve_of(by_name, "fa", x, c, s["test_time_best_lr"]) for x in s["seeds"]]
            ref = [r["loss_by_position"] for r in ref if r]
            ref = [statistics.mean(v) if all(x is not None for x in v) else None for v in zip(*ref)] if ref else None
            for who in s["last_quarter"]:
                for x in s["seeds"]:
                    curve = curve_of(by_name, who, x, c, s["test_time_best_lr"])
                    if not curve:
                        continue
                    style = dict(color=COLORS[who.rstrip("0")], lw=1.2, ls="--" if who == "tto0" else "-",
                                 alpha=1.0 if x == s["seeds"][0] else 0.5,
                                 label=f"{who if who != 'tto0' else 'tto, no TTT'} s{x}")
                    axes[0, col].plot(*binned(curve["loss_by_position"], 32), **style)
                    if ref is not None:
                        diff = [None if p is None or q is None else p - q for p, q in zip(curve["loss_by_position"], ref)]
                        axes[1, col].plot(*binned(diff, 32), **style)
            axes[0, col].set_title(f"held-out {c}: loss by position")
            axes[1, col].set_title(f"{c}: loss minus fa's (mean over seeds)")
            axes[1, col].axhline(0, color="black", lw=0.8)
            axes[1, col].set_xlabel("token position in the context")
            for ax in axes[:, col]:
                ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("loss (nats/token, binned)")
        axes[1, 0].set_ylabel("loss - fa loss")
        axes[0, -1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "loss_by_position.png", dpi=100)
        plt.close(fig)
    if s["training_gap"]:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for k, by_seed in s["training_gap"].items():
            for i, (seed, g) in enumerate(by_seed.items()):
                ax.plot([t / 1e6 for t in g["tokens"]], g["gap"], color=COLORS[k.split(" - ")[0]],
                        alpha=1.0 if i == 0 else 0.5, label=f"{k} ({seed})")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("training loss difference, last quarter of the context")
        ax.set_title("When does a method start using its context? (below 0: better than swa)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "training_gap.png", dpi=100)
        plt.close(fig)
    needle = [r for r in runs if r.get("needle") and r.get("per_seed")]
    if needle:
        n0 = needle[0]["needle"]
        fig, axes = plt.subplots(1, len(n0["lengths"]), figsize=(4 * len(n0["lengths"]), 3.5), sharey=True,
                                 squeeze=False)
        for i, length in enumerate(n0["lengths"]):
            ax = axes[0, i]
            for r in {r["name"]: r for r in needle}.values():
                ax.plot(r["needle"]["depths"], r["needle"]["answer_loss"][i], marker="o", color=COLORS[r["kind"]],
                        label=r["name"])
                ax.axhline(r["needle"]["control_loss"][i], color=COLORS[r["kind"]], ls=":", lw=0.8)
            ax.set_title(f"needle, context {length}")
            ax.set_xlabel("depth of the needle")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("answer loss (nats/token); dotted: no needle")
        axes[0, -1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "needle.png", dpi=100)
        plt.close(fig)
    checks = [r for r in runs if r["kind"] == "spikecheck" and r.get("loss_by_step")]
    if checks:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for r in checks:
            steps = range(1, len(r["loss_by_step"]) + 1)
            axes[0].plot(steps, r["loss_by_step"], label=r["name"])
            norms = [x if isinstance(x, float) and math.isfinite(x) else float("nan") for x in r["grad_norm_by_step"]]
            axes[1].semilogy(steps, norms, label=r["name"])
        axes[0].set_title("spike check: training loss by step")
        axes[1].set_title("spike check: outer gradient norm (before the clip)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "spike_check.png", dpi=100)
        plt.close(fig)
