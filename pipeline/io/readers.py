"""Shard readers: one Parquet or JSONL file -> Arrow tables in the pipeline's row layout.

Pure functions over file objects (no Ray): the Ray datasource in ``pipeline/cluster/graph.py`` calls
them once per shard. A row that cannot be read as a row (malformed JSON, invalid UTF-8, a
non-object line, an id or text of the wrong type) is not dropped: it comes out with its reason
in ``__reject`` and an excerpt of the raw value, and goes to ``_rejects/``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, BinaryIO, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import schema as S
from .errors import StorageError
from .storage import (CHECKSUM_MOD, InputFile, file_rows_checksum, open_filesystem,
                      storage_errors)

READ_CHUNK_BYTES = 4 << 20
COMPRESSED_READ_BYTES = 64 << 10
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
BLOCK_ROWS = 4096


# The type of a JSONL kept column whose sampled values are objects or arrays, or all null:
# strings as they are, any other value as its JSON text.
JSON_TEXT = "json-text"


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """Which columns to read, and the types the run settles for them.

    ``id_type`` and ``keep_types`` come from the pre-flight's sample of the first non-empty
    shard; every block of every shard is cast to them, so part files share one schema. A value
    that does not convert sends its row to the rejects with the reason. ``dedupe`` rejects an
    id seen earlier in the same shard (``--on-duplicate keep-first``).
    """

    id_column: str
    text_column: str
    keep_columns: tuple[str, ...] = ()
    id_type: pa.DataType | None = None
    block_rows: int = BLOCK_ROWS
    keep_types: tuple[tuple[str, Any], ...] = ()  # (column, Arrow type or JSON_TEXT)
    dedupe: bool = True

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([self.id_column, self.text_column, *self.keep_columns]))

    def keep_type(self, column: str) -> Any:
        return dict(self.keep_types).get(column)


class _SourceReads(io.RawIOBase):
    """The compressed bytes, recording an error of the source itself."""

    def __init__(self, raw: BinaryIO, owner: "DecompressedStream") -> None:
        super().__init__()
        self._raw, self._owner = raw, owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self._raw.read(len(buffer))
        except BaseException as err:
            self._owner.source_error = err
            raise
        buffer[: len(data)] = data
        return len(data)


class DecompressedStream:
    """A decompressing reader that tells a damaged file from a failing source.

    Arrow reports a truncated or corrupt gzip/zstd stream as ``OSError``, as it does an error
    while fetching the compressed bytes; ``source_error`` is set only in the second case.
    """

    def __init__(self, raw: BinaryIO, compression: str) -> None:
        self.source_error: BaseException | None = None
        self._raw = raw
        source = pa.PythonFile(io.BufferedReader(_SourceReads(raw, self), 1 << 20), mode="r")
        self._stream = pa.CompressedInputStream(source, compression)

    def read(self, n: int = -1) -> bytes:
        return self._stream.read(n)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "DecompressedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_decompressed(raw: BinaryIO, compression: str | None):
    """A readable stream of the decompressed bytes of ``raw`` (gzip or zstd via Arrow)."""
    if compression is None:
        return raw
    return DecompressedStream(raw, compression)


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
    table's rows carry the file's row count in ``__file_rows`` and the sum of its line numbers
    in ``__file_rowsum`` (null before it), so the run can tell that a file was read to its end
    and every row came out exactly once.

    A compressed file that is cut short or corrupt keeps the rows read before the damage and
    gets one more row, rejected, naming the damage; an error of the storage itself is raised
    (naming ``source``) for the read to be retried or the run to fail.
    """
    rows: list[tuple[int, Any, Any, dict, str | None, str | None]] = []
    pending, total, row_sum, number = None, 0, 0, 0
    seen: dict[Any, int] = {}
    # Arrow drops what it decoded in a read that hits damage: small reads keep the loss small.
    chunk = COMPRESSED_READ_BYTES if isinstance(stream, DecompressedStream) else READ_CHUNK_BYTES
    lines = iter_lines(stream, chunk)
    while True:
        try:
            number, line = next(lines)
        except StopIteration:
            break
        except Exception as err:  # noqa: BLE001 - damage is kept apart from storage errors
            damaged = isinstance(stream, DecompressedStream) and stream.source_error is None \
                and isinstance(err, OSError)
            if not damaged:
                raise _read_error(source, err) from err
            number += 1  # the damaged rest of the file is one rejected row
            rows.append((number, None, None, {}, f"damaged compressed data: {err} after line "
                         f"{number - 1}; the rest of the file is unreadable", ""))
            total, row_sum = total + 1, row_sum + number
            break
        if not line.strip():
            continue
        rows.append((number, *_parse_line(line, spec)))
        total, row_sum = total + 1, row_sum + number
        if len(rows) >= spec.block_rows:
            if pending is not None:
                yield pending
            pending, rows = _jsonl_table(rows, source, spec, seen), []
    if rows:
        if pending is not None:
            yield pending
        pending = _jsonl_table(rows, source, spec, seen)
    if pending is not None:
        yield _with_totals(pending, total, row_sum)


def _read_error(source: str, err: BaseException) -> Exception:
    return StorageError(f"cannot read {source}: {type(err).__name__}: {err}")


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


def _jsonl_table(rows, source: str, spec: ReadSpec, seen: dict) -> pa.Table:
    numbers, ids, texts, keeps, rejects, excerpts = zip(*rows)
    rejects, excerpts = list(rejects), list(excerpts)
    columns = {S.ID: pa.array(ids, type=spec.id_type), S.TEXT: pa.array(texts, type=pa.string())}
    for c in spec.keep_columns:
        columns[c] = _keep_array([k.get(c) for k in keeps], c, spec.keep_type(c), rejects,
                                 excerpts)
    rows_array = pa.array(numbers, pa.int64())
    if spec.dedupe:
        S.reject_unembeddable(_nulls(columns[S.ID]), texts, rejects, excerpts)
        _reject_duplicates(columns[S.ID], rows_array, rejects, excerpts, seen)
    return _with_origin(columns, source, rows_array, rejects, excerpts, None)


def _keep_array(values: list, column: str, kind: Any, rejects: list, excerpts: list) -> pa.Array:
    """A kept column of the run's type; rows whose value does not fit it are rejected.

    JSON values must be of the type itself (no float to int truncation, no bool as number);
    integers fit a float64 column.
    """
    if kind is None:  # no settled type (direct calls): Arrow infers it
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kind = JSON_TEXT
    if kind == JSON_TEXT:
        return pa.array([v if v is None or isinstance(v, str)
                         else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
    fits = _json_fits(kind)
    out = list(values)
    for i, v in enumerate(values):
        if v is not None and not fits(v):
            out[i] = None
            if rejects[i] is None:
                rejects[i] = f"kept column {column!r}: value is not {kind}, the run's type"
                excerpts[i] = S.excerpt(v)
    return pa.array(out, kind)


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _json_fits(kind: pa.DataType):
    """Whether a JSON value is of the Arrow type ``kind`` (as settled from the sample)."""
    if pa.types.is_boolean(kind):
        return lambda v: isinstance(v, bool)
    if pa.types.is_integer(kind):
        return lambda v: isinstance(v, int) and not isinstance(v, bool) \
            and _INT64_MIN <= v <= _INT64_MAX
    if pa.types.is_floating(kind):
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) \
            and _finite(v)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return lambda v: isinstance(v, str)
    raise ValueError(f"no JSON value fits kept-column type {kind}")


def _nulls(values) -> list[bool]:
    """Whether each value is null (the ids of a block)."""
    return [v is None for v in values.to_pylist()]


def _reject_duplicates(ids: pa.Array, rows: pa.Array, rejects: list, excerpts: list,
                       seen: dict) -> None:
    """Reject a row whose id appeared earlier in the shard (``seen``: id -> its first row)."""
    for i, (value, row) in enumerate(zip(ids.to_pylist(), rows.to_pylist())):
        if value is None or rejects[i] is not None:
            continue
        first = seen.setdefault(value, row)
        if first != row:
            rejects[i] = f"duplicate id: first seen at row {first} of this file"
            excerpts[i] = S.excerpt(value)


def read_parquet(f, source: str, spec: ReadSpec,
                 row_groups: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Tables of at most ``spec.block_rows`` rows from a Parquet file (random access), or
    from its row groups ``[start, stop)``: row numbers stay the file's, and ``__file_rows``
    and ``__file_rowsum`` are the slice's.

    The id and kept columns are cast to the run's types (a value that does not convert is
    rejected); a kept column the file lacks is null. A file without the id or text column
    has every row rejected; a file that is not readable Parquet gives one rejected row.
    """
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as err:
        if not _readable(f):
            raise _read_error(source, err) from err
        yield _damaged_parquet(source, spec, err)  # the bytes arrive, they are not Parquet
        return
    names = pf.schema_arrow.names
    groups = range(*row_groups) if row_groups else range(pf.metadata.num_row_groups)
    first = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start))
    total = sum(pf.metadata.row_group(g).num_rows for g in groups)
    row_sum = total * first + total * (total - 1) // 2
    lacking = [c for c in (spec.id_column, spec.text_column) if c not in names]
    wanted = [c for c in spec.columns if c in names]
    seen: dict[Any, int] = {}
    offset = first
    batches = pf.iter_batches(batch_size=spec.block_rows, columns=wanted, row_groups=list(groups))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as err:
            if not _readable(f):
                raise _read_error(source, err) from err
            # The footer counts the rows: each one not read is rejected by its number.
            yield _rows_lost(source, spec, range(offset, first + total), total, row_sum,
                             f"damaged Parquet data: {err}; rows from {offset} on are unreadable")
            return
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        rejects: list = [None] * n
        excerpts: list = [None] * n
        if lacking:
            rejects = [f"the file has no column {lacking[0]!r}"] * n
        ids = table[spec.id_column] if spec.id_column in names else pa.nulls(n, spec.id_type
                                                                               or pa.string())
        ids = _cast_column(ids, spec.id_type, "id", rejects, excerpts)
        if spec.text_column in names:
            text = table[spec.text_column]
            if not _is_text_type(text.type):
                rejects = [r or f"text column has type {text.type}, not string" for r in rejects]
                excerpts = [e or S.excerpt(v) for e, v in zip(excerpts, text.to_pylist())]
                text = pa.nulls(n, pa.string())
            text = text.cast(pa.string())
        else:
            text = pa.nulls(n, pa.string())
        columns = {S.ID: ids, S.TEXT: text}
        for c in spec.keep_columns:
            kind = spec.keep_type(c)
            if c in names:
                columns[c] = _cast_column(table[c], kind, f"kept column {c!r}", rejects, excerpts)
            else:
                columns[c] = pa.nulls(n, kind if isinstance(kind, pa.DataType) else pa.null())
        rows = pa.array(range(offset, offset + n), pa.int64())
        if spec.dedupe:
            S.reject_unembeddable(_nulls(ids), text.to_pylist(), rejects, excerpts)
            _reject_duplicates(ids, rows, rejects, excerpts, seen)
        block = _with_origin(columns, source, rows, rejects, excerpts, total)
        yield block.set_column(block.schema.get_field_index(S.FILE_ROWSUM), S.FILE_ROWSUM,
                               pa.array([row_sum] * n, pa.int64()))
        offset += n


def _cast_column(values, kind: Any, what: str, rejects: list, excerpts: list):
    """``values`` as ``kind`` (unchanged when None); rows whose value does not convert are
    rejected and their value nulled."""
    if not isinstance(kind, pa.DataType) or values.type == kind:
        return values
    try:
        return values.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    out = []
    for i, scalar in enumerate(values):
        try:
            out.append(scalar.cast(kind))
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
        out.append(pa.scalar(None, kind))
        if rejects[i] is None:
            rejects[i] = f"{what}: value of type {values.type} does not convert to {kind}, " \
                         "the run's type"
            excerpts[i] = S.excerpt(scalar.as_py())
    return pa.array([v.as_py() for v in out], kind)


def _damaged_parquet(source: str, spec: ReadSpec, err: BaseException) -> pa.Table:
    """One rejected row standing for a file that is not readable Parquet."""
    return _rows_lost(source, spec, range(0, 1), 1, 0,
                      f"damaged Parquet file: {err}; no row of it is readable")


def _rows_lost(source: str, spec: ReadSpec, rows: range, total: int, row_sum: int,
               reason: str) -> pa.Table:
    """Rejected rows (no id, no text) for rows of a file that cannot be read."""
    n = len(rows)
    columns = {S.ID: pa.nulls(n, spec.id_type or pa.string()), S.TEXT: pa.nulls(n, pa.string())}
    for c in spec.keep_columns:
        kind = spec.keep_type(c)
        columns[c] = pa.nulls(n, kind if isinstance(kind, pa.DataType) else pa.string())
    table = _with_origin(columns, source, pa.array(rows, pa.int64()), [reason] * n, [""] * n,
                         total)
    return table.set_column(table.schema.get_field_index(S.FILE_ROWSUM), S.FILE_ROWSUM,
                            pa.array([row_sum] * n, pa.int64()))


def _readable(f) -> bool:
    """Whether the file's last bytes can be read: tells damaged data from a failing store."""
    if isinstance(f, (str, os.PathLike)):
        return os.path.exists(f)
    try:
        end = f.seek(0, 2)
        f.seek(max(0, end - 8))
        f.read(8)
        return True
    except Exception:  # noqa: BLE001 - any failure of the store itself
        return False


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
    columns[S.FILE_ROWSUM] = pa.nulls(n, pa.int64())
    columns[S.REJECT] = pa.array(rejects, pa.string())
    columns[S.EXCERPT] = pa.array(excerpts, pa.string())
    return pa.table(columns)


def read_file(file: InputFile, spec: ReadSpec, storage_options: dict[str, Any] | None = None,
              fs=None) -> Iterator[pa.Table]:
    """Tables of one shard (or row-group slice) in the pipeline's row layout; a zero-byte
    file holds no rows. ``fs``: the file's filesystem, when the caller has it open."""
    if not file.size:
        return
    if fs is None:
        fs, path = open_filesystem(file.uri, storage_options)
    else:
        path = fs._strip_protocol(file.uri)
    with storage_errors(file.uri, "read"):
        raw = fs.open(path, "rb")
    with raw:
        if file.format == "parquet":
            yield from read_parquet(raw, file.uri, spec, file.row_groups)
        else:
            yield from read_jsonl(open_decompressed(raw, file.compression), file.uri, spec)


class Skipped(NamedTuple):
    """Files of a unit that are not read (a night copies their rows from the previous
    snapshot, ``pipeline/stages/carry.py``), and their rows' count and checksum, which the
    unit's own count and checksum include."""

    members: frozenset[str]
    rows: int
    checksum: int


def files_read(unit: InputFile, skipped: Skipped | None = None) -> list[InputFile]:
    """The files of ``unit`` that are read: its members (or itself) less the ``skipped``."""
    return [f for f in unit.files if skipped is None or f.uri not in skipped.members]


def read_unit(unit: InputFile, spec: ReadSpec, storage_options: dict[str, Any] | None = None,
              skipped: Skipped | None = None) -> Iterator[pa.Table]:
    """Tables of one unit of work, each with the unit's name in ``__unit``.

    A unit of several small files (:attr:`InputFile.members`) is read file after file, its
    rows gathered into tables of about ``spec.block_rows`` (not one small table per file),
    with the rows' own files and row numbers; its last table carries the unit's row count
    in ``__file_rows`` and the checksum of its rows (:func:`file_rows_checksum`, summed over
    its files) in ``__file_rowsum``, null before it, so that the driver commits the unit once
    all of its files' rows came out, each once. ``skipped``: files of the unit left unread,
    whose rows are counted in the unit's count and checksum all the same.
    """
    tables = read_file(unit, spec, storage_options) if not unit.members \
        else _read_members(unit, spec, storage_options, skipped)
    for table in tables:
        yield table.append_column(S.UNIT, pa.array([unit.unit] * table.num_rows, pa.string()))


def _read_members(unit: InputFile, spec: ReadSpec, storage_options: dict[str, Any] | None,
                  skipped: Skipped | None = None) -> Iterator[pa.Table]:
    gathered, rows, pending = [], 0, None
    total, checksum = (skipped.rows, skipped.checksum) if skipped else (0, 0)
    # One filesystem for the unit's files (an S3 one is a client of its own: not one a file).
    fs, _ = open_filesystem(unit.uri, storage_options)
    for member in files_read(unit, skipped):
        file_rows = file_rowsum = 0
        for table in read_file(member, spec, storage_options, fs):
            file_rows = max(file_rows, pc.max(table[S.FILE_ROWS]).as_py() or 0)
            file_rowsum = max(file_rowsum, pc.max(table[S.FILE_ROWSUM]).as_py() or 0)
            gathered.append(_without_totals(table))
            rows += table.num_rows
            if rows >= spec.block_rows:
                if pending is not None:
                    yield pending
                pending, gathered, rows = pa.concat_tables(gathered), [], 0
        total += file_rows
        checksum = (checksum + file_rows_checksum(member.uri, file_rows, file_rowsum)) \
            % CHECKSUM_MOD
    if gathered:
        if pending is not None:
            yield pending
        pending = pa.concat_tables(gathered)
    if pending is not None:
        yield _with_totals(pending, total, checksum)


def _with_totals(table: pa.Table, rows: int, rowsum: int) -> pa.Table:
    """The unit's last block: its row count and row checksum on every row."""
    n = table.num_rows
    return table.set_column(table.schema.get_field_index(S.FILE_ROWS), S.FILE_ROWS,
                            pa.array([rows] * n, pa.int64())) \
        .set_column(table.schema.get_field_index(S.FILE_ROWSUM), S.FILE_ROWSUM,
                    pa.array([rowsum] * n, pa.int64()))


def _without_totals(table: pa.Table) -> pa.Table:
    n = table.num_rows
    for column in (S.FILE_ROWS, S.FILE_ROWSUM):
        table = table.set_column(table.schema.get_field_index(column), column,
                                 pa.nulls(n, pa.int64()))
    return table


def has_rows(file: InputFile, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a shard holds a row: :func:`count_rows` > 0, reading a JSONL file only up to
    its first non-blank line."""
    if file.members:
        return any(has_rows(m, storage_options) for m in file.members)
    if not file.size:
        return False
    if file.format == "parquet":
        return count_rows(file, storage_options) > 0  # the footer's count
    fs, path = open_filesystem(file.uri, storage_options)
    with storage_errors(file.uri, "read"), fs.open(path, "rb") as f:
        return any(line.strip() for _, line in iter_lines(open_decompressed(f, file.compression)))


def count_rows(file: InputFile, storage_options: dict[str, Any] | None = None) -> int:
    """Rows of a shard: its Parquet footer's count, or its non-blank JSONL lines (a unit of
    several files: theirs, summed)."""
    if file.members:
        return sum(count_rows(m, storage_options) for m in file.members)
    if not file.size:
        return 0  # a zero-byte file: nothing to open
    fs, path = open_filesystem(file.uri, storage_options)
    with storage_errors(file.uri, "read"), fs.open(path, "rb") as f:
        if file.format == "parquet" and file.row_groups:
            meta = pq.ParquetFile(f).metadata
            return sum(meta.row_group(g).num_rows for g in range(*file.row_groups))
        if file.format == "parquet":
            return pq.ParquetFile(f).metadata.num_rows if file.size else 0
        return sum(1 for _, line in iter_lines(open_decompressed(f, file.compression))
                   if line.strip())
