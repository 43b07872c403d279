"""``pipeline/io/writers.py`` on real local files and an in-memory store (no Ray): encoder
rows -> embeddings and rejects files, one write record per input file, names relative to the
output; and the nightly columns (``content_hash``, change counts)."""

from __future__ import annotations

import json
import os
import re
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import schema as S
from pipeline.io.storage import GROUP_MARK, open_filesystem, unit_key
from pipeline.io.writers import (OutputSpec, change_stats, file_row_groups, split_rows,
                                 write_outputs, write_parquet)
from pipeline.stages.diff import HASH_COLUMN
from tests.helpers import files_under, vector


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


# ---------------------------------------------------------------------------------------------
# split_rows


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


# ---------------------------------------------------------------------------------------------
# write_outputs


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
# The nightly job's columns: change counts and the content_hash column

NIGHTLY_DIMS = (64, 32)


def encoded_rows(changes, reuse, rejects, hashes) -> pa.Table:
    n = len(changes)
    cols = {
        S.ID: pa.array(range(1, n + 1), pa.int64()), "lang": pa.array(["en"] * n),
        S.SOURCE: pa.array(["s3://in/a"] * n), S.UNIT: pa.array(["s3://in/a"] * n),
        S.ROW: pa.array(range(1, n + 1), pa.int64()),
        S.FILE_ROWS: pa.nulls(n, pa.int64()), S.FILE_ROWSUM: pa.nulls(n, pa.int64()),
        S.REJECT: pa.array(rejects, pa.string()), S.EXCERPT: pa.nulls(n, pa.string()),
        S.HASH: pa.array(hashes, pa.string()),
        S.CHANGE: pa.array(changes, pa.string()), S.REUSE: pa.array(reuse, pa.bool_()),
        S.NUM_TOKENS: pa.array([0] * n, pa.int32()), S.TRUNCATED: pa.array([False] * n),
        S.TOKENIZE_S: pa.array([0.0] * n), S.GRID_TOKENS: pa.array([0] * n, pa.int32()),
        S.BATCH_MAX: pa.array([0] * n, pa.int32()), S.ENCODE_S: pa.array([0.0] * n),
        S.ENCODE_START: pa.array([1.0] * n), S.ENCODE_END: pa.array([2.0] * n),
    }
    for d in NIGHTLY_DIMS:
        cols[f"embedding_{d}"] = pa.array([None if r else vector(i, d) for i, r in
                                           enumerate(rejects)], S.embedding_type(d, "float32"))
    return pa.table(cols)


def nightly_output_spec(extra=((HASH_COLUMN, S.HASH),)) -> OutputSpec:
    return OutputSpec(id_column="id", keep_columns=("lang",), dims=NIGHTLY_DIMS,
                      output_dtype="float32", metadata={"task": "document"},
                      extra_columns=extra)


def test_split_rows_writes_the_content_hash_and_counts_changes():
    table = encoded_rows(
        changes=["new", "changed", "unchanged", "unchanged", None, "new"],
        reuse=[False, False, True, False, False, False],
        rejects=[None, None, None, None, "text is null", None],
        hashes=["h1", "h2", "h3", "h4", None, "h6"])
    embedded, rejects, stats = split_rows(table, nightly_output_spec())
    assert embedded.column_names == ["id", "lang", "embedding_64", "embedding_32", "content_hash"]
    assert embedded["content_hash"].to_pylist() == ["h1", "h2", "h3", "h4", "h6"]
    assert embedded["id"].to_pylist() == [1, 2, 3, 4, 6]
    assert rejects["id"].to_pylist() == ["5"] and rejects["reason"].to_pylist() == ["text is null"]
    assert stats["rows_new"] == 2 and stats["rows_changed"] == 1
    assert stats["rows_unchanged"] == 2 and stats["rows_reused"] == 1
    assert stats["rows_embedded"] == 5 and stats["rows_rejected"] == 1
    assert S.read_metadata(embedded.schema) == {"task": "document"}


def test_change_stats_outside_nightly_and_of_no_rows():
    table = encoded_rows(["new"], [False], [None], ["h"])
    assert change_stats(table.drop_columns([S.CHANGE, S.REUSE])) == {}
    assert change_stats(table.slice(0, 0)) == {"rows_new": 0, "rows_changed": 0,
                                               "rows_unchanged": 0, "rows_reused": 0}
    embedded, _, stats = split_rows(table.drop_columns([S.CHANGE, S.REUSE, S.HASH]),
                                    nightly_output_spec(()))
    assert "content_hash" not in embedded.column_names and "rows_new" not in stats


def test_part_files_encode_vectors_plainly_and_every_other_column_with_a_dictionary(tmp_path):
    # A vector's values never repeat: no dictionary attempt, no min/max (io/writers.py::
    # encodings); ids, hashes and kept columns (nested ones too) keep both.
    out = tmp_path / "out"
    fs, path = open_filesystem(str(out))
    (a, _) = sorted(write_outputs(fs, path, encoded_table(ROWS), output_spec()),
                    key=lambda r: r["source"])
    meta = pq.ParquetFile(out / a["files"][0]).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    vectors = [p for p in columns if p.startswith("embedding_")]
    assert vectors and len(vectors) < len(columns)
    for p, c in columns.items():
        dictionary = "RLE_DICTIONARY" in c.encodings
        assert dictionary == c.is_stats_set == (p not in vectors), (p, c.encodings)
    nested = pa.table({"tags": pa.array([["a"], ["a", "b"]]), "m": pa.array(
        [[("k", 1)], []], pa.map_(pa.string(), pa.int64())), "s": pa.array([{"x": "a"}] * 2),
        "v": pa.array([[0.5], [0.25]], pa.list_(pa.float16()))})
    write_parquet(fs, f"{path}/n.parquet", nested)
    meta = pq.ParquetFile(out / "n.parquet").metadata.row_group(0)
    assert {meta.column(i).path_in_schema: "RLE_DICTIONARY" in meta.column(i).encodings
            for i in range(meta.num_columns)} == {
        "tags.list.element": True, "m.key_value.key": True, "m.key_value.value": True,
        "s.x": True, "v.list.element": False}
    assert pq.read_table(out / "n.parquet").equals(nested)


def test_a_group_units_row_groups_end_with_its_files_rows():
    """``file_row_groups`` over random files: the row groups hold every row once, none more
    than ``most``; each ends where a file's rows end unless it is full (``most`` rows, a
    long file cut) or the last; and it ends at the first file end once it holds ``least``."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        rows = rng.integers(1, 60, int(rng.integers(0, 20))).tolist()
        least, most = int(rng.integers(1, 40)), int(rng.integers(40, 90))
        sizes = file_row_groups(rows, least=least, most=most)
        assert sum(sizes) == sum(rows) and all(0 < n <= most for n in sizes)
        ends = set(np.cumsum(rows).tolist())
        at = 0
        for i, n in enumerate(sizes):
            at += n
            assert at in ends or n == most or i == len(sizes) - 1, (rows, least, most, sizes)
            # No file end inside it after ``least`` rows (it would have ended there).
            inside = [e - (at - n) for e in ends if at - n < e < at]
            assert all(k < least for k in inside), (rows, least, most, sizes)
    assert file_row_groups([]) == []
    assert file_row_groups([100] * 30) == [1100, 1100, 800]  # FILE_GROUP_ROWS = 1024


def test_the_writer_cuts_a_group_units_part_file_at_its_files_ends(tmp_path, monkeypatch):
    from pipeline.io import writers

    monkeypatch.setattr(writers, "FILE_GROUP_ROWS", 4)
    unit = f"/in/a.jsonl{GROUP_MARK}3]"
    rows = [{"id": 10 * f + r, "source": f"/in/{name}.jsonl", "row": r}
            for f, (name, n) in enumerate((("a", 3), ("b", 2), ("c", 5))) for r in range(n)]
    table = encoded_table(rows).append_column(S.UNIT, pa.array([unit] * len(rows)))
    (record,) = write_outputs(fsspec.filesystem("file"), str(tmp_path), table, output_spec())
    (name,) = record["files"]
    meta = pq.ParquetFile(tmp_path / name).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5, 5]
    assert [n for _, n in record["slices"][name]] == [3, 2, 5]
