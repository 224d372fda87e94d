"""The markdown table and bar chart of benchmarks/kernels/attention.py's rows (from its saved --json files or a
fresh run): per mode, ms / TFLOP/s / peak GiB of each provider on each shape."""
from __future__ import annotations

FLOPS_PER_PAIR = {"fwd": 4, "fwd_bwd": 14, "fwd_bwd_dbwd": 38}
MODES = list(FLOPS_PER_PAIR)
PROVIDERS = ["triton", "sdpa_flash", "sdpa_cudnn", "flex", "materialized"]


def report(rows, meta, plot_path=None):
    lines = []
    keyed = {(r["heads"], r["shape"], r["provider"], r["mode"]): r for r in rows}
    heads = list(dict.fromkeys(r["heads"] for r in rows))
    rows_by_heads = {r["heads"]: (r["H"], r["D"]) for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    for mode in MODES:
        lines.append(f"\n**{mode}** — ms (median) / TFLOP/s ({FLOPS_PER_PAIR[mode]} FLOPs per unmasked pair per head "
                     f"dim per head) / peak GiB over inputs\n")
        lines.append("| heads | shape | " + " | ".join(provs) + " |")
        lines.append("|---|---|" + "---|" * len(provs))
        for h in heads:
            for s in shapes:
                cells = []
                for p in provs:
                    r = keyed.get((h, s, p, mode))
                    if r is None:
                        cells.append("")
                    elif "error" in r:
                        cells.append(r["error"].replace("|", "/")[:60])
                    else:
                        cells.append(f"{r['ms']:.3f} / {r['tflops']:.0f} / {(r['peak_bytes'] or 0) / 2**30:.2f}")
                H, D = rows_by_heads[h]
                lines.append(f"| {h} {H}x{D} | {s} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    if plot_path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(len(heads), len(MODES), figsize=(6 * len(MODES), 3.6 * len(heads)), squeeze=False)
        for i, h in enumerate(heads):
            for j, mode in enumerate(MODES):
                ax = axes[i][j]
                width = 0.8 / len(provs)
                for pi, p in enumerate(provs):
                    vals = [keyed.get((h, s, p, mode), {}).get("tflops", 0.0) for s in shapes]
                    ax.bar([x + pi * width for x in range(len(shapes))], vals, width, label=p)
                ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
                ax.set_xticklabels(shapes, fontsize=7)
                ax.set_title(f"{h} {mode}", fontsize=9)
                ax.set_ylabel(f"TFLOP/s ({FLOPS_PER_PAIR[mode]}/pair/dim)", fontsize=8)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle(f"SWA attention, bf16, {meta.get('device', '?')}, {meta.get('date', '?')} "
                     "(missing bar = unsupported/failed)", fontsize=10)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
    return md
