"""``pipeline/io/sampling.py`` on real local files (no Ray, no network): the pre-flight's
sample of a shard (its columns and their types, the first JSON objects) and the JSON type
rules for ids and kept values."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.io.errors import InputError
from pipeline.io.readers import JSON_TEXT
from pipeline.io.sampling import json_id_type, json_value_type, sample_columns, sample_records
from tests.helpers import input_file, jsonl, sample_parquet, write_bytes


# ---------------------------------------------------------------------------------------------
# sample_columns


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


def test_a_file_that_is_not_what_its_name_says_is_an_input_error(tmp_path):
    path = write_bytes(tmp_path / "a.parquet", b"this is not parquet at all")
    with pytest.raises(InputError, match="not a readable file of its format") as info:
        sample_columns(input_file(path))
    assert "endpoint" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# json_id_type, json_value_type


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


# ---------------------------------------------------------------------------------------------
# sample_records


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
