"""Expert parallelism: the experts of every MoE layer split over the ranks of a process group.

Rank ``r`` of ``N`` holds experts ``[r*E/N, (r+1)*E/N)`` of every MoE layer, and every dense
weight (embeddings, attention, dense FFNs, routers, the expert bias). Each rank runs its own
packed batch through attention and the dense layers; at a MoE layer:

1. it routes its tokens (fp32 softmax, top-k) and sorts the routed slots by expert, so slots
   for rank 0's experts come first, then rank 1's, ...;
2. all-to-all of the per-expert slot counts (``E`` int64 per rank), then all-to-all of the
   slots' hidden states, so each rank receives the tokens of its own experts from every rank;
3. the received rows are ordered by local expert and run as grouped matmuls (as the
   single-process path does with all experts);
4. all-to-all of the results back, in the order they came; each rank then weights them by
   their gates and sums them into its tokens exactly as :func:`~.moe.grouped_experts` does.

Every rank must make the same collective calls in the same order. A rank with no batch for a
step calls :meth:`NomicMoEEncoder.forward_idle`, which takes part in every MoE layer's three
exchanges with nothing to send. No Ray here: the pipeline's Ray actors
(``pipeline/cluster/expert_groups.py``)
and the benchmark (torch.multiprocessing) both use this module.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig, check_split
from .moe import Routing, _resolve_backend, expert_matmul, gate_and_sum, route


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
    """One rank's place in an expert-parallel group (``group`` None: the default group)."""

    rank: int
    world_size: int
    group: object | None = None

    def experts(self, num_experts: int) -> tuple[int, int]:
        """``[lo, hi)``: the experts this rank holds."""
        check_split(num_experts, self.world_size)
        per = num_experts // self.world_size
        return self.rank * per, (self.rank + 1) * per


def init_group(rank: int, world_size: int, init_method: str, device: torch.device,
               timeout_s: float) -> ExpertGroup:
    """Join the default process group: NCCL on CUDA, gloo on CPU. Every collective (and the
    rendezvous itself) gives up after ``timeout_s`` seconds instead of hanging."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if device.index is None:  # a Ray GPU actor sees only its own GPU(s)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    return ExpertGroup(rank, world_size)


def _transport(x: torch.Tensor, group) -> torch.Tensor:
    # Not every gloo build takes 16-bit floats (torch 2.13's does, but refuses int16), so the
    # bits travel as bytes (lossless, 2 per element).
    if x.dtype in (torch.bfloat16, torch.float16) and dist.get_backend(group) == "gloo":
        return x.view(torch.uint8)
    return x


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows ``x`` split by ``send`` (one count per rank) out; ``sum(recv)`` rows in."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(_transport(out, group), _transport(x.contiguous(), group),
                           output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class ExpertParallelMoE(nn.Module):
    """The MoE FFN of one rank: the full router, its own ``E/N`` experts, the expert bias."""

    def __init__(self, cfg: EncoderConfig, placement: ExpertGroup, backend: str = "auto") -> None:
        super().__init__()
        lo, hi = placement.experts(cfg.num_experts)
        self.placement = placement
        self.num_experts, self.top_k, self.backend = cfg.num_experts, cfg.top_k, backend
        self.router_ED = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size,
                                                  dtype=torch.float32))
        self.w1_EFD = nn.Parameter(torch.empty(hi - lo, cfg.ffn_size, cfg.hidden_size))
        self.w2_EFD = nn.Parameter(torch.empty(hi - lo, cfg.ffn_size, cfg.hidden_size))
        self.bias_D = nn.Parameter(torch.empty(cfg.hidden_size))
        self.last_exchange: tuple[int, int] = (0, 0)  # rows sent, rows received (last call)

    def forward(self, h_TD: torch.Tensor, routing_out: list | None = None) -> torch.Tensor:
        routing = route(h_TD, self.router_ED, self.top_k)
        if routing_out is not None:
            routing_out.append(routing)
        y_TD = self.routed(h_TD, routing)
        return y_TD + self.bias_D

    def routed(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``sum_k w_k * expert_{e_k}(x)``: the same slot order and sums as ``grouped_experts``,
        with each slot's expert computed on the rank that holds it."""
        K = routing.topk_ids_TK.shape[1]
        flat_ids_S = routing.topk_ids_TK.reshape(-1)
        order_S = torch.argsort(flat_ids_S, stable=True)
        token_S = order_S // K
        counts_E = torch.bincount(flat_ids_S, minlength=self.num_experts)
        y_SD = self.exchange(x_TD[token_S].to(self.w1_EFD.dtype), counts_E)
        return gate_and_sum(x_TD, y_SD, routing, order_S, token_S)

    def idle(self, like: torch.Tensor) -> None:
        """Take part in this layer's exchanges with no tokens (a rank with no batch)."""
        empty = like.new_empty(0, like.shape[-1])
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=like.device)
        self.exchange(empty, counts)

    def exchange(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Slots sorted by expert (``counts_E[e]`` rows for expert ``e``) -> their experts'
        outputs, same order. Three all-to-alls: counts, tokens out, results back."""
        N, group = self.placement.world_size, self.placement.group
        local = self.num_experts // N
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=group)  # [E/N] from each rank
        recv_NL = recv_counts.view(N, local)
        send = counts_E.view(N, local).sum(1).tolist()
        recv = recv_NL.sum(1).tolist()
        self.last_exchange = (sum(send), sum(recv))
        x_RD = all_to_all(x_SD, send, recv, group)
        if not x_RD.shape[0]:  # no token for any of this rank's experts
            return all_to_all(x_RD, recv, send, group)
        # Received rows come by source rank, then local expert: regroup them by local expert.
        expert_R = torch.repeat_interleave(
            torch.arange(local, device=x_RD.device).repeat(N), recv_NL.reshape(-1))
        order_R = torch.argsort(expert_R, stable=True)
        counts_L = recv_NL.sum(0)
        offsets_L = counts_L.cumsum(0).to(torch.int32)
        backend = _resolve_backend(self.backend, x_RD)
        h_RF = F.gelu(expert_matmul(x_RD[order_R], self.w1_EFD.transpose(1, 2), counts_L,
                                    offsets_L, backend))
        y_sorted = expert_matmul(h_RF, self.w2_EFD, counts_L, offsets_L, backend)
        y_RD = torch.empty_like(y_sorted)
        y_RD[order_R] = y_sorted
        return all_to_all(y_RD, recv, send, group)
