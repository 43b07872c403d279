"""Batch planning by hand-made cases (pure, no torch)."""

import numpy as np
import pytest

from pipeline.batching import fixed_size_batches, gather_sequences, padding_stats, plan_batches


def as_lists(groups):
    return [g.tolist() for g in groups]


def test_sorted_and_cut_by_grid_budget():
    lengths = [5, 1, 3, 3, 8]
    # ascending: idx1(1) idx2(3) idx3(3) idx0(5) idx4(8); budget 10 on count * max_len
    assert as_lists(plan_batches(lengths, max_tokens=10)) == [[1, 2, 3], [0], [4]]


def test_every_index_once_and_budget_respected():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 513, 1000)
    groups = plan_batches(lengths, max_tokens=4096)
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(1000))
    for g in groups:
        assert len(g) * lengths[g].max() <= 4096


def test_oversized_sequence_gets_its_own_group():
    assert as_lists(plan_batches([600, 2, 2], max_tokens=512)) == [[1, 2], [0]]


def test_max_seqs_and_empty_and_bad_budget():
    assert as_lists(plan_batches([1, 1, 1, 1, 1], max_tokens=100, max_seqs=2)) == [[0, 1], [2, 3], [4]]
    assert plan_batches([], max_tokens=10) == []
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches([1], max_tokens=0)


def test_padding_stats():
    lengths = [2, 4, 4, 10]
    assert padding_stats(lengths, [np.array([0, 1, 2, 3])]).waste == pytest.approx(1 - 20 / 40)
    assert padding_stats(lengths, [np.array([0]), np.array([1, 2]), np.array([3])]).waste == 0.0
    assert as_lists(fixed_size_batches([3, 1, 2], 2)) == [[1, 2], [0]]


def test_segment_runs_keep_attention_grids_nearly_full():
    from pipeline.batching import attention_padding, segment_runs

    assert segment_runs([]) == []
    assert segment_runs([5, 5, 5]) == [(0, 3)]
    assert segment_runs([1, 100]) == [(0, 1), (1, 2)]  # 1 + 100 on a 2 x 100 grid wastes 50%
    lengths = np.random.default_rng(0).integers(1, 513, 300)
    groups = plan_batches(lengths, max_tokens=4096)
    assert attention_padding(lengths, groups) <= 0.125
    for g in groups:
        runs = segment_runs(lengths[g].tolist())
        assert runs[0][0] == 0 and runs[-1][1] == len(g)
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))


def test_gather_sequences_equals_concatenated_slices():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 9, 40)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ids = rng.integers(0, 1000, int(offsets[-1])).astype(np.int32)
    for group in (rng.permutation(40)[:17], np.arange(40), np.array([5]), np.zeros(0, np.int64)):
        want = np.concatenate([ids[offsets[i]:offsets[i + 1]] for i in group] + [ids[:0]])
        got = gather_sequences(ids, offsets, group)
        assert got.dtype == ids.dtype and np.array_equal(got, want)
