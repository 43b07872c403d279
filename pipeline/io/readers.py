"""Shard readers: one Parquet or JSONL file -> Arrow tables in the pipeline's row layout.

Pure functions over file objects (no Ray): the Ray datasource in ``pipeline/graph.py`` calls
them once per shard. A row that cannot be read as a row (malformed JSON, invalid UTF-8, a
non-object line, an id or text of the wrong type) is not dropped: it comes out with its reason
in ``__reject`` and an excerpt of the raw value, and goes to ``_rejects/``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import schema as S
from .storage import InputError

READ_CHUNK_BYTES = 4 << 20
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
BLOCK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """Which columns to read and how (``id_type``: the Arrow type of JSONL ids)."""

    id_column: str
    text_column: str
    keep_columns: tuple[str, ...] = ()
    id_type: pa.DataType | None = None
    block_rows: int = BLOCK_ROWS

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([self.id_column, self.text_column, *self.keep_columns]))


def open_decompressed(raw: BinaryIO, compression: str | None):
    """A readable stream of the decompressed bytes of ``raw`` (gzip or zstd via Arrow)."""
    if compression is None:
        return raw
    if not isinstance(raw, pa.NativeFile):
        raw = pa.PythonFile(raw, mode="r")
    return pa.CompressedInputStream(raw, compression)


def iter_lines(stream, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """``(line_number, line)`` for each line of a byte stream, 1-based, newline stripped."""
    number, rest = 0, b""
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        lines = (rest + bytes(chunk)).split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            yield number, line
    if rest:
        yield number + 1, rest


def read_jsonl(stream, source: str, spec: ReadSpec) -> Iterator[pa.Table]:
    """Tables of at most ``spec.block_rows`` rows from a decompressed JSONL stream.

    Blank lines are not rows and are skipped; every other line becomes one row. The last
    table's rows carry the file's row count in ``__file_rows`` (null before it), so the run
    summary can tell that a file was read to its end and every row came out.
    """
    rows: list[tuple[int, Any, Any, dict, str | None, str | None]] = []
    pending, total = None, 0
    for number, line in iter_lines(stream):
        if not line.strip():
            continue
        rows.append((number, *_parse_line(line, spec)))
        total += 1
        if len(rows) >= spec.block_rows:
            if pending is not None:
                yield pending
            pending, rows = _jsonl_table(rows, source, spec), []
    if rows:
        if pending is not None:
            yield pending
        pending = _jsonl_table(rows, source, spec)
    if pending is not None:
        column = pending.schema.get_field_index(S.FILE_ROWS)
        yield pending.set_column(column, S.FILE_ROWS, pa.array([total] * pending.num_rows, pa.int64()))


def _parse_line(line: bytes, spec: ReadSpec):
    """``(id, text, keep, reject, excerpt)`` of one JSONL line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, None, {}, f"invalid UTF-8: at byte {err.start}", S.excerpt(line)
    try:
        # A UTF-8 byte-order mark (first line of files saved by some editors) is not content.
        record = json.loads(text.removeprefix("\ufeff"))
    except ValueError as err:
        return None, None, {}, f"malformed JSON: {err}", S.excerpt(text)
    if not isinstance(record, dict):
        return None, None, {}, f"line is a JSON {type(record).__name__}, not an object", \
            S.excerpt(text)
    keep = {c: record.get(c) for c in spec.keep_columns}
    reason = _value_problem(record, spec) or _surrogate_problem(record, spec)
    if reason and reason.startswith("lone surrogate"):
        return None, None, {}, reason, S.excerpt(text)
    if reason:
        id_ok = spec.id_column in record and _id_matches(record[spec.id_column], spec.id_type)
        return (record[spec.id_column] if id_ok else None), None, keep, reason, S.excerpt(text)
    return record[spec.id_column], record[spec.text_column], keep, None, None


def _value_problem(record: dict, spec: ReadSpec) -> str | None:
    if spec.id_column not in record:
        return f"id column {spec.id_column!r} is missing"
    value = record[spec.id_column]
    if value is not None and not _id_matches(value, spec.id_type):
        if pa.types.is_integer(spec.id_type) and isinstance(value, int) \
                and not isinstance(value, bool):
            return f"id out of range: {value} does not fit {spec.id_type}"
        return f"id is {type(value).__name__}, the shard's ids are {spec.id_type}"
    if spec.text_column not in record:
        return f"text column {spec.text_column!r} is missing"
    text = record[spec.text_column]
    if text is not None and not isinstance(text, str):
        return f"text is {type(text).__name__}, not str"
    return None


def _surrogate_problem(record: dict, spec: ReadSpec) -> str | None:
    """JSON ``\\ud800`` escapes decode to lone surrogates, which Arrow strings cannot hold."""
    for column in (spec.id_column, spec.text_column, *spec.keep_columns):
        try:
            json.dumps(record.get(column), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            return f"lone surrogate: in column {column!r} at position {err.start}"
    return None


def _id_matches(value: Any, id_type: pa.DataType | None) -> bool:
    if value is None or id_type is None:
        return True
    if pa.types.is_integer(id_type):
        return isinstance(value, int) and not isinstance(value, bool) and _INT64_MIN <= value <= _INT64_MAX
    return isinstance(value, str)


def _jsonl_table(rows, source: str, spec: ReadSpec) -> pa.Table:
    numbers, ids, texts, keeps, rejects, excerpts = zip(*rows)
    columns = {
        S.ID: pa.array(ids, type=spec.id_type),
        S.TEXT: pa.array(texts, type=pa.string()),
    }
    for c in spec.keep_columns:
        columns[c] = _keep_array([k.get(c) for k in keeps], c, source)
    return _with_origin(columns, source, pa.array(numbers, pa.int64()), rejects, excerpts, None)


def _keep_array(values: list, column: str, source: str) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise InputError(f"{source}: kept column {column!r} mixes value types ({err})") from None


def read_parquet(f, source: str, spec: ReadSpec) -> Iterator[pa.Table]:
    """Tables of at most ``spec.block_rows`` rows from a Parquet file (random access)."""
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    missing = [c for c in spec.columns if c not in names]
    if missing:
        raise InputError(f"{source}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                         "check --id-column, --text-column and --keep-columns")
    offset = 0
    for batch in pf.iter_batches(batch_size=spec.block_rows, columns=spec.columns):
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        text = table[spec.text_column]
        rejects = excerpts = [None] * n
        if not _is_text_type(text.type):
            rejects = [f"text column has type {text.type}, not string"] * n
            excerpts = [S.excerpt(v) for v in text.to_pylist()]
            text = pa.nulls(n, pa.string())
        columns = {S.ID: table[spec.id_column], S.TEXT: text.cast(pa.string())}
        columns |= {c: table[c] for c in spec.keep_columns}
        rows = pa.array(range(offset, offset + n), pa.int64())
        yield _with_origin(columns, source, rows, rejects, excerpts, pf.metadata.num_rows)
        offset += n


def _is_text_type(t: pa.DataType) -> bool:
    """String columns in any of Arrow's layouts (plain, large, view, dictionary-encoded)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _with_origin(columns: dict, source: str, rows: pa.Array, rejects, excerpts,
                 file_rows: int | None) -> pa.Table:
    n = len(rows)
    columns[S.SOURCE] = pa.array([source] * n, pa.string())
    columns[S.ROW] = rows
    columns[S.FILE_ROWS] = pa.array([file_rows] * n, pa.int64())
    columns[S.REJECT] = pa.array(rejects, pa.string())
    columns[S.EXCERPT] = pa.array(excerpts, pa.string())
    return pa.table(columns)
