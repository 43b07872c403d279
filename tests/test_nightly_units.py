"""The nightly job's pure parts, no Ray: content hashes, id buckets, the diff of one bucket
against the previous snapshot, the reuse path of the stages, change counts in the writer, and
the snapshot folder helpers on a local filesystem."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline import snapshots as Snap
from pipeline.jobs import nightly as J
from pipeline.stages import diff as N
from pipeline.io import schema as S
from pipeline.io import writers as W
from pipeline.io.storage import OutputError
from pipeline.model.builder import sample_texts
from pipeline.stages.embed import EncodeStage, TokenizeStage
from pipeline.tokenize import TASK_PREFIXES, add_prefix, task_prefix, text_problem

DIMS = (64, 32)
REPO = Path(__file__).resolve().parents[1]
DOC = TASK_PREFIXES["document"]


# ---------------------------------------------------------------------------------------------
# content_hash


def test_content_hash_is_128_bits_of_sha256_hex():
    import hashlib

    h = N.content_hash(DOC + "hello")
    assert re.fullmatch(r"[0-9a-f]{32}", h)
    assert h == hashlib.sha256((DOC + "hello").encode()).hexdigest()[:32]
    assert N.content_hash(DOC + "hellp") != h  # one character
    assert N.content_hash("hello") != h  # the prefix is part of what is hashed
    assert N.content_hash(TASK_PREFIXES["query"] + "hello") != h
    assert N.content_hash("é") == hashlib.sha256("é".encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# bucket_of

INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(),
             pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]


def _extremes(t: pa.DataType) -> list[int]:
    bits = t.bit_width
    if pa.types.is_signed_integer(t):
        return [-(2 ** (bits - 1)), -1, 0, 1, 2 ** (bits - 1) - 1]
    return [0, 1, 2 ** bits - 1]


@pytest.mark.parametrize("t", INT_TYPES, ids=str)
@pytest.mark.parametrize("buckets", [1, 7, 64, 4096])
def test_bucket_of_integers_in_range_including_extremes(t, buckets):
    values = _extremes(t) + [None, 5, 100]
    got = N.bucket_of(pa.array(values, t), buckets)
    assert got.type == pa.int64() and len(got) == len(values) and got.null_count == 0
    assert all(0 <= b < buckets for b in got.to_pylist())
    assert got[values.index(None)].as_py() == 0  # nulls: bucket 0


def test_bucket_of_same_small_value_same_bucket_in_every_integer_type():
    values = [0, 1, 2, 3, 42, 100, 127]
    want = N.bucket_of(pa.array(values, pa.int64()), 97).to_pylist()
    for t in INT_TYPES:
        assert N.bucket_of(pa.array(values, t), 97).to_pylist() == want, t
    negatives = [-1, -2, -100, -128]
    want = N.bucket_of(pa.array(negatives, pa.int64()), 97).to_pylist()
    for t in (pa.int8(), pa.int16(), pa.int32()):
        assert N.bucket_of(pa.array(negatives, t), 97).to_pylist() == want, t


@pytest.mark.parametrize("arr", [
    pa.array(["a", "b", None, "", "ünïcødé", "x" * 1000]),
    pa.array(["a", None, "c"], pa.large_string()),
    pa.array([b"\x00\xff", None, b""], pa.binary()),
    pa.array([b"ab", None], pa.large_binary()),
    pa.array([b"abcd", None], pa.binary(4)),
    pa.array(["a", "b", "a", None]).dictionary_encode(),
    pa.array(["a", None], pa.string_view()),
], ids=lambda a: str(a.type))
def test_bucket_of_strings_and_bytes(arr):
    got = N.bucket_of(arr, 13)
    assert got.type == pa.int64() and len(got) == len(arr) and got.null_count == 0
    assert all(0 <= b < 13 for b in got.to_pylist())
    for v, b in zip(arr.to_pylist(), got.to_pylist()):
        if v is None:
            assert b == 0
    assert got.to_pylist() == N.bucket_of(arr, 13).to_pylist()


def test_bucket_of_string_layouts_agree():
    values = ["a", "bb", "ccc", None, "ü"]
    want = N.bucket_of(pa.array(values, pa.string()), 31).to_pylist()
    assert N.bucket_of(pa.array(values, pa.large_string()), 31).to_pylist() == want
    assert N.bucket_of(pa.array(values).dictionary_encode(), 31).to_pylist() == want


def test_bucket_of_dictionary_encoded_integer_ids():
    # The pre-flight accepts dictionary-encoded ids whose values are integers.
    ids = pa.array([3, -7, 3, None, 10 ** 6], pa.int64()).dictionary_encode()
    got = N.bucket_of(ids, 16).to_pylist()
    assert all(0 <= b < 16 for b in got) and got[0] == got[2] and got[3] == 0


@pytest.mark.parametrize("t", [pa.int64(), pa.string()], ids=str)
def test_bucket_of_chunked_equals_concatenated(t):
    values = list(range(50)) if t == pa.int64() else [f"id-{i}" for i in range(50)]
    values[7] = None
    whole = N.bucket_of(pa.array(values, t), 11).to_pylist()
    chunked = pa.chunked_array([pa.array(values[:10], t), pa.array([], t),
                                pa.array(values[10:], t)])
    assert N.bucket_of(chunked, 11).to_pylist() == whole
    assert N.bucket_of(pa.chunked_array([], t), 11).to_pylist() == []


def test_bucket_of_spreads_ids_over_buckets():
    n, buckets = 20000, 16
    for ids in (pa.array(range(n), pa.int64()),  # sequential ids: the common case
                pa.array(range(0, n * 1024, 1024), pa.int64()),  # strided
                pa.array([f"doc-{i}" for i in range(n)])):
        counts = np.bincount(N.bucket_of(ids, buckets).to_numpy(), minlength=buckets)
        assert counts.min() > 0.85 * n / buckets and counts.max() < 1.15 * n / buckets, counts


def test_bucket_of_is_the_same_in_another_process():
    code = (
        "import json, pyarrow as pa\n"
        "from pipeline.stages.diff import bucket_of\n"
        "ints = pa.array([0, 1, -1, 2**63 - 1, -2**63, 12345, None], pa.int64())\n"
        "strs = pa.array(['a', 'doc-1', 'ü', None, ''])\n"
        "bins = pa.array([b'\\x00', b'xyz', None])\n"
        "print(json.dumps([bucket_of(a, 1000).to_pylist() for a in (ints, strs, bins)]))\n"
    )
    ints = pa.array([0, 1, -1, 2**63 - 1, -2**63, 12345, None], pa.int64())
    strs = pa.array(["a", "doc-1", "ü", None, ""])
    bins = pa.array([b"\x00", b"xyz", None])
    here = [N.bucket_of(a, 1000).to_pylist() for a in (ints, strs, bins)]
    for seed in ("0", "12345"):  # str hashing differs between these processes
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                             text=True, check=True, env={"PYTHONHASHSEED": seed,
                                                         "PYTHONPATH": str(REPO)})
        assert json.loads(out.stdout) == here


# ---------------------------------------------------------------------------------------------
# hash_rows


def reader_rows(ids, texts, *, sources=None, rows=None, rejects=None, id_type=None,
                text_type=pa.string()) -> pa.Table:
    """A reader block as the nightly graph sees it (read_files appends ``__unit``)."""
    n = len(ids)
    sources = sources or ["s3://in/a.jsonl"] * n
    rows = rows if rows is not None else list(range(1, n + 1))
    texts = texts if isinstance(texts, pa.Array) else pa.array(texts, text_type)
    return pa.table({
        S.ID: pa.array(ids, id_type), S.TEXT: texts,
        S.SOURCE: pa.array(sources, pa.string()), S.ROW: pa.array(rows, pa.int64()),
        S.FILE_ROWS: pa.nulls(n, pa.int64()), S.FILE_ROWSUM: pa.nulls(n, pa.int64()),
        S.REJECT: pa.array(rejects or [None] * n, pa.string()),
        S.EXCERPT: pa.array([None if r is None else f"raw {i}" for i, r in
                             enumerate(rejects or [None] * n)], pa.string()),
        "lang": pa.array([f"l{i}" for i in range(n)], pa.string()),
        S.UNIT: pa.array(sources, pa.string()),
    })


class _SurrogateScalar(pa.ExtensionScalar):
    def as_py(self, **kwargs):
        v = self.value
        return None if v is None or not v.is_valid else v.as_py().decode("utf-8", "surrogatepass")


class _SurrogateText(pa.ExtensionType):
    """Text that reads back as Python strings with lone surrogates (Arrow strings cannot hold
    them; this is how one reaches a stage's ``to_pylist`` in a test)."""

    def __init__(self):
        super().__init__(pa.binary(), "test.surrogate_text")

    def __arrow_ext_serialize__(self):
        return b""

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type, serialized):
        return cls()

    def __arrow_ext_scalar_class__(self):
        return _SurrogateScalar


def surrogate_texts(values) -> pa.Array:
    raw = [None if v is None else v.encode("utf-8", "surrogatepass") for v in values]
    return pa.ExtensionArray.from_storage(_SurrogateText(), pa.array(raw, pa.binary()))


@pytest.fixture(scope="module")
def tokenizer_json(tiny_model_dir) -> str:
    return (tiny_model_dir / "tokenizer.json").read_text()


def test_hash_rows_rejects_like_the_tokenizer(tokenizer_json):
    texts = ["good", "", "   \n\t", None, "lone \ud800 surrogate", "x", "fine too", "\udfff"]
    ids = [1, 2, 3, 4, 5, None, 7, 8]
    table = reader_rows(ids, surrogate_texts(texts))
    out = N.hash_rows(table, "document", 8)
    want = ["id is null" if i is None else text_problem(t) for i, t in zip(ids, texts)]
    assert out[S.REJECT].to_pylist() == want
    assert want[1] == "text is empty or whitespace only" and "lone surrogate" in want[4]
    tokenized = TokenizeStage(tokenizer_json, "document")(table)
    assert out[S.REJECT].to_pylist() == tokenized[S.REJECT].to_pylist()
    assert out[S.EXCERPT].to_pylist() == tokenized[S.EXCERPT].to_pylist()
    hashes = out[S.HASH].to_pylist()
    assert [h is None for h in hashes] == [r is not None for r in want]
    assert hashes[0] == N.content_hash(DOC + "good")
    assert out.num_rows == table.num_rows


def test_hash_rows_rejects_non_string_texts(tokenizer_json):
    table = reader_rows([1, 2, 3], pa.array([5, None, 7], pa.int64()))
    out = N.hash_rows(table, "query", 4)
    assert out[S.REJECT].to_pylist() == ["text is int, not str", "text is null",
                                         "text is int, not str"]
    assert out[S.HASH].null_count == 3
    tokenized = TokenizeStage(tokenizer_json, "query")(table)
    assert out[S.REJECT].to_pylist() == tokenized[S.REJECT].to_pylist()


def test_hash_rows_keeps_earlier_rejects_untouched():
    table = reader_rows([1, None, 3, 4], ["", "text", "ok", "fine"],
                        rejects=["malformed JSON: x", "duplicate id: first seen at row 1", None,
                                 None])
    out = N.hash_rows(table, "document", 4)
    assert out[S.REJECT].to_pylist() == ["malformed JSON: x", "duplicate id: first seen at row 1",
                                         None, None]
    assert out[S.EXCERPT].to_pylist() == ["raw 0", "raw 1", None, None]
    assert out[S.HASH].to_pylist() == [None, None, N.content_hash(DOC + "ok"),
                                       N.content_hash(DOC + "fine")]


@pytest.mark.parametrize("task", sorted(TASK_PREFIXES))
def test_hash_rows_hashes_the_prefixed_text(task):
    texts = ["plain text", "search_query: already prefixed", "clustering: other prefix",
             "search_document:no space", "ünïcødé ✓"]
    table = reader_rows(list(range(len(texts))), texts)
    out = N.hash_rows(table, task, 5)
    prefix = task_prefix(task)
    assert out[S.HASH].to_pylist() == [N.content_hash(add_prefix(t, prefix)) for t in texts]
    assert out[S.HASH].to_pylist()[1] == N.content_hash("search_query: already prefixed")
    assert out[S.HASH].to_pylist()[3] == N.content_hash(prefix + "search_document:no space")


def test_hash_rows_adds_buckets_and_keeps_every_column():
    ids = [10, 11, None, 13]
    table = reader_rows(ids, ["a", "b", "c", "d"])
    out = N.hash_rows(table, "document", 3)
    assert out[S.BUCKET].to_pylist() == N.bucket_of(pa.array(ids, pa.int64()), 3).to_pylist()
    assert out[S.BUCKET].to_pylist()[2] == 0
    assert set(out.column_names) == set(table.column_names) | {S.HASH, S.BUCKET}
    for c in (S.ID, S.SOURCE, S.ROW, S.UNIT, "lang"):
        assert out[c].to_pylist() == table[c].to_pylist()
    assert out[S.REJECT].to_pylist() == [None, None, "id is null", None]
    # Texts leave as large strings; a rejected row's is dropped (its excerpt is kept).
    assert out[S.TEXT].type == pa.large_string()
    assert out[S.TEXT].to_pylist() == ["a", "b", None, "d"]


def test_every_side_of_the_shuffle_has_the_diff_schema():
    # Ray's hash shuffle concatenates a partition's tables without promotion: today's rows,
    # the previous snapshot's and the resumed snapshot's must share one schema exactly.
    from pipeline.io.readers import ReadSpec

    d = diff(True, output_dtype="float16")
    spec = ReadSpec("id", "text", ("lang",), pa.int64(), keep_types=(("lang", pa.string()),))
    d = N.dataclasses.replace(d, schema=N.diff_schema(spec, d))
    today = N.hash_rows(reader_rows([1, 2], ["a", "b"]), "document", 1, d.schema)
    prev = N.conform(previous_rows([1], [h("a")], dtype="float16"), d.schema)
    seen = N.conform(pa.table({S.ID: pa.array([5], pa.int64()), S.SEEN: [True],
                               S.SOURCE: ["s"], S.BUCKET: pa.array([0], pa.int64())}), d.schema)
    assert today.schema == prev.schema == seen.schema == d.schema
    combined = pa.concat_tables([today, prev, seen])  # what the shuffle's reduce does
    out = run_diff(combined, d)
    assert out[S.CHANGE].to_pylist() == ["unchanged", "new"]
    with pytest.raises(ValueError, match="not part of the diff's schema"):
        N.conform(pa.table({"stray": [1]}), d.schema)


# ---------------------------------------------------------------------------------------------
# diff_bucket


def vector(seed: int, width: int, dtype=np.float32) -> list[float]:
    return np.random.default_rng(seed).standard_normal(width).astype(dtype).tolist()


def today_rows(ids, texts, **kwargs) -> pa.Table:
    return N.hash_rows(reader_rows(ids, texts, **kwargs), "document", 1)


def previous_rows(ids, hashes, *, id_type=None, dtype="float32", seeds=None) -> pa.Table:
    """The previous snapshot's rows as ``read_previous`` yields them (vectors: seeds)."""
    seeds = seeds if seeds is not None else list(range(1000, 1000 + len(ids)))
    np_dtype = np.float16 if dtype == "float16" else np.float32
    ids = pa.array(ids, id_type)
    out = {S.ID: ids, S.PREV_HASH: pa.array(hashes, pa.string())}
    for d in DIMS:
        out[S.prev_embedding(d)] = pa.array([vector(s, d, np_dtype) for s in seeds],
                                            S.embedding_type(d, dtype))
    out[S.BUCKET] = N.bucket_of(ids, 1)
    return pa.table(out)


def union(*tables: pa.Table) -> pa.Table:
    """Ray's union then shuffle: one table, the other side's columns filled with nulls."""
    return pa.concat_tables(tables, promote_options="default")


def diff(reuse=True, id_type=pa.int64(), output_dtype="float32") -> N.Diff:
    return N.Diff(task="document", buckets=1, previous_files=(), id_column="id",
                  id_type=id_type, dims=DIMS, reuse=reuse, output_dtype=output_dtype)


def run_diff(table: pa.Table, d: N.Diff) -> pa.Table:
    out = list(N.diff_bucket(table, d))
    assert len(out) == 1
    return out[0]


def h(text: str) -> str:
    return N.content_hash(add_prefix(text, DOC))


def by_id(out: pa.Table, column: str) -> dict:
    return dict(zip(out[S.ID].to_pylist(), out[column].to_pylist()))


@pytest.mark.parametrize("kind", ["int", "str"])
def test_diff_classifies_new_changed_unchanged_and_drops_deleted(kind):
    key = (lambda i: i) if kind == "int" else (lambda i: f"doc-{i}")
    today = today_rows([key(i) for i in (1, 2, 3, 4)], ["same", "edited", "brand new", "  "])
    prev = previous_rows([key(i) for i in (5, 2, 1, 4)], [h("gone"), h("before"), h("same"),
                                                          h("  ")], seeds=[5, 2, 1, 4])
    out = run_diff(union(today, prev), diff(True))
    assert out[S.ID].to_pylist() == [key(i) for i in (1, 2, 3, 4)]  # deleted id 5 dropped
    assert by_id(out, S.CHANGE) == {key(1): "unchanged", key(2): "changed", key(3): "new",
                                    key(4): None}
    assert by_id(out, S.REUSE) == {key(1): True, key(2): False, key(3): False, key(4): False}
    assert by_id(out, S.REJECT)[key(4)] == "text is empty or whitespace only"
    for d in DIMS:
        got = by_id(out, S.prev_embedding(d))
        assert got == {key(1): vector(1, d), key(2): None, key(3): None, key(4): None}
        assert out.schema.field(S.prev_embedding(d)).type == S.embedding_type(d, "float32")
    assert S.PREV_HASH not in out.column_names and S.BUCKET not in out.column_names
    for c in (S.TEXT, S.SOURCE, S.ROW, S.UNIT, S.HASH, "lang"):
        assert out[c].to_pylist() == today[c].to_pylist()


def test_diff_without_reuse_has_no_previous_vectors():
    today = today_rows([1, 2, 3], ["same", "edited", "new"])
    prev = previous_rows([1, 2], [h("same"), h("before")])
    out = run_diff(union(today, prev), diff(False))
    assert out[S.CHANGE].to_pylist() == ["unchanged", "changed", "new"]
    assert out[S.REUSE].to_pylist() == [False, False, False]
    assert not [c for c in out.column_names if c.startswith("__prev_")]


@pytest.mark.parametrize("reuse", [True, False])
def test_diff_of_a_bucket_without_previous_rows(reuse):
    today = today_rows([1, 2, 3], ["a", "", "c"])  # no __prev_* columns at all
    out = run_diff(today, diff(reuse))
    assert out[S.CHANGE].to_pylist() == ["new", None, "new"]
    assert out[S.REUSE].to_pylist() == [False, False, False]
    prev_cols = [c for c in out.column_names if c.startswith("__prev_")]
    if reuse:
        assert prev_cols == [S.prev_embedding(d) for d in DIMS]
        for d in DIMS:
            assert out[S.prev_embedding(d)].null_count == 3
    else:
        assert prev_cols == []


def test_diff_of_a_bucket_with_only_previous_rows_yields_nothing():
    # As after a union whose other side had rows: today's columns are there, all null.
    today = today_rows([1], ["x"]).slice(0, 0)
    assert list(N.diff_bucket(union(today, previous_rows([1, 2], [h("a"), h("b")])),
                              diff(True))) == []


def test_diff_of_a_bucket_with_only_previous_rows_and_none_of_todays_columns():
    # What Ray 2.60's hash shuffle hands map_groups for a partition that only previous-snapshot
    # blocks reached (checked with ray.data union -> groupby(num_partitions).map_groups): the
    # columns of today's rows (__unit, __reject, ...) are absent, not null.
    prev = previous_rows([1, 2], [h("a"), h("b")])
    assert list(N.diff_bucket(prev, diff(True))) == []
    assert list(N.diff_bucket(prev.drop_columns([S.prev_embedding(d) for d in DIMS]),
                              diff(False))) == []


def test_diff_rejected_rows_pass_through_untouched():
    today = today_rows([1, 2, 3], ["x", "y", "z"],
                       rejects=["malformed JSON: q", None, "duplicate id: first seen at row 1"])
    prev = previous_rows([1, 2, 3], [h("x"), h("y"), h("z")], seeds=[1, 2, 3])
    out = run_diff(union(today, prev), diff(True))
    assert out[S.REJECT].to_pylist() == ["malformed JSON: q", None,
                                         "duplicate id: first seen at row 1"]
    assert out[S.EXCERPT].to_pylist() == ["raw 0", None, "raw 2"]
    assert out[S.CHANGE].to_pylist() == [None, "unchanged", None]
    assert out[S.REUSE].to_pylist() == [False, True, False]
    assert out[S.prev_embedding(64)].to_pylist() == [None, vector(2, 64), None]


def test_diff_rejects_ids_repeated_across_files_keeping_the_first_by_file_and_row():
    # id 7: three copies; the first by (source, row) is f1 row 2, whatever the table order.
    # id 8: its earliest row was rejected already, so f1 row 9 is the one kept.
    # id 9: twice in one bucket but in the same place order: f0 row 5 first.
    ids = [7, 8, 7, 9, 8, 7, 9, 8]
    sources = ["s3://in/f2", "s3://in/f1", "s3://in/f1", "s3://in/f1", "s3://in/f1",
               "s3://in/f1", "s3://in/f0", "s3://in/f2"]
    rows = [0, 1, 5, 3, 9, 2, 5, 0]
    texts = ["t7a", "", "t7b", "t9a", "t8a", "t7c", "t9b", "t8b"]
    today = today_rows(ids, texts, sources=sources, rows=rows)
    out = run_diff(union(today, previous_rows([7], [h("t7c")])), diff(True))
    reasons = out[S.REJECT].to_pylist()
    assert reasons[5] is None and reasons[4] is None and reasons[6] is None  # the kept ones
    assert reasons[1] == "text is empty or whitespace only"
    for i, (src, row) in {0: ("s3://in/f1", 2), 2: ("s3://in/f1", 2), 7: ("s3://in/f1", 9),
                          3: ("s3://in/f0", 5)}.items():
        assert reasons[i].startswith("duplicate id"), reasons[i]
        assert re.search(rf"{re.escape(src)} row {row}\b", reasons[i]), reasons[i]
    assert out[S.CHANGE].to_pylist() == [None, None, None, None, "new", "unchanged", "new", None]
    assert out[S.REUSE].to_pylist() == [False] * 5 + [True, False, False]
    assert out.num_rows == today.num_rows


def test_diff_repeated_string_ids_and_first_previous_of_a_duplicated_previous_id():
    today = today_rows(["a", "b", "a"], ["one", "two", "one"],
                       sources=["s3://in/x", "s3://in/x", "s3://in/w"], rows=[1, 2, 7])
    # The previous snapshot holds "a" twice (it should not, but index_in takes the first).
    prev = previous_rows(["a", "b", "a"], [h("one"), h("two"), h("other")], seeds=[11, 12, 13])
    out = run_diff(union(today, prev), diff(True, pa.string()))
    assert out[S.REJECT].to_pylist()[0].startswith("duplicate id: also in s3://in/w row 7")
    assert out[S.CHANGE].to_pylist() == [None, "unchanged", "unchanged"]
    assert out[S.prev_embedding(32)].to_pylist() == [None, vector(12, 32), vector(11, 32)]
    # The other way round: the first previous row of "a" has another hash.
    prev = previous_rows(["a", "a", "b"], [h("other"), h("one"), h("two")], seeds=[13, 11, 12])
    out = run_diff(union(today, prev), diff(True, pa.string()))
    assert out[S.CHANGE].to_pylist() == [None, "unchanged", "changed"]
    assert out[S.prev_embedding(32)].to_pylist() == [None, vector(12, 32), None]


def test_diff_with_dictionary_encoded_string_ids():
    # The pre-flight accepts dictionary-encoded string ids (test_preflight_types), and
    # read_previous casts the previous ids to today's type.
    ids = pa.array(["a", "b", "c", "a"]).dictionary_encode()
    today = today_rows(ids, ["one", "two", "three", "one"],
                       sources=["s3://in/x"] * 3 + ["s3://in/y"])
    prev = previous_rows(pa.array(["a", "b"]).dictionary_encode(), [h("one"), h("old")])
    out = run_diff(union(today, prev), diff(True, ids.type))
    assert out[S.CHANGE].to_pylist() == ["unchanged", "changed", "new", None]
    assert out[S.REJECT].to_pylist()[3].startswith("duplicate id: also in s3://in/x row 1")


def test_diff_previous_vector_columns_have_one_type_in_every_bucket():
    # --output-dtype float16: the previous snapshot's vectors are float16. A bucket without
    # previous rows must give the same column type, or blocks of different buckets cannot be
    # concatenated into one tokenizer batch (Ray 2.60's concat refuses float16 vs float32).
    today = today_rows([1, 2], ["a", "b"])
    with_prev = run_diff(union(today, previous_rows([1], [h("a")], dtype="float16")),
                         diff(True, output_dtype="float16"))
    without = run_diff(today, diff(True, output_dtype="float16"))
    for d in DIMS:
        assert with_prev.schema.field(S.prev_embedding(d)).type == \
            without.schema.field(S.prev_embedding(d)).type, d


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["int", "str"])
@pytest.mark.parametrize("reuse", [True, False])
def test_diff_matches_a_row_by_row_reference(seed, kind, reuse):
    rng = np.random.default_rng(seed)
    key = (lambda i: int(i)) if kind == "int" else (lambda i: f"id-{i}")
    pool = ["alpha", "beta", "gamma", "", "search_query: delta", "epsilon"]
    ids, texts, sources, rows, rejects = [], [], [], [], []
    for f in range(3):
        for r in range(int(rng.integers(0, 25))):
            ids.append(key(rng.integers(0, 30)))
            texts.append(pool[int(rng.integers(0, len(pool)))])
            sources.append(f"s3://in/part-{f}.jsonl")
            rows.append(r + 1)
            rejects.append("malformed JSON: z" if rng.random() < 0.1 else None)
    if not ids:
        ids, texts, sources, rows, rejects = [key(0)], ["alpha"], ["s3://in/p"], [1], [None]
    today = today_rows(ids, texts, sources=sources, rows=rows, rejects=rejects)
    n_prev = int(rng.integers(0, 40))
    prev_ids = [key(rng.integers(0, 40)) for _ in range(n_prev)]
    prev_hashes = [h(pool[int(rng.integers(0, len(pool)))]) if rng.random() < 0.8 else None
                   for _ in range(n_prev)]
    seeds = list(range(500, 500 + n_prev))
    prev = previous_rows(prev_ids, prev_hashes, seeds=seeds, id_type=today[S.ID].type)
    table = union(today, prev)
    table = table.take(pa.array(rng.permutation(table.num_rows)))  # no order across the shuffle

    # The reference, one row at a time.
    hashed = today.to_pylist()
    first = {}
    for i in sorted((i for i, r in enumerate(hashed) if r[S.REJECT] is None),
                    key=lambda i: (hashed[i][S.SOURCE], hashed[i][S.ROW])):
        first.setdefault(hashed[i][S.ID], i)
    prev_first = {}
    for j, pid in enumerate(prev_ids):
        prev_first.setdefault(pid, j)
    want = {}
    for i, r in enumerate(hashed):
        reason, change, vec = r[S.REJECT], None, {d: None for d in DIMS}
        if reason is None and first[r[S.ID]] != i:
            f = hashed[first[r[S.ID]]]
            reason = f"duplicate id: also in {f[S.SOURCE]} row {f[S.ROW]} "
        elif reason is None:
            j = prev_first.get(r[S.ID])
            change = "new" if j is None else \
                "unchanged" if prev_hashes[j] == r[S.HASH] else "changed"
            if change == "unchanged":
                vec = {d: vector(seeds[j], d) for d in DIMS}
        want[(r[S.SOURCE], r[S.ROW])] = (reason, change, vec)

    out = run_diff(table, diff(reuse, today[S.ID].type))
    assert out.num_rows == today.num_rows
    got = out.to_pylist()
    assert sorted((r[S.SOURCE], r[S.ROW]) for r in got) == sorted(want)
    for r in got:
        reason, change, vec = want[(r[S.SOURCE], r[S.ROW])]
        if reason is not None and reason.startswith("duplicate id"):
            assert r[S.REJECT].startswith(reason), (r[S.REJECT], reason)
        else:
            assert r[S.REJECT] == reason
        assert r[S.CHANGE] == change
        assert r[S.REUSE] == (reuse and change == "unchanged")
        for d in DIMS:
            if reuse:
                assert r[S.prev_embedding(d)] == (vec[d] if change == "unchanged" else None)
            else:
                assert S.prev_embedding(d) not in r


# ---------------------------------------------------------------------------------------------
# The stages' reuse path (the tiny random-weight model, on CPU)


@pytest.fixture(scope="module")
def encode_stage(tiny_model_dir) -> EncodeStage:
    return EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                       dims=DIMS, output_dtype="float32", max_tokens_per_batch=None)


def reuse_table(reuse: list[bool], *, seeds=None, dtype="float32", null_prev=()) -> pa.Table:
    n = len(reuse)
    texts = sample_texts()[:n]
    table = reader_rows(list(range(100, 100 + n)), texts)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    table = table.append_column(S.REUSE, pa.array(reuse, pa.bool_()))
    for d in DIMS:
        prev = [vector(1000 + i, d, np_dtype) if reuse[i] and i not in null_prev else None
                for i in range(n)]
        table = table.append_column(S.prev_embedding(d), pa.array(prev, S.embedding_type(d, dtype)))
    return table


def stage_vectors(out: pa.Table, width: int) -> list:
    return out[f"embedding_{width}"].to_pylist()


def test_reused_rows_are_not_tokenized_or_encoded(tokenizer_json, encode_stage):
    reuse = [False, True, False, True, True, False, False]
    table = reuse_table(reuse)
    tokenized = TokenizeStage(tokenizer_json, "document")(table)
    lengths = tokenized[S.NUM_TOKENS].to_pylist()
    assert [n == 0 for n in lengths] == reuse
    assert [len(t) for t in tokenized[S.TOKENS].to_pylist()] == lengths
    assert tokenized[S.REJECT].null_count == len(reuse)
    out = encode_stage(tokenized)
    assert not [c for c in out.column_names if c.startswith("__prev_")]
    plain = encode_stage(TokenizeStage(tokenizer_json, "document")(
        table.drop_columns([S.REUSE] + [S.prev_embedding(d) for d in DIMS])))
    for d in DIMS:
        got, fresh = stage_vectors(out, d), stage_vectors(plain, d)
        assert out.schema.field(f"embedding_{d}").type == S.embedding_type(d, "float32")
        for i, r in enumerate(reuse):
            if r:
                assert got[i] == vector(1000 + i, d)  # exactly, not re-normalised
            else:
                np.testing.assert_allclose(got[i], fresh[i], atol=1e-5, rtol=0)
    assert [g == 0 for g in out[S.GRID_TOKENS].to_pylist()] == reuse


def test_a_window_of_only_reused_rows(tokenizer_json, encode_stage):
    table = reuse_table([True, True, True])
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    for d in DIMS:
        assert stage_vectors(out, d) == [vector(1000 + i, d) for i in range(3)]


def test_reuse_flag_on_a_rejected_row_keeps_it_rejected(tokenizer_json, encode_stage):
    table = reuse_table([True, False])
    table = table.set_column(table.schema.get_field_index(S.REJECT), S.REJECT,
                             pa.array(["malformed JSON: x", None], pa.string()))
    out = encode_stage(TokenizeStage(tokenizer_json, "document")(table))
    assert out[S.REJECT].to_pylist() == ["malformed JSON: x", None]
    for d in DIMS:
        assert out[f"embedding_{d}"].is_null().to_pylist() == [True, False]


def test_a_reused_row_without_a_previous_vector_raises(tokenizer_json, encode_stage):
    table = reuse_table([False, True, True], null_prev=(2,))
    with pytest.raises(ValueError, match="marked for reuse have no earlier embedding"):
        encode_stage(TokenizeStage(tokenizer_json, "document")(table))


def test_reuse_with_float16_output(tokenizer_json, tiny_model_dir):
    stage = EncodeStage(str(tiny_model_dir), revision=None, device="cpu", dtype="float32",
                        dims=DIMS, output_dtype="float16", max_tokens_per_batch=None)
    table = reuse_table([True, False], dtype="float16")
    out = stage(TokenizeStage(tokenizer_json, "document")(table))
    for d in DIMS:
        assert out.schema.field(f"embedding_{d}").type == S.embedding_type(d, "float16")
        assert stage_vectors(out, d)[0] == vector(1000, d, np.float16)
        assert stage_vectors(out, d)[1] is not None


# ---------------------------------------------------------------------------------------------
# The writer: change counts and the content_hash column


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
    for d in DIMS:
        cols[f"embedding_{d}"] = pa.array([None if r else vector(i, d) for i, r in
                                           enumerate(rejects)], S.embedding_type(d, "float32"))
    return pa.table(cols)


def output_spec(extra=((N.HASH_COLUMN, S.HASH),)) -> W.OutputSpec:
    return W.OutputSpec(id_column="id", keep_columns=("lang",), dims=DIMS,
                        output_dtype="float32", metadata={"task": "document"},
                        extra_columns=extra)


def test_split_rows_writes_the_content_hash_and_counts_changes():
    table = encoded_rows(
        changes=["new", "changed", "unchanged", "unchanged", None, "new"],
        reuse=[False, False, True, False, False, False],
        rejects=[None, None, None, None, "text is null", None],
        hashes=["h1", "h2", "h3", "h4", None, "h6"])
    embedded, rejects, stats = W.split_rows(table, output_spec())
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
    assert W.change_stats(table.drop_columns([S.CHANGE, S.REUSE])) == {}
    assert W.change_stats(table.slice(0, 0)) == {"rows_new": 0, "rows_changed": 0,
                                                 "rows_unchanged": 0, "rows_reused": 0}
    embedded, _, stats = W.split_rows(table.drop_columns([S.CHANGE, S.REUSE, S.HASH]),
                                      output_spec(()))
    assert "content_hash" not in embedded.column_names and "rows_new" not in stats


# ---------------------------------------------------------------------------------------------
# Snapshot folders (local filesystem)

T0 = datetime.datetime(2026, 3, 1, 2, 30, 15, tzinfo=datetime.timezone.utc)


def snap(seconds: int, suffix: str = "") -> str:
    return "snapshot-" + (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y%m%dT%H%M%SZ") \
        + suffix


def test_new_snapshot_name_orders_runs():
    first = Snap.new_snapshot_name(set(), T0)
    assert first == "snapshot-20260301T023015Z" and Snap.SNAPSHOT_RE.match(first)
    later = Snap.new_snapshot_name({first}, T0 + datetime.timedelta(seconds=1))
    assert later == snap(1)
    names = [first]
    for _ in range(12):  # the same second again and again: the next free seconds
        names.append(Snap.new_snapshot_name(set(names), T0))
    assert names[1] == snap(1) and names[12] == snap(12)
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(Snap.SNAPSHOT_RE.match(n) for n in names)


def test_new_snapshot_name_when_the_clock_goes_back():
    existing = {snap(0), snap(3600)}
    name = Snap.new_snapshot_name(existing, T0 + datetime.timedelta(seconds=60))
    assert name == snap(3601) and Snap.SNAPSHOT_RE.match(name)
    again = Snap.new_snapshot_name(existing | {name}, T0)
    assert again == snap(3602)


def test_new_snapshot_name_after_older_suffixed_names_stays_sortable_and_fresh():
    existing = {snap(0)} | {snap(0, f"-{k:03d}") for k in range(2, 1000)}
    name = Snap.new_snapshot_name(existing, T0)
    assert name not in existing and name > max(existing), name
    assert Snap.new_snapshot_name(existing | {name}, T0) > name


def put(root: Path, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def run_file(root: Path, name: str, base: str | None) -> None:
    put(root, f"{name}/_manifest/_run.json",
        json.dumps({"identity": {"task": "document", "nightly": {"base": base}}}).encode())


def complete(root: Path, name: str, base: str | None = None) -> None:
    run_file(root, name, base)
    put(root, f"{name}/part-a.parquet")
    put(root, f"{name}/_rejects/part-b.parquet")
    put(root, f"{name}/_summary.json", b"{}")


def unfinished(root: Path, name: str, base: str | None = None) -> None:
    run_file(root, name, base)
    put(root, f"{name}/part-a.parquet")


@pytest.fixture()
def local(tmp_path):
    return fsspec.filesystem("file"), tmp_path, str(tmp_path)


def test_read_latest(local):
    fs, root, path = local
    assert Snap.read_latest(fs, path) is None
    put(root, "_LATEST", (snap(0) + "\n").encode())
    assert Snap.read_latest(fs, path) == snap(0)
    put(root, "_LATEST", (snap(0, "-002")).encode())
    assert Snap.read_latest(fs, path) == snap(0, "-002")
    for junk in (b"", b"hello\n", b"snapshot-2026\n", b"../snapshot-20260301T023015Z",
                 b"snapshot-20260301T023015Z\nmore"):
        put(root, "_LATEST", junk)
        with pytest.raises(OutputError, match="not a snapshot name"):
            Snap.read_latest(fs, path)


def test_read_latest_of_binary_junk_is_an_output_error(local):
    fs, root, path = local
    put(root, "_LATEST", b"\xff\xfe\x00junk")
    with pytest.raises(OutputError):
        Snap.read_latest(fs, path)


def test_list_snapshots(local):
    fs, root, path = local
    assert Snap.list_snapshots(fs, str(root / "missing")) == {}
    assert Snap.list_snapshots(fs, path) == {}
    complete(root, snap(0))
    unfinished(root, snap(10))
    put(root, "_LATEST", snap(0).encode())
    put(root, "other/_summary.json")
    put(root, "snapshot-bad/_summary.json")
    put(root, "notes.txt")
    put(root, f"{snap(20)}/_rejects/_summary.json")  # a summary deeper down is not its summary
    put(root, f"{snap(20)}/part-x.parquet")
    assert Snap.list_snapshots(fs, path) == {snap(0): True, snap(10): False, snap(20): False}
    assert Snap.list_snapshots(fs, path + "/") == Snap.list_snapshots(fs, path)


def test_a_snapshot_killed_before_its_first_part_file_is_seen(local):
    # run() writes _manifest/_run.json first; a run killed before any part file leaves only
    # that (a folder whose files are all two levels down).
    fs, root, path = local
    complete(root, snap(0))
    run_file(root, snap(10), snap(0))
    assert Snap.list_snapshots(fs, path) == {snap(0): True, snap(10): False}
    assert Snap.unfinished_snapshot(fs, path, Snap.list_snapshots(fs, path), snap(0)) == snap(10)
    complete(root, snap(20), snap(0))
    assert snap(10) in Snap.prune(fs, path, snap(20), keep=2)


def test_unfinished_snapshot_picks_the_newest_on_the_same_base(local):
    fs, root, path = local
    base = snap(100)
    complete(root, base)
    unfinished(root, snap(50), base)  # older than its base: not today's run
    unfinished(root, snap(110), base)
    unfinished(root, snap(120), base)  # the newest on this base
    unfinished(root, snap(130), snap(10))  # another base
    unfinished(root, snap(140), None)  # a first run's
    put(root, f"{snap(150)}/part-a.parquet")  # no run file
    put(root, f"{snap(160)}/_manifest/_run.json", b"not json")
    put(root, f"{snap(170)}/_manifest/_run.json", b'{"other": 1}')
    complete(root, snap(180), base)  # finished: nothing to resume
    snapshots = Snap.list_snapshots(fs, path)
    assert Snap.unfinished_snapshot(fs, path, snapshots, base) == snap(120)
    assert Snap.unfinished_snapshot(fs, path, snapshots, None) == snap(140)
    assert Snap.unfinished_snapshot(fs, path, snapshots, snap(10)) == snap(130)
    assert Snap.unfinished_snapshot(fs, path, snapshots, snap(180)) is None
    assert Snap.unfinished_snapshot(fs, path, {}, base) is None


def test_publish_replaces_latest_atomically(local):
    fs, root, path = local
    Snap.publish(fs, path, snap(0))
    assert (root / "_LATEST").read_text() == snap(0) + "\n"
    assert Snap.read_latest(fs, path) == snap(0)
    Snap.publish(fs, path, snap(5, "-002"))
    assert Snap.read_latest(fs, path) == snap(5, "-002")
    assert sorted(p.name for p in root.iterdir()) == ["_LATEST"]  # no temporary file left


def test_prune_keeps_the_newest_complete_and_newer_runs(local):
    fs, root, path = local
    names = [snap(i * 10) for i in range(8)]
    complete(root, names[0])
    complete(root, names[1])
    unfinished(root, names[2])
    complete(root, names[3])
    unfinished(root, names[4])
    complete(root, names[5])  # latest
    complete(root, names[6])  # newer: another run finished meanwhile
    unfinished(root, names[7])  # newer: another run is writing
    put(root, "_LATEST", names[5].encode())
    put(root, "other/part-a.parquet")
    put(root, "snapshot-bad/part-a.parquet")
    put(root, "notes.txt")
    gone = Snap.prune(fs, path, names[5], keep=2)
    assert gone == [names[0], names[1], names[2], names[4]]
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(["_LATEST", "other", "snapshot-bad", "notes.txt",
                           names[3], names[5], names[6], names[7]])
    assert (root / names[7] / "part-a.parquet").exists()
    assert Snap.prune(fs, path, names[5], keep=2) == []
    assert Snap.prune(fs, path, names[5], keep=1) == [names[3]]
    assert Snap.prune(fs, path, names[5], keep=0) == []  # the latest always stays
    assert (root / names[5] / "_summary.json").exists()
    assert Snap.list_snapshots(fs, path) == {names[5]: True, names[6]: True, names[7]: False}


def test_prune_with_many_to_keep_deletes_only_unfinished(local):
    fs, root, path = local
    complete(root, snap(0))
    unfinished(root, snap(1))
    complete(root, snap(2))
    assert Snap.prune(fs, path, snap(2), keep=10) == [snap(1)]
    assert Snap.list_snapshots(fs, path) == {snap(0): True, snap(2): True}


def test_pc_is_used_like_the_diff_expects():
    # index_in takes the first of repeated values: diff_bucket relies on it.
    assert pc.index_in(pa.array([2, 3]), value_set=pa.array([2, 2, 3])).to_pylist() == [0, 2]


def test_nightly_refuses_a_kept_content_hash_column_and_a_run_output(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.io.storage import OutputError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "x", "content_hash": "u"}\n')
    with pytest.raises(ValueError, match="content_hash"):
        J.run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                keep_columns=("content_hash",)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0123456789abcdef-0123456789ab.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="holds the output of a `run`"):
        J.run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="keep-all"):
        J.run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out2"),
                                on_duplicate="keep-all"))


def test_id_kinds_compare_across_widths_and_layouts():
    assert N.id_kind(pa.int32()) == N.id_kind(pa.int64()) == N.id_kind(pa.uint16()) == "integer"
    assert N.id_kind(pa.string()) == N.id_kind(pa.large_string()) == "string"
    assert N.id_kind(pa.dictionary(pa.int32(), pa.string())) == "string"
    assert N.id_kind(pa.binary(16)) == N.id_kind(pa.binary()) == "binary"
    assert N.id_kind(pa.int64()) != N.id_kind(pa.string())
