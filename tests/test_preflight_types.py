"""The pre-flight settles the run's id and kept-column types across shards (local files, no Ray).

``check_inputs`` skips zero-byte files and Parquet files without rows, ignores a column that
is all null in a shard (Arrow type ``null``) and takes its type from the next shard that has
values; a kept column never seen with a value is JSON text (JSONL) or a string (Parquet).
Parquet ids must be integers, strings or binary. A damaged compressed JSONL shard gives the
lines before the damage, or nothing (the next shard is sampled), never an error.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.io.readers import JSON_TEXT
from pipeline.io.errors import InputError
from pipeline.io.sampling import sample_records
from pipeline.preflight import MAX_SAMPLED_FILES, check_inputs
from tests.helpers import compress


def config(tmp_path: Path, keep=("lang",), **options) -> RunConfig:
    return RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                     keep_columns=tuple(keep), **options)


def parquet(tmp_path: Path, name: str, table: pa.Table) -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def jsonl(tmp_path: Path, name: str, rows: list[dict] | None = None,
          data: bytes | None = None) -> Path:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None
                     else "".join(json.dumps(r) + "\n" for r in rows or []).encode())
    return path


REAL = pa.table({"id": pa.array([1, 2], pa.int64()), "text": ["a", "b"],
                 "lang": ["en", "de"]})


def settled(inputs) -> tuple:
    return inputs.id_type, dict(inputs.keep_types)


# ---------------------------------------------------------------------------------------------
# Parquet: shards without rows, and all-null columns, do not settle a type


@pytest.mark.parametrize("empty", [
    pd.DataFrame({"id": pd.Series([], dtype=object), "text": pd.Series([], dtype=object),
                  "lang": pd.Series([], dtype=object)}),  # pandas object columns: null type
    pd.DataFrame({"id": [], "text": [], "lang": []}),  # pandas' default: float64 columns
    pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string()),
              "lang": pa.array([], pa.int32())}),
    pa.table({"id": pa.array([], pa.int64())}),  # lacks text and lang: not checked, no rows
], ids=["pandas-object-null", "pandas-float", "string-id", "missing-columns"])
def test_zero_row_parquet_first_takes_types_from_the_real_shard(tmp_path, empty):
    table = empty if isinstance(empty, pa.Table) else pa.Table.from_pandas(empty,
                                                                           preserve_index=False)
    assert table.num_rows == 0
    parquet(tmp_path, "part-00.parquet", table)
    parquet(tmp_path, "part-01.parquet", table)
    parquet(tmp_path, "part-02.parquet", REAL)
    inputs = check_inputs(config(tmp_path))
    assert len(inputs.files) == 3
    assert settled(inputs) == (pa.int64(), {"lang": pa.string()})


def test_all_null_kept_column_takes_its_type_from_the_next_shard(tmp_path):
    parquet(tmp_path, "part-00.parquet", pa.table({"id": [1, 2], "text": ["a", "b"],
                                                   "lang": [None, None]}))
    assert pq.read_schema(tmp_path / "in" / "part-00.parquet").field("lang").type == pa.null()
    parquet(tmp_path, "part-01.parquet", pa.table({"id": [3], "text": ["c"], "lang": ["en"]}))
    inputs = check_inputs(config(tmp_path))
    assert settled(inputs) == (pa.int64(), {"lang": pa.string()})


def test_all_null_id_takes_its_type_from_the_next_shard(tmp_path):
    parquet(tmp_path, "part-00.parquet", pa.table({"id": [None, None], "text": ["a", "b"],
                                                   "lang": ["en", "fr"]}))
    parquet(tmp_path, "part-01.parquet", pa.table({"id": ["k3"], "text": ["c"],
                                                   "lang": [None]}))
    assert settled(check_inputs(config(tmp_path))) == (pa.string(), {"lang": pa.string()})


def test_first_shard_with_a_value_settles_each_column(tmp_path):
    parquet(tmp_path, "part-00.parquet", pa.table({"id": pa.array([1], pa.int32()),
                                                   "text": ["a"], "lang": [None],
                                                   "n": pa.array([7], pa.int16())}))
    parquet(tmp_path, "part-01.parquet", pa.table({"id": pa.array([2], pa.int64()),
                                                   "text": ["b"], "lang": [3.5],
                                                   "n": ["seven"]}))
    parquet(tmp_path, "part-02.parquet", pa.table({"id": [3], "text": ["c"], "lang": ["en"],
                                                   "n": [8]}))
    inputs = check_inputs(config(tmp_path, keep=("lang", "n")))
    assert settled(inputs) == (pa.int32(), {"lang": pa.float64(), "n": pa.int16()})
    assert [c for c, _ in inputs.keep_types] == ["lang", "n"]  # the configured order


def test_kept_column_null_in_every_shard_is_a_string(tmp_path):
    for i in range(3):
        parquet(tmp_path, f"part-{i:02d}.parquet",
                pa.table({"id": [i], "text": ["t"], "lang": pa.nulls(1)}))
    assert settled(check_inputs(config(tmp_path))) == (pa.int64(), {"lang": pa.string()})


def test_dictionary_string_ids_are_accepted(tmp_path):
    ids = pa.array(["a", "b", "a"]).dictionary_encode()
    parquet(tmp_path, "part-00.parquet", pa.table({"id": ids, "text": ["x", "y", "z"],
                                                   "lang": ["en"] * 3}))
    id_type, _ = settled(check_inputs(config(tmp_path)))
    assert pa.types.is_dictionary(id_type) and id_type.value_type == pa.string()


@pytest.mark.parametrize("ids", [
    pa.array([1.0, 2.0]),
    pa.array([[1], [2]], pa.list_(pa.int64())),
    pa.array([{"k": 1}, {"k": 2}]),
    pa.array([1.5, 2.5]).dictionary_encode(),
], ids=["float", "list", "struct", "dictionary-float"])
def test_parquet_id_that_is_not_integer_string_or_binary_is_an_input_error(tmp_path, ids):
    path = parquet(tmp_path, "part-00.parquet",
                   pa.table({"doc": ids, "text": ["a", "b"], "lang": ["en", "de"]}))
    with pytest.raises(InputError, match="id column 'doc' has type") as info:
        check_inputs(config(tmp_path, id_column="doc"))
    assert str(path) in str(info.value) and "--id-column" in str(info.value)


def test_float_ids_in_a_zero_row_shard_are_not_judged(tmp_path):
    # An empty pandas frame writes float64 columns; without rows it settles nothing.
    parquet(tmp_path, "part-00.parquet",
            pa.table({"id": pa.array([], pa.float64()), "text": pa.array([], pa.string()),
                      "lang": pa.array([], pa.string())}))
    parquet(tmp_path, "part-01.parquet", REAL)
    assert settled(check_inputs(config(tmp_path))) == (pa.int64(), {"lang": pa.string()})


def test_float_ids_after_the_settling_shard_are_left_to_the_readers(tmp_path):
    parquet(tmp_path, "part-00.parquet", REAL)
    parquet(tmp_path, "part-01.parquet", pa.table({"id": [1.5], "text": ["a"],
                                                   "lang": ["en"]}))
    assert settled(check_inputs(config(tmp_path))) == (pa.int64(), {"lang": pa.string()})


# ---------------------------------------------------------------------------------------------
# JSONL: zero-byte files, null values, damaged compressed shards


def test_jsonl_many_zero_byte_files_first_then_int_ids(tmp_path):
    for i in range(MAX_SAMPLED_FILES + 5):  # more empty files than the sampling limit
        jsonl(tmp_path, f"a-{i:03d}.jsonl", data=b"")
    jsonl(tmp_path, "b.jsonl", [{"id": 7, "text": "x", "lang": "en"}])
    inputs = check_inputs(config(tmp_path))
    assert len(inputs.files) == MAX_SAMPLED_FILES + 6
    assert settled(inputs) == (pa.int64(), {"lang": pa.string()})


def test_jsonl_null_values_take_their_types_from_later_shards(tmp_path):
    jsonl(tmp_path, "a.jsonl", data=b"\n\n")  # bytes but no row
    jsonl(tmp_path, "b.jsonl", [{"id": None, "text": "x", "lang": None, "n": None}])
    jsonl(tmp_path, "c.jsonl", [{"id": "k1", "text": "y", "lang": None, "n": 3}])
    jsonl(tmp_path, "d.jsonl", [{"id": 4, "text": "z", "lang": {"a": 1}, "n": "x"}])
    inputs = check_inputs(config(tmp_path, keep=("lang", "n")))
    assert settled(inputs) == (pa.string(), {"lang": JSON_TEXT, "n": pa.int64()})


def test_jsonl_kept_column_never_seen_with_a_value_is_json_text(tmp_path):
    jsonl(tmp_path, "a.jsonl", [{"id": 1, "text": "x"}, {"id": 2, "text": "y", "lang": None}])
    assert settled(check_inputs(config(tmp_path))) == (pa.int64(), {"lang": JSON_TEXT})


def test_jsonl_only_empty_files_settle_defaults(tmp_path):
    jsonl(tmp_path, "a.jsonl", data=b"")
    jsonl(tmp_path, "b.jsonl", data=b"\n")
    assert settled(check_inputs(config(tmp_path))) == (pa.string(), {"lang": JSON_TEXT})


LINES = "".join(json.dumps({"id": i, "text": "x" * 300, "lang": "en"}) + "\n"
                for i in range(2000)).encode()
NEXT = [{"id": "s1", "text": "y", "lang": 5}]  # other types: tells which shard settled them


# ~3 KB lines of random hex: a quarter of the compressed file holds some 40 whole lines, fewer
# than the sample's 100, so sampling reads up to the damage.
_RANDOM = random.Random(0)
LONG_LINES = "".join(json.dumps({"id": i, "text": "%03000x" % _RANDOM.getrandbits(12000),
                                 "lang": "en"}) + "\n" for i in range(200)).encode()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_compressed_first_shard_settles_from_its_readable_lines(tmp_path, compression):
    whole = compress(LONG_LINES, compression, gzip_level=9)
    suffix = ".gz" if compression == "gzip" else ".zst"
    path = jsonl(tmp_path, "a.jsonl" + suffix, data=whole[: len(whole) // 4])
    jsonl(tmp_path, "b.jsonl", NEXT)
    inputs = check_inputs(config(tmp_path))
    assert settled(inputs) == (pa.int64(), {"lang": pa.string()})
    assert inputs.files[0].compression == compression
    # The sample stopped at the damage, with the lines before it.
    records = sample_records(inputs.files[0])
    assert 0 < len(records) < 100 and [r["id"] for r in records] == list(range(len(records)))
    assert inputs.files[0].uri == str(path)


@pytest.mark.parametrize("cut", [10, 40, 200], ids=lambda c: f"first-{c}-bytes")
def test_truncated_gzip_without_a_readable_line_settles_from_the_next_shard(tmp_path, cut):
    jsonl(tmp_path, "a.jsonl.gz", data=gzip.compress(LINES)[:cut])
    jsonl(tmp_path, "b.jsonl", NEXT)
    assert settled(check_inputs(config(tmp_path))) == (pa.string(), {"lang": pa.int64()})


@pytest.mark.parametrize("lines,expected", [
    (LONG_LINES, (pa.int64(), {"lang": pa.string()})),  # lines before the damage
    (LINES, (pa.string(), {"lang": pa.int64()})),  # Arrow drops the one read: the next shard
], ids=["lines-before-the-damage", "next-shard"])
def test_corrupt_gzip_first_shard_is_no_error(tmp_path, lines, expected):
    blob = bytearray(gzip.compress(lines))
    blob[len(blob) // 4] ^= 0xFF
    jsonl(tmp_path, "a.jsonl.gz", data=bytes(blob))
    jsonl(tmp_path, "b.jsonl", NEXT)
    assert settled(check_inputs(config(tmp_path))) == expected


def test_a_kept_column_no_jsonl_record_sampled_has_is_warned_of(tmp_path, caplog):
    """JSON records may leave a key out (a rare one, or one only newer files have), so a kept
    column the sample never met is not refused, but named: it may be a typo."""
    write = lambda name, rows: (tmp_path / "in" / name).write_text(  # noqa: E731
        "".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "in").mkdir()
    write("a.jsonl", [{"id": i, "text": "t"} for i in range(150)] + [{"id": 150, "text": "t",
                                                                     "url": "u"}])
    write("b.jsonl", [{"id": 200, "text": "t", "lang": "en"}])
    with caplog.at_level("WARNING", logger="pipeline.preflight"):
        inputs = check_inputs(config(tmp_path, keep=("lang", "url")))
    assert dict(inputs.keep_types)["lang"] == pa.string()
    (message,) = [r.getMessage() for r in caplog.records]
    assert "'url'" in message and "'lang'" not in message
    assert "first 100 records of the 2 JSONL file(s) sampled (keys seen: id, lang, text)" \
        in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.preflight"):
        check_inputs(config(tmp_path, keep=("lang",)))
    assert not caplog.records
