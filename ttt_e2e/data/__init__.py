"""Data pipeline: documents -> tokens -> one packed, cached, memory-mapped stream -> windows -> batches.

    tok = build_tokenizer(cfg.tokenizer)
    train, val = split_stream(token_stream(cfg, tok), cfg.val_fraction)
    ds = WindowDataset(train, seq_length)
    sampler = StatefulSampler(len(ds), batch_size, rank, world_size, cfg.seed)
    input_ids, targets, loss_mask = make_batch(ds.batch(sampler.next_batch()), tok.bos_id)
"""
from .errors import DataError
from .sampler import StatefulSampler
from .sources import iter_documents, stdlib_files
from .stream import cache_path, split_stream, token_stream
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer
from .windows import WindowDataset, check_enough, make_batch

__all__ = [
    "DataError", "StatefulSampler", "iter_documents", "stdlib_files", "cache_path", "split_stream", "token_stream",
    "ByteTokenizer", "HFTokenizer", "Tokenizer", "build_tokenizer", "WindowDataset", "check_enough", "make_batch",
]
