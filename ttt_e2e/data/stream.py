"""Packing documents into one token stream, cached on disk and memory-mapped.

The stream is BOS doc EOS BOS doc EOS ... over all (non-empty) documents. It is written once to
`cfg.cache_dir/<slug>-<hash>.bin` (raw uint16 when the vocabulary fits, else uint32), keyed by everything that
determines its content, and later runs map it without touching the source or the tokenizer. The file appears
only through os.replace of a finished temporary file, so a crashed or killed run never leaves a partial cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Iterable, Iterator

import numpy as np

from .errors import DataError
from .sources import iter_documents, source_identity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the packing or file layout changes, to invalidate old caches
_ENCODE_BATCH = 256  # documents per tokenizer call


def stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(cfg, tokenizer) -> dict:
    return {
        "format": FORMAT_VERSION,
        "source": cfg.source, "source_identity": source_identity(cfg),
        "name": cfg.name, "split": cfg.split, "text_field": cfg.text_field, "max_docs": cfg.max_docs,
        "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id, "tokenizer_fingerprint": tokenizer.fingerprint,
    }


def cache_path(cfg, tokenizer) -> str:
    key = cache_key(cfg, tokenizer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    # A readable prefix so a human can tell cache files apart; the hash makes them unique.
    source = os.path.basename(cfg.source.rstrip("/*")) or "data"
    tok = os.path.basename(tokenizer.name.rstrip("/"))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{source}-{tok}")[:80]
    return os.path.join(os.path.expanduser(cfg.cache_dir), f"{slug}-{digest}.bin")


def _batched(docs: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_stream(cfg, tokenizer, path: str) -> dict:
    """Tokenize every document straight into `path` (no whole-corpus list in memory); returns counts."""
    dtype = stream_dtype(tokenizer.vocab_size)
    n_rows = n_docs = n_tokens = 0
    with open(path, "wb") as f:
        for texts in _batched(iter_documents(cfg), _ENCODE_BATCH):
            n_rows += len(texts)
            texts = [t for t in texts if t]  # an empty document would only add a BOS EOS pair
            if not texts:
                continue
            for ids in tokenizer.encode_batch(texts):
                if not ids:
                    continue
                doc = np.empty(len(ids) + 2, dtype=dtype)
                doc[0], doc[1:-1], doc[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
                f.write(doc.tobytes())
                n_docs += 1
                n_tokens += len(doc)
    if n_rows == 0:
        raise DataError(f"data source '{cfg.source}' is empty: no documents (split={cfg.split})")
    if n_docs == 0:
        raise DataError(f"data source '{cfg.source}' yields no tokens: all {n_rows} documents are empty")
    return {"documents": n_docs, "tokens": n_tokens}


def _open(path: str, vocab_size: int) -> np.ndarray:
    return np.memmap(path, dtype=stream_dtype(vocab_size), mode="r")


def token_stream(cfg, tokenizer) -> np.ndarray:
    """The whole corpus of `cfg` (a DataConfig) as one read-only memory-mapped 1-D token array."""
    path = cache_path(cfg, tokenizer)
    if os.path.exists(path):
        stream = _open(path, tokenizer.vocab_size)
        log.info("token cache hit: %s (%d tokens)", path, len(stream))
        return stream

    log.info("token cache miss: tokenizing %s with %s into %s", cfg.source, tokenizer.name, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The pid keeps concurrent writers (e.g. every rank of a job) from clobbering each other's temporary file;
    # the last os.replace wins, and all of them write the same bytes.
    tmp = f"{path}.tmp.{os.getpid()}"
    t0 = time.time()
    try:
        counts = _write_stream(cfg, tokenizer, tmp)
        # Metadata for humans and tools; written before the stream so a cache hit always has it.
        meta = {"key": cache_key(cfg, tokenizer), **counts, "dtype": stream_dtype(tokenizer.vocab_size).name}
        with open(tmp + ".json", "w") as f:
            json.dump(meta, f, indent=1, default=str)
        os.replace(tmp + ".json", path[:-len(".bin")] + ".json")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".json"):
            if os.path.exists(leftover):
                os.remove(leftover)
    log.info("tokenized %d documents into %d tokens in %.1fs", counts["documents"], counts["tokens"], time.time() - t0)
    return _open(path, tokenizer.vocab_size)


def split_stream(stream: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last `val_fraction` of the tokens is held out; both are views, nothing is copied."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(len(stream) * val_fraction)
    n_train = len(stream) - n_val
    return stream[:n_train], stream[n_train:]
