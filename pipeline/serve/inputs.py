"""Texts of a request -> token ids, and the pieces an encoder replica batches. Pure (no Ray,
no torch): the ingress tokenizes, the encoder replicas only run the model.

The prefix rule, the text checks and the tokenizer are the batch job's own
(:func:`~pipeline.tokenize.add_prefix`, :func:`~pipeline.tokenize.text_problem`,
:class:`~pipeline.tokenize.TextTokenizer`), so a text tokenizes here exactly as
``Embedder.tokenize`` does it: the task's prefix added once (never to a text that already
starts with a known prefix), ``<s>``/``</s>`` around it.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from ..tokenize import TextTokenizer, TokenizedBatch, add_prefix, task_prefix, text_problem
from .protocol import bad_request


@dataclasses.dataclass(frozen=True)
class Piece:
    """Consecutive sequences of one request, to embed at ``width``: the unit an encoder
    replica batches (its ``tokens`` count toward the batch's token budget)."""

    ids: np.ndarray  # int32 [sum(lengths)]
    lengths: np.ndarray  # int32 [N]
    width: int

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def piece_tokens(pieces: list[Piece]) -> int:
    """The size of a batch of pieces for ``@serve.batch``: its tokens."""
    return sum(p.tokens for p in pieces)


def take_batch(waiting: collections.deque, max_tokens: int) -> list[tuple[Piece, Any]]:
    """The next batch from the front of ``waiting`` (``(piece, future)`` pairs, oldest
    first): pieces in arrival order while their tokens fit in ``max_tokens`` (the first one
    always), skipping those whose caller has gone (a cancelled future)."""
    batch, tokens = [], 0
    while waiting:
        piece, future = waiting[0]
        if future.cancelled():
            waiting.popleft()
            continue
        if batch and tokens + piece.tokens > max_tokens:
            break
        batch.append(waiting.popleft())
        tokens += piece.tokens
    return batch


class QueryTokenizer:
    """The model's tokenizer, refusing (400) texts over its limit unless ``truncate``."""

    def __init__(self, tokenizer_json: str, truncate: bool = False) -> None:
        self.tokenizer = TextTokenizer.from_json(tokenizer_json)
        self.truncate = truncate

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def tokenize(self, texts: tuple[str, ...], task: str) -> TokenizedBatch:
        prefix = task_prefix(task)
        for i, text in enumerate(texts):
            problem = text_problem(text)
            if problem is not None:
                raise bad_request(f"input[{i}]: {problem}", param="input")
        prefixed = [add_prefix(t, prefix) for t in texts]
        batch = self.tokenizer.encode(prefixed)
        if not self.truncate and batch.truncated.any():
            i = int(np.flatnonzero(batch.truncated)[0])
            count = len(self.tokenizer.untruncated().encode(prefixed[i]).ids)
            raise bad_request(
                f"input[{i}] has {count} tokens with the `{task}` prefix, over the model's "
                f"{self.max_length}; shorten it (the service was started without --truncate)",
                param="input", code="input_too_long")
        return batch


def split_pieces(batch: TokenizedBatch, width: int, max_tokens: int) -> list[Piece]:
    """Consecutive runs of sequences of at most ``max_tokens`` tokens each (a sequence is
    never longer than the budget), in input order: concatenated back, they are the batch."""
    pieces, offsets = [], batch.offsets
    start, tokens = 0, 0
    for i, n in enumerate(batch.lengths.tolist()):
        if i > start and tokens + n > max_tokens:
            pieces.append(_piece(batch, offsets, start, i, width))
            start, tokens = i, 0
        tokens += n
    pieces.append(_piece(batch, offsets, start, len(batch.lengths), width))
    return pieces


def _piece(batch: TokenizedBatch, offsets: np.ndarray, a: int, b: int, width: int) -> Piece:
    return Piece(batch.ids[offsets[a]:offsets[b]], batch.lengths[a:b], width)


def join_pieces(pieces: list[Piece]) -> tuple[TokenizedBatch, list[tuple[int, int]]]:
    """The pieces of a batch as one tokenized batch, and each piece's rows in it."""
    rows, start = [], 0
    for p in pieces:
        rows.append((start, start + len(p.lengths)))
        start += len(p.lengths)
    ids = np.concatenate([p.ids for p in pieces])
    lengths = np.concatenate([p.lengths for p in pieces])
    return TokenizedBatch(ids, lengths, np.zeros(len(lengths), bool)), rows
