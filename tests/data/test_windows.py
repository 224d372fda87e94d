import numpy as np
import pytest
import torch

from ttt_e2e.data import DataError, WindowDataset, check_enough, make_batch

BOS, EOS = 256, 257


def test_windows_cover_stream_in_order():
    stream = np.arange(1, 104, dtype=np.uint16)  # 103 tokens, T = 10 -> (103 - 1) // 10 = 10 windows
    ds = WindowDataset(stream, 10)
    assert len(ds) == 10
    windows = [ds[i] for i in range(len(ds))]
    assert all(w.dtype == torch.int64 and w.shape == (11,) for w in windows)
    for i, w in enumerate(windows):
        np.testing.assert_array_equal(w.numpy(), stream[i * 10:i * 10 + 11])
    # Consecutive windows share one token, so the targets tile the stream with no gap and no overlap.
    targets = torch.cat([w[1:] for w in windows]).numpy()
    np.testing.assert_array_equal(targets, stream[1:101])
    with pytest.raises(IndexError):
        ds[10]
    np.testing.assert_array_equal(ds.batch([3, 0]).numpy(), np.stack([stream[30:41], stream[0:11]]))


def test_exactly_one_window():
    assert len(WindowDataset(np.arange(9), 8)) == 1


def test_corpus_shorter_than_one_sequence():
    with pytest.raises(DataError, match=r"^corpus has 8 tokens, fewer than the seq_length \+ 1 = 9 needed for "
                                        r"one sequence; use more documents or a shorter seq_length$"):
        WindowDataset(np.arange(8), 8)
    with pytest.raises(DataError, match=r"^validation stream has 3 tokens, fewer than the seq_length \+ 1 = 5"):
        check_enough(np.arange(3), 4, what="validation stream")


def test_make_batch_shift_and_mask_excludes_bos_targets():
    windows = torch.tensor([[BOS, 5, 6, EOS, BOS, 7, 8],
                            [6, EOS, BOS, 9, EOS, BOS, 1]])
    inputs, targets, mask = make_batch(windows, BOS)
    assert torch.equal(inputs, windows[:, :-1]) and torch.equal(targets, windows[:, 1:])
    assert inputs.shape == targets.shape == mask.shape == (2, 6) and mask.dtype == torch.bool
    assert torch.equal(mask, torch.tensor([[1, 1, 1, 0, 1, 1],
                                           [1, 0, 1, 1, 0, 1]], dtype=torch.bool))
    assert mask[targets == EOS].all()  # predicting the end of a document is kept


def test_make_batch_rejects_bad_shape():
    with pytest.raises(DataError, match=r"make_batch needs \(batch, seq_length \+ 1\) windows, got shape \(7,\)"):
        make_batch(torch.arange(7), BOS)
