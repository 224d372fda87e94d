"""Training data for the loop: tokenizer -> cached token stream -> train/val windows -> per-rank batches.

All of the heavy lifting is ttt_e2e.data; this file adds what is trainer-specific: checking the tokenizer
against the model's vocabulary, letting rank 0 build the token cache while the others wait (then map it), and
the per-rank share of each global batch, cut into micro-batches for gradient accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ttt_e2e.config import Config, ConfigError
from ttt_e2e.data import (DataError, StatefulSampler, WindowDataset, build_tokenizer, check_enough, make_batch,
                          split_stream, token_stream)

from .distributed import DistInfo, broadcast_object

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, targets, loss_mask, each (B, T)


@dataclass
class TrainData:
    tokenizer: object
    train: WindowDataset
    val: Optional[WindowDataset]
    sampler: StatefulSampler
    micro_batch_size: int
    accumulation: int
    device: torch.device

    def next_micro_batches(self) -> list[Batch]:
        """This rank's share of the next global batch, as `accumulation` micro-batches on the device."""
        windows = self.train.batch(self.sampler.next_batch())
        inputs, targets, mask = (t.to(self.device) for t in make_batch(windows, self.tokenizer.bos_id))
        m = self.micro_batch_size
        return [(inputs[i:i + m], targets[i:i + m], mask[i:i + m]) for i in range(0, len(inputs), m)]


def load_stream(cfg: Config, info: DistInfo):
    """(tokenizer, stream). Rank 0 tokenizes (or hits the cache) first; its error, if any, is every rank's."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer '{cfg.data.tokenizer}' has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    error, stream = None, None
    if info.is_main:
        try:
            stream = token_stream(cfg.data, tokenizer)
        except DataError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise DataError(error)
    if stream is None:
        stream = token_stream(cfg.data, tokenizer)
    return tokenizer, stream


def build_data(cfg: Config, info: DistInfo) -> TrainData:
    tokenizer, stream = load_stream(cfg, info)
    T = cfg.model.seq_length
    check_enough(stream, T, f"corpus '{cfg.data.source}' (data.max_docs={cfg.data.max_docs})")
    train_stream, val_stream = split_stream(stream, cfg.data.val_fraction)
    train = WindowDataset(train_stream, T, "the training split")
    val = (WindowDataset(val_stream, T, f"the validation split (data.val_fraction={cfg.data.val_fraction})")
           if cfg.data.val_fraction > 0 else None)
    micro, accum = cfg.training.accumulation(info.world_size)
    sampler = StatefulSampler(len(train), micro * accum, info.rank, info.world_size, cfg.data.seed)
    return TrainData(tokenizer, train, val, sampler, micro, accum, info.device)
