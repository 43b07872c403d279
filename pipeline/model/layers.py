"""Rotary embedding, packed attention and the dense FFN (model-spec 3.3-3.5).

Names carry their shapes; legend in :mod:`pipeline.model.packed`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..batching import MAX_SEGMENT_PADDING, segment_runs
from .config import EncoderConfig
from .packed import PackedBatch


# Device types whose forward pass takes the CUDA kernels in half precision (flash varlen
# attention, grouped expert matmuls). tests/test_gpu_path.py adds "meta" to run exactly that
# path, with shapes and dtypes but no data, on a machine without a GPU.
CUDA_KERNEL_DEVICES = {"cuda"}


@functools.cache
def _varlen_attn():
    """torch >= 2.10's flash-attention varlen kernel on CUDA (no padding at all), or None.

    Lazy: importing it imports torch._dynamo (over a second on a CPU worker's start), and only
    CUDA in half precision uses it.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn  # lazy: torch, see above
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``position * inv_freq`` in fp32, cast to ``dtype``: ``[..., head_dim / 2]``.

    Same arithmetic as the reference: ``inv_freq = 1 / base^(arange(0, d, 2) / d)`` in fp32,
    angles as a product of two fp32 values, cos/sin in fp32, then the cast.
    """
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (exponent / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (GPT-NeoX, rotate-half) rotary on the last axis of ``x``.

    ``cos``/``sin`` broadcast against ``x[..., :Dh/2]``; the same angles serve both halves.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` in place (same arithmetic, no new tensor for the result)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out1 = x1 * cos - x2 * sin
    x1_sin = x1 * sin
    x2.mul_(cos).add_(x1_sin)
    x1.copy_(out1)
    return x


@dataclasses.dataclass(frozen=True)
class GridSegment:
    """Consecutive sequences ``[start, end)`` of the packed row, attended as one padded grid."""

    start: int
    end: int
    num_seqs: int
    max_len: int
    pad_index: torch.Tensor | None  # grid slot of each token of the segment; None: no padding
    key_mask_B11L: torch.Tensor | None  # True = real key


def uses_varlen(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention runs as flash varlen (no padding) for this device and dtype."""
    return (device.type in CUDA_KERNEL_DEVICES and dtype in (torch.float16, torch.bfloat16)
            and _varlen_attn() is not None)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """How one packed batch runs attention; built once per batch, shared by every layer."""

    batch: PackedBatch
    use_varlen: bool
    segments: tuple[GridSegment, ...]

    @classmethod
    def build(cls, batch: PackedBatch, dtype: torch.dtype, varlen: bool | None = None,
              max_padding: float = MAX_SEGMENT_PADDING) -> "AttentionPlan":
        """``varlen`` (default: :func:`uses_varlen`) or grids of consecutive sequences, each
        padding at most ``max_padding`` of its slots (1.0: one padded grid for the batch)."""
        device = batch.input_ids_T.device
        if uses_varlen(device, dtype) if varlen is None else varlen:
            return cls(batch, True, ())
        lengths = batch.lengths_B.tolist()
        cu = batch.cu_seqlens_B1.tolist()
        segments = []
        for a, b in segment_runs(lengths, max_padding):
            n, longest = b - a, max(lengths[a:b])
            pad_index = key_mask = None
            if n * longest != cu[b] - cu[a]:
                seg_lengths = batch.lengths_B[a:b]
                local_seq = batch.seq_ids_T[cu[a] : cu[b]] - a
                pad_index = local_seq * longest + batch.position_ids_T[cu[a] : cu[b]]
                keys = torch.arange(longest, device=device)[None, :] < seg_lengths[:, None]
                key_mask = keys[:, None, None, :]
            segments.append(GridSegment(cu[a], cu[b], n, longest, pad_index, key_mask))
        return cls(batch, False, tuple(segments))


def _grid_attention(qkv_T3HDh: torch.Tensor, seg: GridSegment) -> torch.Tensor:
    T, _, H, Dh = qkv_T3HDh.shape
    B, L = seg.num_seqs, seg.max_len
    if seg.pad_index is None:
        grid = qkv_T3HDh
    else:
        grid = qkv_T3HDh.new_zeros(B * L, 3, H, Dh)
        grid[seg.pad_index] = qkv_T3HDh
    q_BHLDh, k_BHLDh, v_BHLDh = grid.view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
    o_BHLDh = F.scaled_dot_product_attention(q_BHLDh, k_BHLDh, v_BHLDh, attn_mask=seg.key_mask_B11L)
    o_GHDh = o_BHLDh.transpose(1, 2).reshape(B * L, H, Dh)
    return o_GHDh if seg.pad_index is None else o_GHDh[seg.pad_index]


def packed_attention(qkv_T3HDh: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Softmax attention within each packed sequence: ``[T, 3, H, Dh] -> [T, H, Dh]``.

    On CUDA in half precision this is flash-attention varlen (no padding). Elsewhere runs of
    similar-length sequences are laid out on small ``[B, L]`` grids for SDPA with a key mask;
    only attention (never the projections or FFNs) sees those few pads.
    """
    if plan.use_varlen:
        cu = plan.batch.cu_seqlens_B1
        q, k, v = qkv_T3HDh.unbind(1)
        return _varlen_attn()(q, k, v, cu, cu, plan.batch.max_seqlen, plan.batch.max_seqlen)
    if len(plan.segments) == 1:
        return _grid_attention(qkv_T3HDh, plan.segments[0])
    T, _, H, Dh = qkv_T3HDh.shape
    out_THDh = qkv_T3HDh.new_empty(T, H, Dh)
    for seg in plan.segments:
        out_THDh[seg.start : seg.end] = _grid_attention(qkv_T3HDh[seg.start : seg.end], seg)
    return out_THDh


class Attention(nn.Module):
    """Fused-QKV self-attention with rotary on q and k, over packed tokens. Takes the stream
    (fp32) and returns the out projection in the compute dtype (the weights')."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # rows [q; k; v], head-major
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x_TD: torch.Tensor, cos_TDh2: torch.Tensor, sin_TDh2: torch.Tensor,
        plan: AttentionPlan,
    ) -> torch.Tensor:
        T = x_TD.shape[0]
        qkv_T3HDh = self.qkv(x_TD.to(self.qkv.weight.dtype)).view(T, 3, self.num_heads,
                                                                  self.head_dim)
        apply_rotary_(qkv_T3HDh[:, :2], cos_TDh2[:, None, None], sin_TDh2[:, None, None])
        o_THDh = packed_attention(qkv_T3HDh, plan)
        return self.out(o_THDh.reshape(T, -1))


class DenseFFN(nn.Module):
    """fc2(GELU_erf(fc1(x))) with biases (even layers)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, h_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h_TD.to(self.fc1.weight.dtype))))
