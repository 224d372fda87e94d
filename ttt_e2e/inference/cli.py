"""Command line: python generate.py (or python -m ttt_e2e.inference) --checkpoint RUN_DIR --prompt-file p.txt

    --checkpoint PATH    a run dir, its checkpoints dir, one step dir, a save_pretrained dir or a Hub repo id
                         (ttt_e2e/convert/load.py); model, TTT settings and tokenizer come from the config saved
                         with it
    --random-init        no checkpoint: random weights, from ModelConfig defaults plus --model key=value ...
    --no-ttt             decode without test-time training (the baseline; also what train_mode pretrain gives)

The prompt is read from --prompt, --prompt-file, or stdin (--prompt-file -). It is tokenized like the training
data (ttt_e2e.data.build_tokenizer) and starts with BOS, as every training document does. The completion goes to
stdout, statistics to stderr. A checkpoint, setting or tokenizer that does not work stops with a one-line error
(exit status 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional

import torch

from ttt_e2e.config import ConfigError, ModelConfig, TTTConfig
from ttt_e2e.convert.load import load
from ttt_e2e.convert.steps import CheckpointError
from ttt_e2e.data import DataError
from ttt_e2e.model.transformer import Transformer

from .generation import generate


def parse_overrides(cls, pairs: list[str], base: Optional[dict] = None):
    """key=value strings -> a dataclass instance; values parse as JSON (numbers, null, true), else strings."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(base or {})
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"bad override {pair!r}: expected key=value with key one of {sorted(fields)}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return cls(**{k: v for k, v in values.items() if k in fields})


def load_model(args) -> tuple[Transformer, TTTConfig, str]:
    if args.random_init:
        mcfg = parse_overrides(ModelConfig, args.model)
        ttt = parse_overrides(TTTConfig, args.ttt)
        torch.manual_seed(args.seed or 0)
        return Transformer(mcfg), ttt, args.tokenizer or "bytes"
    loaded = load(args.checkpoint, [*(f"model.{p}" for p in args.model), *(f"ttt.{p}" for p in args.ttt)])
    return loaded.model, loaded.config.ttt, args.tokenizer or loaded.config.data.tokenizer


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file in (None, "-"):
        return sys.stdin.read()
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--random-init", action="store_true")
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="ModelConfig overrides")
    p.add_argument("--ttt", nargs="*", default=[], metavar="KEY=VALUE", help="TTTConfig overrides")
    p.add_argument("--no-ttt", action="store_true", help="baseline decoding, no test-time training")
    p.add_argument("--tokenizer", help="bytes or a transformers tokenizer (default: the checkpoint's)")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file", help="file with the prompt, - for stdin (the default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stop-at-eos", action="store_true")
    p.add_argument("--prefill-chunk", type=int)
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager inner steps and decoding on a GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from ttt_e2e.data import build_tokenizer

    try:
        model, ttt, tok_spec = load_model(args)
        tok = build_tokenizer(tok_spec)
        if tok.vocab_size > model.cfg.vocab_size:
            raise DataError(f"tokenizer {tok_spec} has {tok.vocab_size} ids, the model only {model.cfg.vocab_size}: "
                            f"not the tokenizer it was trained with")
    except (CheckpointError, ConfigError, DataError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    model = model.to(args.device).eval()
    ids = [tok.bos_id, *tok.encode(read_prompt(args))]
    t0 = time.perf_counter()
    out = generate(model, None if args.no_ttt else ttt, ids, args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, bos_id=tok.bos_id,
                   stop_tokens=() if args.no_stop_at_eos else (tok.eos_id,), prefill_chunk=args.prefill_chunk,
                   graphs=False if args.no_cuda_graphs else None)
    dt = time.perf_counter() - t0
    new = out.tokens[0]
    text_ids = new[:-1] if out.finished[0] else new
    sys.stdout.write(tok.decode(text_ids) + "\n")
    steps = len(out.state.losses)
    print(f"[{len(ids)} prompt + {len(new)} new tokens in {dt:.2f}s; {steps} TTT steps"
          + (f"; prompt inner loss {out.prompt_losses.mean():.3f}" if out.prompt_losses is not None else "") + "]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
