"""python -m ttt_e2e.convert from-jax SRC DST [--config REF_CONFIG.json] [--set key=value ...] [--tokenizer T]
python -m ttt_e2e.convert to-jax SRC DST

from-jax: SRC is the authors' checkpoint (github test-time-training/e2e): an orbax CheckpointManager dir (its
latest step), one step dir, or an .npz keyed by their parameter paths. DST becomes one of our checkpoint dirs
(parameters only), for eval.py checkpoint=DST, generate.py --checkpoint DST, training.init_from=DST
training.load_part=params and ttt_e2e.load_pretrained(DST). The model's dimensions come from the shapes; window,
mini-batch, RoPE theta, inner learning rate etc. from the reference's config.json beside SRC (or --config), else
the released checkpoints' settings; --set overrides any of our settings (e.g. model.seq_length=131072).

to-jax: SRC is one of our checkpoints or a save_pretrained dir; DST ending in .npz: an .npz (and DST's
<stem>.config.json), else an orbax CheckpointManager dir with the reference's config.json inside.

Nothing is written at DST unless the conversion completes. Exit status 2 with a one-line error for input that
cannot be converted.
"""
from __future__ import annotations

import argparse
import sys
import time

from ttt_e2e.train.checkpoint import CheckpointError

from .layout import ConvertError
from .reference import from_jax, to_jax


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
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    t0 = time.perf_counter()
    try:
        if args.command == "from-jax":
            out = from_jax(args.src, args.dst, args.config, args.set, args.tokenizer, log=log)
        else:
            out = to_jax(args.src, args.dst, log=log)
    except (ConvertError, CheckpointError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
