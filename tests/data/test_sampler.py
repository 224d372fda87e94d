import pytest
import torch

from ttt_e2e.data import DataError, StatefulSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_deterministic_and_seeded():
    a, b = StatefulSampler(50, 4, seed=3), StatefulSampler(50, 4, seed=3)
    assert take(a, 30) == take(b, 30)
    assert take(StatefulSampler(50, 4, seed=3), 5) != take(StatefulSampler(50, 4, seed=4), 5)
    # The epoch order is torch.randperm under seed + epoch.
    assert sum(take(StatefulSampler(50, 4, seed=3), 12), []) == torch.randperm(
        50, generator=torch.Generator().manual_seed(3))[:48].tolist()


def test_epochs_are_permutations_and_infinite():
    s = StatefulSampler(12, 3)
    assert s.batches_per_epoch == 4
    epochs = [sum(take(s, 4), []) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(12))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert s.epoch == 2


def test_remainder_dropped_per_epoch():
    s = StatefulSampler(10, 3)  # 3 batches per epoch, one window left over each epoch
    first = sum(take(s, 3), [])
    assert len(set(first)) == 9
    take(s, 1)
    assert s.epoch == 1 and s.position == 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_disjoint_and_union_is_single_rank_order(world_size):
    global_batch = 8
    single = StatefulSampler(50, global_batch, seed=7)
    ranks = [StatefulSampler(50, global_batch // world_size, rank=r, world_size=world_size, seed=7)
             for r in range(world_size)]
    for _ in range(20):  # crosses epoch boundaries (6 global batches per epoch)
        parts = [r.next_batch() for r in ranks]
        flat = sum(parts, [])
        assert len(set(flat)) == global_batch  # disjoint
        assert flat == single.next_batch()  # rank r holds slice r of the global batch


@pytest.mark.parametrize("steps", [0, 5, 6, 13])  # start, mid epoch, at an epoch boundary, a later epoch
def test_state_dict_resumes_exactly(steps):
    ref = StatefulSampler(27, 4, rank=1, world_size=2, seed=11)
    take(ref, steps)
    state = ref.state_dict()
    assert {"epoch", "position"} <= set(state)
    expected = take(ref, 10)

    resumed = StatefulSampler(27, 4, rank=1, world_size=2, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected


def test_resume_with_other_world_size_same_global_batch():
    ref = StatefulSampler(40, 8)
    take(ref, 7)
    state = ref.state_dict()
    expected = ref.next_batch()
    halves = [StatefulSampler(40, 4, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert halves[0].next_batch() + halves[1].next_batch() == expected


def test_load_state_dict_refuses_other_data_order():
    state = StatefulSampler(40, 8, seed=0).state_dict()
    with pytest.raises(DataError, match=r"^sampler state has num_windows=40, but this sampler has num_windows=41"):
        StatefulSampler(41, 8).load_state_dict(state)
    with pytest.raises(DataError, match=r"sampler state has seed=0, but this sampler has seed=1"):
        StatefulSampler(40, 8, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"sampler state has global_batch=8, but this sampler has global_batch=4"):
        StatefulSampler(40, 4).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(DataError, match=r"^only 7 windows, fewer than one global batch of 8 \(batch_size 4 x "
                                        r"world_size 2\)"):
        StatefulSampler(7, 4, rank=0, world_size=2)
    with pytest.raises(DataError, match=r"rank 2 is not in \[0, world_size=2\)"):
        StatefulSampler(100, 4, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"batch_size must be >= 1, got 0"):
        StatefulSampler(100, 0)
