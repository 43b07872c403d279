"""The I/O layer and the run summary on real local files (no Ray, no network).

Readers: JSONL lines and Parquet row groups -> the pipeline's row layout, bad rows rejected
with a reason and never dropped. Storage: format detection, input listing, output checks.
Writers: encoder rows -> embeddings and rejects files. Summary: row accounting per file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import summary
from pipeline.io import schema as S
from pipeline.io.readers import ReadSpec, iter_lines, open_decompressed, read_jsonl, read_parquet
from pipeline.io.storage import (InputError, OutputError, check_disjoint, count_rows,
                                 detect_format, json_id_type, list_inputs, open_filesystem,
                                 prepare_output, remove_previous, sample_columns)
from pipeline.io.writers import OutputSpec, split_rows, write_outputs

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


def test_read_parquet_missing_text_column_names_file_and_column(tmp_path):
    path = write_parquet_file(tmp_path / "a.parquet", pa.table({"id": [1], "body": ["x"]}))
    with pytest.raises(InputError, match=r"s3://b/a\.parquet.*'text'"):
        list(read_parquet(str(path), "s3://b/a.parquet", ReadSpec("id", "text")))


def test_read_parquet_missing_keep_column_names_file_and_column(tmp_path):
    path = write_parquet_file(tmp_path / "a.parquet", pa.table({"id": [1], "text": ["x"]}))
    with pytest.raises(InputError, match=r"a\.parquet.*'lang'"):
        list(read_parquet(str(path), "a.parquet", ReadSpec("id", "text", ("lang",))))


def test_read_parquet_zero_rows_yields_nothing(tmp_path):
    table = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})
    path = write_parquet_file(tmp_path / "z.parquet", table)
    assert list(read_parquet(str(path), "z", ReadSpec("id", "text"))) == []


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
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_prepare_output_fresh_dir_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    prepare_output(str(out))
    assert out.is_dir() and files_under(out) == []  # the write probe is gone


def test_prepare_output_refuses_earlier_run_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    for rel in ["part-0001.parquet", "_summary.json", "_rejects/part-0002.parquet",
                "README.txt", "sub/part-0003.parquet", "part-dir/x.parquet", "other.parquet"]:
        write_bytes(out / rel, b"x")
    with pytest.raises(OutputError, match="earlier run.*--overwrite"):
        prepare_output(str(out))
    assert len(files_under(out)) == 7  # nothing deleted without overwrite
    previous = prepare_output(str(out), overwrite=True)
    assert len(files_under(out)) == 7  # checking deletes nothing: later checks may still fail
    remove_previous(str(out), previous)
    assert files_under(out) == ["README.txt", "other.parquet", "part-dir/x.parquet",
                                "sub/part-0003.parquet"]
    assert prepare_output(str(out)) == []  # no earlier run left


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
    names = [S.ID, S.TEXT, S.SOURCE, S.ROW, S.FILE_ROWS, S.REJECT, S.EXCERPT, S.TOKENS,
             S.NUM_TOKENS, S.TRUNCATED, S.TOKENIZE_S, S.GRID_TOKENS, S.BATCH_MAX, S.ENCODE_S]
    assert len(set(names)) == len(names) and all(n.startswith("__") for n in names)
    assert S.REJECTS_SCHEMA.names == ["id", "source", "row", "reason", "excerpt"]


# ---------------------------------------------------------------------------------------------
# writers

DIMS = (8, 4)


def encoded_table(rows: list[dict], dims=DIMS, output_dtype: str = "float32",
                  id_type=pa.int64()) -> pa.Table:
    """Rows as the encoder stage emits them; ``rows`` give id, source, row, reject and tokens."""
    n = len(rows)
    good = np.array([r.get("reject") is None for r in rows])
    np_dtype = np.float16 if output_dtype == "float16" else np.float32
    columns = {
        S.ID: pa.array([r["id"] for r in rows], id_type),
        "lang": pa.array([r.get("lang") for r in rows], pa.string()),
        S.SOURCE: pa.array([r["source"] for r in rows], pa.string()),
        S.ROW: pa.array([r["row"] for r in rows], pa.int64()),
        S.FILE_ROWS: pa.array([r.get("file_rows") for r in rows], pa.int64()),
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


ROWS = [
    {"id": 10, "lang": "en", "source": "a.parquet", "row": 0, "file_rows": 3, "tokens": 5,
     "grid": 6, "batch_max": 8},
    {"id": 11, "source": "a.parquet", "row": 1, "file_rows": 3, "reject": "text is null",
     "excerpt": "None"},
    {"id": 12, "lang": "de", "source": "a.parquet", "row": 2, "file_rows": 3, "tokens": 8,
     "truncated": True, "grid": 8, "batch_max": 8},
    {"id": None, "source": "b.jsonl", "row": 4, "reject": "malformed JSON: Expecting value",
     "excerpt": "{oops"},
    {"id": 14, "lang": "fr", "source": "b.jsonl", "row": 7, "tokens": 3, "grid": 3,
     "batch_max": 4},
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
    assert stats["rows_embedded"] == 3 and stats["rows_rejected"] == 2
    assert stats["tokens"] == 16 and stats["texts_truncated"] == 1
    assert stats["grid_tokens"] == 17 and stats["batch_grid_tokens"] == 20
    assert stats["tokenize_s"] == pytest.approx(5 * 0.25)
    assert stats["encode_s"] == pytest.approx(5 * 0.5)
    assert (stats["encode_first_start"], stats["encode_last_end"]) == (1000.0, 1006.0)
    assert stats["reject_reasons"] == {"text is null": 1, "malformed JSON": 1}
    assert stats["sources"] == {"a.parquet": [3, 2, 3], "b.jsonl": [2, 7, -1]}


def test_split_rows_reason_kinds_drop_details():
    rows = [{"id": None, "source": "b.jsonl", "row": i, "reject": f"invalid UTF-8: at byte {i}",
             "excerpt": "x"} for i in (3, 9)]
    _, _, stats = split_rows(encoded_table(rows), output_spec())
    assert len(stats["reject_reasons"]) == 1


def test_split_rows_string_ids_and_all_rejected():
    rows = [{"id": "a", "source": "s", "row": 1, "reject": "text is null", "excerpt": "None"}]
    embedded, rejects, stats = split_rows(encoded_table(rows, id_type=pa.string()), output_spec())
    assert embedded.num_rows == 0 and embedded.schema.field("doc_id").type == pa.string()
    assert rejects["id"].to_pylist() == ["a"]
    assert stats["tokens"] == 0 and stats["rows_embedded"] == 0


def test_write_outputs_writes_parts_and_rejects_without_temp_files(tmp_path):
    spec = output_spec()
    fs, path = open_filesystem(str(tmp_path / "out"))
    stats = write_outputs(fs, path, encoded_table(ROWS), spec)
    part, reject = stats["files"]
    assert Path(part).parent == tmp_path / "out" and Path(part).name.startswith("part-")
    assert Path(reject).parent == tmp_path / "out" / "_rejects" and reject.endswith(".parquet")
    assert files_under(tmp_path / "out") == sorted(
        [Path(part).name, f"_rejects/{Path(reject).name}"])  # no .tmp file left behind
    assert stats["bytes"] == os.path.getsize(part) + os.path.getsize(reject)
    written = pq.read_table(part)
    assert written["doc_id"].to_pylist() == [10, 12, 14]
    assert S.read_metadata(pq.read_schema(part)) == spec.metadata
    assert pq.read_table(reject).schema.equals(S.REJECTS_SCHEMA)
    assert pq.read_table(reject).num_rows == 2
    assert stats["rows_embedded"] == 3 and stats["rows_rejected"] == 2


def test_write_outputs_only_what_exists(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    good = [r for r in ROWS if "reject" not in r]
    stats = write_outputs(fs, path, encoded_table(good), output_spec())
    assert len(stats["files"]) == 1 and "/_rejects/" not in stats["files"][0]
    assert not (tmp_path / "out" / "_rejects").exists()
    bad = [r for r in ROWS if "reject" in r]
    stats = write_outputs(fs, path, encoded_table(bad), output_spec())
    assert len(stats["files"]) == 1 and "/_rejects/" in stats["files"][0]


def test_write_outputs_float16(tmp_path):
    spec = output_spec("float16")
    fs, path = open_filesystem(str(tmp_path / "out"))
    stats = write_outputs(fs, path, encoded_table(ROWS, output_dtype="float16"), spec)
    table = pq.read_table(stats["files"][0])
    assert table.schema.field("embedding_8").type == pa.list_(pa.float16(), 8)
    assert np.asarray(table["embedding_4"].to_pylist(), np.float16)[:, 0].tolist() == [1, 3, 5]
    assert S.read_metadata(table.schema)["dtype"] == "float16"
    assert spec.bytes_per_row == (8 + 4) * 2 and output_spec().bytes_per_row == (8 + 4) * 4


def test_rows_per_file_targets_file_size_with_a_floor():
    assert output_spec(dims=(768,)).rows_per_file() == (128 << 20) // (768 * 4)
    assert output_spec(dims=(1 << 20,)).rows_per_file() == 1024


# ---------------------------------------------------------------------------------------------
# summary


def write_stats(sources, embedded, rejected, tokens=0, grid=0, files=(), reasons=None, **kw):
    return {"rows_embedded": embedded, "rows_rejected": rejected, "tokens": tokens,
            "texts_truncated": 0, "grid_tokens": grid, "batch_grid_tokens": grid,
            "bytes": 100, "tokenize_s": 0.5, "encode_s": 1.0, "write_s": 0.25,
            "reject_reasons": reasons or {}, "sources": sources, "files": list(files)} | kw


def test_combine_sums_writes():
    total = summary.combine([
        write_stats({"a.parquet": [2, 4, 5]}, 2, 0, tokens=10, files=["o/part-b.parquet"]),
        write_stats({"a.parquet": [3, 2, 5], "b.jsonl": [1, 9, -1]}, 3, 1, tokens=5,
                    files=["o/part-a.parquet", "o/_rejects/part-c.parquet"],
                    reasons={"text is null": 1}),
        write_stats({"b.jsonl": [2, 3, -1]}, 2, 0, reasons={"malformed JSON": 2, "text is null": 1}),
        {},  # a write that saw only empty blocks
    ])
    assert total["rows_embedded"] == 7 and total["rows_rejected"] == 1 and total["tokens"] == 15
    assert total["bytes"] == 300 and total["write_s"] == pytest.approx(0.75)
    assert total["sources"] == {"a.parquet": [5, 4, 5], "b.jsonl": [3, 9, -1]}
    assert total["reject_reasons"] == {"malformed JSON": 2, "text is null": 2}
    assert total["files"] == ["o/_rejects/part-c.parquet", "o/part-a.parquet", "o/part-b.parquet"]


def test_combine_nothing():
    total = summary.combine([])
    assert total["rows_embedded"] == 0 and total["sources"] == {} and total["files"] == []


def test_rows_in_uses_footer_counts_where_known():
    assert summary.rows_in({"a.parquet": [4, 4, 5], "b.jsonl": [3, 9, -1]}) == 5 + 3
    assert summary.rows_in({}) == 0


CLEAN = {"a.parquet": [5, 4, 5], "b.jsonl": [4, 6, 4]}


def test_reconcile_clean():
    assert summary.reconcile(CLEAN, {"empty.jsonl": 0}) == []


@pytest.mark.parametrize("sources,unseen,problem", [
    ({"a.parquet": [4, 4, 5]}, {}, "a.parquet: 5 rows in the file, 4 written or rejected"),
    ({"a.parquet": [6, 4, 5]}, {}, "a.parquet: 5 rows in the file, 6 written or rejected"),
    ({"b.jsonl": [5, 6, 4]}, {}, "b.jsonl: 4 rows in the file, 5 written or rejected"),
    ({"b.jsonl": [3, 4, -1]}, {}, "b.jsonl: the rows read at its end never came out (3 did)"),
    (CLEAN, {"c.parquet": 3}, "c.parquet: 3 rows in the file, none written or rejected"),
], ids=["lost-row", "duplicated-row", "jsonl-duplicates", "jsonl-last-block-lost", "unseen-file"])
def test_reconcile_problems(sources, unseen, problem):
    assert summary.reconcile(sources, unseen) == [problem]


def build(stats, unseen=None):
    return summary.build(stats=stats, unseen_rows=unseen or {}, wall_s=2.0,
                         config={"dims": (8, 4), "input": "in"}, model={"model_id": "m"},
                         input_files=3)


def test_build_clean_run():
    stats = summary.combine([write_stats(CLEAN, 8, 1, tokens=100, grid=125,
                                         files=["o/part-a.parquet", "o/_rejects/part-b.parquet"])])
    doc = build(stats, {"empty.jsonl": 0})
    assert doc["reconciled"] is True and doc["reconcile_problems"] == []
    assert doc["rows_in"] == 9 and doc["rows_embedded"] == 8 and doc["rows_rejected"] == 1
    assert doc["padding_waste"] == pytest.approx(0.2) and doc["tokens_per_s"] == 50.0
    assert doc["encoder_tokens_per_busy_s"] == 100.0
    assert doc["output_files"] == ["o/part-a.parquet"]
    assert doc["rejects_files"] == ["o/_rejects/part-b.parquet"]
    assert doc["widths"] == [8, 4] and doc["input_files"] == 3
    json.dumps(doc)  # _summary.json must serialise


def test_build_lost_parquet_row():
    stats = summary.combine([write_stats({"a.parquet": [4, 4, 5]}, 4, 0)])
    doc = build(stats)
    assert doc["reconciled"] is False and doc["rows_in"] == 5
    assert doc["reconcile_problems"] == ["a.parquet: 5 rows in the file, 4 written or rejected"]


def test_build_duplicated_row():
    stats = summary.combine([write_stats({"a.parquet": [4, 3, 5]}, 4, 0),
                             write_stats({"a.parquet": [2, 4, 5]}, 2, 0)])
    doc = build(stats)
    assert doc["reconciled"] is False and doc["rows_in"] == 5 and doc["rows_embedded"] == 6


def test_build_unseen_non_empty_file():
    stats = summary.combine([write_stats(CLEAN, 9, 0)])
    doc = build(stats, {"c.parquet": 3, "empty.jsonl": 0})
    assert doc["reconciled"] is False and doc["rows_in"] == 12
    assert doc["reconcile_problems"] == ["c.parquet: 3 rows in the file, none written or rejected"]


def test_build_counts_disagreeing_with_sources():
    stats = summary.combine([write_stats(CLEAN, 8, 0)])  # sources say 9 rows came out
    doc = build(stats)
    assert doc["reconciled"] is False
    assert doc["reconcile_problems"] == ["rows_in 9 != rows_embedded + rows_rejected"]


def test_build_empty_run():
    doc = build(summary.combine([]), {"e.jsonl": 0})
    assert doc["reconciled"] is True and doc["rows_in"] == 0
    assert doc["padding_waste"] == 0.0 and doc["encoder_tokens_per_busy_s"] == 0.0


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
