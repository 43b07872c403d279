"""The output side: encoder rows -> Parquet embeddings, rejects, and per-write statistics.

``split_rows`` is pure (tables in, tables and counts out); ``write_parquet`` puts one table at
a path so that a reader never sees a partial file: object stores publish an object only when
its upload completes, and on local disks the file is written under a temporary name first.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..chunking import LongText
from ..config import embedding_column
from . import schema as S
from .storage import (CHECKSUM_MOD, DOCUMENTS_DIR, REJECTS_DIR, file_rows_checksum, is_group,
                      open_for_publish, storage_errors, to_uri, unit_key)

ROW_GROUP_ROWS = 8192
# A unit of several files: its part files' row groups end where a file's rows end, once they
# hold this many rows, so that a later night moves those of unchanged files as bytes
# (pipeline/stages/carry.py, pipeline/io/splice.py).
FILE_GROUP_ROWS = 1024
# Output files of about this many bytes of embeddings (no swarm of tiny files, none too big
# for one reader task).
TARGET_FILE_BYTES = 128 << 20
MIN_FILE_ROWS = 1024  # a write batch's floor: no tiny part files


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The output layout: id and kept columns, widths, element type, schema metadata."""

    id_column: str
    keep_columns: tuple[str, ...]
    dims: tuple[int, ...]
    output_dtype: str
    metadata: dict[str, Any]
    # Further output columns: (output name, internal column), written after the embeddings
    # (the nightly snapshot's content_hash, the enrichment's source row number).
    extra_columns: tuple[tuple[str, str], ...] = ()
    long_text: LongText = LongText()

    @property
    def bytes_per_row(self) -> int:
        return sum(self.dims) * (2 if self.output_dtype == "float16" else 4)

    def rows_per_file(self) -> int:
        return max(MIN_FILE_ROWS, TARGET_FILE_BYTES // self.bytes_per_row)


def split_rows(table: pa.Table, spec: OutputSpec) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """``(embedded, rejects, stats)`` of a table of encoder rows.

    ``embedded`` has the id, the kept columns and the embedding columns, with the run metadata
    in its schema (with ``--long-text chunk``: one row per chunk, see :func:`chunk_rows`);
    ``rejects`` follows :data:`schema.REJECTS_SCHEMA`.
    """
    rejected = pc.is_valid(table[S.REJECT])
    good = table.filter(pc.invert(rejected))
    bad = table.filter(rejected)
    if spec.long_text.chunked:
        embedded = chunk_rows(good, spec)
    else:
        columns = {spec.id_column: good[S.ID]}
        columns |= {c: good[c] for c in spec.keep_columns}
        columns |= {embedding_column(d): good[embedding_column(d)] for d in spec.dims}
        columns |= {name: good[internal] for name, internal in spec.extra_columns}
        embedded = pa.table(columns)
    embedded = embedded.replace_schema_metadata(S.encode_metadata(spec.metadata))
    rejects = pa.table({
        "id": id_text(bad[S.ID]),
        "source": bad[S.SOURCE], "row": bad[S.ROW], "reason": bad[S.REJECT],
        "excerpt": bad[S.EXCERPT],
    }, schema=S.REJECTS_SCHEMA)
    return embedded, rejects, row_stats(table, good, bad)


def chunk_rows(good: pa.Table, spec: OutputSpec) -> pa.Table:
    """One row per chunk of the embedded documents ``good``: the id, ``chunk`` (0-based),
    ``chunks`` (the document's count), ``char_start``/``char_end`` (code points, half-open),
    ``tokens`` (the chunk's model input), ``chunk_text`` if kept, the kept columns (repeated),
    the embeddings, the extra columns (repeated)."""
    lengths = good[S.CHUNK_LENGTHS].combine_chunks()
    doc = pc.list_parent_indices(lengths)
    counts = pc.list_value_length(lengths)
    first = np.concatenate(([0], np.cumsum(counts.to_numpy(zero_copy_only=False))))[:-1]
    index = np.arange(len(doc)) - first[doc.to_numpy()]
    repeat = lambda column: good[column].take(doc)  # noqa: E731 (a document's value per chunk)
    columns = {spec.id_column: repeat(S.ID),
               "chunk": pa.array(index.astype(np.int32)),
               "chunks": counts.take(doc).cast(pa.int32()),
               "char_start": pc.list_flatten(good[S.CHAR_STARTS]),
               "char_end": pc.list_flatten(good[S.CHAR_ENDS]),
               "tokens": pc.list_flatten(lengths)}
    if spec.long_text.chunk_text:
        columns["chunk_text"] = pc.list_flatten(good[S.CHUNK_TEXTS])
    columns |= {c: repeat(c) for c in spec.keep_columns}
    columns |= {embedding_column(d): pc.list_flatten(good[embedding_column(d)])
                for d in spec.dims}
    columns |= {name: repeat(internal) for name, internal in spec.extra_columns}
    return pa.table(columns)


def document_rows(good: pa.Table, spec: OutputSpec) -> pa.Table:
    """One row per chunked document (``--doc-vectors``): the id, ``chunks``, ``tokens`` (its
    chunks' model input tokens, counted from the chunks: a nightly document whose vectors are
    reused was not tokenized for the encoder), the kept columns and the document's vectors."""
    lengths = good[S.CHUNK_LENGTHS].combine_chunks()
    tokens = np.bincount(pc.list_parent_indices(lengths).to_numpy(),
                         pc.list_flatten(lengths).to_numpy(), minlength=good.num_rows)
    columns = {spec.id_column: good[S.ID],
               "chunks": pc.list_value_length(lengths).cast(pa.int32()),
               "tokens": pa.array(tokens.astype(np.int32))}
    columns |= {c: good[c] for c in spec.keep_columns}
    columns |= {embedding_column(d): good[S.doc_embedding(d)] for d in spec.dims}
    columns |= {name: good[internal] for name, internal in spec.extra_columns}
    return pa.table(columns).replace_schema_metadata(S.encode_metadata(
        spec.metadata | {"documents": "token-weighted mean of the chunks' pooled vectors, then "
                                      "cut and L2-normalised per width"}))


def id_text(ids: pa.ChunkedArray) -> pa.Array:
    """Ids as text for the rejects file: strings and numbers as such, bytes as hex."""
    t = ids.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t) \
            or pa.types.is_floating(t):
        return pc.cast(ids, pa.string())
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return pa.array([None if v is None else v.hex() for v in ids.to_pylist()], pa.string())
    return pa.array([None if v is None else S.excerpt(v) for v in ids.to_pylist()], pa.string())


def row_stats(table: pa.Table, good: pa.Table, bad: pa.Table) -> dict[str, Any]:
    """Counts and timings of one unit's rows in one write (summed per unit by the driver).

    ``rows`` and ``row_sum`` (the sum of the rows' numbers) are checked against the file's
    own ``file_rows`` and ``file_rowsum`` (-1 until the rows that carry them come out).
    """
    first = None
    if bad.num_rows:
        first = [bad[S.ROW][0].as_py(), bad[S.REJECT][0].as_py()]
    starts = table[S.ENCODE_START] if S.ENCODE_START in table.column_names else None
    return change_stats(good) | chunk_stats(good) | {
        "rows": table.num_rows,
        "row_sum": int(pc.sum(table[S.ROW]).as_py() or 0),
        "file_rows": _max_or(table, S.FILE_ROWS),
        "file_rowsum": _max_or(table, S.FILE_ROWSUM),
        "rows_embedded": good.num_rows,
        "rows_rejected": bad.num_rows,
        "first_reject": first,
        "tokens": int(pc.sum(good[S.NUM_TOKENS]).as_py() or 0),
        "texts_truncated": int(pc.sum(pc.cast(good[S.TRUNCATED], pa.int64())).as_py() or 0),
        "grid_tokens": int(pc.sum(pc.cast(good[S.GRID_TOKENS], pa.int64())).as_py() or 0),
        "batch_grid_tokens": int(pc.sum(pc.cast(good[S.BATCH_MAX], pa.int64())).as_py() or 0),
        "tokenize_s": float(pc.sum(table[S.TOKENIZE_S]).as_py() or 0.0),
        "encode_s": float(pc.sum(table[S.ENCODE_S]).as_py() or 0.0),
        "encode_first_start": float(pc.min(starts).as_py() or 0.0) if starts else 0.0,
        "encode_last_end": float(pc.max(table[S.ENCODE_END]).as_py() or 0.0) if starts else 0.0,
        "reject_reasons": dict(Counter(reason_kind(r) for r in bad[S.REJECT].to_pylist())),
    }


def change_stats(good: pa.Table) -> dict[str, int]:
    """The nightly job's counts of embedded rows: new, changed and unchanged ids against the
    previous snapshot, and rows whose earlier embeddings were reused (none outside nightly)."""
    if S.CHANGE not in good.column_names:
        return {}
    kinds = Counter(good[S.CHANGE].to_pylist())
    reused = int(pc.sum(pc.cast(good[S.REUSE], pa.int64())).as_py() or 0)
    return {"rows_new": kinds.get("new", 0), "rows_changed": kinds.get("changed", 0),
            "rows_unchanged": kinds.get("unchanged", 0), "rows_reused": reused}


def chunk_stats(good: pa.Table) -> dict[str, int]:
    """With ``--long-text chunk``: chunks written, the most of one document, the documents
    cut into more than one, and the document tokens embedded twice (overlaps)."""
    if S.CHUNK_LENGTHS not in good.column_names:
        return {}
    counts = pc.list_value_length(good[S.CHUNK_LENGTHS])
    return {"chunks": int(pc.sum(counts).as_py() or 0),
            "chunks_max": int(pc.max(counts).as_py() or 0),
            "docs_chunked": int(pc.sum(pc.greater(counts, 1)).as_py() or 0),
            "overlap_tokens": int(pc.sum(good[S.OVERLAP_TOKENS]).as_py() or 0)}


def _max_or(table: pa.Table, column: str) -> int:
    value = pc.max(table[column]).as_py() if table.num_rows else None
    return -1 if value is None else int(value)


def reason_kind(reason: str) -> str:
    """The reason without its details (``malformed JSON: ...`` -> ``malformed JSON``)."""
    return reason.split(":", 1)[0]


def rows_checksum(table: pa.Table, counted: dict[str, list[int]] | None = None) -> int:
    """The checksum of a unit of several files' rows in ``table`` (each row known by its
    file and row number), as the reader computes it for the whole unit (``counted``: its
    :func:`member_rows`, when known)."""
    counted = member_rows(table) if counted is None else counted
    return sum(file_rows_checksum(uri, n, s) for uri, (n, s) in counted.items()) % CHECKSUM_MOD


def member_rows(table: pa.Table) -> dict[str, list[int]]:
    """A unit of several files' rows in ``table`` (good and rejected) per file: ``{file URI:
    [rows, sum of their row numbers]}``, what a later night needs to account for the rows of
    a file it copies instead of reading (``pipeline/stages/carry.py``)."""
    sums = table.group_by(S.SOURCE).aggregate([(S.ROW, "count"), (S.ROW, "sum")])
    return {uri: [int(n), int(s or 0)] for uri, n, s in zip(
        sums[S.SOURCE].to_pylist(), sums[f"{S.ROW}_count"].to_pylist(),
        sums[f"{S.ROW}_sum"].to_pylist())}


def runs(sources: pa.ChunkedArray | pa.Array) -> list[list[Any]]:
    """``[[file URI, rows], ...]``: the runs of equal values of a part file's sources, in its
    row order (the file's row slices of each input file)."""
    out: list[list[Any]] = []
    for value in sources.to_pylist():
        add_run(out, value, 1)
    return out


def add_run(out: list[list[Any]], value: Any, rows: int) -> None:
    """Append ``rows`` rows of ``value`` to the runs ``out`` (``[[value, rows], ...]``)."""
    if out and out[-1][0] == value:
        out[-1][1] += rows
    else:
        out.append([value, rows])


def pair_array(runs: Any) -> np.ndarray | None:
    """``runs`` (a list of ``[int, int]``, or such an array) as an ``(n, 2)`` int64 array;
    None if they are not that (other numbers, other shapes, ints beyond int64)."""
    if isinstance(runs, (list, tuple)) and not runs:
        return np.empty((0, 2), np.int64)
    if not isinstance(runs, (list, tuple, np.ndarray)):
        return None
    try:
        array = np.asarray(runs)
    except ValueError:  # ragged
        return None
    ok = array.dtype == np.int64 and array.ndim == 2 and array.shape[1] == 2
    return array if ok else None


def part_name(unit: str) -> str:
    """A fresh name for a file of one unit's rows (``part-*.parquet`` is the output's glob)."""
    return f"part-{unit}-{uuid.uuid4().hex[:12]}.parquet"


def write_parquet(fs, path: str, table: pa.Table, row_groups: list[int] | None = None) -> int:
    """Write ``table`` to ``path`` so that no reader sees it half-written, in row groups of
    ``row_groups`` rows (default: of :data:`ROW_GROUP_ROWS`); returns its bytes."""
    with storage_errors(to_uri(fs, path), "write"):
        with open_for_publish(fs, path) as f:
            write_table(f, table, row_groups)
        return int(fs.size(path))


def write_table(f, table: pa.Table, row_groups: list[int] | None = None) -> None:
    """``table`` as Parquet into the open file ``f`` (see :func:`write_parquet`)."""
    if row_groups is None:
        pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS, **encodings(table.schema))
        return
    if sum(row_groups) != table.num_rows:
        raise ValueError(f"row groups of {sum(row_groups)} rows for a table of {table.num_rows}")
    with pq.ParquetWriter(f, table.schema, **encodings(table.schema)) as writer:
        start = 0
        for rows in row_groups:
            writer.write_table(table.slice(start, rows), row_group_size=rows)
            start += rows


def file_row_groups(rows: list[int], least: int | None = None,
                    most: int = ROW_GROUP_ROWS) -> list[int]:
    """The row groups of a part file whose files' rows are ``rows`` (one count per run of a
    file's rows, in order): each ends where a file's rows end once it holds ``least`` rows,
    and none holds more than ``most`` (a longer file spans several); ``least`` defaults to
    :data:`FILE_GROUP_ROWS`."""
    least = FILE_GROUP_ROWS if least is None else least
    sizes, current = [], 0
    for n in rows:
        while current + n > most:
            n -= most - current
            sizes.append(most)
            current = 0
        current += n
        if current >= least:
            sizes.append(current)
            current = 0
    if current:
        sizes.append(current)
    return sizes


def encodings(schema: pa.Schema) -> dict[str, Any]:
    """``pq.write_table`` options: dictionary encoding and statistics for every column but the
    vectors (lists of floats). A vector's values never repeat, so the writer's dictionary
    attempt is wasted work before it falls back (25,000 rows at widths 64/32: 124 ms a write
    with it, 22 ms without, and a 27% smaller file), and their min/max serve no reader."""
    leaves = [path for field in schema if not _is_vector(field.type) for path in _leaves(field)]
    return {"use_dictionary": leaves, "write_statistics": leaves}


def _is_vector(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)
            or pa.types.is_large_list(kind)) and pa.types.is_floating(kind.value_type)


def _leaves(field: pa.Field, prefix: str = "") -> list[str]:
    """The Parquet column paths of one Arrow field (a path no column has is ignored by the
    writer: that column would only be written without a dictionary)."""
    name, kind = prefix + field.name, field.type
    if pa.types.is_struct(kind):
        return [p for i in range(kind.num_fields) for p in _leaves(kind.field(i), name + ".")]
    if pa.types.is_map(kind):
        return [p for child in (kind.key_field, kind.item_field)
                for p in _leaves(child, name + ".key_value.")]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaves(kind.value_field.with_name("element"), name + ".list.")
    return [name]


def write_outputs(fs, output_path: str, table: pa.Table, spec: OutputSpec) -> list[dict[str, Any]]:
    """Write ``table``'s rows to files holding one unit's rows each (its embedded rows, and its
    rejects under ``_rejects/``); returns one record per unit for the driver, which commits
    a unit once all of its rows are reported. Files are named relative to the output."""
    base = output_path.rstrip("/")
    records = []
    # The unit of work: an input file, or a row-group slice of a large one.
    units = table[S.UNIT] if S.UNIT in table.column_names else table[S.SOURCE]
    for source in pc.unique(units).to_pylist():
        part = table.filter(pc.equal(units, source))
        members = is_group(source) and not spec.long_text.chunked
        if members:  # each file's rows together, in order: a file's rows are a slice
            part = part.sort_by([(S.SOURCE, "ascending"), (S.ROW, "ascending")])
        embedded, rejects, stats = split_rows(part, spec)
        if is_group(source):  # several files' rows: their checksum, not the plain sum
            counted = member_rows(part)
            stats["row_sum"] = rows_checksum(part, counted)
        if members:
            stats["member_rows"] = counted
            stats["slices"] = {}
            sources = pc.filter(part[S.SOURCE], pc.is_null(part[S.REJECT]))  # the good rows
        unit = unit_key(source)
        files, size = [], 0  # names relative to the output, whatever spelling it is given
        # One file per unit, or several when chunks made its rows many (a write batch
        # counts documents).
        step = spec.rows_per_file()
        for start in range(0, embedded.num_rows, step):
            name = part_name(unit)
            rows = embedded.slice(start, step)
            if members:  # its files' runs, and row groups that end with a file's rows
                stats["slices"][name] = runs(sources.slice(start, step))
                size += write_parquet(fs, f"{base}/{name}", rows,
                                      file_row_groups([n for _, n in stats["slices"][name]]))
            else:
                size += write_parquet(fs, f"{base}/{name}", rows)
            files.append(name)
        if rejects.num_rows:
            name = f"{REJECTS_DIR}/{part_name(unit)}"
            size += write_parquet(fs, f"{base}/{name}", rejects)
            files.append(name)
        if spec.long_text.doc_vectors and embedded.num_rows:
            good = part.filter(pc.is_null(part[S.REJECT]))
            name = f"{DOCUMENTS_DIR}/{part_name(unit)}"
            size += write_parquet(fs, f"{base}/{name}", document_rows(good, spec))
            files.append(name)
        records.append(stats | {"unit": unit, "source": source, "files": files, "bytes": size})
    return records
