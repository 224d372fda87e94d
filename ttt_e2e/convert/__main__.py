"""python -m ttt_e2e.convert from-jax SRC DST [--config REF_CONFIG.json] [--set key=value ...] [--tokenizer T]
python -m ttt_e2e.convert to-jax SRC DST
python -m ttt_e2e.convert from-hf SRC DST [--window W] [--suffix-len N] [--set key=value ...]

from-jax: SRC is the authors' checkpoint (github test-time-training/e2e): an orbax CheckpointManager dir (its
latest step), one step dir, or an .npz keyed by their parameter paths. DST becomes one of our checkpoint dirs
(parameters only), for eval.py checkpoint=DST, generate.py --checkpoint DST, training.init_from=DST
training.load_part=params and ttt_e2e.load_pretrained(DST). The model's dimensions come from the shapes; window,
mini-batch, RoPE theta, inner learning rate etc. from the reference's config.json beside SRC (or --config), else
the released checkpoints' settings; --set overrides any of our settings (e.g. model.seq_length=131072).

to-jax: SRC is one of our checkpoints or a save_pretrained dir; DST ending in .npz: an .npz (and DST's
<stem>.config.json), else an orbax CheckpointManager dir with the reference's config.json inside.

from-hf: SRC is a Hugging Face LlamaForCausalLM or Qwen3ForCausalLM (a local folder or a Hub id, safetensors
weights); DST becomes one of our checkpoint dirs (parameters only, the source's tokenizer inside), a TTT-E2E model
with sliding-window attention (window W, default 8192) whose last N blocks (default a quarter) carry MLP', that
computes the source's function exactly while the context fits in the window and before any inner step
(ttt_e2e/convert/hf.py, docs/METHOD.md section 8). --set changes our other settings (model.seq_length,
ttt.mini_batch_size, ...), never the source's function.

Nothing is written at DST unless the conversion completes. Exit status 2 with a one-line error for input that
cannot be converted.
"""
from __future__ import annotations

import argparse
import sys
import time

from ttt_e2e.config import ConfigError

from .hf import from_hf
from .layout import ConvertError
from .reference import from_jax, to_jax
from .steps import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ttt_e2e.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-jax", help="the authors' orbax / .npz checkpoint -> our checkpoint dir")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument("--config", help="the reference's config.json (default: the one beside SRC, if any)")
    a.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="our settings, e.g. model.window=4096")
    a.add_argument("--tokenizer", help="data.tokenizer to record (default: Llama-3's for a 128256 vocabulary)")
    b = sub.add_parser("to-jax", help="our checkpoint -> the authors' layout (.npz or orbax)")
    b.add_argument("src")
    b.add_argument("dst")
    c = sub.add_parser("from-hf", help="a Hugging Face Llama / Qwen3 (folder or Hub id) -> our checkpoint dir")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--window", type=int, help="the sliding window W (default 8192)")
    c.add_argument("--suffix-len", type=int, help="the last N blocks get MLP' (default a quarter of the blocks)")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="our settings, e.g. model.seq_length=32768")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    try:
        if args.command == "from-jax":
            out = from_jax(args.src, args.dst, args.config, args.set, args.tokenizer, log=log)
        elif args.command == "from-hf":
            out = from_hf(args.src, args.dst, args.window, args.suffix_len, args.set, log=log)
        else:
            out = to_jax(args.src, args.dst, log=log)
    except (ConvertError, CheckpointError, ConfigError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
