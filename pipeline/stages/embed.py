"""The pipeline's stages as small classes: heavy state in ``__init__``, work in ``__call__``.

Each stage maps one Arrow table to another (Ray Data calls them with ``batch_format="pyarrow"``
from ``pipeline/cluster/graph.py``, but nothing here imports Ray, so tests call them directly). Rows
carry their id and origin; no stage relies on row order. A rejected row (``__reject`` set)
passes through every stage untouched until the writer sends it to ``_rejects/``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..chunking import Chunker, Chunks, LongText
from ..config import POOLED, embedding_column
from ..io import schema as S
from ..io.schema import embedding_type
from ..model.cpu import default_threads, set_threads
from ..tokenize import TextTokenizer, TokenizedBatch, add_prefix, task_prefix
from .diff import prev_doc_embedding

NORM_EPS = 1e-12  # as the encoder's own normalisation (pipeline/model/pooling.py)


def require_columns(table: pa.Table, columns, stage: str) -> None:
    """Raise naming the stage and the columns it needs that ``table`` lacks."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"{stage} needs columns {missing}; the batch has {table.column_names}")


def _good_rows(table: pa.Table) -> np.ndarray:
    """Indices of rows not rejected so far."""
    return np.flatnonzero(pc.is_null(table[S.REJECT]).to_numpy(zero_copy_only=False))


class TokenizeStage:
    """Validate ids and texts, add the task prefix, tokenize; strings stop here.

    A text over the model's limit is truncated, rejected with its token count, or cut into
    chunks (``long_text``, see ``pipeline/chunking.py``); a chunked document stays one row,
    its chunks' ids one after another in ``__tokens`` and their spans in list columns.
    """

    NEEDS = (S.ID, S.TEXT, S.REJECT, S.EXCERPT)

    def __init__(self, tokenizer_json: str, task: str, long_text: LongText = LongText()) -> None:
        self.tokenizer = TextTokenizer.from_json(tokenizer_json)
        self.prefix = task_prefix(task)
        self.long_text = long_text
        self.chunker = None if long_text.mode == "truncate" else Chunker(
            self.tokenizer, self.prefix, long_text.window, long_text.overlap,
            long_text.max_chunks)

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
        truncated = np.zeros(table.num_rows, bool)
        chunks: dict[int, Chunks] = {}
        cut_ids: dict[int, np.ndarray] = {}  # the rows whose ids are not ``tokens``' (chunked)
        if self.long_text.mode == "truncate":
            truncated[good] = tokens.truncated
        elif self.long_text.mode == "reject":
            for k in np.flatnonzero(tokens.truncated):
                i = good[k]
                rejects[i], excerpts[i] = self._over_limit(texts[i]), S.excerpt(texts[i])
        else:
            window = self.long_text.window
            for i in range(table.num_rows):
                if reused[i] and rejects[i] is None:
                    # Unchanged (nightly): chunked again for its spans, never encoded.
                    chunks[i] = self._chunks_again(texts[i])
            for k, i in enumerate(good):
                if not tokens.truncated[k] and tokens.lengths[k] <= window:
                    chunks[i] = one_chunk(int(tokens.lengths[k]), len(texts[i]))
                    continue
                cut = self.chunker.chunk_long(texts[i])  # over the window: known here
                if isinstance(cut, str):
                    rejects[i], excerpts[i] = cut, S.excerpt(texts[i])
                else:
                    chunks[i], cut_ids[i] = cut, cut.ids
                    truncated[i] = cut.truncated > 0
        lengths = np.zeros(table.num_rows, np.int32)
        if not cut_ids and all(rejects[i] is None for i in good):
            # Each row's ids are as tokenized (the common case): no per-row copy.
            lengths[good], flat = tokens.lengths, tokens.ids
        else:
            offsets_K = tokens.offsets
            ids_N = [np.zeros(0, np.int32)] * table.num_rows
            for k, i in enumerate(good):
                if rejects[i] is None:
                    ids_N[i] = cut_ids.get(i, tokens.ids[offsets_K[k]:offsets_K[k + 1]])
            lengths = np.fromiter((len(x) for x in ids_N), np.int32, table.num_rows)
            flat = np.concatenate(ids_N) if table.num_rows else np.zeros(0, np.int32)
        offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64))).astype(np.int32)
        out = table.drop_columns([S.TEXT, S.REJECT, S.EXCERPT])
        elapsed = (time.perf_counter() - t0) / max(table.num_rows, 1)
        out = out.append_column(S.REJECT, pa.array(rejects, pa.string())) \
            .append_column(S.EXCERPT, pa.array(excerpts, pa.string())) \
            .append_column(S.TOKENS, pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int32()))) \
            .append_column(S.NUM_TOKENS, pa.array(lengths)) \
            .append_column(S.TRUNCATED, pa.array(truncated)) \
            .append_column(S.TOKENIZE_S, pa.array(np.full(table.num_rows, elapsed)))
        if self.long_text.chunked:
            kept = {i: c for i, c in chunks.items() if rejects[i] is None}
            out = append_chunk_columns(out, kept, texts, self.long_text.chunk_text)
        return out

    def _chunks_again(self, text: str) -> Chunks:
        cut = self.chunker.chunk(text)
        if isinstance(cut, str):
            raise ValueError(f"a document the previous snapshot embedded cannot be chunked "
                             f"now ({cut}); the chunking settings must have changed")
        return dataclasses.replace(cut, ids=np.zeros(0, np.int32))

    def _over_limit(self, text: str) -> str:
        count, exact = self.chunker.count_tokens(text)
        counted = f"{count:,} tokens" if exact else f"more than {count:,} tokens"
        return (f"text over the model's {self.tokenizer.max_length}-token limit: {counted} "
                "with the task prefix (--long-text reject)")


def one_chunk(tokens: int, chars: int) -> Chunks:
    """A document that fits: one chunk, the whole text (its ids are the row's own)."""
    return Chunks(np.zeros(0, np.int32), np.array([tokens], np.int32), np.array([0], np.int64),
                  np.array([chars], np.int64), np.array([tokens], np.int32))


def append_chunk_columns(table: pa.Table, chunks: dict[int, Chunks], texts: list,
                         with_text: bool) -> pa.Table:
    """The chunk list columns of ``table``'s rows (empty lists for rows without chunks)."""
    n = table.num_rows
    counts = np.zeros(n, np.int64)
    for i, c in chunks.items():
        counts[i] = c.count
    offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
    order = sorted(chunks)

    def listed(field: str, dtype) -> pa.Array:
        parts = [getattr(chunks[i], field) for i in order]
        values = np.concatenate(parts) if parts else np.zeros(0)
        return pa.ListArray.from_arrays(offsets, pa.array(values.astype(dtype)))

    out = table.append_column(S.CHUNK_LENGTHS, listed("lengths", np.int32)) \
        .append_column(S.CHAR_STARTS, listed("starts", np.int64)) \
        .append_column(S.CHAR_ENDS, listed("ends", np.int64)) \
        .append_column(S.CHUNK_WEIGHTS, listed("weights", np.int32))
    overlap = np.zeros(n, np.int64)
    for i, c in chunks.items():
        overlap[i] = c.overlap_tokens
    out = out.append_column(S.OVERLAP_TOKENS, pa.array(overlap))
    if with_text:
        pieces = [texts[i][a:b] for i in order
                  for a, b in zip(chunks[i].starts.tolist(), chunks[i].ends.tolist())]
        out = out.append_column(S.CHUNK_TEXTS, pa.ListArray.from_arrays(
            offsets, pa.array(pieces, pa.string())))
    return out


class EncodeStage:
    """Embed a window of tokenized rows: sort by length, cut by token budget, encode, pool.

    The window is one Ray Data batch (``window_rows`` rows): sorting happens inside it, never
    across the dataset. Adds one ``embedding_<width>`` column per width (null for rejected
    rows), and drops the token ids. Rows the nightly job marked for reuse (``__reuse``) are
    not encoded: their previous snapshot's vectors (``__prev_<width>``) are taken as they are,
    and with document vectors their previous document vectors (``__prev_doc_<width>``) too.
    """

    NEEDS = (S.TOKENS, S.NUM_TOKENS, S.REJECT)

    def __init__(self, model: str, *, revision: str | None, device: str, dtype: str,
                 dims: tuple[int, ...], output_dtype: str, max_tokens_per_batch: int | None,
                 threads: int | None = None, replicas: int = 1,
                 storage_options: dict[str, Any] | None = None,
                 fingerprint: str | None = None, engine: Callable[..., Any] | None = None,
                 doc_vectors: bool = False, gguf_expert_bias: str = "zero") -> None:
        load = dict(model=model, revision=revision, device=device, dtype=dtype,
                    max_tokens_per_batch=max_tokens_per_batch, storage_options=storage_options,
                    fingerprint=fingerprint, gguf_expert_bias=gguf_expert_bias)
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
        self.dims, self.output_dtype, self.doc_vectors = dims, output_dtype, doc_vectors
        # float16 vectors are cast on the device, halving what comes back, where the engine can.
        self._engine_casts = output_dtype != "float32" and output_dtype in getattr(
            self.embedder, "output_dtypes", ())

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(table, self.NEEDS, "encode")
        t0, start = time.perf_counter(), time.time()
        good_M = _good_rows(table)  # indices into the window's N rows
        reused = np.zeros(0, np.int64)  # indices of rows taking earlier vectors
        if S.REUSE in table.column_names:
            reuse_flags_N = pc.fill_null(table[S.REUSE], False).to_numpy(zero_copy_only=False)
            reused = good_M[reuse_flags_N[good_M]]
            good_M = good_M[~reuse_flags_N[good_M]]
        # Sequences: one per row, or one per chunk of a chunked document (its chunks' ids
        # follow each other in the row's tokens); doc_S: the row (index into good_M) of each.
        take_M = pa.array(good_M)
        # The common window encodes every row: no copy of its ids (or chunk lists) by a take.
        every_row = len(good_M) == table.num_rows

        def rows_of(column: str) -> pa.Array:
            whole = table[column].combine_chunks()
            return whole if every_row else whole.take(take_M)

        chunked = S.CHUNK_LENGTHS in table.column_names
        if chunked:
            per_doc = rows_of(S.CHUNK_LENGTHS)
            lengths_S = pc.list_flatten(per_doc).to_numpy().astype(np.int32, copy=False)
            doc_S = pc.list_parent_indices(per_doc).to_numpy()
        else:
            lengths_S = table[S.NUM_TOKENS].to_numpy()[good_M].astype(np.int32, copy=False)
            doc_S = np.arange(len(good_M))
        flat_T = pc.list_flatten(rows_of(S.TOKENS)).to_numpy().astype(np.int32, copy=False)
        batch = TokenizedBatch(flat_T, lengths_S, np.zeros(len(lengths_S), bool))
        groups_G = self.embedder.plan(lengths_S)
        pooled = chunked and self.doc_vectors
        # Only what an engine takes: an expert-parallel group has no pooled or dtype options.
        options = ({"pooled": True} if pooled else {}) | (
            {"dtype": self.output_dtype} if self._engine_casts else {})
        vectors_SW = self.embedder.embed_tokenized(batch, self.dims, groups_G, **options)
        grid_S = self.embedder.attention_slots(lengths_S, groups_G)
        batch_max_S = np.zeros(len(lengths_S), np.int64)
        for g in groups_G:
            batch_max_S[g] = lengths_S[g].max()
        grid_N = np.zeros(table.num_rows, np.int64)
        batch_max_N = np.zeros(table.num_rows, np.int64)
        np.add.at(grid_N, good_M[doc_S], grid_S)
        np.add.at(batch_max_N, good_M[doc_S], batch_max_S)
        prev = [c for d in self.dims for c in (S.prev_embedding(d), prev_doc_embedding(d))
                if c in table.column_names]
        out = table.drop_columns([S.TOKENS, *prev])
        n = table.num_rows
        if chunked:
            for d in self.dims:
                out = out.append_column(embedding_column(d), self._chunk_column(
                    table, vectors_SW[d], good_M, doc_S, reused, d))
            if pooled:
                weights_S = pc.list_flatten(rows_of(S.CHUNK_WEIGHTS))
                docs_MW = doc_vectors(vectors_SW[POOLED], doc_S, len(good_M),
                                      weights_S.to_numpy().astype(np.float64), self.dims)
                rows = np.concatenate([good_M, reused])
                for d in self.dims:
                    values = docs_MW[d]
                    if len(reused):  # as stored: the very vectors of the previous snapshot
                        values = np.concatenate([values.astype(self._dtype), reused_vectors(
                            table, reused, d, prev_doc_embedding(d), "document vector")])
                    out = out.append_column(S.doc_embedding(d), self._column(values, rows, n, d))
        else:
            rows = np.concatenate([good_M, reused])
            for d in self.dims:
                values = vectors_SW[d]
                if len(reused):
                    values = np.concatenate([values, reused_vectors(table, reused, d)])
                out = out.append_column(embedding_column(d), self._column(values, rows, n, d))
        elapsed = time.perf_counter() - t0
        return out.append_column(S.GRID_TOKENS, pa.array(grid_N)) \
            .append_column(S.BATCH_MAX, pa.array(batch_max_N)) \
            .append_column(S.ENCODE_S, pa.array(np.full(n, elapsed / max(n, 1)))) \
            .append_column(S.ENCODE_START, pa.array(np.full(n, start))) \
            .append_column(S.ENCODE_END, pa.array(np.full(n, start + elapsed)))

    def _chunk_column(self, table: pa.Table, vectors_SW: np.ndarray, good_M: np.ndarray,
                      doc_S: np.ndarray, reused: np.ndarray, width: int) -> pa.Array:
        """A list<fixed-size-list> column: each row's chunk vectors, encoded now (``good_M``,
        chunk ``s`` of row ``good_M[doc_S[s]]``) or the previous snapshot's (``reused``);
        null for the other rows."""
        n = table.num_rows
        counts_N = np.zeros(n, np.int64)
        counts_N[good_M] = np.bincount(doc_S, minlength=len(good_M))
        parts: dict[int, np.ndarray] = {}
        firsts = np.concatenate(([0], np.cumsum(counts_N[good_M])))
        for m, row in enumerate(good_M):
            parts[int(row)] = vectors_SW[firsts[m]:firsts[m + 1]]
        if len(reused):
            previous = table[S.prev_embedding(width)].combine_chunks().take(pa.array(reused))
            if previous.null_count:
                raise ValueError(f"{previous.null_count} document(s) marked for reuse have no "
                                 f"earlier chunk vectors of width {width}")
            now = table[S.CHUNK_LENGTHS].combine_chunks().take(pa.array(reused))
            had = pc.list_value_length(previous).to_numpy()
            if (had != pc.list_value_length(now).to_numpy()).any():
                raise ValueError("a reused document's chunks differ from its earlier ones; "
                                 "the chunking settings must have changed")
            flat = pc.list_flatten(pc.list_flatten(previous)).to_numpy(zero_copy_only=False)
            flat = flat.reshape(-1, width)
            starts = np.concatenate(([0], np.cumsum(had)))
            for r, row in enumerate(reused):
                parts[int(row)] = flat[starts[r]:starts[r + 1]]
                counts_N[row] = had[r]
        rows = sorted(parts)
        stacked = np.concatenate([parts[r] for r in rows]) if rows \
            else np.zeros((0, width), np.float32)
        values = pa.FixedSizeListArray.from_arrays(
            pa.array(stacked.astype(self._dtype, copy=False).reshape(-1)), width) \
            .cast(embedding_type(width, self.output_dtype))
        offsets = np.concatenate(([0], np.cumsum(counts_N))).astype(np.int32)
        mask = np.ones(n, bool)
        mask[rows] = False
        return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(mask))

    @property
    def _dtype(self) -> type:
        return np.float16 if self.output_dtype == "float16" else np.float32

    def _column(self, vectors_MW: np.ndarray, rows: np.ndarray, n: int, width: int) -> pa.Array:
        """A fixed-size-list column with ``rows`` filled (one vector each) and the others null."""
        if len(rows) == n and (rows == np.arange(n)).all():  # every row, in order: no copy
            full, mask = np.ascontiguousarray(vectors_MW, self._dtype), None
        else:
            full = np.zeros((n, width), self._dtype)
            full[rows] = vectors_MW
            mask = np.ones(n, bool)
            mask[rows] = False
            mask = pa.array(mask)
        values = pa.array(full.reshape(-1))
        return pa.FixedSizeListArray.from_arrays(values, width, mask=mask) \
            .cast(embedding_type(width, self.output_dtype))


class TokenizeEncodeStage:
    """:class:`TokenizeStage` then :class:`EncodeStage` in one actor: a CPU run's encoder
    actors tokenize their own windows (``pipeline/plan.py``: ``TOKENIZE_IN_ENCODER``), as the
    encoder there is ~1,000x slower per token than the tokenizer. Called on the same table, it
    returns exactly what the two stages apart return; ``tokenize``: the tokenizer stage's
    arguments, the rest the encoder's.
    """

    NEEDS = TokenizeStage.NEEDS

    def __init__(self, tokenize: dict[str, Any], **encode: Any) -> None:
        self.tokenize = TokenizeStage(**tokenize)
        self.encode = EncodeStage(**encode)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.encode(self.tokenize(table))


def doc_vectors(pooled_SD: np.ndarray, doc_S: np.ndarray, docs: int, weights_S: np.ndarray,
                dims: tuple[int, ...]) -> dict[int, np.ndarray]:
    """One vector per document: the mean of its chunks' pooled vectors, each weighted by the
    document tokens it adds beyond the overlap, then cut and L2-normalised per width (as a
    chunk's own vector is)."""
    weighted = np.zeros((docs, pooled_SD.shape[1]), np.float64)
    np.add.at(weighted, doc_S, pooled_SD * weights_S[:, None])
    totals = np.bincount(doc_S, weights_S, minlength=docs)
    mean_MD = weighted / np.maximum(totals, 1e-12)[:, None]
    out = {}
    for d in dims:
        cut = mean_MD[:, :d]
        norms = np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), NORM_EPS)
        out[d] = (cut / norms).astype(np.float32)
    return out


def reused_vectors(table: pa.Table, rows: np.ndarray, width: int, column: str | None = None,
                   what: str = "embedding") -> np.ndarray:
    """The previous snapshot's vectors of ``rows`` (``[len(rows), width]``) from ``column``
    (default: the previous embedding of that width)."""
    name = column or S.prev_embedding(width)
    if name not in table.column_names:
        raise ValueError(f"{len(rows)} row(s) marked for reuse have no earlier {what} of "
                         f"width {width} (no {name} column)")
    taken = table[name].take(pa.array(rows))
    if taken.null_count:
        raise ValueError(f"{taken.null_count} row(s) marked for reuse have no earlier "
                         f"{what} of width {width}")
    # The shuffle carries them as variable-size lists: each must have the width's values.
    wrong = int((pc.list_value_length(taken).to_numpy(zero_copy_only=False) != width).sum())
    if wrong:
        raise ValueError(f"{wrong} row(s) marked for reuse have an earlier {what} of another "
                         f"width than {width}")
    flat = pc.list_flatten(taken).to_numpy(zero_copy_only=False)
    return flat.reshape(len(rows), width)
