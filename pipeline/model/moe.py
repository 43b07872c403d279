"""Token-choice MoE FFN: fp32 softmax router, top-k, tokens sorted by expert, grouped matmuls.

model-spec 3.6: ``probs = softmax(x Wr^T)`` over all experts in fp32, top-k of the probabilities
(not renormalised), ``y_e = GELU_erf(x w1[e]^T) w2[e]`` with ``w1, w2`` viewed as ``[E, F, D]``
(``w2`` *not* transposed), ``f = sum_k w_k y_{e_k} + bias`` (bias once, after the sum).
Legend in :mod:`pipeline.model.packed`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .layers import CUDA_KERNEL_DEVICES

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

MOE_BACKENDS = ("auto", "grouped", "loop")


@dataclasses.dataclass(frozen=True)
class Routing:
    """Router decisions for ``T`` tokens."""

    topk_ids_TK: torch.Tensor  # int64, experts in descending probability
    topk_weights_TK: torch.Tensor  # fp32 probabilities, not renormalised
    probs_TE: torch.Tensor  # fp32 softmax over all experts


def route(x_TD: torch.Tensor, router_ED: torch.Tensor, top_k: int) -> Routing:
    """Softmax over all experts in fp32, then top-k (model-spec 3.6 steps 1-2)."""
    probs_TE = F.linear(x_TD.float(), router_ED.float()).softmax(dim=-1)
    weights_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
    return Routing(ids_TK, weights_TK, probs_TE)


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in MOE_BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; choose one of {MOE_BACKENDS}")
    if backend != "auto":
        if backend == "grouped" and _grouped_mm is None:
            raise ValueError("MoE backend 'grouped' needs torch with F.grouped_mm/_grouped_mm")
        return backend
    # The fused kernel is a CUDA bf16 kernel (SM >= 80; it refuses fp16). Elsewhere torch's
    # grouped_mm is a per-group loop itself, so our own loop over the same sorted slots is as
    # fast. The loop reads the expert counts on the host: on CUDA in fp16 that is a device
    # sync per expert matmul (bf16 has none).
    if (_grouped_mm is not None and x.device.type in CUDA_KERNEL_DEVICES
            and x.dtype == torch.bfloat16):
        return "grouped"
    return "loop"


def expert_matmul(
    x_SI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Rows of ``x`` sorted by expert, ``counts_E[e]`` rows for expert ``e``: ``x_e @ w[e]``."""
    if backend == "grouped":
        return _grouped_mm(x_SI, w_EIO, offs=offsets_E)
    out_SO = x_SI.new_empty(x_SI.shape[0], w_EIO.shape[-1])
    start = 0
    for e, count in enumerate(host_counts(counts_E)):
        if count:  # an expert with no tokens costs nothing
            torch.mm(x_SI[start : start + count], w_EIO[e], out=out_SO[start : start + count])
        start += count
    return out_SO


def host_counts(counts_E: torch.Tensor) -> list[int]:
    """The loop backend's rows per expert, read on the host (a device sync off the CPU)."""
    return counts_E.tolist()


def expert_slots(flat_ids_S: torch.Tensor, num_experts: int):
    """Slots sorted by expert: ``order_S`` (stable), ``counts_E`` and the int32 end offsets
    ``offsets_E`` of each expert's run, all on the device without a host sync (``bincount``
    would size its output by the largest id, which CUDA reads back to the host)."""
    order_S = torch.argsort(flat_ids_S, stable=True)
    experts_E = torch.arange(num_experts, device=flat_ids_S.device, dtype=flat_ids_S.dtype)
    ends_E = torch.searchsorted(flat_ids_S[order_S], experts_E, right=True)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    return order_S, counts_E, ends_E.to(torch.int32)


def grouped_experts(
    x_TD: torch.Tensor, routing: Routing, w1_EFD: torch.Tensor, w2_EFD: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """``sum_k w_k * expert_{e_k}(x)`` per token, computing each expert only on its tokens."""
    T, K = routing.topk_ids_TK.shape
    E = w1_EFD.shape[0]
    backend = _resolve_backend(backend, x_TD)
    order_S, counts_E, offsets_E = expert_slots(routing.topk_ids_TK.reshape(-1), E)
    token_S = order_S // K
    x_SD = x_TD[token_S].to(w1_EFD.dtype)
    h_SF = F.gelu(expert_matmul(x_SD, w1_EFD.transpose(1, 2), counts_E, offsets_E, backend))
    y_SD = expert_matmul(h_SF, w2_EFD, counts_E, offsets_E, backend)
    return gate_and_sum(x_TD, y_SD, routing, order_S, token_S)


def gate_and_sum(x_TD: torch.Tensor, y_SD: torch.Tensor, routing: Routing,
                 order_S: torch.Tensor, token_S: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k * y`` per token, in the stream's dtype (``x_TD``'s: fp32 in half precision,
    so the gate and the two experts' sum are not rounded to 8 bits)."""
    gate_S1 = routing.topk_weights_TK.reshape(-1)[order_S, None].to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_S, y_SD.to(x_TD.dtype) * gate_S1)


class MoEFFN(nn.Module):
    """The MoE feed-forward of odd layers. The router weight always stays fp32."""

    def __init__(self, cfg: EncoderConfig, backend: str = "auto") -> None:
        super().__init__()
        E, F_, D = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
        self.top_k = cfg.top_k
        self.backend = backend
        self.router_ED = nn.Parameter(torch.empty(E, D, dtype=torch.float32))
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w2_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.bias_D = nn.Parameter(torch.empty(D))

    def forward(self, h_TD: torch.Tensor, routing_out: list | None = None) -> torch.Tensor:
        routing = route(h_TD, self.router_ED, self.top_k)
        if routing_out is not None:
            routing_out.append(routing)
        y_TD = grouped_experts(h_TD, routing, self.w1_EFD, self.w2_EFD, self.backend)
        return y_TD + self.bias_D
