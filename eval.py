"""Held-out loss by token position (the paper's loss-vs-context curve) for one or more checkpoints.

    python eval.py checkpoint=outputs/2026-01-01/12-00-00                  # a run dir: its latest checkpoint
    python eval.py checkpoint=runs/e2e/checkpoints/step_00004800 checkpoint=runs/fa label=e2e label=fa
    python eval.py checkpoint=runs/e2e windows=64 batch_size=8 out=eval_out data.source=/data/books \
        model.seq_length=32768                                              # dotted overrides of the saved config

Each checkpoint is evaluated with the config saved in it (train_mode, model, data; its validation split), on
the first `windows` windows of that split. Writes <out>/eval.json (per checkpoint: mean loss, loss at every
position, ...) and <out>/loss_by_position.png (all checkpoints on one plot). out defaults to eval_out/.
Options: checkpoint= (repeatable), label= (repeatable, same order), out=, windows= (16), batch_size= (4),
device= (auto|cpu|cuda), bins= (64, plot only), path= (auto|engine|training); any other key=value overrides the
saved config.

path: engine (what auto takes) computes every window's per-token losses in memory constant in its length: a meta
model through the inference engine's prefill, each inner step a replayed CUDA graph on a GPU; a pretrain model
in one no-grad pass with the logits formed in chunks. training runs the training-mode loss eagerly under no_grad
(the same numbers; slower, memory growing with the window): for comparison.
Exit status 2 with a one-line error for a bad checkpoint, config or data.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from ttt_e2e.config import ConfigError
from ttt_e2e.data import DataError
from ttt_e2e.eval.context_curve import evaluate_checkpoint, plot_curves
from ttt_e2e.convert.steps import CheckpointError

_OPTIONS = {"out": "eval_out", "windows": "16", "batch_size": "4", "device": "auto", "bins": "64", "path": "auto"}


def parse(argv: list[str]) -> tuple[list[str], list[str], dict, list[str]]:
    checkpoints, labels, opts, overrides = [], [], dict(_OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments are key=value, got '{arg}' (see python eval.py --help)")
        if key == "checkpoint":
            checkpoints.append(value)
        elif key == "label":
            labels.append(value)
        elif key in _OPTIONS:
            opts[key] = value
        else:
            overrides.append(arg)
    if not checkpoints:
        raise ConfigError("give at least one checkpoint=<step dir, checkpoints dir or run dir>")
    if labels and len(labels) != len(checkpoints):
        raise ConfigError(f"{len(labels)} label= for {len(checkpoints)} checkpoint=; give one per checkpoint or none")
    return checkpoints, labels or [Path(c).resolve().name for c in checkpoints], opts, overrides


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        checkpoints, labels, opts, overrides = parse(argv)
        results = [evaluate_checkpoint(c, overrides, int(opts["windows"]), int(opts["batch_size"]), opts["device"],
                                       opts["path"])
                   for c in checkpoints]
    except (ConfigError, DataError, CheckpointError, OmegaConfBaseException, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    for r, label in zip(results, labels):
        r["label"] = label
    (out / "eval.json").write_text(json.dumps({"checkpoints": results}, indent=1))
    plot_curves(results, labels, out / "loss_by_position.png", int(opts["bins"]))
    for r in results:
        print(f"{r['label']}: step {r['step']} {r['train_mode']} loss {r['loss']:.4f} over {r['tokens']} tokens "
              f"({r['windows']} windows of {r['seq_length']})")
    print(f"wrote {out / 'eval.json'} and {out / 'loss_by_position.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
