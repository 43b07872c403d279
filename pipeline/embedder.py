"""``Embedder``: texts in, unit-norm Matryoshka embeddings out, on one device.

The in-process API the pipeline's encoder stage and the tests build on::

    emb = Embedder.from_pretrained("nomic-ai/nomic-embed-text-v2-moe", device="cuda")
    out = emb.encode(["some text"], task="document", dims=(768, 256))  # {768: [N, 768], ...}
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Sequence

import numpy as np
import torch

from .config import POOLED, resolve_device_type, resolve_dtype_name
from .batching import attention_padding, attention_slots, default_max_tokens, gather_sequences
from .batching import plan_batches
from .model.layers import uses_varlen
from .model.cpu import retain_freed_memory
from .model.staging import DeviceStaging, encode_packed
from .model.sources import DEFAULT_MODEL, ModelSourceError, resolve_model, weights_fingerprint
from .model import NomicMoEEncoder, PackedBatch, check_dims, load_encoder
from .tokenize import TextTokenizer, TokenizedBatch, TokenizerError, add_prefix, task_prefix
from .tokenize import text_problem

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the current CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device(resolve_device_type("auto", torch.cuda.device_count()))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A torch dtype or its name; ``"auto"`` is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[resolve_dtype_name(str(dtype).lower(), device.type)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto") from None


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What one :meth:`Embedder.embed_tokenized` call did."""

    texts: int
    tokens: int
    texts_truncated: int
    batches: int
    attention_padding: float  # fraction of attention-grid slots that were padding (CPU path)


class Embedder:
    """A loaded encoder and tokenizer, and the batching between them."""

    output_dtypes = ("float32", "float16")  # of the width vectors (``embed_tokenized``)

    def __init__(
        self, encoder: NomicMoEEncoder, tokenizer: TextTokenizer, *, model_id: str | None = None,
        revision: str | None = None, max_tokens_per_batch: int | None = None,
    ) -> None:
        if max_tokens_per_batch is None:
            dtype_name = str(encoder.dtype).removeprefix("torch.")
            max_tokens_per_batch = default_max_tokens(encoder.device.type, dtype_name)
        if tokenizer.vocab_size > encoder.config.vocab_size:
            raise TokenizerError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                f"{encoder.config.vocab_size}: they are not from the same model"
            )
        if max_tokens_per_batch < tokenizer.max_length:
            raise ValueError(
                f"max_tokens_per_batch {max_tokens_per_batch} is below the longest sequence "
                f"({tokenizer.max_length} tokens)"
            )
        self.encoder, self.tokenizer = encoder, tokenizer
        self.model_id, self.revision = model_id, revision
        self.max_tokens_per_batch = max_tokens_per_batch
        self.last_stats: EncodeStats | None = None
        self.staging = DeviceStaging(encoder.device)
        self._device_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, source: str | os.PathLike | None = None, *, revision: str | None = None,
        device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
        cache_dir: str | os.PathLike | None = None,
        max_tokens_per_batch: int | None = None, moe_backend: str = "auto",
        placement=None, gguf_expert_bias: str | os.PathLike = "zero",
    ) -> "Embedder":
        """Load from a local directory, a hub id (default the real model) or an fsspec prefix,
        or a GGUF file (a path, a URI or ``org/name/file.gguf``; see docs/gguf.md).

        ``dtype`` is a torch dtype or its name (float32, bfloat16, float16; ``auto`` picks
        bfloat16 on CUDA, float32 on CPU). The router always runs in float32.
        ``max_tokens_per_batch`` bounds ``sequences x longest`` per forward pass (default
        4096 on CPU in float32, 16384 on CPU in bfloat16 and on CUDA). ``placement`` (an
        :class:`~pipeline.model.expert_parallel.ExpertGroup`) makes this one rank of an
        expert-parallel group: it loads only its experts and must encode in step with the
        other ranks (see ``steps`` of :meth:`embed_tokenized`). ``gguf_expert_bias`` (GGUF
        only): ``"zero"``, what llama.cpp computes, or the sidecar file of the hub model's MoE
        output biases (``python -m pipeline.model.gguf expert-bias``).
        """
        resolved = resolve_model(source or DEFAULT_MODEL, revision=revision, cache_dir=cache_dir,
                                 gguf_expert_bias=gguf_expert_bias)
        dev = resolve_device(device)
        if dev.type == "cpu":
            retain_freed_memory()
        encoder = load_encoder(resolved.local_dir, dev, resolve_dtype(dtype, dev), moe_backend,
                               placement)
        return cls(
            encoder, TextTokenizer.from_dir(resolved.local_dir), model_id=resolved.model_id,
            revision=resolved.revision, max_tokens_per_batch=max_tokens_per_batch,
        )

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def tokenize(self, texts: Sequence[str], task: str = "document") -> TokenizedBatch:
        """Validate, prefix and tokenise ``texts``; raises ``ValueError`` naming bad texts."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        prefix = task_prefix(task)
        problems = [(i, p) for i, t in enumerate(texts) if (p := text_problem(t)) is not None]
        if problems:
            shown = "; ".join(f"text {i}: {p}" for i, p in problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"{len(problems)} text(s) cannot be embedded: {shown}{more}")
        return self.tokenizer.encode([add_prefix(t, prefix) for t in texts])

    def encode(
        self, texts: Sequence[str], task: str = "document", dims: Sequence[int] = (768, 256),
    ) -> dict[int, np.ndarray]:
        """Embed ``texts``: ``{width: float32 array [N, width]}``, every row unit-norm.

        ``task`` is document, query, classification or clustering (its prefix is added unless
        a text already starts with a known prefix). Texts over 512 tokens are truncated and
        counted in :attr:`last_stats`.
        """
        dims = check_dims(dims, self.hidden_size)
        return self.embed_tokenized(self.tokenize(texts, task), dims)

    def plan(self, lengths) -> list[np.ndarray]:
        """Length-sorted, token-budgeted groups of sequence indices (see ``plan_batches``)."""
        return plan_batches(lengths, self.max_tokens_per_batch)

    def attention_slots(self, lengths, groups: list[np.ndarray]) -> np.ndarray:
        """Per sequence, the attention-grid width it is computed at (its length with varlen)."""
        varlen = uses_varlen(self.encoder.device, self.encoder.dtype)
        return attention_slots(lengths, groups, varlen)

    @torch.inference_mode()
    def embed_tokenized(
        self, batch: TokenizedBatch, dims: Sequence[int], groups: list[np.ndarray] | None = None,
        steps: int | None = None, pooled: bool = False, dtype: str = "float32",
    ) -> dict[int, np.ndarray]:
        """Embed already tokenised sequences in token-budgeted packed batches, input order kept.

        ``groups`` (default :meth:`plan`) are the index groups run as one packed batch each.
        ``steps`` (expert parallelism: the most groups any rank of the group has this call)
        pads the call with idle forward steps, so that every rank makes the same collectives.
        ``pooled`` adds, under the key :data:`POOLED`, the mean-pooled vectors before any cut
        or normalisation (``[N, hidden]`` float32; document vectors average them). ``dtype``
        (one of :attr:`output_dtypes`) is that of the width vectors, cast on the device.

        Thread-safe: the host-side packing runs unlocked, the device phase one call at a time,
        so that one thread's packing overlaps another's device work.
        """
        dims = check_dims(dims, self.hidden_size)
        if dtype not in self.output_dtypes:
            raise ValueError(f"output dtype {dtype!r}; choose one of {self.output_dtypes}")
        n = len(batch.lengths)
        if groups is None:
            groups = self.plan(batch.lengths)
        offsets = batch.offsets
        packed_G = []
        for group in groups:
            ids = gather_sequences(batch.ids, offsets, group)
            packed_G.append(self.staging.pin(
                PackedBatch.from_lengths_and_ids(ids, batch.lengths[group])))
        order_R = np.concatenate(groups) if groups else np.zeros(0, np.int64)
        with self._device_lock:
            host_RW, host_RD = encode_packed(self.encoder, self.staging, packed_G, dims,
                                             DTYPES[dtype], pooled, steps or 0)
            self.staging.wait()
        vectors_RW = host_RW.numpy()
        out, col = {}, 0
        for d in dims:
            out[d] = np.empty((n, d), dtype=vectors_RW.dtype)
            out[d][order_R] = vectors_RW[:, col : col + d]
            col += d
        if pooled:
            out[POOLED] = np.empty((n, self.hidden_size), dtype=np.float32)
            out[POOLED][order_R] = host_RD.numpy()
        self.last_stats = EncodeStats(
            texts=n, tokens=int(batch.lengths.sum()), texts_truncated=int(batch.truncated.sum()),
            batches=len(groups), attention_padding=attention_padding(batch.lengths, groups),
        )
        return out


def load_worker_embedder(model: str, *, revision: str | None, device: str, dtype: str,
                         max_tokens_per_batch: int | None,
                         storage_options: dict[str, Any] | None, fingerprint: str | None,
                         placement=None, gguf_expert_bias: str = "zero") -> Embedder:
    """The encoder of a pipeline worker (an encoder actor, an expert-parallel rank): the model
    resolved on this node, checked against the weights the driver fingerprinted, loaded whole
    or (``placement``) as one expert-parallel rank."""
    resolved = resolve_model(model, revision=revision, storage_options=storage_options,
                             gguf_expert_bias=gguf_expert_bias)
    if fingerprint is not None and weights_fingerprint(resolved.local_dir) != fingerprint:
        raise ModelSourceError(
            f"the weights of {model} on this node differ from the ones the driver checked "
            f"({fingerprint}); the model source changed during the run"
        )
    return Embedder.from_pretrained(resolved.local_dir, device=device, dtype=dtype,
                                    max_tokens_per_batch=max_tokens_per_batch,
                                    placement=placement)
