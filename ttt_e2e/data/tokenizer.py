"""Tokenizers: the built-in byte-level one (no download) and any `transformers` tokenizer.

Both expose the same small interface the pipeline needs: encode / encode_batch without special tokens (the
packer adds BOS/EOS itself), decode, vocab_size, bos_id, eos_id, name, and a fingerprint of the vocabulary that
keys the on-disk token cache.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

from .errors import DataError


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS = 256, EOS = 257. Works on any text, needs nothing."""

    name = "bytes"
    vocab_size = 258
    bos_id = 256
    eos_id = 257
    fingerprint = "bytes-utf8-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        # Special ids are not bytes; a window may also cut a multi-byte character, hence "replace".
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `transformers` tokenizer (hub name or local path), e.g. Llama-3's: BOS 128000, EOS 128001."""

    def __init__(self, spec: str, tok):
        self.name = spec
        self._tok = tok
        # Documents are far longer than the model's max length; we cut windows ourselves, so silence the warning.
        self._tok.model_max_length = int(1e30)
        self.vocab_size = len(tok)  # includes added special tokens, unlike tok.vocab_size
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        for what, tid in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if tid is None:
                raise DataError(f"tokenizer '{spec}' has no {what} token; the packer needs both BOS and EOS")
        self.fingerprint = _vocab_fingerprint(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # A batched call lets a fast (Rust) tokenizer use all cores.
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def _vocab_fingerprint(tok) -> str:
    """Hash of the full tokenizer definition, so a retrained tokenizer at the same path misses the cache."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec)


def build_tokenizer(spec: str) -> Tokenizer:
    """"bytes", or a transformers AutoTokenizer hub name / local directory."""
    if spec == "bytes":
        return ByteTokenizer()
    if not spec:
        raise DataError("unknown tokenizer '': give 'bytes' or a transformers tokenizer name/path")
    if _looks_like_path(spec):
        path = os.path.expanduser(spec)
        if not os.path.isdir(path):
            raise DataError(f"unknown tokenizer '{spec}': no such directory")
        spec_to_load = path
    else:
        spec_to_load = spec
    from transformers import AutoTokenizer  # heavy import, only when needed

    try:
        tok = AutoTokenizer.from_pretrained(spec_to_load)
    except Exception as e:  # transformers raises OSError, ValueError, HF hub errors, ... depending on the case
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"unknown tokenizer '{spec}': {first_line}") from None
    return HFTokenizer(spec, tok)
