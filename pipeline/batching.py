"""Batch planning: sequence lengths -> token-budgeted groups. Pure Python/NumPy (no torch, no Ray).

The encoder runs packed batches, so the matmuls never see padding; only attention lays each
batch out on a ``[B, L_max]`` grid (CPU) and pays for the gap. Sorting by length before cutting
keeps that gap small, and budgeting on ``B * L_max`` bounds both memory and work per batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Grid tokens per batch, measured with `python -m pipeline.bench encoder --max-tokens N` on the
# 2-core dev machine (real-size model, 192-text mix). CPU fp32: 4096 -> 787 tokens/s, 8192 ->
# 771, 32768 -> 717, 2048 -> 704. CPU bf16 wants bigger matmuls: 16384 -> 2133, 8192 -> 1880,
# 4096 -> 1562. GPUs need large batches to fill the device.
DEFAULT_MAX_TOKENS = {("cpu", "float32"): 4096, ("cpu", "bfloat16"): 16384}
DEFAULT_MAX_TOKENS_GPU = 16384


def default_max_tokens(device_type: str, dtype_name: str = "float32") -> int:
    """The default token budget per batch for a device type and dtype name."""
    if device_type != "cpu":
        return DEFAULT_MAX_TOKENS_GPU
    return DEFAULT_MAX_TOKENS.get((device_type, dtype_name), 4096)


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Real tokens vs. the ``[B, L_max]`` grid that padded execution of the same groups needs."""

    real_tokens: int
    grid_tokens: int

    @property
    def waste(self) -> float:
        """Fraction of grid slots that are padding (0 when every group is one length)."""
        return 1.0 - self.real_tokens / self.grid_tokens if self.grid_tokens else 0.0


def gather_sequences(ids_T: np.ndarray, offsets_N1: np.ndarray, group: np.ndarray) -> np.ndarray:
    """The ids of sequences ``group`` one after another (sequence ``i`` is
    ``ids_T[offsets_N1[i]:offsets_N1[i + 1]]``): one fancy index, no per-sequence slice."""
    starts = offsets_N1[group]
    lengths = offsets_N1[np.asarray(group) + 1] - starts
    before = np.cumsum(lengths) - lengths  # where each sequence starts in the result
    return ids_T[np.arange(int(lengths.sum())) + np.repeat(starts - before, lengths)]


def plan_batches(lengths, max_tokens: int, max_seqs: int | None = None):
    """Group sequence indices so that each group's ``len(group) * max_len <= max_tokens``.

    Sequences are taken in ascending length order (stable, so equal lengths keep input order);
    a sequence longer than the budget gets a group of its own. Returns a list of int64 index
    arrays covering every index exactly once.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_seqs is not None and max_seqs < 1:
        raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
    order = np.argsort(lengths, kind="stable")
    groups: list[np.ndarray] = []
    start = 0
    for i in range(len(order)):
        count = i - start + 1  # group [start, i]; ascending, so lengths[order[i]] is its max
        too_many = max_seqs is not None and count > max_seqs
        if count > 1 and (count * lengths[order[i]] > max_tokens or too_many):
            groups.append(order[start:i])
            start = i
    if start < len(order):
        groups.append(order[start:])
    return groups


def fixed_size_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """The straightforward plan: sort by length, cut every ``batch_size`` sequences."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_stats(lengths, groups) -> PaddingStats:
    """Real vs. grid tokens of a plan (see :class:`PaddingStats`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(sum(lengths[g].sum() for g in groups))
    grid = int(sum(len(g) * lengths[g].max() for g in groups if len(g)))
    return PaddingStats(real, grid)


# A run of consecutive sequences shares one SDPA call on a [B, L_max] grid while its padding
# stays under this fraction of the grid; batches arrive length-sorted, so runs are long.
# Measured (python -m pipeline.bench encoder --no-baseline, 2-core dev machine, real size):
# 0.125 -> fp32 754 / bf16 2234 tokens/s, 9.7% / 10.8% attention padding; 0.05 -> 765 / 2638,
# 3.4% / 3.7%; 0.02 -> 805 / 1521 (bf16 pays for many small grids), 1.1% / 1.2%.
MAX_SEGMENT_PADDING = 0.05


def segment_runs(lengths: list[int], max_padding: float = MAX_SEGMENT_PADDING):
    """Split sequences (in order) into runs whose ``count * max_len`` grid wastes little."""
    runs, first, real, longest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        new_real, new_longest = real + n, max(longest, n)
        if i > first and (i - first + 1) * new_longest * (1 - max_padding) > new_real:
            runs.append((first, i))
            first, new_real, new_longest = i, n, n
        real, longest = new_real, new_longest
    if lengths:
        runs.append((first, len(lengths)))
    return runs


def attention_slots(lengths, groups, varlen: bool = False) -> np.ndarray:
    """Per sequence, the attention-grid width the packed encoder computes it at.

    With varlen attention that is its own length; otherwise the longest length of its
    segment run (see :func:`segment_runs`) within its group. Summed, it is the encoder's
    computed token slots; the gap to the real tokens is its padding.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if varlen:
        return lengths.copy()
    slots = np.zeros(len(lengths), np.int64)
    for g in groups:
        lens = lengths[g].tolist()
        for a, b in segment_runs(lens):
            slots[g[a:b]] = max(lens[a:b])
    return slots


def attention_padding(lengths, groups) -> float:
    """Padding fraction of the attention grids that the packed CPU path builds for a plan."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = grid = 0
    for g in groups:
        lens = lengths[g].tolist()
        for a, b in segment_runs(lens):
            real += sum(lens[a:b])
            grid += (b - a) * max(lens[a:b])
    return 1.0 - real / grid if grid else 0.0


def deal_groups(lengths, groups: list[np.ndarray], ranks: int) -> list[list[int]]:
    """Indices of ``groups`` for each of ``ranks`` expert-parallel ranks, balanced by work.

    Every rank of a group waits for the slowest at each MoE layer, so each step should cost
    about the same everywhere: the groups, heaviest first (``len * longest``), go one by one
    to the rank with the least work so far among those with the fewest groups, so no rank
    gets more than one group more than another.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    cost = [len(g) * int(lengths[g].max()) for g in groups]
    work, dealt = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(groups)), key=lambda i: -cost[i]):
        r = min(range(ranks), key=lambda r: (len(dealt[r]), work[r]))
        dealt[r].append(i)
        work[r] += cost[i]
    return dealt
