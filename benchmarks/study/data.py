"""The study's corpora and tokenizer (docs/study.md), built here from packages the registries serve.

    python -m benchmarks.study.data                    # data/study/ (git-ignored; ~60 MiB), needs PyPI and apt
    python -m benchmarks.study.data --tiny --out DIR   # a small version from this Python's own files, offline

Writes into --out:
  code_train/, code_val/   long Python source files (one .txt per file): CPython's standard library (this
                           interpreter's) and the sources of a few large pure-Python packages (their wheels from
                           PyPI, pinned in WHEELS), test suites excluded; whole files are held out for code_val by a
                           hash of their path, never split
  code_train_rep/,         the same files with spans repeated: each file is cut into consecutive spans of
  code_val_rep/            --repeat-chars characters (drawn per span), and each span is followed by a copy of itself
                           with probability --repeat-p. A copy lies farther back than a small attention window can
                           see but inside the context: text that only attention over the whole context (or a memory
                           of it) can predict, the copying that induction heads do
  docs_val/                a held-out corpus of another kind: the reStructuredText sources of the Python 3.11
                           documentation (Debian's python3.11-doc), prose with examples; never trained on
  tokenizer/               a byte-level BPE (the `tokenizers` library) trained on code_train only, saved so that
                           transformers' AutoTokenizer loads it (data.tokenizer=<this folder>)
  manifest.json            where each corpus came from, its files, characters and tokens

--tiny takes the code from this interpreter's stdlib and the prose from installed packages' METADATA files
(their long descriptions), so the test suite can build it with no network.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

BOS, EOS = "<bos>", "<eos>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testing"}
# (requirement, package folder inside the wheel)
WHEELS = (("sympy==1.14.0", "sympy"), ("pandas==3.1.1", "pandas"), ("SQLAlchemy==2.1.9", "sqlalchemy"),
          ("Twisted==26.10.0", "twisted"), ("Django==5.2.20", "django"), ("networkx==3.6.1", "networkx"))
DOCS_DEB = "python3.11-doc"


def _held_out(name: str, fraction: float) -> bool:
    """Stable per-document split: the same file is held out on every machine and every build."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _python_files(root: Path, prefix: str) -> dict[str, str]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        out[f"{prefix}/{rel.as_posix()}"] = f.read_bytes().decode("utf-8", errors="replace")
    return out


def stdlib_docs() -> dict[str, str]:
    return _python_files(Path(sysconfig.get_paths()["stdlib"]), "cpython")


def wheel_docs(work: Path) -> dict[str, str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work),
                    *(req for req, _ in WHEELS)], check=True, stdout=subprocess.DEVNULL)
    out = {}
    for req, package in WHEELS:
        dist = req.split("==")[0].lower()
        wheel = next(w for w in work.glob("*.whl") if w.name.lower().startswith(dist + "-"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(work / dist, [n for n in z.namelist() if n.endswith(".py")])
        out.update(_python_files(work / dist / package, package))
    return out


def python_doc_sources(work: Path) -> dict[str, str]:
    subprocess.run(["apt-get", "download", DOCS_DEB], cwd=work, check=True, stdout=subprocess.DEVNULL)
    deb = next(work.glob(f"{DOCS_DEB}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    root = next((work / "deb").rglob("_sources"))
    return {f"pydoc/{f.relative_to(root).as_posix()}": f.read_text(errors="replace")
            for f in sorted(root.rglob("*.txt"))}


def metadata_docs() -> dict[str, str]:
    """Installed packages' METADATA (their READMEs): prose every Python install has, for the offline tiny build."""
    site = Path(sysconfig.get_paths()["purelib"])
    return {f"metadata/{f.parent.name}": f.read_text(errors="replace")
            for f in sorted(site.glob("*.dist-info/METADATA"))}


def with_repeats(text: str, lo: int, hi: int, p: float, rng: random.Random) -> str:
    """`text` cut into consecutive spans of lo..hi characters, each followed by a copy of itself with probability
    p. Spans end at line ends, so that a copy starts where the original did (a line's start)."""
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + rng.randint(lo, hi))
        j = len(text) if j < 0 else j + 1
        span = text[i:j]
        out.append(span + (span if rng.random() < p else ""))
        i = j
    return "".join(out)


def _take(docs: dict[str, str], budget: int) -> dict[str, str]:
    """Documents in a stable pseudo-random order (by a hash of the name) until `budget` characters."""
    out, total = {}, 0
    for k in sorted(docs, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if total + len(docs[k]) <= budget:
            out[k], total = docs[k], total + len(docs[k])
    return out


def _write(docs: dict[str, str], folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, (name, text) in enumerate(docs.items()):
        (folder / f"{i:05d}.txt").write_text(text)
        names.append(name)
    return names


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS).save_pretrained(str(out))


def build(out: Path, tiny: bool, vocab_size: int, min_chars: int, val_fraction: float, max_mib: float,
          repeat_chars: tuple[int, int] = (200, 1000), repeat_p: float = 0.5) -> dict:
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if tiny:
            code, prose = stdlib_docs(), metadata_docs()
        else:
            code, prose = {**stdlib_docs(), **wheel_docs(work)}, python_doc_sources(work)
    code = {k: v for k, v in code.items() if len(v) >= min_chars}
    prose = {k: v for k, v in prose.items() if len(v) >= min_chars // 2}
    budget = int(max_mib * 2**20)
    held = {k for k in code if _held_out(k, val_fraction)}
    train = _take({k: v for k, v in code.items() if k not in held}, budget)
    # the held-out sets are read only in part (a few hundred windows): a sixteenth of the budget each
    val = _take({k: v for k, v in code.items() if k in held}, budget // 16)
    docs_val = _take(prose, budget // 16)
    if not (train and val and docs_val):
        raise SystemExit(f"error: too few documents of >= {min_chars} characters: {len(train)} train, "
                         f"{len(val)} held-out code, {len(docs_val)} prose")
    manifest = {"tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": vocab_size,
                              "trained_on": "code_train"},
                "sources": {"code": f"CPython {sys.version.split()[0]} stdlib" +
                                    ("" if tiny else " + " + ", ".join(req for req, _ in WHEELS) + " wheels"),
                            "docs": "installed packages' METADATA" if tiny else f"Debian {DOCS_DEB} _sources"},
                "min_chars": min_chars, "val_fraction": val_fraction}
    train_tokenizer(list(train.values()), vocab_size, out / "tokenizer")
    for folder, docs in (("code_train", train), ("code_val", val), ("docs_val", docs_val)):
        manifest[folder] = _write_counted(docs, out / folder, out / "tokenizer")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return add_repeats(out, repeat_chars, repeat_p)


def _write_counted(docs: dict[str, str], folder: Path, tokenizer: Path) -> dict:
    from transformers import AutoTokenizer

    names = _write(docs, folder)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    n_tokens = sum(len(ids) for ids in tok(list(docs.values()), add_special_tokens=False)["input_ids"])
    return {"documents": len(names), "chars": sum(map(len, docs.values())), "tokens": n_tokens, "files": names}


def add_repeats(out: Path, repeat_chars: tuple[int, int], repeat_p: float) -> dict:
    """code_train_rep and code_val_rep from a built folder's code_train and code_val (replaced if there)."""
    manifest = json.loads((out / "manifest.json").read_text())
    rng = random.Random(0)
    for folder in ("code_train", "code_val"):
        files = sorted((out / folder).glob("*.txt"))
        docs = {name: with_repeats(f.read_text(), *repeat_chars, repeat_p, rng)
                for name, f in zip(manifest[folder]["files"], files)}
        shutil.rmtree(out / f"{folder}_rep", ignore_errors=True)
        manifest[f"{folder}_rep"] = _write_counted(docs, out / f"{folder}_rep", out / "tokenizer")
    manifest["repeats"] = {"span_chars": list(repeat_chars), "p": repeat_p}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/study")
    p.add_argument("--tiny", action="store_true", help="offline, small: this Python's stdlib + METADATA files")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 4096; tiny 512)")
    p.add_argument("--min-chars", type=int, default=None, help="shortest document kept (default 16000; tiny 4000)")
    p.add_argument("--val-fraction", type=float, default=0.08, help="share of code files held out")
    p.add_argument("--max-mib", type=float, default=None, help="training text budget (default 64; tiny 1)")
    p.add_argument("--repeat-chars", default="200,1000", help="span lengths of the _rep corpora, lo,hi characters")
    p.add_argument("--repeat-p", type=float, default=0.5, help="probability that a span is repeated")
    p.add_argument("--repeats-only", action="store_true", help="only redo the _rep corpora of the --out folder")
    a = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in a.repeat_chars.split(","))
        if not 0 < lo <= hi or not 0 <= a.repeat_p <= 1:
            raise ValueError
    except ValueError:
        p.error(f"--repeat-chars must be lo,hi with 0 < lo <= hi and --repeat-p in [0, 1], got {a.repeat_chars} "
                f"and {a.repeat_p}")
    if a.repeats_only and not (Path(a.out) / "manifest.json").exists():
        p.error(f"--repeats-only needs a built corpus folder at {a.out}")
    m = add_repeats(Path(a.out), (lo, hi), a.repeat_p) if a.repeats_only else build(Path(a.out), a.tiny, a.vocab or (512 if a.tiny else 4096), a.min_chars or (4000 if a.tiny else 16000),
              a.val_fraction, a.max_mib or (1.0 if a.tiny else 64.0), (lo, hi), a.repeat_p)
    for k in ("code_train", "code_val", "docs_val", "code_train_rep", "code_val_rep"):
        print(f"{k}: {m[k]['documents']} documents, {m[k]['chars'] / 1e6:.2f}M chars, {m[k]['tokens'] / 1e6:.2f}M "
              f"tokens ({m[k]['chars'] / m[k]['tokens']:.2f} chars/token)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
