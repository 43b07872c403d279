"""The nomic-embed-text-v2-moe encoder over packed batches (model-spec section 3).

Embeddings (word + the single token-type row) -> LayerNorm -> post-norm blocks
``h = LN1(x + Attn(x)); x = LN2(h + FFN(h))`` with a dense FFN on even layers and the MoE FFN
on odd layers. No final norm, no pooler. Legend in :mod:`pipeline.model.packed`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig
from .expert_parallel import ExpertGroup, ExpertParallelMoE
from .layers import Attention, AttentionPlan, DenseFFN, rotary_cos_sin
from .moe import MoEFFN, Routing
from .packed import PackedBatch


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, moe: bool, moe_backend: str,
                 placement: ExpertGroup | None = None) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if moe:
            self.ffn = ExpertParallelMoE(cfg, placement, moe_backend) if placement \
                else MoEFFN(cfg, moe_backend)
        else:
            self.ffn = DenseFFN(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x_TD, cos, sin, plan, routing_out=None):
        h_TD = self.norm1(x_TD + self.attn(x_TD, cos, sin, plan))
        f_TD = self.ffn(h_TD) if isinstance(self.ffn, DenseFFN) else self.ffn(h_TD, routing_out)
        return self.norm2(h_TD + f_TD)


class NomicMoEEncoder(nn.Module):
    """The encoder. ``forward_packed`` is the real path; ``forward`` wraps it for ``[B, L]``.

    Build with :func:`pipeline.model.load_encoder` (weights from a checkpoint); constructing it
    directly gives uninitialised parameters. With ``placement`` the module is one rank of an
    expert-parallel group (:mod:`pipeline.model.expert_parallel`): it holds only its share of
    the experts, and every rank must call :meth:`forward_packed` or :meth:`forward_idle` in
    step with the others.
    """

    def __init__(self, cfg: EncoderConfig, moe_backend: str = "auto",
                 placement: ExpertGroup | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.placement = placement
        # Given uninitialised weights: nn.Embedding's own random init, run on the meta device
        # that load_encoder builds on, goes through torch._refs and imports torch._dynamo
        # (over a second at every worker start, for values the checkpoint replaces).
        self.word_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.token_type_embeddings = nn.Embedding(
            cfg.type_vocab_size, cfg.hidden_size,
            _weight=torch.empty(cfg.type_vocab_size, cfg.hidden_size))
        self.emb_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            Block(cfg, cfg.is_moe_layer(i), moe_backend, placement) for i in range(cfg.num_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the matmuls' and attention's (the residual stream is fp32)."""
        return self.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def embed(self, input_ids_T: torch.Tensor) -> torch.Tensor:
        # token_type_ids are always 0 for this model: row 0 is added to every token. The sum
        # and everything after it is in the stream's dtype (the norms': fp32 in half precision).
        type_row_D = self.token_type_embeddings.weight[0]
        x_TD = self.word_embeddings(input_ids_T).to(type_row_D.dtype) + type_row_D
        return self.emb_norm(x_TD)

    def forward_packed(
        self, batch: PackedBatch, routing_out: list[Routing] | None = None,
        hidden_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``[T, D]`` of a packed batch (on this module's device; fp32, the
        residual stream's dtype, whatever the compute dtype).

        If given, ``routing_out`` receives each MoE layer's :class:`Routing` and ``hidden_out``
        the embedding output and every block's output, in order (for tests and debugging).
        """
        cfg = self.config
        if batch.max_seqlen > cfg.max_positions:
            raise ValueError(
                f"sequence of {batch.max_seqlen} tokens exceeds the model's "
                f"{cfg.max_positions} positions"
            )
        # Checked where it costs no device sync; on CUDA a bad id would be a device assert, so
        # callers validate the tokenizer against the vocabulary at load time instead.
        ids = batch.input_ids_T
        if ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= cfg.vocab_size:
            raise ValueError(
                f"token id {int(batch.input_ids_T.max())} is outside the vocabulary "
                f"({cfg.vocab_size}); tokenizer and model do not match"
            )
        x_TD = self.embed(batch.input_ids_T)
        cos, sin = rotary_cos_sin(batch.position_ids_T, cfg.head_dim, cfg.rotary_base, self.dtype)
        plan = AttentionPlan.build(batch, self.dtype)
        if hidden_out is not None:
            hidden_out.append(x_TD)
        for block in self.layers:
            x_TD = block(x_TD, cos, sin, plan, routing_out)
            if hidden_out is not None:
                hidden_out.append(x_TD)
        return x_TD

    def forward_idle(self) -> None:
        """One step with no batch: an expert-parallel rank still serves the other ranks' tokens
        at every MoE layer. Nothing to do without expert parallelism."""
        if self.placement is None:
            return
        like = self.word_embeddings.weight
        for block in self.layers:
            if isinstance(block.ffn, ExpertParallelMoE):
                block.ffn.idle(like)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded ``[B, L]`` ids and mask -> last hidden states ``[B, L, D]``.

        A thin wrapper over :meth:`forward_packed`; pad positions of the output are zero.
        """
        batch, flat_index = PackedBatch.from_padded(
            input_ids.to(self.device), attention_mask.to(self.device)
        )
        x_TD = self.forward_packed(batch)
        B, L = input_ids.shape
        out = x_TD.new_zeros(B * L, x_TD.shape[-1])
        out[flat_index] = x_TD
        return out.view(B, L, -1)
