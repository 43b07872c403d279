"""Batch planning: sequence lengths -> token-budgeted groups. Pure Python/NumPy (no torch, no Ray).

The encoder runs packed batches, so the matmuls never see padding; only attention lays each
batch out on a ``[B, L_max]`` grid (CPU) and pays for the gap. Sorting by length before cutting
keeps that gap small, and budgeting on ``B * L_max`` bounds both memory and work per batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_MAX_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Real tokens vs. the ``[B, L_max]`` grid that padded execution of the same groups needs."""

    real_tokens: int
    grid_tokens: int

    @property
    def waste(self) -> float:
        """Fraction of grid slots that are padding (0 when every group is one length)."""
        return 1.0 - self.real_tokens / self.grid_tokens if self.grid_tokens else 0.0


def plan_batches(lengths, max_tokens: int = DEFAULT_MAX_TOKENS, max_seqs: int | None = None):
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
