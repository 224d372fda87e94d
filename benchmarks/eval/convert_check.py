"""The authors' checkpoint format end to end, on the paper's 125M TTT-E2E shape: random weights written as the
authors' code writes them (orbax CheckpointManager, item model_weights, step 4799, no config.json: like a released
checkpoint), converted with `python -m ttt_e2e.convert from-jax`, checked bit for bit, then run through the
user's commands: generate.py and eval.py; then to-jax back (bit for bit again) and save_pretrained -> load_pretrained.

    python -m benchmarks.eval.convert_check --out DIR              # GPU, 125M (vocab 128256): about 1-2 minutes
    python -m benchmarks.eval.convert_check --out DIR --tiny       # the same steps at a tiny shape on the CPU

Exit status 1 if any check fails (each is listed with what it saw). DIR gets convert_check.json, eval/eval.json
and eval/loss_by_position.png; the checkpoints live in a temporary dir (--work to keep them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if not (REPO / "ttt_e2e" / "kernels").exists():  # a bare copy of the tree: the package's kernels link
    try:
        import ttt_e2e.kernels  # noqa: F401  (pip-installed)
    except ImportError:
        (REPO / "ttt_e2e" / "kernels").symlink_to("../kernels")
        print("created the link ttt_e2e/kernels -> ../kernels (as in a checkout)", file=sys.stderr)

# jax writes the reference checkpoint (WRITE_ORBAX, in a child process); without preallocation it would leave
# the GPU to the torch processes anyway
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
WRITE_ORBAX = """
import json, sys
import numpy as np
from pathlib import Path
from ttt_e2e.convert import orbax_io
with np.load(sys.argv[1]) as z:
    flat = {k: z[k] for k in z.files}
orbax_io.write(Path(sys.argv[2]), 4799, flat)
import jax, orbax.checkpoint as ocp
print(json.dumps({"jax": jax.__version__, "orbax-checkpoint": getattr(ocp, "__version__", "?"),
                  "written_on": jax.devices()[0].platform}))
"""

import numpy as np
import torch

from ttt_e2e.config import ModelConfig
from ttt_e2e.convert import layout, orbax_io
from ttt_e2e.model.sizes import paper_config
from ttt_e2e.model.transformer import Transformer

from benchmarks.core.env import describe, environment
from benchmarks.core.records import write_json

SHAPE_TINY = dict(vocab_size=512, n_layers=3, d_model=64, n_heads=4, mlp_width=96, prime_mlp_width=96,
                  suffix_len=2, seq_length=256, window=128)
TINY_SETTINGS = ["model.seq_length=256", "model.window=128", "ttt.mini_batch_size=64"]  # no config.json: --set


class Checks:
    def __init__(self):
        self.rows, self.failed = [], []

    def __call__(self, name: str, ok: bool, seen) -> None:
        self.rows.append({"check": name, "ok": bool(ok), "seen": seen})
        print(f"[{'ok' if ok else 'FAILED'}] {name}: {seen}", flush=True)
        if not ok:
            self.failed.append(name)


def run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    print("$ " + " ".join(cmd if cmd[0] != "-c" else ["-c", "WRITE_ORBAX", *cmd[2:]]), flush=True)
    t0 = time.perf_counter()
    # without JAX_PLATFORMS the converter keeps jax on the CPU: it restores what a GPU wrote without the saving
    # devices, as it must for the released checkpoints
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, **(env or {})}
    try:
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        p = subprocess.CompletedProcess(cmd, -1, str(e.stdout or ""), f"timed out after {timeout:.0f}s")
    dt = time.perf_counter() - t0
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:], sep="\n", file=sys.stderr)
    return p, dt


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape (CPU test of every step)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", help="where the checkpoints go (default: a temporary dir, removed)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="convert_check-"))
    work.mkdir(parents=True, exist_ok=True)
    check, times = Checks(), {}
    mcfg = ModelConfig(**SHAPE_TINY) if args.tiny else paper_config("125m", "e2e")  # the authors' 125M TTT-E2E
    settings = TINY_SETTINGS if args.tiny else []

    t0 = time.perf_counter()
    ours, flat, src, fmt, versions = write_reference(work, mcfg, check)
    times["write_reference_s"] = time.perf_counter() - t0

    # 2. from-jax, as a user runs it
    dst = work / "converted"
    p, times["from_jax_s"] = run(["-m", "ttt_e2e.convert", "from-jax", str(src), str(dst), "--tokenizer", "bytes",
                                  *(["--set", *settings] if settings else [])])
    check("from-jax exit status", p.returncode == 0, p.stderr.strip().splitlines()[-1:] if p.stderr else "")
    if p.returncode:
        return finish(out, check, times, args, versions, fmt)  # nothing to run further (the work dir is kept)
    converted = torch.load(dst / "model.pt", weights_only=True)
    check("converted weights bit-identical", same({k: v.numpy() for k, v in converted.items()},
                                                  {k: v.numpy() for k, v in ours.items()}), f"{len(converted)} tensors")
    cfg = json.loads((dst / "meta.json").read_text())["config"]
    want = (128, 64, 256) if args.tiny else (8192, 1024, 8192)
    got = (cfg["model"]["window"], cfg["ttt"]["mini_batch_size"], cfg["model"]["seq_length"])
    check("converted config (window, mini-batch, seq_length)", got == want and cfg["model"]["n_heads"] == mcfg.n_heads
          and cfg["ttt"]["train_mode"] == "meta", got)

    # 3. generate.py on the converted checkpoint (bytes as prompt ids: the Llama-3 tokenizer needs the network)
    n_new = 16
    p, times["generate_s"] = run(["generate.py", "--checkpoint", str(dst), "--prompt", "Test-time training " * 8,
                                  "--max-new-tokens", str(n_new), "--no-stop-at-eos", "--device", args.device])
    stats = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    check("generate.py", p.returncode == 0 and f"+ {n_new} new tokens" in stats, stats)

    # 4. eval.py: loss by position on a synthetic text (bytes), two windows of the full context
    times["eval_s"] = eval_check(dst, work, out, mcfg, args.device, check)

    # 5. to-jax back, bit for bit
    back = work / ("back" if fmt == "orbax" else "back.npz")
    p, times["to_jax_s"] = run(["-m", "ttt_e2e.convert", "to-jax", str(dst), str(back)])
    if p.returncode == 0:
        back_flat = orbax_io.read(back)[0] if fmt == "orbax" else dict(np.load(back))
        check("to-jax round trip bit-identical", same(back_flat, flat), f"{len(back_flat)} arrays")
    else:
        check("to-jax exit status", False, p.stderr.strip().splitlines()[-1:])

    # 6. save_pretrained (sharded safetensors) -> load_pretrained
    from ttt_e2e.pretrained import load_pretrained
    t0 = time.perf_counter()
    model, mc = load_pretrained(dst)
    model.save_pretrained(work / "hf", config=mc, max_shard_size="200MB")
    loaded, _ = load_pretrained(work / "hf")
    a, b = model.state_dict(), loaded.state_dict()
    times["save_load_pretrained_s"] = time.perf_counter() - t0
    shards = sorted(p.name for p in (work / "hf").glob("*.safetensors"))
    check("save_pretrained -> load_pretrained exact", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
          f"{len(shards)} shard(s)")
    code = finish(out, check, times, args, versions, fmt)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return code


def write_reference(work: Path, mcfg: ModelConfig, check: Checks):
    """Random weights in the reference's layout, written with orbax as the authors' Checkpointer does (or as .npz
    where this orbax is one the code does not know). Returns (state dict, reference arrays, path, format, versions)."""
    torch.manual_seed(0)
    ours = Transformer(mcfg).state_dict()
    flat = layout.to_reference(ours, mcfg)
    np.savez(work / "random.npz", **flat)
    src, fmt, versions = work / "125m_ttt_e2e", "orbax", {}
    for platforms in ("", "cpu"):  # jax's GPU if it has one (as the released checkpoints), else its CPU
        p, _ = run(["-c", WRITE_ORBAX, str(work / "random.npz"), str(src)], env={"JAX_PLATFORMS": platforms})
        if p.returncode == 0:
            versions = json.loads(p.stdout.strip().splitlines()[-1])
            break
        shutil.rmtree(src, ignore_errors=True)
    if not versions:  # an orbax this code does not know: say so, go on with the .npz
        check("orbax write", False, p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else p.returncode)
        src, fmt = work / "random.npz", "npz"
    n_params = sum(v.numel() for v in ours.values())
    print(f"reference checkpoint ({fmt}, {n_params / 1e6:.1f}M parameters, {versions}) at {src}", flush=True)
    return ours, flat, src, fmt, versions


def eval_check(dst: Path, work: Path, out: Path, mcfg: ModelConfig, device: str, check: Checks) -> float:
    """eval.py on the converted checkpoint over a synthetic text (bytes), two windows of the full context: the
    first mini-batch's loss is ln(vocab), the last one's lower. Returns eval.py's seconds."""
    rng = np.random.default_rng(0)
    words = ["time", "test", "training", "model", "context", "long", "weights", "learns", "the", "of", "a"]
    T = mcfg.seq_length
    n_words = int(2.2 * T / 0.05 / 5) + 1000  # val split (5%) >= 2 windows of T tokens, ~5 bytes a word
    corpus = work / "corpus.txt"
    corpus.write_text(" ".join(rng.choice(words, n_words)))
    p, seconds = run(["eval.py", f"checkpoint={dst}", f"data.source={corpus}", f"data.cache_dir={work / 'cache'}",
                      "windows=2", "batch_size=1", f"device={device}", f"out={out / 'eval'}"])
    first = last = None
    if p.returncode == 0:
        r = json.loads((out / "eval" / "eval.json").read_text())["checkpoints"][0]
        b, curve = r["mini_batch_size"], r["loss_by_position"]
        per_mb = [np.mean([x for x in curve[i:i + b] if x is not None]) for i in range(0, len(curve), b)]
        first, last = float(per_mb[0]), float(per_mb[-1])
    # Random weights (init std 0.02) give near-uniform logits: before any inner step (the first mini-batch) the loss
    # is ln(vocab). The inner steps then learn the repetitive text, so the last mini-batch's loss is lower (the
    # window's mean loss is not ln(vocab): benchmarks/RESULTS.md, the authors' checkpoints).
    check("eval.py", first is not None and abs(first - np.log(mcfg.vocab_size)) < 0.5 and last < first,
          f"first mini-batch {first}, last {last} (ln vocab {np.log(mcfg.vocab_size):.2f})")
    return seconds


def finish(out: Path, check: Checks, times: dict, args, versions: dict, fmt: str) -> int:
    env = environment(args.device)
    result = {"shape": "tiny" if args.tiny else "125m", "format": fmt, "versions": versions,
              "checks": check.rows, "times_s": times, "failed": check.failed}
    write_json(out / "convert_check.json", result, env)
    print(f"\nconvert_check ({result['shape']}, {fmt}, {versions}): {describe(env)}")
    print(f"{'step':<26}{'seconds':>9}")
    for k, v in times.items():
        print(f"{k:<26}{v:>9.1f}")
    print(f"{len(check.rows) - len(check.failed)}/{len(check.rows)} checks passed"
          + (f"; FAILED: {', '.join(check.failed)}" if check.failed else ""))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
