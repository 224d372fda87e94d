"""Document sources: each yields the raw text of one document at a time, in a deterministic order.

- "stdlib": the Python standard library's own .py files (a real text corpus on every machine, no download).
- a local file, folder or glob of .txt / .json / .jsonl / .parquet, read with `datasets` (works offline).
- otherwise a Hugging Face hub dataset name, streamed (so max_docs does not download the whole dataset).
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from .errors import DataError

# Directories of the stdlib that are not library source: third-party packages (machine dependent) and test
# suites (large, full of deliberately odd encodings and data files).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}

# datasets builder for each local file type
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if not _STDLIB_SKIP_DIRS & set(f.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _iter_stdlib(max_docs: Optional[int]) -> Iterator[str]:
    for f in stdlib_files()[:max_docs]:
        yield f.read_bytes().decode("utf-8", errors="replace")


def is_local(source: str) -> bool:
    """A path, a glob, or something that was clearly meant as one (so a typo is reported, not sent to the hub)."""
    return (os.path.exists(os.path.expanduser(source)) or glob.has_magic(source)
            or source.startswith(("/", "./", "../", "~")) or Path(source).suffix.lower() in _BUILDERS)


def local_files(source: str) -> list[str]:
    """The data files a local source names, sorted; raises DataError if there are none."""
    path = os.path.expanduser(source)
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data source '{source}': the glob matches no files")
    elif os.path.isdir(path):
        files = sorted(str(f) for f in Path(path).rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS)
        if not files:
            raise DataError(f"data source '{source}': the folder holds no {'/'.join(_BUILDERS)} files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data source '{source}' does not exist")
    kinds = {Path(f).suffix.lower() for f in files}
    unknown = kinds - set(_BUILDERS)
    if unknown:
        raise DataError(f"data source '{source}': unsupported file type(s) {sorted(unknown)}; "
                        f"use {'/'.join(_BUILDERS)}")
    builders = {_BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise DataError(f"data source '{source}' mixes file types {sorted(kinds)}; use one type per source")
    return [os.path.abspath(f) for f in files]


def local_fingerprint(source: str) -> list:
    """Path, size and mtime of every file, so editing a local corpus invalidates its token cache."""
    return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in local_files(source)]


def _is_empty_file(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq  # a dependency of datasets

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception as e:
            raise DataError(f"data file '{path}' is not a readable parquet file: {_first_line(e)}") from None
    return False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_rows(ds, what: str) -> Iterator[dict]:
    """Rows of a streamed dataset; a streamed read fails while iterating, so errors are translated here."""
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{what}: cannot read it: {_first_line(e)}") from None
        yield row


def _iter_datasets(source: str, name: Optional[str], split: str, text_field: str,
                   max_docs: Optional[int]) -> Iterator[str]:
    # Always streamed: rows go straight to the tokenizer, with no arrow copy of the corpus in the datasets cache
    # and no full download of a hub dataset when max_docs takes only its start.
    if is_local(source):
        all_files = local_files(source)
        # datasets fails obscurely on empty json and zero-row parquet files; they hold no documents anyway.
        files = [f for f in all_files if not _is_empty_file(f)]
        if not files:
            raise DataError(f"data source '{source}' is empty: no documents (all {len(all_files)} files are empty)")
        builder = _BUILDERS[Path(files[0]).suffix.lower()]
        if builder == "text":  # one .txt file is one document: read directly, no `datasets` needed
            yield from (Path(f).read_bytes().decode("utf-8", errors="replace") for f in files[:max_docs])
            return
        import datasets  # heavy import, only when needed
        # sample_by="document": one .txt file is one document, not one per line.
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        what = f"data source '{source}'"
        try:
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True, **kwargs)
        except Exception as e:
            raise DataError(f"{what}: cannot read it: {_first_line(e)}") from None
    else:
        import datasets

        what = f"dataset '{source}' (name={name}, split={split})"
        try:
            ds = datasets.load_dataset(source, name, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"cannot load {what}: {_first_line(e)}") from None

    for i, row in enumerate(_read_rows(ds, what)):
        if max_docs is not None and i >= max_docs:
            break
        if text_field not in row:
            raise DataError(f"data source '{source}' has no text field '{text_field}'; its fields are {list(row)}")
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"data source '{source}': field '{text_field}' holds {type(text).__name__}, not text")
        yield text or ""


def iter_documents(cfg) -> Iterator[str]:
    """Raw text of each document of `cfg` (a DataConfig), capped at cfg.max_docs."""
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise DataError(f"data.max_docs must be >= 1 (or null for all), got {cfg.max_docs}")
    if cfg.source == "stdlib":
        return _iter_stdlib(cfg.max_docs)
    if not cfg.source:
        raise DataError("data.source is empty: give 'stdlib', a local path, or a hub dataset name")
    return _iter_datasets(cfg.source, cfg.name, cfg.split, cfg.text_field, cfg.max_docs)


def source_identity(cfg) -> dict:
    """What pins down the documents of a source, for the cache key (without reading them)."""
    if cfg.source == "stdlib":
        # The stdlib differs between Python versions and installs.
        return {"stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version}
    if is_local(cfg.source):
        return {"files": local_fingerprint(cfg.source)}
    return {"hub": cfg.source}
