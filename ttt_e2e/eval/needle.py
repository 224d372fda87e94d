"""Needle in a haystack: a key-value passkey planted at depth d of a long held-out text, asked for at the end.

    python -m ttt_e2e.eval.needle checkpoint=runs/e2e checkpoint=runs/fa label=e2e label=fa haystack=data/study/code_val \
        lengths=1024,2048,4096 depths=0.1,0.5,0.9 trials=8 out=needle.json

Each trial is one sequence of `length` tokens: BOS, the haystack (consecutive held-out tokens, a different stretch
per trial) with the needle "# The passkey of <key> is <value>. Remember it." inserted at `depth` of it, then the
question "# What is the passkey of <key>? The passkey of <key> is" and the answer " <value>." at the very end.
What is measured is the loss of the answer's tokens (nats per token; the model's sequence_loss, so a meta model
runs its inner loop over the whole sequence first, with the full inner lr, and answers with the weights it has
after its mini-batches, the last of which holds the question) and the hit rate: the share of trials in which
every answer token has probability > 1/2 (hence is the greedy choice). The control is the same sequence with
no needle: what the answer costs when it must be guessed.
"""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Optional

import torch

from ttt_e2e.data import DataError
from ttt_e2e.convert.load import load
from ttt_e2e.train.data import load_stream
from ttt_e2e.train.distributed import DistInfo, pick_device
from ttt_e2e.train.parallel import LossModule
from ttt_e2e.train.precision import autocast, param_dtype

_KEYS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lagoon", "meadow", "nickel", "orchid", "pebble", "quartz", "raven", "saffron", "tundra")


def needle_texts(key: str, value: str) -> tuple[str, str, str]:
    return (f"\n# The passkey of {key} is {value}. Remember it.\n",
            f"\n# What is the passkey of {key}? The passkey of {key} is", f" {value}.")


def build_trials(tokenizer, haystack, length: int, depth: float, trials: int, seed: int = 0,
                 with_needle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows (trials, length + 1), answer mask over the targets (trials, length)). Trial i takes its haystack
    from stretch i of `haystack` (a 1-D token array) and its key and 5-digit value from `seed` and i."""
    rng = random.Random(f"{seed}-{length}-{depth}")  # the same keys with and without the needle
    windows, masks = [], []
    for i in range(trials):
        key, value = rng.choice(_KEYS), f"{rng.randrange(10**4, 10**5)}"
        needle, query, answer = (tokenizer.encode(t) for t in needle_texts(key, value))
        n_hay = length - len(query) - len(answer) - (len(needle) if with_needle else 0)
        if n_hay < 1:
            raise DataError(f"needle length {length} is too short for the needle and the question")
        if (i + 1) * n_hay > len(haystack):
            raise DataError(f"the haystack has {len(haystack)} tokens, too few for {trials} trials of {length}")
        hay = [int(t) for t in haystack[i * n_hay:(i + 1) * n_hay]]
        at = round(depth * n_hay)
        seq = [tokenizer.bos_id] + hay[:at] + (needle if with_needle else []) + hay[at:] + query + answer
        windows.append(seq)
        mask = [False] * length
        mask[length - len(answer):] = [True] * len(answer)  # targets are seq[1:], the answer ends the sequence
        masks.append(mask)
    return torch.tensor(windows), torch.tensor(masks)


@torch.no_grad()
def answer_losses(loss_fn, windows: torch.Tensor, answer: torch.Tensor, device, amp, batch_size: int):
    """(mean answer loss per trial, hit per trial): loss_fn(inputs, targets, mask, ilr_mult) -> token_losses."""
    losses, hits = [], []
    for s in range(0, len(windows), batch_size):
        w, a = windows[s:s + batch_size].to(device), answer[s:s + batch_size].to(device)
        with amp():
            tok = loss_fn(w[:, :-1], w[:, 1:], torch.ones_like(a), 1.0)["token_losses"].float()
        for row, m in zip(tok, a):
            losses.append(row[m].mean().item())
            hits.append(bool((row[m] < math.log(2)).all()))
    return losses, hits


def evaluate_needle(path: str, haystack: str, lengths: list[int], depths: list[float], trials: int,
                    batch_size: int = 8, device: str = "auto", overrides: Optional[list[str]] = None) -> dict:
    info = DistInfo(0, 1, 0, pick_device(device, 0))
    loaded = load(path, [f"data.source={haystack}", *(overrides or [])])
    step_dir, cfg = loaded.path, loaded.config
    tokenizer, stream = load_stream(cfg, info)
    model = loaded.model.to(dtype=param_dtype(cfg.model), device=info.device)
    loss_fn = LossModule(model, cfg.ttt)
    amp = lambda: autocast(cfg.model, info.device)  # noqa: E731
    out = {"checkpoint": str(step_dir), "step": loaded.step, "train_mode": cfg.ttt.train_mode,
           "window": cfg.model.window, "mini_batch_size": cfg.ttt.mini_batch_size, "haystack": haystack,
           "lengths": lengths, "depths": depths, "trials": trials, "answer_loss": [], "hit_rate": [],
           "control_loss": [], "control_hit_rate": []}
    for length in lengths:
        if cfg.ttt.train_mode == "meta" and length % cfg.ttt.mini_batch_size:
            raise DataError(f"needle length {length} is not divisible by ttt.mini_batch_size="
                            f"{cfg.ttt.mini_batch_size}")
        row_loss, row_hit = [], []
        for depth in depths:
            losses, hits = answer_losses(loss_fn, *build_trials(tokenizer, stream, length, depth, trials),
                                         info.device, amp, batch_size)
            row_loss.append(sum(losses) / trials)
            row_hit.append(sum(hits) / trials)
        out["answer_loss"].append(row_loss)
        out["hit_rate"].append(row_hit)
        losses, hits = answer_losses(loss_fn, *build_trials(tokenizer, stream, length, 0.5, trials,
                                                            with_needle=False), info.device, amp, batch_size)
        out["control_loss"].append(sum(losses) / trials)
        out["control_hit_rate"].append(sum(hits) / trials)
    return out


_OPTIONS = {"out": "needle.json", "haystack": "", "lengths": "1024,2048,4096", "depths": "0.1,0.3,0.5,0.7,0.9",
            "trials": "8", "batch_size": "8", "device": "auto"}


def main(argv: list[str]) -> int:
    from ttt_e2e.config import ConfigError
    from ttt_e2e.convert.steps import CheckpointError

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    checkpoints, labels, opts, overrides = [], [], dict(_OPTIONS), []
    try:
        for arg in argv:
            key, sep, value = arg.partition("=")
            if not sep:
                raise ConfigError(f"arguments are key=value, got '{arg}'")
            if key in ("checkpoint", "label"):
                (checkpoints if key == "checkpoint" else labels).append(value)
            elif key in _OPTIONS:
                opts[key] = value
            else:
                overrides.append(arg)
        if not checkpoints or not opts["haystack"]:
            raise ConfigError("give checkpoint=<run dir or checkpoint> (repeatable) and haystack=<held-out text>")
        if labels and len(labels) != len(checkpoints):
            raise ConfigError(f"{len(labels)} label= for {len(checkpoints)} checkpoint=")
        results = []
        for i, c in enumerate(checkpoints):
            r = evaluate_needle(c, opts["haystack"], [int(x) for x in opts["lengths"].split(",")],
                                [float(x) for x in opts["depths"].split(",")], int(opts["trials"]),
                                int(opts["batch_size"]), opts["device"], overrides)
            r["label"] = labels[i] if labels else Path(c).name
            results.append(r)
            print(f"{r['label']}: answer loss by length (mean over depths) "
                  f"{[round(sum(x) / len(x), 3) for x in r['answer_loss']]}, control {r['control_loss']}", flush=True)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
    Path(opts["out"]).write_text(json.dumps({"checkpoints": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
