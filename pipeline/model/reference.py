"""The slow, obvious forms of the model: test references and the benchmark's baseline.

``padded_forward`` is the straightforward usage of the hub code, computed with the weights of a
:class:`NomicMoEEncoder`: a right-padded ``[B, L]`` batch, masked dense attention with the
reference's additive ``finfo.min`` key mask, and MoE as a loop over experts that routes every
position (pads included) exactly like the hub's ``NomicMoELayer``. ``per_token_moe`` is the
most literal MoE there is, one token and one expert at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoder import NomicMoEEncoder
from .layers import apply_rotary, rotary_cos_sin
from .moe import MoEFFN, route


def expert_loop_moe(moe: MoEFFN, h_ND: torch.Tensor) -> torch.Tensor:
    """The hub's pure-torch MoE: for each expert, gather its tokens, run it, ``index_add_``."""
    routing = route(h_ND, moe.router_ED, moe.top_k)
    weights_NK = routing.topk_weights_TK.to(h_ND.dtype)
    out_ND = torch.zeros_like(h_ND)
    x_ND = h_ND.to(moe.w1_EFD.dtype)
    for e in range(moe.w1_EFD.shape[0]):
        token_idx, slot = torch.where(routing.topk_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        y = F.gelu(x_ND[token_idx] @ moe.w1_EFD[e].T) @ moe.w2_EFD[e]
        out_ND.index_add_(0, token_idx, y.to(h_ND.dtype) * weights_NK[token_idx, slot, None])
    return out_ND + moe.bias_D


def per_token_moe(moe: MoEFFN, h_ND: torch.Tensor) -> torch.Tensor:
    """One token at a time, one chosen expert at a time, bias once at the end."""
    routing = route(h_ND, moe.router_ED, moe.top_k)
    rows = []
    for t in range(h_ND.shape[0]):
        acc = torch.zeros_like(h_ND[t])
        for j in range(moe.top_k):
            e = int(routing.topk_ids_TK[t, j])
            y = F.gelu(h_ND[t].to(moe.w1_EFD.dtype) @ moe.w1_EFD[e].T) @ moe.w2_EFD[e]
            acc = acc + routing.topk_weights_TK[t, j].to(h_ND.dtype) * y.to(h_ND.dtype)
        rows.append(acc + moe.bias_D)
    return torch.stack(rows) if rows else h_ND.new_zeros(h_ND.shape)


@torch.no_grad()
def padded_forward(
    model: NomicMoEEncoder, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor
) -> torch.Tensor:
    """Last hidden states ``[B, L, D]`` of a right-padded batch, the straightforward way."""
    cfg = model.config
    B, L = input_ids_BL.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    x = model.embed(input_ids_BL)
    positions = torch.arange(L, device=x.device)
    dtype = model.dtype  # the compute dtype; x, the stream, is fp32 in half precision
    cos, sin = rotary_cos_sin(positions, Dh, cfg.rotary_base, dtype)  # [L, Dh/2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    keep = attention_mask_BL.to(dtype)[:, None, None, :]
    additive_mask = (1.0 - keep) * torch.finfo(dtype).min
    for block in model.layers:
        q, k, v = block.attn.qkv(x.to(dtype)).view(B, L, 3, H, Dh).unbind(2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=additive_mask
        )
        h = block.norm1(x + block.attn.out(o.transpose(1, 2).reshape(B, L, H * Dh)))
        if isinstance(block.ffn, MoEFFN):
            f = expert_loop_moe(block.ffn, h.reshape(B * L, -1)).view(B, L, -1)
        else:
            f = block.ffn(h)
        x = block.norm2(h + f)
    return x
