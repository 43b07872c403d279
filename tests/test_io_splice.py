"""Parquet files made of other files' row groups moved as bytes (pipeline/io/splice.py), read
back by pyarrow and by DuckDB's own Parquet reader."""

from __future__ import annotations

import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import splice
from pipeline.io.writers import encodings, write_table


def table(rows: int, seed: int, width: int = 6) -> pa.Table:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, width)).astype(np.float32)
    return pa.table({
        "id": pa.array([f"doc-{seed}-{i}" for i in range(rows)]),
        "n": pa.array(rng.integers(-5, 5, rows), pa.int64()),
        "maybe": pa.array([None if i % 3 else float(i) for i in range(rows)], pa.float64()),
        "embedding_6": pa.array(list(vectors), pa.list_(pa.float32())),
        "tags": pa.array([{"a": i, "b": str(i % 4)} for i in range(rows)]),
    }).replace_schema_metadata({"run": f"night {seed}"})


def parquet(t: pa.Table, row_groups: list[int] | None) -> bytes:
    buffer = io.BytesIO()
    write_table(buffer, t, row_groups)
    return buffer.getvalue()


def test_a_file_spliced_from_all_its_row_groups_is_the_same_file_byte_for_byte():
    """The footer's scan and rewrite: every row group of a file, in order, at the same
    offsets, with the file as template, gives back the writer's own bytes."""
    cases = [
        parquet(table(40, 1), [7, 13, 20]),
        parquet(table(0, 2), []),
        parquet(table(300, 3), [1] * 20 + [280]),  # a list of more than 14 row groups
    ]
    buffer = io.BytesIO()
    pq.write_table(table(50, 4), buffer, row_group_size=9, compression="zstd")  # defaults
    cases.append(buffer.getvalue())
    for data in cases:
        parsed = splice.parse(data)
        out = io.BytesIO()
        splice.write_spliced(out, list(parsed.row_groups), parsed.footer)
        assert out.getvalue() == data


def test_row_groups_of_two_files_join_as_bytes_and_read_back_by_two_readers(tmp_path):
    first, second = table(60, 5), table(45, 6)
    a = splice.parse(parquet(first, [10, 20, 30]))
    b = splice.parse(parquet(second, [15, 15, 15]))
    assert [g.rows for g in a.row_groups] == [10, 20, 30]
    chosen = [(b, 2), (a, 0), (a, 2), (b, 0)]
    out = io.BytesIO()
    size = splice.write_spliced(out, [p.row_groups[i] for p, i in chosen], a.footer)
    data = out.getvalue()
    assert size == len(data)
    want = pa.concat_tables([second.slice(30, 15), first.slice(0, 10), first.slice(30, 30),
                             second.slice(0, 15)])
    got = pq.read_table(io.BytesIO(data))
    assert got.equals(want.replace_schema_metadata(first.schema.metadata))
    assert got.schema.metadata == first.schema.metadata  # the template's metadata
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [15, 10, 30, 15]
    assert meta.num_rows == 70
    path = tmp_path / "joined.parquet"
    path.write_bytes(data)
    rows = duckdb.sql(f"SELECT id, n, maybe, embedding_6, tags.b FROM '{path}'").fetchall()
    assert [r[0] for r in rows] == want["id"].to_pylist()
    assert [r[1] for r in rows] == want["n"].to_pylist()
    assert [r[2] for r in rows] == want["maybe"].to_pylist()
    assert [r[3] for r in rows] == want["embedding_6"].to_pylist()
    assert [r[4] for r in rows] == [t["b"] for t in want["tags"].to_pylist()]


def test_random_joins_equal_the_rows_they_take():
    rng = np.random.default_rng(11)
    for trial in range(25):
        sources = []
        for s in range(int(rng.integers(1, 4))):
            rows = int(rng.integers(1, 80))
            cuts = np.sort(rng.choice(np.arange(1, rows), min(rows - 1, int(rng.integers(0, 6))),
                                      replace=False)) if rows > 1 else []
            sizes = np.diff([0, *cuts, rows]).astype(int).tolist()
            t = table(rows, 100 * trial + s)
            sources.append((t, sizes, splice.parse(parquet(t, sizes))))
        picks = []
        for _ in range(int(rng.integers(0, 8))):
            s = int(rng.integers(len(sources)))
            picks.append((s, int(rng.integers(len(sources[s][1])))))
        out = io.BytesIO()
        splice.write_spliced(out, [sources[s][2].row_groups[g] for s, g in picks],
                             sources[0][2].footer)
        got = pq.read_table(io.BytesIO(out.getvalue()))
        want = [sources[s][0].slice(sum(sources[s][1][:g]), sources[s][1][g]) for s, g in picks]
        if want:
            assert got.equals(pa.concat_tables(want).replace_schema_metadata(
                got.schema.metadata)), trial
        else:
            assert got.num_rows == 0 and got.schema.names == sources[0][0].schema.names


def test_row_groups_of_another_schema_are_refused():
    a = splice.parse(parquet(table(10, 1), [10]))
    b = splice.parse(parquet(table(10, 2, width=4).drop_columns(["tags"]), [10]))
    with pytest.raises(splice.SpliceError, match="different schemas"):
        splice.write_spliced(io.BytesIO(), [a.row_groups[0], b.row_groups[0]], a.footer)


def test_row_groups_of_another_writer_are_refused():
    """Readers work around a writer's known bugs by its name (``created_by``): row groups of
    files written by different writers do not share a footer."""
    data = parquet(table(10, 1), [10])
    name = pq.ParquetFile(io.BytesIO(data)).metadata.created_by.encode()
    other = data.replace(name, name[:-1] + b"X")  # same length: the footer stays whole
    assert pq.ParquetFile(io.BytesIO(other)).metadata.created_by.endswith("X")
    a, b = splice.parse(data), splice.parse(other)
    with pytest.raises(splice.SpliceError, match="different schemas or writers"):
        splice.write_spliced(io.BytesIO(), [a.row_groups[0], b.row_groups[0]], a.footer)


def test_files_whose_row_groups_do_not_move_as_bytes_are_not_spliceable(tmp_path):
    t = table(30, 3)
    plain = parquet(t, [10, 20])
    assert [g.rows for g in splice.parse(plain).row_groups] == [10, 20]
    with_index = io.BytesIO()
    pq.write_table(t, with_index, row_group_size=10, write_page_index=True)
    unspliceable = [
        (with_index.getvalue(), "page index"),  # offsets outside the row groups
        (b"PAR1 not a parquet file", "not a Parquet file"),
        (plain[:-8] + (10 ** 6).to_bytes(4, "little") + b"PAR1", "longer than its file"),
        (plain[:-4] + b"PAR2", "not a Parquet file"),
    ]
    for data, message in unspliceable:
        with pytest.raises(splice.SpliceError, match=message):
            splice.parse(data)
    with pytest.raises(splice.SpliceError, match="not a Parquet file"):
        splice.parse(b"{\"id\": 1}\n" * 3)
    # A footer whose length field is wrong by one byte is caught, not misread.
    length = int.from_bytes(plain[-8:-4], "little")
    shifted = plain[:-8] + (length - 1).to_bytes(4, "little") + b"PAR1"
    with pytest.raises(splice.SpliceError):
        splice.parse(shifted)
    with pytest.raises(splice.SpliceError):
        splice.parse(plain[:4] + plain[-200:])  # a footer cut short


def test_a_vector_column_is_written_as_the_writer_always_does():
    # The spliced file's row groups keep the vectors' options (no dictionary, no statistics).
    t = table(20, 8)
    a = splice.parse(parquet(t, [20]))
    out = io.BytesIO()
    splice.write_spliced(out, list(a.row_groups), a.footer)
    column = pq.ParquetFile(io.BytesIO(out.getvalue())).metadata.row_group(0).column(3)
    assert column.path_in_schema == "embedding_6.list.element"
    assert not column.is_stats_set and not column.has_dictionary_page
    assert "embedding_6.list.element" not in encodings(t.schema)["use_dictionary"]
