"""Mean pooling per packed sequence, L2 normalisation and Matryoshka widths (model-spec 3.7)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .packed import PackedBatch

NORM_EPS = 1e-12


def mean_pool(x_TD: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Mean over each sequence's tokens (all real: ``<s>``, prefix and ``</s>`` included).

    Accumulates in fp32 whatever the activation dtype: ``[T, D] -> [B, D]`` float32.
    """
    sums_BD = x_TD.new_zeros(batch.num_seqs, x_TD.shape[-1], dtype=torch.float32)
    sums_BD.index_add_(0, batch.seq_ids_T, x_TD.float())
    return sums_BD / batch.lengths_B.to(sums_BD.dtype).clamp_min(1)[:, None]


def matryoshka(pooled_BD: torch.Tensor, dims: Iterable[int]) -> dict[int, torch.Tensor]:
    """For each width ``d``: the first ``d`` pooled features, then L2-normalised.

    Truncate first, then normalise (the model card's recipe), so every width is a unit vector.
    """
    return {d: F.normalize(pooled_BD[:, :d], p=2.0, dim=-1, eps=NORM_EPS) for d in dims}
