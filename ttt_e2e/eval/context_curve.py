"""The paper's loss-vs-context curve for trained checkpoints: held-out loss at each token position.

Each checkpoint is evaluated with the config it was trained with (its train_mode, so a meta model runs its inner
loop over every window, as at test time), on the head of its validation split; dotted overrides change that
config (e.g. data.source=... to evaluate on other text, model.seq_length=... for a longer context).
The losses are computed through `eval_path` (train/evaluate.py): by default the constant-memory one (stream_loss.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ttt_e2e.convert.load import load
from ttt_e2e.data import DataError, WindowDataset, split_stream
from ttt_e2e.train.data import load_stream
from ttt_e2e.train.distributed import DistInfo, pick_device
from ttt_e2e.train.evaluate import evaluate
from ttt_e2e.train.parallel import LossModule
from ttt_e2e.train.precision import autocast, param_dtype


def evaluate_checkpoint(path: str, overrides: Optional[list[str]] = None, windows: int = 16, batch_size: int = 4,
                        device: str = "auto", eval_path: str = "auto") -> dict:
    info = DistInfo(0, 1, 0, pick_device(device, 0))
    loaded = load(path, overrides or ())
    step_dir, cfg = loaded.path, loaded.config
    tokenizer, stream = load_stream(cfg, info)
    _, val_stream = split_stream(stream, cfg.data.val_fraction)
    if len(val_stream) == 0:
        raise DataError(f"checkpoint {step_dir} was trained with data.val_fraction=0: no held-out split; pass "
                        f"data.val_fraction=... (and data.source=... for text it did not train on)")
    val = WindowDataset(val_stream, cfg.model.seq_length, f"the validation split of '{cfg.data.source}'")
    model = loaded.model.to(dtype=param_dtype(cfg.model), device=info.device)
    r = evaluate(LossModule(model, cfg.ttt), val, tokenizer.bos_id, batch_size, windows,
                 cfg.ttt.eval_ilr_multiplier(loaded.step), info, lambda: autocast(cfg.model, info.device), eval_path)
    return {"checkpoint": str(step_dir), "step": loaded.step, "train_mode": cfg.ttt.train_mode,
            "eval_path": eval_path, "seq_length": cfg.model.seq_length, "window": cfg.model.window,
            "mini_batch_size": cfg.ttt.mini_batch_size, "data_source": cfg.data.source, "windows": r.windows,
            "tokens": r.tokens, "loss": r.loss, "loss_by_position": [_json_float(x) for x in r.loss_by_position]}


def _json_float(x: float):
    return None if math.isnan(x) else x


def binned(curve: list, bins: int) -> tuple[list[float], list[float]]:
    """(bin centers as 1-based positions, mean loss per bin), ignoring positions without a value."""
    n = len(curve)
    width = max(1, n // bins)
    xs, ys = [], []
    for start in range(0, n, width):
        vals = [v for v in curve[start:start + width] if v is not None]
        if vals:
            xs.append(start + (min(start + width, n) - start + 1) / 2)
            ys.append(sum(vals) / len(vals))
    return xs, ys


def plot_curves(results: list[dict], labels: list[str], png: Path, bins: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, label in zip(results, labels):
        xs, ys = binned(r["loss_by_position"], bins)
        ax.plot(xs, ys, label=f"{label} (mean {r['loss']:.3f})")
    ax.set_xlabel("token position in the context")
    ax.set_ylabel("held-out loss (nats/token, binned mean)")
    ax.set_title("Loss by context position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
