"""What the pre-flight reads of a shard before the run: its columns, and for JSONL the first
records and the Arrow types their values settle on (decoded exactly as the reader decodes)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .readers import JSON_TEXT, DecompressedStream, iter_lines, open_decompressed
from .storage import InputFile, open_filesystem, storage_errors


def sample_columns(file: InputFile, storage_options: dict[str, Any] | None = None,
                   max_lines: int = 100, prefer_key: str | None = None) -> dict[str, Any] | None:
    """Column names of a shard -> Arrow type (Parquet) or first JSON value (JSONL).

    For JSONL, the first object among the first ``max_lines`` lines whose ``prefer_key`` is
    not null (else the first object). None when the shard holds no rows to sample.
    """
    if file.size == 0:
        return None
    if file.format == "parquet":
        fs, path = open_filesystem(file.uri, storage_options, preflight=True)
        with storage_errors(file.uri, "read"), fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
        return {name: schema.field(name).type for name in schema.names} if rows else None
    return preferred_record(sample_records(file, storage_options, max_lines), prefer_key)


def preferred_record(records: list[dict[str, Any]], key: str | None) -> dict[str, Any] | None:
    """The first record whose ``key`` is not null, else the first record (None if none)."""
    preferred = [r for r in records if key is None or r.get(key) is not None]
    return (preferred or records or [None])[0]


def sample_records(file: InputFile, storage_options: dict[str, Any] | None = None,
                   max_lines: int = 100) -> list[dict[str, Any]]:
    """The JSON objects among the first ``max_lines`` non-blank lines of a JSONL shard.

    Lines are decoded as the reader decodes them; a bad line here is the reader's reject
    later, but a sample with no object at all is an input error.
    """
    if file.size == 0:
        return []
    fs, path = open_filesystem(file.uri, storage_options, preflight=True)
    records, bad = [], []
    with storage_errors(file.uri, "read"), fs.open(path, "rb") as raw:
        stream = open_decompressed(raw, file.compression)
        for number, line in _readable_lines(stream):
            if not line.strip():
                continue
            if len(records) + len(bad) >= max_lines:
                break
            try:
                record = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
            except ValueError as err:
                bad.append(f"line {number}: {err}")
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(f"line {number}: a JSON {type(record).__name__}, not an object")
    if bad and not records:
        raise InputError(f"{file.uri}: none of its first {len(bad)} line(s) is a JSON "
                         f"object ({bad[0]})")
    return records


def _readable_lines(stream) -> Iterator[tuple[int, bytes]]:
    """Lines up to any damage of a compressed file (the reader rejects the damaged rest)."""
    lines = iter_lines(stream, 1 << 16)
    while True:
        try:
            yield next(lines)
        except StopIteration:
            return
        except OSError:
            if isinstance(stream, DecompressedStream) and stream.source_error is None:
                return
            raise


def json_value_type(values: list[Any]) -> Any:
    """The Arrow type a JSONL kept column settles on, from sampled values.

    Booleans, integers (float64 when a sampled number has a fraction), and strings map to
    their Arrow types; objects, arrays and columns with no sampled value are kept as text
    (strings as they are, other values as JSON).
    """
    present = [v for v in values if v is not None]
    if not present:
        return JSON_TEXT
    first = present[0]
    if isinstance(first, bool):
        return pa.bool_()
    if isinstance(first, (int, float)):
        numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return pa.float64() if any(isinstance(v, float) for v in numbers) else pa.int64()
    if isinstance(first, str):
        return pa.string()
    return JSON_TEXT


def json_id_type(value: Any, uri: str, id_column: str) -> pa.DataType:
    """The Arrow type of JSONL ids, from the first row's id (integers or strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{uri}: id column {id_column!r} holds {type(value).__name__} "
                         f"{value!r}; ids must be integers or strings")
    return pa.int64() if isinstance(value, int) else pa.string()
