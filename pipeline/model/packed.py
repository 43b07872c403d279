"""The packed batch: the only contract between batching and the encoder.

Sequences are concatenated without padding. Legend for tensor names used across the model:
``T`` packed tokens, ``B`` sequences, ``L`` longest sequence, ``D`` model width, ``H`` heads,
``Dh`` head width, ``F`` expert/FFN hidden, ``E`` experts, ``K`` top-k, ``S`` routed slots (T*K).
The pipeline's arrays around the model use the same legend, plus ``N`` rows of a window (one
Ray Data batch), ``M`` rows of it that are encoded, ``G`` token-budgeted batches of a window,
``R`` expert-parallel ranks and ``W`` one Matryoshka width (``pipeline/stages/embed.py``,
``pipeline/cluster/expert_groups.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """``B`` sequences of token ids packed into one ``[T]`` row.

    ``cu_seqlens_B1[b]`` is where sequence ``b`` starts, ``cu_seqlens_B1[-1] == T``;
    ``position_ids_T`` restarts at 0 for each sequence (rotary positions); ``seq_ids_T`` names
    the sequence of each token. Attention never crosses sequences.
    """

    input_ids_T: torch.Tensor  # int64 [T]
    cu_seqlens_B1: torch.Tensor  # int32 [B + 1]
    position_ids_T: torch.Tensor  # int64 [T]
    seq_ids_T: torch.Tensor  # int64 [T]
    max_seqlen: int

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_B1.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids_T.numel()

    @property
    def lengths_B(self) -> torch.Tensor:
        return (self.cu_seqlens_B1[1:] - self.cu_seqlens_B1[:-1]).long()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids_T, self.cu_seqlens_B1, self.position_ids_T, self.seq_ids_T

    def pin_memory(self) -> "PackedBatch":
        """A copy in page-locked host memory (the source of a non-blocking copy to CUDA)."""
        pinned = [t.pin_memory() for t in self.tensors()]
        return PackedBatch(*pinned, self.max_seqlen)

    def to(self, device: torch.device | str) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            move(self.input_ids_T), move(self.cu_seqlens_B1), move(self.position_ids_T),
            move(self.seq_ids_T), self.max_seqlen,
        )

    @classmethod
    def from_lengths_and_ids(cls, input_ids_T: np.ndarray, lengths_B: np.ndarray) -> "PackedBatch":
        """Pack from a flat id array and per-sequence lengths (each >= 1)."""
        lengths_B = np.asarray(lengths_B, dtype=np.int64)
        if lengths_B.size == 0:
            raise ValueError("a packed batch needs at least one sequence")
        if lengths_B.min() < 1:
            raise ValueError("every sequence in a packed batch needs at least one token")
        total = int(lengths_B.sum())
        if len(input_ids_T) != total:
            raise ValueError(f"{len(input_ids_T)} token ids for sequences totalling {total}")
        cu = np.zeros(len(lengths_B) + 1, dtype=np.int64)
        np.cumsum(lengths_B, out=cu[1:])
        seq_ids = np.repeat(np.arange(len(lengths_B), dtype=np.int64), lengths_B)
        positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths_B)
        return cls(
            input_ids_T=torch.from_numpy(np.ascontiguousarray(input_ids_T, dtype=np.int64)),
            cu_seqlens_B1=torch.from_numpy(cu.astype(np.int32)),
            position_ids_T=torch.from_numpy(positions),
            seq_ids_T=torch.from_numpy(seq_ids),
            max_seqlen=int(lengths_B.max()),
        )

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> "PackedBatch":
        """Pack a list of token-id sequences."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(
            sequences
        ) else np.zeros(0, dtype=np.int64)
        return cls.from_lengths_and_ids(flat, lengths)

    @classmethod
    def from_padded(
        cls, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
    ) -> tuple["PackedBatch", torch.Tensor]:
        """Pack a right-padded ``[B, L]`` batch; also returns the flat index of real tokens.

        Raises ``ValueError`` for left padding or holes in the mask: rotary positions would
        differ from running each sequence alone (model-spec 3.3).
        """
        if input_ids_BL.dim() != 2 or input_ids_BL.shape != attention_mask_BL.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids_BL.shape)} and attention_mask "
                f"{tuple(attention_mask_BL.shape)} must both be [B, L]"
            )
        mask = attention_mask_BL.to(torch.bool)
        lengths = mask.sum(dim=1)
        L = mask.shape[1]
        right_padded = torch.arange(L, device=mask.device)[None, :] < lengths[:, None]
        if not torch.equal(mask, right_padded):
            raise ValueError("attention_mask must be right-padded: 1s first, then only 0s")
        if bool((lengths == 0).any()):
            raise ValueError("every row of attention_mask needs at least one real token")
        flat_index = mask.reshape(-1).nonzero().squeeze(1)
        ids = input_ids_BL.reshape(-1)[flat_index].cpu().numpy()
        packed = cls.from_lengths_and_ids(ids, lengths.cpu().numpy())
        return packed.to(input_ids_BL.device), flat_index
