"""``pipeline/io/readers.py`` on real local files (no Ray, no network).

JSONL lines and Parquet row groups -> the pipeline's row layout: row numbers, the file's row
count and row-number sum, kept columns cast to the run's types, bad rows rejected with a reason
and never dropped, damaged or failing sources; and ``count_rows``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.io import schema as S
from pipeline.io.errors import StorageError
from pipeline.io.readers import (JSON_TEXT, ReadSpec, count_rows, iter_lines, open_decompressed,
                                 read_jsonl, read_parquet)
from tests.helpers import (compress, input_file, jsonl, sample_parquet, write_bytes,
                           write_parquet_file)


INT_IDS = ReadSpec("id", "text", keep_columns=("lang",), id_type=pa.int64())


# ---------------------------------------------------------------------------------------------
# helpers


def rows_of(tables) -> list[dict]:
    tables = list(tables)
    return pa.concat_tables(tables).to_pylist() if tables else []


def read_jsonl_file(path: Path, compression: str | None, spec: ReadSpec = INT_IDS) -> list[pa.Table]:
    with open(path, "rb") as raw:
        return list(read_jsonl(open_decompressed(raw, compression), str(path), spec))


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


def test_read_parquet_accepts_dictionary_encoded_text(tmp_path):
    text = pa.array(["a", "b", "a"]).dictionary_encode()
    path = write_parquet_file(tmp_path / "d.parquet", pa.table({"id": [1, 2, 3], "text": text}))
    rows = rows_of(read_parquet(str(path), "d.parquet", ReadSpec("id", "text")))
    assert [r[S.TEXT] for r in rows] == ["a", "b", "a"]
    assert all(r[S.REJECT] is None for r in rows)


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
# count_rows


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
# units of several small files: one filesystem a unit, nothing opened for zero-byte files


def test_a_unit_of_several_files_opens_its_filesystem_once(tmp_path, monkeypatch):
    import pipeline.io.readers as R
    from pipeline.io.storage import InputFile, group_version

    members = []
    for k in range(3):
        path = write_bytes(tmp_path / f"f{k}.jsonl", jsonl({"id": k, "text": f"t{k}"}))
        members.append(input_file(path))
    members.append(InputFile(str(tmp_path / "empty.jsonl"), 0, "jsonl", None))
    unit = InputFile(members[0].uri, 30, "jsonl", None, version=group_version(members),
                     members=tuple(members))
    opened = []
    real = R.open_filesystem
    monkeypatch.setattr(R, "open_filesystem", lambda uri, *a, **k: opened.append(uri)
                        or real(uri, *a, **k))
    (table,) = R.read_unit(unit, ReadSpec("id", "text", id_type=pa.int64()))
    assert table[S.ID].to_pylist() == [0, 1, 2] and opened == [unit.uri]
    assert table[S.SOURCE].to_pylist() == [m.uri for m in members[:3]]
    # Counting rows (a unit that produced none) opens no zero-byte file.
    opened.clear()
    assert R.count_rows(unit) == 3 and opened == [m.uri for m in members[:3]]
