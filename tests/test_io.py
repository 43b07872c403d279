"""The I/O layer and the run summary on real local files (no Ray, no network).

Readers: JSONL lines and Parquet row groups -> the pipeline's row layout, bad rows rejected
with a reason and never dropped. Storage: format detection, input listing, output checks.
Writers: encoder rows -> embeddings and rejects files, one record per input file. Summary:
totals and row accounting over units (one unit per input file).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import summary
from pipeline.io import schema as S
from pipeline.io.readers import (JSON_TEXT, ReadSpec, iter_lines, open_decompressed, read_jsonl,
                                 read_parquet)
from pipeline.io.errors import InputError, OutputError, StorageError
from pipeline.io.readers import count_rows
from pipeline.io.sampling import json_id_type, json_value_type, sample_columns, sample_records
from pipeline.io.storage import (check_disjoint, detect_format, list_inputs, open_filesystem,
                                 prepare_output, remove_files)
from pipeline.io.writers import OutputSpec, split_rows, write_outputs
from pipeline.units import merge, unit_key

INT_IDS = ReadSpec("id", "text", keep_columns=("lang",), id_type=pa.int64())


# ---------------------------------------------------------------------------------------------
# helpers


def write_bytes(path: Path, data: bytes, compression: str | None = None) -> Path:
    """``data`` at ``path``, gzip-compressed with Python, zstd-compressed with Arrow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "gzip":
        path.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    else:
        path.write_bytes(data)
    return path


def write_parquet_file(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def rows_of(tables) -> list[dict]:
    tables = list(tables)
    return pa.concat_tables(tables).to_pylist() if tables else []


def read_jsonl_file(path: Path, compression: str | None, spec: ReadSpec = INT_IDS) -> list[pa.Table]:
    with open(path, "rb") as raw:
        return list(read_jsonl(open_decompressed(raw, compression), str(path), spec))


def input_file(path: Path):
    (file,) = list_inputs(str(path))
    return file


# ---------------------------------------------------------------------------------------------
# iter_lines


def test_iter_lines_numbers_from_one_across_chunk_boundaries():
    data = b"alpha\nbe\n\ngamma-long-line\r\nlast"
    got = list(iter_lines(io.BytesIO(data), chunk_bytes=3))
    assert got == [(1, b"alpha"), (2, b"be"), (3, b""), (4, b"gamma-long-line\r"), (5, b"last")]


@pytest.mark.parametrize("chunk_bytes", [1, 2, 5, 1 << 20])
def test_iter_lines_same_for_any_chunk_size(chunk_bytes):
    data = b"".join(f"line {i} {'x' * i}\n".encode() for i in range(20))
    got = list(iter_lines(io.BytesIO(data), chunk_bytes=chunk_bytes))
    assert got == [(i + 1, f"line {i} {'x' * i}".encode()) for i in range(20)]


def test_iter_lines_trailing_newline_and_empty_stream():
    assert list(iter_lines(io.BytesIO(b"a\nb\n"), 4)) == [(1, b"a"), (2, b"b")]
    assert list(iter_lines(io.BytesIO(b""), 4)) == []


# ---------------------------------------------------------------------------------------------
# read_jsonl

GOOD = [{"id": 1, "text": "hello", "lang": "en"}, {"id": 2, "text": "hallo"}]


@pytest.mark.parametrize("suffix,compression", [("", None), (".gz", "gzip"), (".zst", "zstd")])
def test_read_jsonl_plain_and_compressed(tmp_path, suffix, compression):
    path = write_bytes(tmp_path / f"a.jsonl{suffix}", jsonl(*GOOD), compression)
    rows = rows_of(read_jsonl_file(path, compression))
    assert [(r[S.ID], r[S.TEXT], r["lang"]) for r in rows] == [(1, "hello", "en"), (2, "hallo", None)]
    assert [r[S.ROW] for r in rows] == [1, 2]
    assert all(r[S.SOURCE] == str(path) for r in rows)
    assert all(r[S.REJECT] is None and r[S.EXCERPT] is None for r in rows)
    # JSONL has no footer: the reader counts the rows and sets the count on the last block.
    assert all(r[S.FILE_ROWS] == 2 for r in rows)


def test_read_jsonl_blank_lines_skipped_but_counted_in_line_numbers():
    data = b"\n" + jsonl(GOOD[0]) + b"   \n\r\n" + jsonl(GOOD[1]) + b"\n"
    tables = list(read_jsonl(io.BytesIO(data), "s.jsonl", INT_IDS))
    rows = rows_of(tables)
    assert [r[S.ID] for r in rows] == [1, 2]
    assert [r[S.ROW] for r in rows] == [2, 5]


def test_read_jsonl_column_types():
    (table,) = read_jsonl(io.BytesIO(jsonl(*GOOD)), "s", INT_IDS)
    assert table.schema.field(S.ID).type == pa.int64()
    assert table.schema.field(S.TEXT).type == pa.string()
    assert table.schema.field(S.ROW).type == pa.int64()
    assert table.schema.field(S.REJECT).type == pa.string()


BAD_LINES = [
    # (raw line, expected id, reason check, excerpt check)
    (b'{"id": 3, "text": "caf\xe9"}', None, lambda r: r.startswith("invalid UTF-8: at byte 22"),
     lambda e: "\\xe9" in e),
    (b'{"id": 4, "text": ', None, lambda r: r.startswith("malformed JSON:"),
     lambda e: e == '{"id": 4, "text": '),
    (b"[1, 2]", None, lambda r: r == "line is a JSON list, not an object", lambda e: e == "[1, 2]"),
    (b'{"text": "no id"}', None, lambda r: r == "id column 'id' is missing",
     lambda e: "no id" in e),
    (b'{"id": 6, "lang": "de"}', 6, lambda r: r == "text column 'text' is missing",
     lambda e: '"id": 6' in e),
    (b'{"id": 7, "text": 5}', 7, lambda r: r == "text is int, not str", lambda e: '"text": 5' in e),
    (b'{"id": "8", "text": "str id"}', None,
     lambda r: r.startswith("id is str") and "int64" in r, lambda e: "str id" in e),
    (b'{"id": true, "text": "bool id"}', None, lambda r: r.startswith("id is bool"),
     lambda e: "bool id" in e),
    (b'{"id": 1.5, "text": "float id"}', None, lambda r: r.startswith("id is float"),
     lambda e: "float id" in e),
]


@pytest.mark.parametrize("line,want_id,reason_ok,excerpt_ok", BAD_LINES,
                         ids=["utf8", "json", "list", "no-id", "no-text", "int-text", "str-id",
                              "bool-id", "float-id"])
def test_read_jsonl_bad_line_becomes_a_rejected_row(line, want_id, reason_ok, excerpt_ok):
    data = jsonl(GOOD[0]) + line + b"\n" + jsonl(GOOD[1])
    rows = rows_of(read_jsonl(io.BytesIO(data), "s.jsonl", INT_IDS))
    assert [r[S.ROW] for r in rows] == [1, 2, 3]
    bad = rows[1]
    assert bad[S.ID] == want_id
    assert bad[S.TEXT] is None
    assert reason_ok(bad[S.REJECT]), bad[S.REJECT]
    assert excerpt_ok(bad[S.EXCERPT]), bad[S.EXCERPT]
    assert bad[S.SOURCE] == "s.jsonl"
    assert [rows[0][S.REJECT], rows[2][S.REJECT]] == [None, None]
    assert [rows[0][S.ID], rows[2][S.ID]] == [1, 2]


def test_read_jsonl_every_bad_line_kept_in_one_stream():
    lines = [line for line, *_ in BAD_LINES]
    data = b"\n".join([jsonl(GOOD[0]).strip(), *lines, jsonl(GOOD[1]).strip()])
    rows = rows_of(read_jsonl(io.BytesIO(data), "s", INT_IDS))
    assert len(rows) == len(lines) + 2
    assert [r[S.REJECT] is None for r in rows] == [True] + [False] * len(lines) + [True]
    assert all(r[S.EXCERPT] for r in rows[1:-1])
    assert [r[S.ROW] for r in rows] == list(range(1, len(lines) + 3))


def test_read_jsonl_string_ids_reject_integer_id():
    spec = ReadSpec("id", "text", id_type=pa.string())
    rows = rows_of(read_jsonl(io.BytesIO(jsonl({"id": "a", "text": "x"}, {"id": 5, "text": "y"})),
                              "s", spec))
    assert [r[S.ID] for r in rows] == ["a", None]
    assert rows[0][S.REJECT] is None
    assert rows[1][S.REJECT].startswith("id is int")


def test_read_jsonl_keep_columns_null_where_missing_or_unparsable():
    spec = ReadSpec("id", "text", keep_columns=("lang", "score"), id_type=pa.int64())
    data = jsonl({"id": 1, "text": "a", "lang": "en", "score": 0.5},
                 {"id": 2, "text": "b", "score": 2.0}) + b"not json\n"
    (table,) = read_jsonl(io.BytesIO(data), "s", spec)
    assert table["lang"].to_pylist() == ["en", None, None]
    assert table["score"].to_pylist() == [0.5, 2.0, None]
    assert table.schema.field("score").type == pa.float64()


def test_read_jsonl_blocks_at_most_block_rows():
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=3)
    records = [{"id": i, "text": f"t{i}"} for i in range(8)]
    data = b"\n\n".join(json.dumps(r).encode() for r in records)  # blank lines are not rows
    tables = list(read_jsonl(io.BytesIO(data), "s", spec))
    assert [t.num_rows for t in tables] == [3, 3, 2]
    rows = rows_of(tables)
    assert [r[S.ID] for r in rows] == list(range(8))
    assert [r[S.ROW] for r in rows] == list(range(1, 16, 2))
    # Only the last block knows the file's row count; a file whose last block is lost is
    # therefore visible in the summary.
    assert [t[S.FILE_ROWS].to_pylist() for t in tables] == [[None] * 3, [None] * 3, [8, 8]]


def test_read_jsonl_empty_and_blank_streams_yield_nothing():
    assert list(read_jsonl(io.BytesIO(b""), "s", INT_IDS)) == []
    assert list(read_jsonl(io.BytesIO(b"\n \n\r\n"), "s", INT_IDS)) == []


def test_read_jsonl_out_of_range_integer_id_is_rejected_not_raised():
    data = jsonl(GOOD[0]) + b'{"id": 99999999999999999999, "text": "big"}\n'
    rows = rows_of(read_jsonl(io.BytesIO(data), "s", INT_IDS))
    assert len(rows) == 2 and rows[1][S.REJECT] is not None and rows[1][S.ID] is None


def test_read_jsonl_lone_surrogate_text_is_rejected_not_raised():
    data = jsonl(GOOD[0]) + b'{"id": 9, "text": "bad \\ud800 text"}\n'
    rows = rows_of(read_jsonl(io.BytesIO(data), "s", INT_IDS))
    assert len(rows) == 2 and rows[1][S.REJECT] is not None


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1)
    if compression == "zstd":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return data


def read_bytes(data: bytes, compression: str | None = None, spec: ReadSpec = INT_IDS,
               source: str = "s") -> list[pa.Table]:
    return list(read_jsonl(open_decompressed(io.BytesIO(data), compression), source, spec))


def test_read_jsonl_row_sum_and_count_on_the_last_block_only():
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=2)
    data = b"\n" + b"\n\n".join(json.dumps({"id": i, "text": "t"}).encode() for i in range(5))
    tables = read_bytes(data, spec=spec)
    rows = rows_of(tables)
    lines = [r[S.ROW] for r in rows]
    assert lines == [2, 4, 6, 8, 10]
    assert [t[S.FILE_ROWSUM].to_pylist() for t in tables] == [[None] * 2, [None] * 2, [30]]
    assert [t[S.FILE_ROWS].to_pylist() for t in tables] == [[None] * 2, [None] * 2, [5]]
    assert tables[0].schema.field(S.FILE_ROWSUM).type == pa.int64()


def test_read_jsonl_duplicate_ids_keep_first():
    # keep-first keeps an id's first *embeddable* row: a null id, or a text the tokenizer
    # would reject, is rejected here with its reason and does not count as the first.
    data = jsonl({"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": 1, "text": "c"},
                 {"id": None, "text": "d"}, {"id": None, "text": "e"},  # null ids: not counted
                 {"id": 4},  # rejected (no text): not counted as the first 4
                 {"id": 4, "text": "f"}, {"id": 2, "text": "g"}, {"id": 1, "text": "h"},
                 {"id": 5, "text": "  "}, {"id": 5, "text": "i"})  # blank text: not the first
    rows = rows_of(read_bytes(data))
    assert [r[S.REJECT] for r in rows] == [
        None, None, "duplicate id: first seen at row 1 of this file", "id is null",
        "id is null", "text column 'text' is missing", None,
        "duplicate id: first seen at row 2 of this file",
        "duplicate id: first seen at row 1 of this file",
        "text is empty or whitespace only", None]
    assert [r[S.ID] for r in rows] == [1, 2, 1, None, None, 4, 4, 2, 1, 5, 5]  # ids stay
    assert rows[2][S.EXCERPT] == "1" and rows[2][S.TEXT] == "c"
    # keep-all leaves null ids and bad texts to the tokenizer stage.
    rows = rows_of(read_bytes(data, spec=dataclasses.replace(INT_IDS, dedupe=False)))
    assert [r[S.REJECT] for r in rows] == [None] * 5 + ["text column 'text' is missing"] + \
        [None] * 5


def test_read_jsonl_duplicates_found_across_blocks():
    spec = ReadSpec("id", "text", id_type=pa.string(), block_rows=2)
    data = jsonl(*({"id": i, "text": i} for i in ["a", "b", "c", "d", "b", "e", "a"]))
    tables = read_bytes(data, spec=spec)
    assert len(tables) == 4
    assert [r[S.REJECT] for r in rows_of(tables)] == [
        None, None, None, None, "duplicate id: first seen at row 2 of this file", None,
        "duplicate id: first seen at row 1 of this file"]


def test_read_jsonl_dedupe_off_keeps_every_row():
    spec = ReadSpec("id", "text", id_type=pa.int64(), dedupe=False, block_rows=2)
    rows = rows_of(read_bytes(jsonl(*({"id": 7, "text": str(i)} for i in range(5))), spec=spec))
    assert [r[S.REJECT] for r in rows] == [None] * 5 and [r[S.ID] for r in rows] == [7] * 5


def test_read_jsonl_duplicates_are_not_tracked_across_files():
    data = jsonl({"id": 1, "text": "a"}, {"id": 2, "text": "b"})
    for source in ("one.jsonl", "two.jsonl", "one.jsonl"):  # every read starts afresh
        assert [r[S.REJECT] for r in rows_of(read_bytes(data, source=source))] == [None, None]


KEEP_SPEC = ReadSpec("id", "text", keep_columns=("n", "f", "b", "s", "j"), id_type=pa.int64(),
                     keep_types=(("n", pa.int64()), ("f", pa.float64()), ("b", pa.bool_()),
                                 ("s", pa.string()), ("j", JSON_TEXT)))


def test_read_jsonl_kept_columns_converted_to_the_run_types():
    data = jsonl({"id": 1, "text": "a", "n": 3, "f": 1.5, "b": True, "s": "x", "j": {"k": [1]}},
                 {"id": 2, "text": "b", "f": 2},  # an integer in a float column is a float
                 {"id": 3, "text": "c", "n": None, "j": "plain"})
    (table,) = read_bytes(data, spec=KEEP_SPEC)
    assert [table.schema.field(c).type for c in "nfbsj"] == [
        pa.int64(), pa.float64(), pa.bool_(), pa.string(), pa.string()]
    assert table.select(list("nfbsj")).to_pylist() == [
        {"n": 3, "f": 1.5, "b": True, "s": "x", "j": '{"k": [1]}'},
        {"n": None, "f": 2.0, "b": None, "s": None, "j": None},
        {"n": None, "f": None, "b": None, "s": None, "j": "plain"}]
    assert table[S.REJECT].to_pylist() == [None] * 3


@pytest.mark.parametrize("record,column,excerpt", [
    ({"n": "7"}, "n", "7"), ({"n": 2**70}, "n", str(2**70)), ({"n": [1]}, "n", "[1]"),
    ({"b": 1}, "b", "1"), ({"s": 5}, "s", "5"), ({"s": {"a": 1}}, "s", "{'a': 1}"),
    ({"f": "1.5"}, "f", "1.5"),
], ids=["str-in-int", "huge-int", "list-in-int", "int-in-bool", "int-in-str", "obj-in-str",
        "str-in-float"])
def test_read_jsonl_kept_value_of_another_type_rejects_its_row(record, column, excerpt):
    data = jsonl({"id": 1, "text": "a"}, {"id": 2, "text": "b"} | record, {"id": 3, "text": "c"})
    rows = rows_of(read_bytes(data, spec=KEEP_SPEC))
    kind = dict(KEEP_SPEC.keep_types)[column]
    assert [r[S.REJECT] for r in rows] == [
        None, f"kept column {column!r}: value is not {kind}, the run's type", None]
    assert rows[1][S.EXCERPT] == excerpt and rows[1][column] is None
    assert rows[1][S.ID] == 2  # the row is still known by its id in the rejects


def test_read_jsonl_kept_reject_does_not_replace_an_earlier_reason():
    data = jsonl({"id": 1, "n": "bad"})  # no text, and a bad kept value: the first reason stays
    (row,) = rows_of(read_bytes(data, spec=KEEP_SPEC))
    assert row[S.REJECT] == "text column 'text' is missing"


def test_read_jsonl_json_text_keeps_strings_and_encodes_the_rest():
    spec = ReadSpec("id", "text", keep_columns=("meta",), id_type=pa.int64(),
                    keep_types=(("meta", JSON_TEXT),))
    values = ["as is", {"a": [1, "é"]}, [1, 2], 3, 2.5, True, None, '{"already": "text"}']
    data = jsonl(*({"id": i, "text": "t", "meta": v} for i, v in enumerate(values)))
    (table,) = read_bytes(data, spec=spec)
    assert table.schema.field("meta").type == pa.string()
    assert table["meta"].to_pylist() == ["as is", '{"a": [1, "é"]}', "[1, 2]", "3", "2.5",
                                         "true", None, '{"already": "text"}']
    assert table[S.REJECT].null_count == len(values)


def test_read_jsonl_fraction_in_an_integer_kept_column_is_rejected_not_truncated():
    data = jsonl({"id": 1, "text": "a", "n": 1}, {"id": 2, "text": "b", "n": 2.5})
    rows = rows_of(read_bytes(data, spec=KEEP_SPEC))
    assert rows[1]["n"] != 2  # silently changed data
    assert rows[1][S.REJECT] == "kept column 'n': value is not int64, the run's type"


def test_read_jsonl_boolean_in_a_float_kept_column_is_rejected():
    rows = rows_of(read_bytes(jsonl({"id": 1, "text": "a", "f": True}), spec=KEEP_SPEC))
    assert rows[0][S.REJECT] == "kept column 'f': value is not double, the run's type"


# Lines of about 1 KiB: 5000 of them decompress to ~5 MiB, more than one 4 MiB read.
BIG = [{"id": i, "text": f"{i} " + "x" * 1000} for i in range(1, 5001)]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_read_jsonl_damaged_compressed_file_keeps_rows_before_the_damage(compression, damage):
    blob = bytearray(compress(jsonl(*BIG), compression))
    at = len(blob) * 9 // 10
    if damage == "truncated":
        blob = blob[:at]
    else:
        blob[at:at + 64] = bytes(64)
    tables = read_bytes(bytes(blob), compression, ReadSpec("id", "text", id_type=pa.int64()))
    rows = rows_of(tables)
    *good, bad = rows
    k = len(good)
    assert 1000 < k < len(BIG)
    assert [r[S.ROW] for r in good] == list(range(1, k + 1))
    assert [r[S.ID] for r in good] == list(range(1, k + 1))
    assert all(r[S.REJECT] is None for r in good)
    assert bad[S.ROW] == k + 1 and bad[S.ID] is None and bad[S.TEXT] is None
    # The reason's kind ("damaged compressed data") comes first, the details after the ":".
    assert bad[S.REJECT].startswith("damaged compressed data: ")
    assert bad[S.REJECT].endswith(f" after line {k}; the rest of the file is unreadable")
    # The damaged row counts: k + 1 rows, numbered 1..k+1, on the last block only.
    assert set(tables[-1][S.FILE_ROWS].to_pylist()) == {k + 1}
    assert set(tables[-1][S.FILE_ROWSUM].to_pylist()) == {sum(r[S.ROW] for r in rows)}
    assert all(t[S.FILE_ROWS].null_count == t.num_rows for t in tables[:-1])


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_read_jsonl_small_truncated_file_keeps_rows_before_the_damage(compression):
    records = [{"id": i, "text": "x" * 200} for i in range(1, 3001)]
    blob = compress(jsonl(*records), compression)
    rows = rows_of(read_bytes(blob[: len(blob) // 2], compression))
    assert len(rows) > 1000 and rows[-1][S.REJECT].startswith("damaged compressed data")


class FailingSource(io.RawIOBase):
    """A byte source that delivers ``good`` bytes in small reads, then raises ``error``."""

    def __init__(self, data: bytes, good: int, error: BaseException) -> None:
        super().__init__()
        self._data, self._pos, self._good, self._error = data, 0, good, error

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._pos >= self._good:
            raise self._error
        n = 4096 if n is None or n < 0 else min(n, 4096)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_read_jsonl_failing_source_raises_storage_error_naming_it(compression):
    blob = compress(jsonl(*BIG[:2000]), compression)
    source = FailingSource(blob, len(blob) // 3, ConnectionResetError("peer reset"))
    uri = "s3://bucket/in/part-7.jsonl"
    with pytest.raises(StorageError, match=re.escape(uri)) as info:
        list(read_jsonl(open_decompressed(source, compression), uri, INT_IDS))
    assert "ConnectionResetError: peer reset" in str(info.value)
    assert "damaged" not in str(info.value)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_read_jsonl_failing_source_of_any_error_type_is_a_storage_error(compression):
    blob = compress(jsonl(*BIG[:2000]), compression)
    source = FailingSource(blob, len(blob) // 3, RuntimeError("payload incomplete"))
    with pytest.raises(StorageError, match="s3://b/k.jsonl"):
        list(read_jsonl(open_decompressed(source, compression), "s3://b/k.jsonl", INT_IDS))


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n\n"], ids=["empty", "newline", "blank"])
def test_read_jsonl_zero_line_files_yield_nothing(compression, data):
    assert read_bytes(compress(data, compression), compression) == []


# ---------------------------------------------------------------------------------------------
# read_parquet


def sample_parquet(path: Path, n: int = 7, row_group_size: int = 3) -> Path:
    table = pa.table({
        "id": pa.array(range(100, 100 + n), pa.int64()),
        "text": pa.array([f"text {i}" for i in range(n)], pa.string()),
        "lang": pa.array(["en", "de", None, "fr", "en", "es", "it"][:n], pa.string()),
        "score": pa.array([i / 4 for i in range(n)], pa.float32()),
    })
    return write_parquet_file(path, table, row_group_size)


def test_read_parquet_rows_numbered_across_blocks(tmp_path):
    path = sample_parquet(tmp_path / "a.parquet")
    spec = ReadSpec("id", "text", keep_columns=("lang", "score"), block_rows=2)
    with open(path, "rb") as f:
        tables = list(read_parquet(f, "s3://b/a.parquet", spec))
    assert len(tables) >= 4 and all(t.num_rows <= 2 for t in tables)
    rows = rows_of(tables)
    assert [r[S.ROW] for r in rows] == list(range(7))
    assert [r[S.ID] for r in rows] == list(range(100, 107))
    assert [r[S.TEXT] for r in rows] == [f"text {i}" for i in range(7)]
    assert all(r[S.FILE_ROWS] == 7 and r[S.SOURCE] == "s3://b/a.parquet" for r in rows)
    assert all(r[S.REJECT] is None and r[S.EXCERPT] is None for r in rows)
    assert [r["lang"] for r in rows] == ["en", "de", None, "fr", "en", "es", "it"]
    assert tables[0].schema.field("score").type == pa.float32()
    assert tables[0].schema.field(S.ID).type == pa.int64()


def test_read_parquet_non_string_text_rejects_every_row(tmp_path):
    table = pa.table({"id": pa.array(["a", "b", "c"]), "text": pa.array([1, None, 3], pa.int64())})
    path = write_parquet_file(tmp_path / "ints.parquet", table)
    rows = rows_of(read_parquet(str(path), "ints.parquet", ReadSpec("id", "text", block_rows=2)))
    assert [r[S.ID] for r in rows] == ["a", "b", "c"]
    assert all(r[S.TEXT] is None for r in rows)
    assert all(r[S.REJECT] == "text column has type int64, not string" for r in rows)
    assert [r[S.EXCERPT] for r in rows] == ["1", "None", "3"]


def test_read_parquet_large_string_text_accepted(tmp_path):
    table = pa.table({"id": [1], "text": pa.array(["big"], pa.large_string())})
    path = write_parquet_file(tmp_path / "l.parquet", table)
    (out,) = read_parquet(str(path), "l", ReadSpec("id", "text"))
    assert out[S.TEXT].to_pylist() == ["big"] and out[S.REJECT].to_pylist() == [None]
    assert out.schema.field(S.TEXT).type == pa.string()


def test_read_parquet_shard_without_text_column_rejects_every_row(tmp_path):
    # Another shard of the run has the column (the pre-flight checked the first one).
    path = write_parquet_file(tmp_path / "a.parquet", pa.table({"id": [1, 2], "body": ["x", "y"]}))
    rows = rows_of(read_parquet(str(path), "s3://b/a.parquet",
                                ReadSpec("id", "text", id_type=pa.int64())))
    assert [r[S.REJECT] for r in rows] == ["the file has no column 'text'"] * 2
    assert [r[S.ID] for r in rows] == [1, 2] and rows[0][S.FILE_ROWS] == 2


def test_read_parquet_shard_without_kept_column_gives_nulls_of_the_run_type(tmp_path):
    path = write_parquet_file(tmp_path / "a.parquet", pa.table({"id": [1], "text": ["x"]}))
    (out,) = read_parquet(str(path), "a.parquet",
                          ReadSpec("id", "text", ("lang",), keep_types=(("lang", pa.string()),)))
    assert out["lang"].to_pylist() == [None] and out.schema.field("lang").type == pa.string()
    assert out[S.REJECT].to_pylist() == [None]


def test_read_parquet_zero_rows_yields_nothing(tmp_path):
    table = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})
    path = write_parquet_file(tmp_path / "z.parquet", table)
    assert list(read_parquet(str(path), "z", ReadSpec("id", "text"))) == []


def test_read_parquet_row_sum_on_every_block(tmp_path):
    path = sample_parquet(tmp_path / "a.parquet", n=7, row_group_size=3)
    tables = list(read_parquet(str(path), "a", ReadSpec("id", "text", block_rows=2)))
    assert len(tables) >= 4
    assert all(t[S.FILE_ROWSUM].to_pylist() == [21] * t.num_rows for t in tables)  # 0+...+6
    assert all(t[S.FILE_ROWS].to_pylist() == [7] * t.num_rows for t in tables)


def test_read_parquet_id_cast_to_the_run_type(tmp_path):
    table = pa.table({"id": pa.array([1, 2, 3], pa.int32()), "text": ["a", "b", "c"]})
    path = write_parquet_file(tmp_path / "a.parquet", table)
    (out,) = read_parquet(str(path), "a", ReadSpec("id", "text", id_type=pa.int64()))
    assert out.schema.field(S.ID).type == pa.int64()
    assert out[S.ID].to_pylist() == [1, 2, 3] and out[S.REJECT].null_count == 3


def test_read_parquet_id_that_does_not_cast_rejects_its_row(tmp_path):
    table = pa.table({"id": ["1", "x2", "3", None], "text": ["a", "b", "c", "d"]})
    path = write_parquet_file(tmp_path / "a.parquet", table, row_group_size=2)
    rows = rows_of(read_parquet(str(path), "a", ReadSpec("id", "text", id_type=pa.int64(),
                                                           block_rows=2)))
    assert [r[S.ID] for r in rows] == [1, None, 3, None]
    assert [r[S.REJECT] for r in rows] == [
        None, "id: value of type string does not convert to int64, the run's type", None,
        "id is null"]
    assert rows[1][S.EXCERPT] == "x2" and rows[1][S.TEXT] == "b"


def test_read_parquet_kept_columns_cast_and_bad_values_rejected(tmp_path):
    table = pa.table({"id": [1, 2, 3, 4], "text": ["a", "b", "c", "d"],
                      "score": [1.0, 2.5, 3.0, None], "n": pa.array([1, 2, 2**40, 4], pa.int64())})
    path = write_parquet_file(tmp_path / "a.parquet", table)
    spec = ReadSpec("id", "text", keep_columns=("score", "n", "lang"), id_type=pa.int64(),
                    keep_types=(("score", pa.int64()), ("n", pa.int32()), ("lang", pa.string())))
    (out,) = read_parquet(str(path), "a", spec)
    assert [out.schema.field(c).type for c in ("score", "n", "lang")] == [
        pa.int64(), pa.int32(), pa.string()]
    assert out["score"].to_pylist() == [1, None, 3, None]
    assert out["n"].to_pylist() == [1, 2, None, 4]
    assert out["lang"].to_pylist() == [None] * 4  # the shard lacks it: nulls, not rejects
    assert out[S.REJECT].to_pylist() == [
        None,
        "kept column 'score': value of type double does not convert to int64, the run's type",
        "kept column 'n': value of type int64 does not convert to int32, the run's type",
        None]
    assert out[S.EXCERPT].to_pylist()[1:3] == ["2.5", str(2**40)]


def test_read_parquet_duplicate_ids_keep_first_across_blocks(tmp_path):
    table = pa.table({"id": ["a", "b", "a", None, None, "b"], "text": list("uvwxyz")})
    path = write_parquet_file(tmp_path / "a.parquet", table, row_group_size=2)
    spec = ReadSpec("id", "text", id_type=pa.string(), block_rows=2)
    rows = rows_of(read_parquet(str(path), "a", spec))
    assert [r[S.REJECT] for r in rows] == [
        None, None, "duplicate id: first seen at row 0 of this file", "id is null",
        "id is null", "duplicate id: first seen at row 1 of this file"]
    rows = rows_of(read_parquet(str(path), "a", dataclasses.replace(spec, dedupe=False)))
    assert [r[S.REJECT] for r in rows] == [None] * 6


def test_read_parquet_shard_without_id_column_rejects_every_row(tmp_path):
    path = write_parquet_file(tmp_path / "a.parquet", pa.table({"body": ["x", "y", "z"]}))
    rows = rows_of(read_parquet(str(path), "a", ReadSpec("id", "text", id_type=pa.int64())))
    assert [r[S.REJECT] for r in rows] == ["the file has no column 'id'"] * 3
    assert [r[S.ROW] for r in rows] == [0, 1, 2] and rows[0][S.FILE_ROWSUM] == 3


@pytest.mark.parametrize("data", [b"this is not parquet at all", b"PAR1" + b"\0" * 64])
def test_read_parquet_damaged_file_is_one_rejected_row(tmp_path, data):
    path = write_bytes(tmp_path / "a.parquet", data)
    spec = ReadSpec("id", "text", keep_columns=("lang",), id_type=pa.int64(),
                    keep_types=(("lang", pa.string()),))
    (table,) = read_parquet(str(path), "s3://b/a.parquet", spec)
    (row,) = table.to_pylist()
    assert row[S.REJECT].startswith("damaged Parquet file: ")
    assert row[S.REJECT].endswith("no row of it is readable")
    assert (row[S.ROW], row[S.FILE_ROWS], row[S.FILE_ROWSUM]) == (0, 1, 0)
    assert row[S.SOURCE] == "s3://b/a.parquet" and row[S.ID] is None
    # The same columns and types as a good shard's blocks.
    assert table.schema.field(S.ID).type == pa.int64()
    assert table.schema.field("lang").type == pa.string()


def test_read_parquet_corrupt_footer_is_one_rejected_row(tmp_path):
    path = sample_parquet(tmp_path / "a.parquet")
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer
    data[start:start + 40] = b"\xff" * 40  # the magic bytes and the length stay valid
    path.write_bytes(bytes(data))
    (table,) = read_parquet(str(path), "a", ReadSpec("id", "text"))
    assert table[S.REJECT][0].as_py().startswith("damaged Parquet file: ")


# ---------------------------------------------------------------------------------------------
# detect_format


@pytest.mark.parametrize("name,forced,want", [
    ("a.parquet", "auto", ("parquet", None)),
    ("dir/A.PQ", "auto", ("parquet", None)),
    ("a.jsonl", "auto", ("jsonl", None)),
    ("a.json", "auto", ("jsonl", None)),
    ("a.ndjson", "auto", ("jsonl", None)),
    ("s3://b/x/a.jsonl.gz", "auto", ("jsonl", "gzip")),
    ("a.json.zst", "auto", ("jsonl", "zstd")),
    ("a.ndjson.zstd", "auto", ("jsonl", "zstd")),
    ("a.csv", "auto", (None, None)),
    ("a.txt.gz", "auto", (None, "gzip")),
    ("a.parquet.gz", "auto", (None, "gzip")),
    ("a.txt", "jsonl", ("jsonl", None)),
    ("a.log.gz", "jsonl", ("jsonl", "gzip")),
    ("a.bin", "parquet", ("parquet", None)),
    ("a.bin.gz", "parquet", (None, "gzip")),
])
def test_detect_format(name, forced, want):
    assert detect_format(name, forced) == want


# ---------------------------------------------------------------------------------------------
# list_inputs


def test_list_inputs_single_file(tmp_path):
    path = sample_parquet(tmp_path / "one.parquet")
    (file,) = list_inputs(str(path))
    assert (file.uri, file.format, file.compression) == (str(path), "parquet", None)
    assert file.size == path.stat().st_size


def test_list_inputs_directory_recursive_sorted_hidden_skipped(tmp_path):
    d = tmp_path / "in"
    for rel in ["b.jsonl", "a/c.jsonl.gz", "a/b.json", "_SUCCESS", ".crc", "_tmp/x.jsonl",
                "a/.hidden.jsonl", "a/_meta.jsonl"]:
        write_bytes(d / rel, b'{"id": 1, "text": "x"}\n')
    files = list_inputs(str(d))
    assert [f.uri for f in files] == [str(d / "a/b.json"), str(d / "a/c.jsonl.gz"), str(d / "b.jsonl")]
    assert [f.compression for f in files] == [None, "gzip", None]
    assert {f.format for f in files} == {"jsonl"}


def test_list_inputs_glob(tmp_path):
    d = tmp_path / "in"
    for rel in ["b.parquet", "a.parquet", "notes.txt", "sub/c.parquet"]:
        write_bytes(d / rel, b"x")
    files = list_inputs(str(d / "*.parquet"))
    assert [f.uri for f in files] == [str(d / "a.parquet"), str(d / "b.parquet")]


def test_list_inputs_forced_format(tmp_path):
    write_bytes(tmp_path / "in" / "a.txt", b"{}\n")
    (file,) = list_inputs(str(tmp_path / "in"), forced_format="jsonl")
    assert file.format == "jsonl"


def test_list_inputs_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))


def test_list_inputs_glob_matching_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError):
        list_inputs(str(tmp_path / "in" / "*.parquet"))


def test_list_inputs_empty_directory(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match="holds no data files"):
        list_inputs(str(tmp_path / "in"))
    write_bytes(tmp_path / "hidden" / "_SUCCESS", b"")
    with pytest.raises(InputError, match="holds no data files"):
        list_inputs(str(tmp_path / "hidden"))


def test_list_inputs_unknown_suffix_lists_the_file(tmp_path):
    write_bytes(tmp_path / "in" / "a.parquet", b"x")
    write_bytes(tmp_path / "in" / "notes.csv", b"x")
    with pytest.raises(InputError, match=r"no known format.*notes\.csv"):
        list_inputs(str(tmp_path / "in"))


def test_list_inputs_mixed_formats(tmp_path):
    write_bytes(tmp_path / "in" / "a.parquet", b"x")
    write_bytes(tmp_path / "in" / "b.jsonl", b"x")
    with pytest.raises(InputError, match="mixes formats"):
        list_inputs(str(tmp_path / "in"))


# ---------------------------------------------------------------------------------------------
# sample_columns, json_id_type, count_rows


def test_sample_columns_parquet_types(tmp_path):
    columns = sample_columns(input_file(sample_parquet(tmp_path / "a.parquet")))
    assert columns == {"id": pa.int64(), "text": pa.string(), "lang": pa.string(),
                       "score": pa.float32()}


@pytest.mark.parametrize("suffix,compression", [("", None), (".gz", "gzip"), (".zst", "zstd")])
def test_sample_columns_jsonl_first_non_blank_record(tmp_path, suffix, compression):
    data = b"\n  \n" + jsonl({"id": "x", "text": "first"}, {"id": 2, "text": "second"})
    path = write_bytes(tmp_path / f"a.jsonl{suffix}", data, compression)
    assert sample_columns(input_file(path)) == {"id": "x", "text": "first"}


@pytest.mark.parametrize("data,match", [(b"oops\n", "line 1: Expecting value"),
                                        (b"[1]\n", "line 1: a JSON list, not an object")])
def test_sample_columns_jsonl_no_object_in_sample(tmp_path, data, match):
    path = write_bytes(tmp_path / "a.jsonl", data)
    with pytest.raises(InputError, match=match):
        sample_columns(input_file(path))


def test_sample_columns_skips_bad_lines_and_null_ids_like_the_reader(tmp_path):
    data = b'oops\n{"id": null, "text": "a"}\n\xef\xbb\xbf{"id": 7, "text": "b"}\n'
    path = write_bytes(tmp_path / "a.jsonl", data)
    assert sample_columns(input_file(path), prefer_key="id") == {"id": 7, "text": "b"}
    assert sample_columns(input_file(path)) == {"id": None, "text": "a"}


@pytest.mark.parametrize("name,data,compression", [
    ("e.jsonl", b"", None), ("b.jsonl", b"\n\n", None), ("e.jsonl.gz", b"", "gzip"),
])
def test_sample_columns_empty_jsonl_is_none(tmp_path, name, data, compression):
    assert sample_columns(input_file(write_bytes(tmp_path / name, data, compression))) is None


def test_sample_columns_zero_byte_parquet_is_none(tmp_path):
    assert sample_columns(input_file(write_bytes(tmp_path / "e.parquet", b""))) is None


def test_json_id_type():
    assert json_id_type(3, "u", "id") == pa.int64()
    assert json_id_type("a", "u", "id") == pa.string()
    for bad in (True, 1.5, None, [1]):
        with pytest.raises(InputError, match="'id'"):
            json_id_type(bad, "u", "id")


@pytest.mark.parametrize("values,want", [
    ([True, False], pa.bool_()),
    ([None, 1, 2], pa.int64()),
    ([1, 2.5], pa.float64()),
    ([1.0], pa.float64()),
    ([1, True, 3], pa.int64()),  # booleans are not numbers with a fraction
    (["a", None], pa.string()),
    ([{"a": 1}], JSON_TEXT), ([[1, 2]], JSON_TEXT),
    ([None, None], JSON_TEXT), ([], JSON_TEXT),
    ([1, "a"], pa.int64()),  # the first value decides; the reader rejects the rest
], ids=["bool", "int", "int-and-float", "float", "int-and-bool", "str", "object", "array",
        "all-null", "none", "mixed"])
def test_json_value_type(values, want):
    assert json_value_type(values) == want


def test_sample_records_objects_among_the_first_lines(tmp_path):
    data = (b"\n" + b"oops\n[1]\n" + jsonl({"id": 1, "lang": "en"}) + b"\xef\xbb\xbf"
            + jsonl({"id": 2}, {"id": 3}, {"id": 4}))
    for name, compression in [("a.jsonl", None), ("a.jsonl.gz", "gzip"), ("a.jsonl.zst", "zstd")]:
        file = input_file(write_bytes(tmp_path / name, data, compression))
        assert sample_records(file) == [{"id": 1, "lang": "en"}, {"id": 2}, {"id": 3}, {"id": 4}]
        # max_lines counts the bad lines too; blank lines are not lines of the sample.
        assert sample_records(file, max_lines=4) == [{"id": 1, "lang": "en"}, {"id": 2}]


def test_sample_records_no_object_is_an_input_error(tmp_path):
    path = write_bytes(tmp_path / "a.jsonl", b"oops\n[1, 2]\n" + jsonl({"id": 1}))
    with pytest.raises(InputError, match=r"a\.jsonl: none of its first 2 line\(s\) is a JSON "
                                         r"object \(line 1: Expecting value"):
        sample_records(input_file(path), max_lines=2)
    assert sample_records(input_file(path), max_lines=3) == [{"id": 1}]


def test_sample_records_empty_files(tmp_path):
    assert sample_records(input_file(write_bytes(tmp_path / "e.jsonl", b""))) == []
    assert sample_records(input_file(write_bytes(tmp_path / "b.jsonl", b"\n \n"))) == []


def test_count_rows_parquet_and_jsonl(tmp_path):
    assert count_rows(input_file(sample_parquet(tmp_path / "a.parquet", n=5, row_group_size=2))) == 5
    data = b"\n" + jsonl(*GOOD) + b"  \n" + b'{"id": 3, "text": "no newline"}'
    for name, compression in [("b.jsonl", None), ("c.jsonl.gz", "gzip"), ("d.jsonl.zst", "zstd")]:
        assert count_rows(input_file(write_bytes(tmp_path / name, data, compression))) == 3


def test_count_rows_empty_files(tmp_path):
    assert count_rows(input_file(write_bytes(tmp_path / "e.parquet", b""))) == 0
    assert count_rows(input_file(write_bytes(tmp_path / "e.jsonl.gz", b"", "gzip"))) == 0
    zero = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})
    assert count_rows(input_file(write_parquet_file(tmp_path / "z.parquet", zero))) == 0


# ---------------------------------------------------------------------------------------------
# prepare_output, check_disjoint


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_prepare_output_fresh_dir_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    prepare_output(str(out))
    assert out.is_dir() and files_under(out) == []  # the write probe is gone


OWN = ["part-0001.parquet", "part-abc-0123456789ab.parquet", "_summary.json",
       "_rejects/part-0002.parquet", "_manifest/_run.json", "_manifest/unit-abc.json",
       "_manifest/.unit-def.json.tmp-1a2b3c4d", "_manifest/deeper/anything",
       ".part-abc-0123456789ab.parquet.tmp-deadbeef", "_rejects/.part-x.parquet.tmp-0badf00d"]
FOREIGN = ["README.txt", "sub/part-0003.parquet", "part-dir/x.parquet", "other.parquet",
           "_rejects/sub/part-0004.parquet", "_rejects/notes.txt", ".hidden", "sub/_summary.json",
           "sub/.part-y.parquet.tmp-12345678"]


def test_prepare_output_returns_own_files_and_deletes_nothing(tmp_path):
    out = tmp_path / "out"
    for rel in OWN + FOREIGN:
        write_bytes(out / rel, b"x")
    found = prepare_output(str(out))
    # Full paths of the pipeline's files only: parts, rejects, everything under _manifest/,
    # the summary, and the hidden temporaries of interrupted local writes (root, _rejects/).
    assert sorted(Path(p).relative_to(out).as_posix() for p in found) == sorted(OWN)
    assert all(Path(p).is_absolute() for p in found)
    # Checking deletes nothing (no probe left either): the run decides what to remove.
    assert files_under(out) == sorted(OWN + FOREIGN)


def test_remove_files_deletes_only_what_it_is_given(tmp_path):
    out = tmp_path / "out"
    for rel in OWN + FOREIGN:
        write_bytes(out / rel, b"x")
    found = prepare_output(str(out))
    doomed = [p for p in found if "_manifest" not in p]
    remove_files(str(out), doomed)
    assert files_under(out) == sorted(FOREIGN + [r for r in OWN if r.startswith("_manifest/")])
    remove_files(str(out), [])  # nothing to do is fine
    remove_files(str(out), prepare_output(str(out)))
    assert files_under(out) == sorted(FOREIGN)
    assert prepare_output(str(out)) == []  # no earlier run left


def test_prepare_output_earlier_run_is_not_refused(tmp_path):
    out = tmp_path / "out"
    write_bytes(out / "part-0001.parquet", b"x")
    write_bytes(out / "_summary.json", b"{}")
    found = prepare_output(str(out))  # no --overwrite any more: resume decides later
    assert sorted(Path(p).name for p in found) == ["_summary.json", "part-0001.parquet"]


def test_prepare_output_unrelated_files_allowed(tmp_path):
    write_bytes(tmp_path / "out" / "notes.md", b"x")
    prepare_output(str(tmp_path / "out"))
    assert files_under(tmp_path / "out") == ["notes.md"]


@pytest.mark.parametrize("rel", ["", "sub"])
def test_prepare_output_on_or_under_a_regular_file(tmp_path, rel):
    blocker = write_bytes(tmp_path / "file", b"x")
    with pytest.raises(OutputError, match="cannot write"):
        prepare_output(str(blocker / rel) if rel else str(blocker))
    assert blocker.read_bytes() == b"x"


@pytest.mark.parametrize("inp,out", [
    ("/data/in", "/data/in/out"), ("/data/in/", "/data/in/out/"), ("/data/in", "/data/in"),
    ("file:///data/in", "/data/in/x"), ("s3://b/in/", "s3://b/in/out"), ("s3://b/in", "s3://b/in/"),
])
def test_check_disjoint_refuses_output_inside_input(inp, out):
    with pytest.raises(OutputError, match="inside the input"):
        check_disjoint(inp, out)


@pytest.mark.parametrize("inp,out", [
    ("/data/in", "/data/out"), ("/data/in", "/data/input2"), ("/data/in/x", "/data/in"),
    ("s3://b/in", "s3://b/input"), ("s3://b/in", "s3://c/in"),
])
def test_check_disjoint_allows_siblings(inp, out):
    check_disjoint(inp, out)


def test_check_disjoint_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError):
        check_disjoint("data", str(tmp_path / "data" / "out"))


# ---------------------------------------------------------------------------------------------
# schema


def test_excerpt():
    assert S.excerpt("short") == "short"
    assert S.excerpt(12) == "12"
    assert S.excerpt(b"\xff") == "b'\\xff'"
    assert S.excerpt("a\ud800b") == "a\\ud800b"  # a lone surrogate stays writable as UTF-8
    long = S.excerpt("x" * 500)
    assert long == "x" * S.EXCERPT_CHARS + "..."


def test_output_metadata_roundtrips_through_schema():
    meta = S.output_metadata(model_id="m", revision=None, fingerprint="f", task="document",
                             prefix="search_document: ", dims=(768, 256), output_dtype="float16")
    assert meta["widths"] == [768, 256]
    assert meta["columns"] == {"768": "embedding_768", "256": "embedding_256"}
    assert meta["dtype"] == "float16" and meta["normalization"] == S.NORMALIZATION
    schema = pa.schema([("id", pa.int64())]).with_metadata(S.encode_metadata(meta))
    assert S.read_metadata(schema) == meta


def test_read_metadata_other_metadata_is_key_error():
    with pytest.raises(KeyError):
        S.read_metadata(pa.schema([("id", pa.int64())]).with_metadata({b"pandas": b"{}"}))


def test_read_metadata_no_metadata_is_key_error():
    with pytest.raises(KeyError):
        S.read_metadata(pa.schema([("id", pa.int64())]))


def test_internal_names_are_prefixed_and_distinct():
    names = [S.ID, S.TEXT, S.SOURCE, S.ROW, S.FILE_ROWS, S.FILE_ROWSUM, S.REJECT, S.EXCERPT,
             S.TOKENS, S.NUM_TOKENS, S.TRUNCATED, S.TOKENIZE_S, S.GRID_TOKENS, S.BATCH_MAX,
             S.ENCODE_S, S.ENCODE_START, S.ENCODE_END]
    assert len(set(names)) == len(names) and all(n.startswith("__") for n in names)
    assert S.REJECTS_SCHEMA.names == ["id", "source", "row", "reason", "excerpt"]


# ---------------------------------------------------------------------------------------------
# writers

DIMS = (8, 4)


def encoded_table(rows: list[dict], dims=DIMS, output_dtype: str = "float32",
                  id_type=pa.int64()) -> pa.Table:
    """Rows as the encoder stage emits them; ``rows`` give id, source, row, reject and tokens."""
    n = len(rows)
    good = np.array([r.get("reject") is None for r in rows], dtype=bool)
    np_dtype = np.float16 if output_dtype == "float16" else np.float32
    columns = {
        S.ID: pa.array([r["id"] for r in rows], id_type),
        "lang": pa.array([r.get("lang") for r in rows], pa.string()),
        S.SOURCE: pa.array([r["source"] for r in rows], pa.string()),
        S.ROW: pa.array([r["row"] for r in rows], pa.int64()),
        S.FILE_ROWS: pa.array([r.get("file_rows") for r in rows], pa.int64()),
        S.FILE_ROWSUM: pa.array([r.get("file_rowsum") for r in rows], pa.int64()),
        S.REJECT: pa.array([r.get("reject") for r in rows], pa.string()),
        S.EXCERPT: pa.array([r.get("excerpt") for r in rows], pa.string()),
        S.NUM_TOKENS: pa.array([r.get("tokens", 0) for r in rows], pa.int32()),
        S.TRUNCATED: pa.array([r.get("truncated", False) for r in rows], pa.bool_()),
        S.TOKENIZE_S: pa.array(np.full(n, 0.25)),
    }
    for d in dims:
        values = np.zeros((n, d), np_dtype)
        values[:, 0] = np.arange(n) + 1  # row i's vector starts with i + 1
        columns[f"embedding_{d}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1)), d, mask=pa.array(~good)).cast(S.embedding_type(d, output_dtype))
    columns[S.GRID_TOKENS] = pa.array([r.get("grid", 0) for r in rows], pa.int32())
    columns[S.BATCH_MAX] = pa.array([r.get("batch_max", 0) for r in rows], pa.int32())
    columns[S.ENCODE_S] = pa.array(np.full(n, 0.5))
    # Each row's encoder window (epoch seconds): row i ran in [1000 + i, 1002 + i].
    columns[S.ENCODE_START] = pa.array(1000.0 + np.arange(n))
    columns[S.ENCODE_END] = pa.array(1002.0 + np.arange(n))
    return pa.table(columns)


# a.parquet: 3 rows (0..2), every row knows the file's count and row sum (0 + 1 + 2).
# b.jsonl: lines 4 and 7 (blank lines elsewhere); only the last block knows 2 rows, sum 11.
ROWS = [
    {"id": 10, "lang": "en", "source": "a.parquet", "row": 0, "file_rows": 3, "file_rowsum": 3,
     "tokens": 5, "grid": 6, "batch_max": 8},
    {"id": 11, "source": "a.parquet", "row": 1, "file_rows": 3, "file_rowsum": 3,
     "reject": "text is null", "excerpt": "None"},
    {"id": 12, "lang": "de", "source": "a.parquet", "row": 2, "file_rows": 3, "file_rowsum": 3,
     "tokens": 8, "truncated": True, "grid": 8, "batch_max": 8},
    {"id": None, "source": "b.jsonl", "row": 4, "reject": "malformed JSON: Expecting value",
     "excerpt": "{oops"},
    {"id": 14, "lang": "fr", "source": "b.jsonl", "row": 7, "file_rows": 2, "file_rowsum": 11,
     "tokens": 3, "grid": 3, "batch_max": 4},
]


def output_spec(output_dtype: str = "float32", dims=DIMS) -> OutputSpec:
    meta = S.output_metadata(model_id="m", revision="r1", fingerprint="fp", task="document",
                             prefix="search_document: ", dims=dims, output_dtype=output_dtype)
    return OutputSpec("doc_id", ("lang",), dims, output_dtype, meta)


def test_split_rows_good_rows_embedded_with_user_names_and_metadata():
    spec = output_spec()
    embedded, _, _ = split_rows(encoded_table(ROWS), spec)
    assert embedded.column_names == ["doc_id", "lang", "embedding_8", "embedding_4"]
    assert embedded["doc_id"].to_pylist() == [10, 12, 14]
    assert embedded["lang"].to_pylist() == ["en", "de", "fr"]
    assert embedded.schema.field("embedding_8").type == pa.list_(pa.float32(), 8)
    assert [v[0] for v in embedded["embedding_4"].to_pylist()] == [1.0, 3.0, 5.0]
    assert embedded["embedding_8"].null_count == 0
    assert S.read_metadata(embedded.schema) == spec.metadata


def test_split_rows_bad_rows_go_to_rejects():
    _, rejects, _ = split_rows(encoded_table(ROWS), output_spec())
    assert rejects.schema == S.REJECTS_SCHEMA
    assert rejects.to_pylist() == [
        {"id": "11", "source": "a.parquet", "row": 1, "reason": "text is null", "excerpt": "None"},
        {"id": None, "source": "b.jsonl", "row": 4, "reason": "malformed JSON: Expecting value",
         "excerpt": "{oops"},
    ]


def test_split_rows_stats():
    _, _, stats = split_rows(encoded_table(ROWS), output_spec())
    assert stats["rows"] == 5 and stats["row_sum"] == 0 + 1 + 2 + 4 + 7
    assert stats["rows_embedded"] == 3 and stats["rows_rejected"] == 2
    assert stats["first_reject"] == [1, "text is null"]  # the first rejected row, with reason
    assert stats["tokens"] == 16 and stats["texts_truncated"] == 1
    assert stats["grid_tokens"] == 17 and stats["batch_grid_tokens"] == 20
    assert stats["tokenize_s"] == pytest.approx(5 * 0.25)
    assert stats["encode_s"] == pytest.approx(5 * 0.5)
    assert (stats["encode_first_start"], stats["encode_last_end"]) == (1000.0, 1006.0)
    assert stats["reject_reasons"] == {"text is null": 1, "malformed JSON": 1}
    assert "sources" not in stats  # per-file accounting is the records' job now
    json.dumps(stats)  # travels to the driver as JSON


def test_split_rows_file_counts_unknown_until_the_last_block():
    # JSONL rows before the last block carry no file count: -1, not 0 (0 is an empty file).
    rows = [{"id": i, "source": "b.jsonl", "row": i + 1, "tokens": 1} for i in range(3)]
    _, _, stats = split_rows(encoded_table(rows), output_spec())
    assert (stats["file_rows"], stats["file_rowsum"]) == (-1, -1)
    assert (stats["rows"], stats["row_sum"]) == (3, 6)
    assert stats["first_reject"] is None and stats["reject_reasons"] == {}


def test_split_rows_reason_kinds_drop_details():
    rows = [{"id": None, "source": "b.jsonl", "row": i, "reject": f"invalid UTF-8: at byte {i}",
             "excerpt": "x"} for i in (3, 9)]
    _, _, stats = split_rows(encoded_table(rows), output_spec())
    assert stats["reject_reasons"] == {"invalid UTF-8": 2}
    assert stats["first_reject"] == [3, "invalid UTF-8: at byte 3"]


def test_split_rows_string_ids_and_all_rejected():
    rows = [{"id": "a", "source": "s", "row": 1, "reject": "text is null", "excerpt": "None"}]
    embedded, rejects, stats = split_rows(encoded_table(rows, id_type=pa.string()), output_spec())
    assert embedded.num_rows == 0 and embedded.schema.field("doc_id").type == pa.string()
    assert rejects["id"].to_pylist() == ["a"]
    assert stats["tokens"] == 0 and stats["rows_embedded"] == 0


def by_source(records: list[dict]) -> dict[str, dict]:
    assert len({r["source"] for r in records}) == len(records)  # one record per input file
    return {r["source"]: r for r in records}


def test_write_outputs_one_record_and_files_per_input_file(tmp_path):
    spec = output_spec()
    out = tmp_path / "out"
    fs, path = open_filesystem(str(out))
    records = by_source(write_outputs(fs, path, encoded_table(ROWS), spec))
    assert sorted(records) == ["a.parquet", "b.jsonl"]
    a, b = records["a.parquet"], records["b.jsonl"]
    for rec in (a, b):
        unit = unit_key(rec["source"])
        assert rec["unit"] == unit
        part, reject = rec["files"]
        # Names relative to the output (no base, no URI); they carry the unit (one unit's
        # rows per file) and a fresh suffix.
        assert re.fullmatch(rf"part-{unit}-[0-9a-f]{{12}}\.parquet", part), part
        assert re.fullmatch(rf"_rejects/part-{unit}-[0-9a-f]{{12}}\.parquet", reject), reject
        assert rec["bytes"] == os.path.getsize(out / part) + os.path.getsize(out / reject)
        assert set(pq.read_table(out / reject)["source"].to_pylist()) == {rec["source"]}
        assert S.read_metadata(pq.read_schema(out / part)) == spec.metadata
        assert pq.read_table(out / reject).schema.equals(S.REJECTS_SCHEMA)
    assert files_under(out) == sorted(  # nothing else, no temporary left behind
        f for r in (a, b) for f in r["files"])
    assert pq.read_table(out / a["files"][0])["doc_id"].to_pylist() == [10, 12]
    assert pq.read_table(out / b["files"][0])["doc_id"].to_pylist() == [14]
    assert {k: a[k] for k in ("rows", "row_sum", "file_rows", "file_rowsum", "rows_embedded",
                              "rows_rejected", "first_reject", "tokens", "reject_reasons")} == {
        "rows": 3, "row_sum": 3, "file_rows": 3, "file_rowsum": 3, "rows_embedded": 2,
        "rows_rejected": 1, "first_reject": [1, "text is null"], "tokens": 13,
        "reject_reasons": {"text is null": 1}}
    assert {k: b[k] for k in ("rows", "row_sum", "file_rows", "file_rowsum", "rows_embedded",
                              "rows_rejected", "first_reject", "tokens", "reject_reasons")} == {
        "rows": 2, "row_sum": 11, "file_rows": 2, "file_rowsum": 11, "rows_embedded": 1,
        "rows_rejected": 1, "first_reject": [4, "malformed JSON: Expecting value"], "tokens": 3,
        "reject_reasons": {"malformed JSON": 1}}
    # Each record's timings are of its own rows (rows 0-2 and 3-4 of the table).
    assert (a["encode_first_start"], a["encode_last_end"]) == (1000.0, 1004.0)
    assert (b["encode_first_start"], b["encode_last_end"]) == (1003.0, 1006.0)
    assert a["tokenize_s"] == pytest.approx(3 * 0.25) and b["encode_s"] == pytest.approx(2 * 0.5)
    json.dumps([a, b])


def test_write_outputs_fresh_names_for_every_write(tmp_path):
    # A retried write task, or two batches of one unit, never overwrite each other's files.
    fs, path = open_filesystem(str(tmp_path / "out"))
    good = [r for r in ROWS if r["source"] == "a.parquet" and "reject" not in r]
    (first,) = write_outputs(fs, path, encoded_table(good), output_spec())
    (second,) = write_outputs(fs, path, encoded_table(good), output_spec())
    assert first["unit"] == second["unit"] and first["files"] != second["files"]
    assert len(files_under(tmp_path / "out")) == 2


def test_write_outputs_object_store_files_are_relative_names():
    # On an object store too: names relative to the output, never a URI or the bucket path.
    fs, path = open_filesystem(f"memory://out-{uuid.uuid4().hex}")
    try:
        records = write_outputs(fs, path, encoded_table(ROWS), output_spec())
        files = [f for r in records for f in r["files"]]
        assert len(files) == 4
        assert all(re.fullmatch(r"(_rejects/)?part-[0-9a-f]{16}-[0-9a-f]{12}\.parquet", f)
                   for f in files), files
        assert all(fs.exists(f"{path}/{f}") for f in files)
    finally:
        fs.rm(path, recursive=True)


@pytest.mark.parametrize("spelling", ["{out}/", "{parent}/./out", "{parent}//out",
                                      "file://{out}"])
def test_write_outputs_names_do_not_depend_on_the_output_spelling(tmp_path, spelling):
    out = tmp_path / "out"
    fs, path = open_filesystem(spelling.format(out=out, parent=tmp_path))
    records = write_outputs(fs, path, encoded_table(ROWS), output_spec())
    files = sorted(f for r in records for f in r["files"])
    assert all(not f.startswith(("/", ".", "file:")) for f in files), files
    assert files_under(out) == files


def test_write_outputs_only_what_exists(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    good = [r for r in ROWS if "reject" not in r]
    records = write_outputs(fs, path, encoded_table(good), output_spec())
    assert len(records) == 2
    assert all(len(r["files"]) == 1 and r["files"][0].startswith("part-") for r in records)
    assert not (tmp_path / "out" / "_rejects").exists()
    bad = [r for r in ROWS if "reject" in r]
    records = write_outputs(fs, path, encoded_table(bad), output_spec())
    assert all(len(r["files"]) == 1 and r["files"][0].startswith("_rejects/part-")
               for r in records)
    assert all(r["rows_embedded"] == 0 and r["tokens"] == 0 for r in records)


def test_write_outputs_empty_table_writes_nothing(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    assert write_outputs(fs, path, encoded_table([]), output_spec()) == []
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_write_outputs_float16(tmp_path):
    spec = output_spec("float16")
    fs, path = open_filesystem(str(tmp_path / "out"))
    records = by_source(write_outputs(fs, path, encoded_table(ROWS, output_dtype="float16"), spec))
    table = pq.read_table(tmp_path / "out" / records["a.parquet"]["files"][0])
    assert table.schema.field("embedding_8").type == pa.list_(pa.float16(), 8)
    assert np.asarray(table["embedding_4"].to_pylist(), np.float16)[:, 0].tolist() == [1, 3]
    assert S.read_metadata(table.schema)["dtype"] == "float16"
    assert spec.bytes_per_row == (8 + 4) * 2 and output_spec().bytes_per_row == (8 + 4) * 4


def test_rows_per_file_targets_file_size_with_a_floor():
    assert output_spec(dims=(768,)).rows_per_file() == (128 << 20) // (768 * 4)
    assert output_spec(dims=(1 << 20,)).rows_per_file() == 1024


# ---------------------------------------------------------------------------------------------
# summary: units (one per input file) as the driver commits them


def unit(uri, rows, *, file_rows=None, file_rowsum=None, rejected=0, tokens=0, grid=0,
         files=(), reasons=None, encode=(0.0, 0.0), encode_s=1.0, times=True) -> dict:
    """A unit's totals as ``units.merge`` builds them from one write record of ``rows``."""
    rows = list(rows)
    record = {
        "unit": unit_key(uri), "source": uri, "rows": len(rows), "row_sum": sum(rows),
        "file_rows": len(rows) if file_rows is None else file_rows,
        "file_rowsum": sum(rows) if file_rowsum is None else file_rowsum,
        "rows_embedded": len(rows) - rejected, "rows_rejected": rejected, "tokens": tokens,
        "texts_truncated": 0, "grid_tokens": grid, "batch_grid_tokens": grid,
        "bytes": 100 if files else 0, "files": list(files), "reject_reasons": reasons or {},
        "first_reject": None, "encode_first_start": encode[0], "encode_last_end": encode[1],
    }
    if times:
        record |= {"tokenize_s": 0.5, "encode_s": encode_s, "write_s": 0.25}
    return merge(None, record)


# Manifests name files relative to the output; the summary gives them the output's prefix.
A = unit("a.parquet", range(5), rejected=1, tokens=60, grid=75, encode=(1000.0, 1001.0),
         files=["part-a1.parquet", "_rejects/part-a2.parquet"], reasons={"text is null": 1})
B = unit("b.jsonl", [1, 2, 4], tokens=40, grid=50, encode=(1000.5, 1002.0),
         files=["part-b1.parquet"])
OUT = "s3://bkt/o"
EMPTY = unit("e.jsonl", [], times=False)  # a file without rows, committed by finish_empty


def build(committed, resumed=(), open_units=(), unseen=None, wall_s=2.0, output=OUT + "/"):
    return summary.build(
        committed={u["unit"]: u for u in committed}, resumed=[unit_key(u) for u in resumed],
        open_units=list(open_units), unseen_rows=unseen or {}, wall_s=wall_s,
        config={"dims": (8, 4), "input": "in", "output": output}, model={"model_id": "m"},
        input_files=3)


def test_totals_sum_units():
    total = summary.totals([A, B, EMPTY])
    assert total["rows"] == 8 and total["row_sum"] == 10 + 7
    assert (total["rows_embedded"], total["rows_rejected"]) == (7, 1)
    assert total["tokens"] == 100 and total["grid_tokens"] == 125 and total["bytes"] == 200
    assert total["encode_s"] == pytest.approx(2.0) and total["write_s"] == pytest.approx(0.5)
    assert total["reject_reasons"] == {"text is null": 1}
    assert total["files"] == ["_rejects/part-a2.parquet", "part-a1.parquet", "part-b1.parquet"]
    # The encoder window spans the units that ran the encoder (EMPTY has no window).
    assert (total["encode_first_start"], total["encode_last_end"]) == (1000.0, 1002.0)


def test_totals_merge_reasons_and_nothing():
    x = unit("x", [1], rejected=1, reasons={"malformed JSON": 1, "text is null": 2})
    y = unit("y", [1], rejected=1, reasons={"text is null": 1})
    assert summary.totals([y, x])["reject_reasons"] == {"malformed JSON": 1, "text is null": 3}
    total = summary.totals([])
    assert total["rows"] == 0 and total["files"] == [] and total["reject_reasons"] == {}
    assert (total["encode_first_start"], total["encode_last_end"]) == (0.0, 0.0)


def test_build_clean_run():
    doc = build([A, B, EMPTY], unseen={})
    assert doc["reconciled"] is True and doc["reconcile_problems"] == []
    assert doc["rows_in"] == 8 and doc["rows_embedded"] == 7 and doc["rows_rejected"] == 1
    assert doc["reject_fraction"] == 0.125 and doc["reject_reasons"] == {"text is null": 1}
    assert doc["units"] == {"total": 3, "committed": 3, "resumed": 0, "committed_now": 3}
    assert doc["rows_now"] == 8 and doc["tokens"] == 100
    assert doc["padding_waste"] == pytest.approx(0.2) and doc["tokens_per_s"] == 50.0
    assert doc["tokens_per_s_steady"] == 50.0  # 100 tokens from 1000.0 to 1002.0
    assert doc["encoder_tokens_per_busy_s"] == 50.0  # 100 tokens in 2 encoder-seconds
    assert doc["stage_busy_s"] == {"tokenize": 1.0, "encode": 2.0, "write": 0.5}
    # Full names under the output as configured (one "/" however it ends).
    assert doc["output_files"] == [f"{OUT}/part-a1.parquet", f"{OUT}/part-b1.parquet"]
    assert doc["rejects_files"] == [f"{OUT}/_rejects/part-a2.parquet"]
    assert doc["output_bytes"] == 200
    assert doc["widths"] == [8, 4] and doc["input_files"] == 3
    json.dumps(doc)  # _summary.json must serialise


def test_build_resumed_units_count_in_totals_not_in_rates():
    # A was committed by an earlier run; this run did B only ("ghost" is no unit of this output).
    doc = build([A, B], resumed=["a.parquet", "ghost.jsonl"])
    assert doc["reconciled"] is True
    assert doc["rows_in"] == 8 and doc["rows_embedded"] == 7 and doc["rows_rejected"] == 1
    assert doc["tokens"] == 100 and doc["output_files"] == [f"{OUT}/part-a1.parquet",
                                                            f"{OUT}/part-b1.parquet"]
    assert doc["units"] == {"total": 3, "committed": 2, "resumed": 1, "committed_now": 1}
    assert doc["rows_now"] == 3
    assert doc["tokens_per_s"] == 20.0  # B's 40 tokens over this run's 2 s
    assert doc["tokens_per_s_steady"] == pytest.approx(40 / 1.5, abs=0.1)
    assert doc["encoder_tokens_per_busy_s"] == 40.0
    assert doc["stage_busy_s"] == {"tokenize": 0.5, "encode": 1.0, "write": 0.25}


@pytest.mark.parametrize("open_unit,rows_in,problem", [
    (unit("c.jsonl", [1, 2, 3], file_rows=5, file_rowsum=15), 5 + 5,
     "c.jsonl: 5 rows in the file, 3 written or rejected"),
    (unit("c.jsonl", [1, 2], file_rows=-1, file_rowsum=-1), 5 + 2,
     "c.jsonl: the rows read at its end never came out (2 did)"),
    (unit("c.parquet", [0, 1, 1], file_rows=3, file_rowsum=3), 5 + 3,
     "c.parquet: its row numbers do not add up (a row came out twice and another not at all)"),
    (unit("c.parquet", [0, 1, 2, 2], file_rows=3, file_rowsum=3), 5 + 3,
     "c.parquet: 3 rows in the file, 4 written or rejected"),
], ids=["rows-missing", "last-block-lost", "row-sum-disagrees", "row-twice"])
def test_build_open_unit_counts_in_rows_in_only(open_unit, rows_in, problem):
    doc = build([A], open_units=[open_unit])
    assert doc["reconciled"] is False and doc["reconcile_problems"] == [problem]
    assert doc["rows_in"] == rows_in
    # Its rows are not in the output (its files are deleted): not embedded, not rejected.
    assert (doc["rows_embedded"], doc["rows_rejected"]) == (4, 1)
    assert doc["units"]["committed"] == 1
    assert doc["rows_now"] == 5 + open_unit["rows"]  # but they were this run's work


@pytest.mark.parametrize("output,prefix", [("/data/out", "/data/out"),
                                           ("/data/out/", "/data/out"),
                                           ("s3://bkt/run-1", "s3://bkt/run-1")])
def test_build_names_files_under_the_configured_output(output, prefix):
    doc = build([A, B], output=output)
    assert doc["output_files"] == [f"{prefix}/part-a1.parquet", f"{prefix}/part-b1.parquet"]
    assert doc["rejects_files"] == [f"{prefix}/_rejects/part-a2.parquet"]


def test_build_unseen_non_empty_file():
    doc = build([A, B], unseen={"c.parquet": 3, "empty.jsonl": 0})
    assert doc["reconciled"] is False and doc["rows_in"] == 11
    assert doc["reconcile_problems"] == ["c.parquet: 3 rows in the file, none written or rejected"]


def test_reconcile_lists_every_problem_in_order():
    problems = summary.reconcile(
        [unit("z.jsonl", [1], file_rows=2, file_rowsum=3), unit("y.jsonl", [1], file_rows=-1)],
        {"x.parquet": 2, "w.parquet": 0})
    assert [p.split(":")[0] for p in problems] == ["x.parquet", "y.jsonl", "z.jsonl"]
    assert summary.reconcile([], {"e.jsonl": 0}) == []


def test_build_counts_disagreeing_with_the_file():
    # A committed unit whose embedded + rejected rows are not its file's: the safety net.
    bad = A | {"rows_embedded": 3}
    doc = build([bad])
    assert doc["reconciled"] is False
    assert doc["reconcile_problems"] == ["rows_in 5 != rows_embedded + rows_rejected"]


def test_build_empty_run():
    doc = build([EMPTY], unseen={"f.jsonl": 0}, wall_s=0.0)
    assert doc["reconciled"] is True and doc["rows_in"] == 0 and doc["reject_fraction"] == 0.0
    assert doc["padding_waste"] == 0.0 and doc["encoder_tokens_per_busy_s"] == 0.0
    assert doc["tokens_per_s"] == 0.0 and doc["tokens_per_s_steady"] == 0.0
    assert doc["output_files"] == [] and doc["units"]["committed"] == 1
    doc = build([])
    assert doc["reconciled"] is True and doc["rows_in"] == 0 and doc["units"]["committed"] == 0


def test_read_parquet_accepts_dictionary_encoded_text(tmp_path):
    text = pa.array(["a", "b", "a"]).dictionary_encode()
    path = write_parquet_file(tmp_path / "d.parquet", pa.table({"id": [1, 2, 3], "text": text}))
    rows = rows_of(read_parquet(str(path), "d.parquet", ReadSpec("id", "text")))
    assert [r[S.TEXT] for r in rows] == ["a", "b", "a"]
    assert all(r[S.REJECT] is None for r in rows)


def test_a_file_that_is_not_what_its_name_says_is_an_input_error(tmp_path):
    path = write_bytes(tmp_path / "a.parquet", b"this is not parquet at all")
    with pytest.raises(InputError, match="not a readable file of its format") as info:
        sample_columns(input_file(path))
    assert "endpoint" not in str(info.value)


def test_globs_skip_hidden_directories_and_are_checked_against_the_output(tmp_path):
    for rel in ["in/a/p.jsonl", "in/.tmp/partial.jsonl", "in/_rejects/old.jsonl"]:
        write_bytes(tmp_path / rel, b'{"id": 1, "text": "x"}\n')
    files = list_inputs(str(tmp_path / "in" / "**" / "*.jsonl"))
    assert [Path(f.uri).relative_to(tmp_path).as_posix() for f in files] == ["in/a/p.jsonl"]
    with pytest.raises(OutputError, match="inside the input"):
        check_disjoint(str(tmp_path / "in" / "**" / "*.jsonl"), str(tmp_path / "in" / "out"))
    check_disjoint(str(tmp_path / "in" / "*.jsonl"), str(tmp_path / "out"))
