import json
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ttt_e2e.config import DataConfig
from ttt_e2e.data import DataError, build_tokenizer, cache_path, split_stream, stdlib_files, token_stream
from ttt_e2e.data import stream as stream_mod

DOCS = {"a.txt": "first doc\nline two\n", "b.txt": "ünïcode ✓", "sub/c.txt": "third"}


def packed(docs, tok):
    """The expected stream: BOS doc EOS per document, in order."""
    return np.array([t for d in docs for t in [tok.bos_id, *tok.encode(d), tok.eos_id]])


def cfg_for(source, tmp_path, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_packing_txt_folder_exact(write_files, tmp_path):
    root = write_files(DOCS)
    tok = build_tokenizer("bytes")
    stream = token_stream(cfg_for(root, tmp_path), tok)
    assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
    # Files in sorted path order, each file one document (not one per line).
    np.testing.assert_array_equal(stream, packed([DOCS["a.txt"], DOCS["b.txt"], DOCS["sub/c.txt"]], tok))


def test_packing_with_transformers_tokenizer(write_files, tmp_path, local_tokenizer):
    tok = build_tokenizer(local_tokenizer())
    docs = ["the cat sat", "a dog saw the log"]
    root = write_files({"1.txt": docs[0], "2.txt": docs[1]})
    stream = token_stream(cfg_for(root, tmp_path), tok)
    np.testing.assert_array_equal(stream, packed(docs, tok))
    assert list(stream[:5]) == [tok.bos_id, *tok.encode("the cat sat"), tok.eos_id]


def test_empty_documents_are_skipped(write_files, tmp_path):
    root = write_files({"a.txt": "x", "b.txt": "", "c.txt": "yz"})
    tok = build_tokenizer("bytes")
    np.testing.assert_array_equal(token_stream(cfg_for(root, tmp_path), tok), packed(["x", "yz"], tok))


def test_jsonl_and_json_sources_with_text_field(tmp_path):
    rows = [{"body": "alpha", "id": 1}, {"body": "beta", "id": 2}, {"body": "gamma", "id": 3}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok = build_tokenizer("bytes")
    stream = token_stream(cfg_for(path, tmp_path, text_field="body"), tok)
    np.testing.assert_array_equal(stream, packed(["alpha", "beta", "gamma"], tok))
    capped = token_stream(cfg_for(path, tmp_path, text_field="body", max_docs=2), tok)
    np.testing.assert_array_equal(capped, packed(["alpha", "beta"], tok))


def test_parquet_glob_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, texts in enumerate([["one", "two"], ["three"]]):
        pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / f"part{i}.parquet")
    tok = build_tokenizer("bytes")
    stream = token_stream(cfg_for(tmp_path / "*.parquet", tmp_path), tok)
    np.testing.assert_array_equal(stream, packed(["one", "two", "three"], tok))


def test_stdlib_source(tmp_path):
    tok = build_tokenizer("bytes")
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any({"site-packages", "test", "tests"} & set(f.relative_to(root).parts) for f in files)
    assert files == sorted(files, key=lambda f: f.relative_to(root).as_posix())
    stream = token_stream(DataConfig(source="stdlib", max_docs=3, cache_dir=str(tmp_path)), tok)
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files[:3]]
    np.testing.assert_array_equal(stream, packed([d for d in docs if d], tok))


def test_cache_hit_does_not_retokenize(write_files, tmp_path, monkeypatch, caplog):
    root = write_files(DOCS)
    cfg = cfg_for(root, tmp_path)
    tok = build_tokenizer("bytes")
    with caplog.at_level(logging.INFO, logger="ttt_e2e.data"):
        first = np.array(token_stream(cfg, tok))
    assert "cache miss" in caplog.text
    caplog.clear()

    def boom(*a, **k):
        raise AssertionError("re-tokenized on a cache hit")
    monkeypatch.setattr(tok, "encode", boom)
    monkeypatch.setattr(tok, "encode_batch", boom)
    monkeypatch.setattr(stream_mod, "iter_documents", boom)  # nor is the source read again
    with caplog.at_level(logging.INFO, logger="ttt_e2e.data"):
        second = token_stream(cfg, tok)
    assert "cache hit" in caplog.text
    np.testing.assert_array_equal(second, first)


def test_cache_key_changes_with_config_and_files(write_files, tmp_path):
    root = write_files(DOCS)
    tok = build_tokenizer("bytes")
    base = cache_path(cfg_for(root, tmp_path), tok)
    assert base == cache_path(cfg_for(root, tmp_path), tok)
    assert base != cache_path(cfg_for(root, tmp_path, max_docs=2), tok)
    assert base != cache_path(cfg_for(root, tmp_path, text_field="body"), tok)
    old = token_stream(cfg_for(root, tmp_path), tok)
    (root / "a.txt").write_text("edited, longer than before")
    assert cache_path(cfg_for(root, tmp_path), tok) != base  # an edited corpus is re-tokenized
    new = token_stream(cfg_for(root, tmp_path), tok)
    assert len(new) != len(old)


def test_atomic_write_leaves_nothing_on_failure(write_files, tmp_path, monkeypatch):
    root = write_files({f"{i:02d}.txt": f"doc {i}" for i in range(6)})
    cfg = cfg_for(root, tmp_path)
    tok = build_tokenizer("bytes")
    monkeypatch.setattr(stream_mod, "_ENCODE_BATCH", 2)  # several batches, so the failure is midway
    calls = []
    real = tok.encode_batch

    def fail_on_third(texts):
        calls.append(texts)
        if len(calls) == 3:
            raise RuntimeError("tokenizer died")
        return real(texts)
    monkeypatch.setattr(tok, "encode_batch", fail_on_third)
    with pytest.raises(RuntimeError, match="tokenizer died"):
        token_stream(cfg, tok)
    assert len(calls) == 3
    assert os.listdir(tmp_path / "cache") == []  # neither a partial cache nor a temporary file

    monkeypatch.setattr(tok, "encode_batch", real)
    stream = token_stream(cfg, tok)
    np.testing.assert_array_equal(stream, packed([f"doc {i}" for i in range(6)], tok))


class BigVocab:
    """A fake tokenizer with ids beyond uint16."""
    name, vocab_size, bos_id, eos_id, fingerprint = "big", 100_000, 99_998, 99_999, "big-v1"

    def encode_batch(self, texts):
        return [[70_000 + ord(c) for c in t] for t in texts]


def test_large_vocab_uses_uint32(write_files, tmp_path):
    root = write_files({"a.txt": "ab"})
    stream = token_stream(cfg_for(root, tmp_path), BigVocab())
    assert stream.dtype == np.uint32
    assert list(stream) == [99_998, 70_097, 70_098, 99_999]


def test_split_stream_holds_out_tail():
    stream = np.arange(100)
    train, val = split_stream(stream, 0.1)
    assert len(train) == 90 and len(val) == 10
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    assert val[0] == 90
    train, val = split_stream(stream, 0.0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split_stream(stream, 1.0)


# --- errors -------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(DataError, match=rf"^data source '{missing}' does not exist$"):
        token_stream(cfg_for(missing, tmp_path), build_tokenizer("bytes"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"^data source '.*\*\.parquet': the glob matches no files$"):
        token_stream(cfg_for(tmp_path / "*.parquet", tmp_path), build_tokenizer("bytes"))


def test_empty_dataset_no_documents(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^data source '.*empty.jsonl' is empty: no documents"):
        token_stream(cfg_for(tmp_path / "empty.jsonl", tmp_path), build_tokenizer("bytes"))


def test_empty_dataset_no_documents_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"^data source '.*e.parquet' is empty: no documents"):
        token_stream(cfg_for(tmp_path / "e.parquet", tmp_path), build_tokenizer("bytes"))
    assert os.listdir(tmp_path / "cache") == []


def test_empty_dataset_no_tokens(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"^data source '.*d.jsonl' yields no tokens: all 2 documents are empty$"):
        token_stream(cfg_for(path, tmp_path), build_tokenizer("bytes"))


def test_missing_text_field_lists_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "id": 1}))
    with pytest.raises(DataError, match=r"^data source '.*d.jsonl' has no text field 'text'; "
                                        r"its fields are \['body', 'id'\]$"):
        token_stream(cfg_for(path, tmp_path), build_tokenizer("bytes"))


def test_unknown_hub_dataset(tmp_path):
    with pytest.raises(DataError, match=r"^cannot load dataset 'no-such-org/no-such-dataset' "
                                        r"\(name=None, split=train\): "):
        token_stream(cfg_for("no-such-org/no-such-dataset", tmp_path), build_tokenizer("bytes"))


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"^data source '.*bad.jsonl': cannot read it: "):
        token_stream(cfg_for(path, tmp_path), build_tokenizer("bytes"))
    assert os.listdir(tmp_path / "cache") == []


def test_non_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"^data source '.*d.jsonl': field 'text' holds int, not text$"):
        token_stream(cfg_for(path, tmp_path), build_tokenizer("bytes"))


def test_folder_mixing_file_types(write_files, tmp_path):
    root = write_files({"a.txt": "x", "b.jsonl": '{"text": "y"}'})
    with pytest.raises(DataError, match=r"^data source '.*corpus' mixes file types \['.jsonl', '.txt'\]; "
                                        r"use one type per source$"):
        token_stream(cfg_for(root, tmp_path), build_tokenizer("bytes"))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\nx\n")
    with pytest.raises(DataError, match=r"^data source '.*d.csv': unsupported file type\(s\) \['.csv'\]"):
        token_stream(cfg_for(path, tmp_path), build_tokenizer("bytes"))
