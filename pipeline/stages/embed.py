"""The pipeline's stages as small classes: heavy state in ``__init__``, work in ``__call__``.

Each stage maps one Arrow table to another (Ray Data calls them with ``batch_format="pyarrow"``
from ``pipeline/cluster/graph.py``, but nothing here imports Ray, so tests call them directly). Rows
carry their id and origin; no stage relies on row order. A rejected row (``__reject`` set)
passes through every stage untouched until the writer sends it to ``_rejects/``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import embedding_column
from ..io import schema as S
from ..io.schema import embedding_type
from ..model.cpu import default_threads, set_threads
from ..tokenize import TextTokenizer, TokenizedBatch, add_prefix, task_prefix


def require_columns(table: pa.Table, columns, stage: str) -> None:
    """Raise naming the stage and the columns it needs that ``table`` lacks."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; the batch has {table.column_names}")


def _good_rows(table: pa.Table) -> np.ndarray:
    """Indices of rows not rejected so far."""
    return np.flatnonzero(pc.is_null(table[S.REJECT]).to_numpy(zero_copy_only=False))


class TokenizeStage:
    """Validate ids and texts, add the task prefix, tokenize; strings stop here."""

    NEEDS = (S.ID, S.TEXT, S.REJECT, S.EXCERPT)

    def __init__(self, tokenizer_json: str, task: str) -> None:
        self.tokenizer = TextTokenizer.from_json(tokenizer_json)
        self.prefix = task_prefix(task)

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(table, self.NEEDS, "tokenize")
        t0 = time.perf_counter()
        rejects = table[S.REJECT].to_pylist()
        excerpts = table[S.EXCERPT].to_pylist()
        ids_null = pc.is_null(table[S.ID]).to_pylist()
        texts = table[S.TEXT].to_pylist()
        # Rows whose earlier embeddings the nightly job reuses are not tokenized.
        reused = table[S.REUSE].to_pylist() if S.REUSE in table.column_names \
            else [False] * table.num_rows
        good = S.reject_unembeddable(ids_null, texts, rejects, excerpts, skip=reused)
        tokens = self.tokenizer.encode([add_prefix(texts[i], self.prefix) for i in good])
        lengths = np.zeros(table.num_rows, np.int32)
        truncated = np.zeros(table.num_rows, bool)
        lengths[good], truncated[good] = tokens.lengths, tokens.truncated
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64))).astype(np.int32)
        out = table.drop_columns([S.TEXT, S.REJECT, S.EXCERPT])
        elapsed = (time.perf_counter() - t0) / max(table.num_rows, 1)
        return out.append_column(S.REJECT, pa.array(rejects, pa.string())) \
            .append_column(S.EXCERPT, pa.array(excerpts, pa.string())) \
            .append_column(S.TOKENS, pa.ListArray.from_arrays(offsets, pa.array(tokens.ids))) \
            .append_column(S.NUM_TOKENS, pa.array(lengths)) \
            .append_column(S.TRUNCATED, pa.array(truncated)) \
            .append_column(S.TOKENIZE_S, pa.array(np.full(table.num_rows, elapsed)))


class EncodeStage:
    """Embed a window of tokenized rows: sort by length, cut by token budget, encode, pool.

    The window is one Ray Data batch (``window_rows`` rows): sorting happens inside it, never
    across the dataset. Adds one ``embedding_<width>`` column per width (null for rejected
    rows), and drops the token ids. Rows the nightly job marked for reuse (``__reuse``) are
    not encoded: their previous snapshot's vectors (``__prev_<width>``) are taken as they are.
    """

    NEEDS = (S.TOKENS, S.NUM_TOKENS, S.REJECT)

    def __init__(self, model: str, *, revision: str | None, device: str, dtype: str,
                 dims: tuple[int, ...], output_dtype: str, max_tokens_per_batch: int | None,
                 threads: int | None = None, replicas: int = 1,
                 storage_options: dict[str, Any] | None = None,
                 fingerprint: str | None = None, engine: Callable[..., Any] | None = None) -> None:
        load = dict(model=model, revision=revision, device=device, dtype=dtype,
                    max_tokens_per_batch=max_tokens_per_batch, storage_options=storage_options,
                    fingerprint=fingerprint)
        if engine is not None:
            # Given by the graph: e.g. an expert-parallel group whose ranks do the work
            # (pipeline/cluster/expert_groups.py); this actor only coordinates.
            self.embedder = engine(load)
        else:
            if threads or device == "cpu":
                set_threads(threads or default_threads(replicas))
            # Lazy: importing the embedder imports torch, after the thread count is set.
            from ..embedder import load_worker_embedder

            self.embedder = load_worker_embedder(**load)
        self.dims, self.output_dtype = dims, output_dtype

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(table, self.NEEDS, "encode")
        t0, start = time.perf_counter(), time.time()
        good_M = _good_rows(table)  # indices into the window's N rows
        reused = np.zeros(0, np.int64)  # indices of rows taking earlier vectors
        if S.REUSE in table.column_names:
            reuse_flags_N = pc.fill_null(table[S.REUSE], False).to_numpy(zero_copy_only=False)
            reused = good_M[reuse_flags_N[good_M]]
            good_M = good_M[~reuse_flags_N[good_M]]
        tokens = table[S.TOKENS].combine_chunks()
        lengths_M = table[S.NUM_TOKENS].to_numpy()[good_M]
        flat_T = pc.list_flatten(tokens.take(pa.array(good_M))).to_numpy().astype(np.int32, copy=False)
        batch = TokenizedBatch(flat_T, lengths_M, np.zeros(len(good_M), bool))
        groups_G = self.embedder.plan(lengths_M)
        vectors_MW = self.embedder.embed_tokenized(batch, self.dims, groups_G)
        grid_N = np.zeros(table.num_rows, np.int32)
        batch_max_N = np.zeros(table.num_rows, np.int32)
        grid_N[good_M] = self.embedder.attention_slots(lengths_M, groups_G)
        for g in groups_G:
            batch_max_N[good_M[g]] = lengths_M[g].max()
        prev = [S.prev_embedding(d) for d in self.dims if S.prev_embedding(d) in table.column_names]
        out = table.drop_columns([S.TOKENS, *prev])
        rows = np.concatenate([good_M, reused])
        for d in self.dims:
            values = vectors_MW[d]
            if len(reused):
                values = np.concatenate([values, reused_vectors(table, reused, d)])
            out = out.append_column(embedding_column(d), self._column(values, rows, table.num_rows, d))
        elapsed = time.perf_counter() - t0
        n = table.num_rows
        return out.append_column(S.GRID_TOKENS, pa.array(grid_N)) \
            .append_column(S.BATCH_MAX, pa.array(batch_max_N)) \
            .append_column(S.ENCODE_S, pa.array(np.full(n, elapsed / max(n, 1)))) \
            .append_column(S.ENCODE_START, pa.array(np.full(n, start))) \
            .append_column(S.ENCODE_END, pa.array(np.full(n, start + elapsed)))

    def _column(self, vectors_MW: np.ndarray, rows: np.ndarray, n: int, width: int) -> pa.Array:
        """A fixed-size-list column with ``rows`` filled (one vector each) and the others null."""
        dtype = np.float16 if self.output_dtype == "float16" else np.float32
        full = np.zeros((n, width), dtype)
        full[rows] = vectors_MW
        mask = np.ones(n, bool)
        mask[rows] = False
        values = pa.array(full.reshape(-1))
        return pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(mask)) \
            .cast(embedding_type(width, self.output_dtype))


def reused_vectors(table: pa.Table, rows: np.ndarray, width: int) -> np.ndarray:
    """The previous snapshot's vectors of ``rows`` (``[len(rows), width]``)."""
    column = table[S.prev_embedding(width)].take(pa.array(rows))
    if column.null_count:
        raise ValueError(f"{column.null_count} row(s) marked for reuse have no earlier "
                         f"embedding of width {width}")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(len(rows), width)
