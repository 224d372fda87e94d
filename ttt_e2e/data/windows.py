"""Cutting the token stream into training windows, and turning windows into (inputs, targets, mask)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import DataError


def check_enough(stream: np.ndarray, seq_length: int, what: str = "corpus") -> None:
    """One window needs seq_length + 1 tokens (inputs plus the shifted targets)."""
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    if len(stream) < seq_length + 1:
        raise DataError(f"{what} has {len(stream)} tokens, fewer than the seq_length + 1 = {seq_length + 1} "
                        f"needed for one sequence; use more documents or a shorter seq_length")


class WindowDataset(torch.utils.data.Dataset):
    """Window i is tokens [i*T, i*T + T + 1): consecutive windows share one token, so every token of the
    stream (but the first) is a target exactly once."""

    def __init__(self, stream: np.ndarray, seq_length: int, what: str = "corpus"):
        check_enough(stream, seq_length, what)
        self.stream = stream
        self.seq_length = seq_length

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        start = i * self.seq_length
        return torch.from_numpy(self.stream[start:start + self.seq_length + 1].astype(np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), seq_length + 1) LongTensor of the given windows."""
        return torch.stack([self[int(i)] for i in indices])


def make_batch(windows: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, targets, loss_mask) from (B, T+1) windows. Predicting a BOS is meaningless (the next document
    starts wherever the packer put it), so those targets are masked out; EOS targets are kept."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise DataError(f"make_batch needs (batch, seq_length + 1) windows, got shape {tuple(windows.shape)}")
    inputs = windows[:, :-1].contiguous()
    targets = windows[:, 1:].contiguous()
    return inputs, targets, targets != bos_id
