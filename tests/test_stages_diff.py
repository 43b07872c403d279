"""``pipeline/stages/diff.py``, the nightly diff, no Ray: content hashes, id buckets, the
rows' hashes and rejects, the diff of one bucket against the previous snapshot (checked
against a row-by-row reference), the one schema of every side of the shuffle, id kinds,
``plan_diff`` (whether the previous vectors are reused, and how many buckets), and the
previous snapshot's document vectors (``--doc-vectors``: read, matched, attached)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io import schema as S
from pipeline.io.errors import OutputError
from pipeline.stages import diff as N
from pipeline.stages.embed import TokenizeStage
from pipeline.tokenize import TASK_PREFIXES, add_prefix, task_prefix, text_problem
from tests.helpers import reader_rows, vector


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
        # Variable-size lists in the shuffle (a null costs an offset, not 64 zeros).
        assert out.schema.field(S.prev_embedding(d)).type == pa.list_(pa.float32())
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


def test_pc_is_used_like_the_diff_expects():
    # index_in takes the first of repeated values: diff_bucket relies on it.
    assert pc.index_in(pa.array([2, 3]), value_set=pa.array([2, 2, 3])).to_pylist() == [0, 2]


# ---------------------------------------------------------------------------------------------
# id_kind


def test_id_kinds_compare_across_widths_and_layouts():
    assert N.id_kind(pa.int32()) == N.id_kind(pa.int64()) == N.id_kind(pa.uint16()) == "integer"
    assert N.id_kind(pa.string()) == N.id_kind(pa.large_string()) == "string"
    assert N.id_kind(pa.dictionary(pa.int32(), pa.string())) == "string"
    assert N.id_kind(pa.binary(16)) == N.id_kind(pa.binary()) == "binary"
    assert N.id_kind(pa.int64()) != N.id_kind(pa.string())


# ---------------------------------------------------------------------------------------------
# plan_diff: whether the previous vectors are reused, and how many buckets (pure, the driver's)

GIB = 1 << 30
SAME = {"model_fingerprint": "fp", "tokenizer_sha256": "tk", "task": "document", "dims": [64, 32],
        "output_dtype": "float32", "dtype": "float32", "id_column": "id", "text_column": "text",
        "keep_columns": ["lang"], "on_duplicate": "keep-first"}


def identity(id_type=pa.int64(), **changes) -> dict:
    """A run identity (``units.run_identity``'s fields) with the settled types."""
    from pipeline.units import encode_types

    return {"types": encode_types(id_type, (("lang", pa.string()),)), "model_id": "m",
            "revision": None} | SAME | changes


def read_spec(id_type=pa.int64()):
    from pipeline.io.readers import ReadSpec

    return ReadSpec("id", "text", ("lang",), id_type, keep_types=(("lang", pa.string()),))


def plan(previous=None, *, today=None, id_type=pa.int64(), files=None, todo_bytes=1000,
         cpus=4.0, seen=(), output_dtype="float32") -> N.Diff:
    read = read_spec(id_type)
    if files is None:
        files = (("s3://o/snapshot-1/part-a.parquet", 4000), ("s3://o/snapshot-1/part-b.parquet",
                                                               6000))
    return N.plan_diff(identity=today or identity(id_type, output_dtype=output_dtype), read=read,
                       previous_identity=previous, previous_files=files if previous else (),
                       todo_bytes=todo_bytes, seen_files=seen, cpus=cpus)


def prev_columns(d: N.Diff) -> list[str]:
    """The previous vectors' columns in the diff's schema (the previous hash is always there)."""
    assert S.PREV_HASH in d.schema.names
    return [f.name for f in d.schema if f.name.startswith("__prev_") and f.name != S.PREV_HASH]


def test_plan_diff_first_snapshot_compares_nothing():
    d = plan(None)
    assert (d.reuse, d.reembed_reason, d.previous_files) == (False, "first snapshot", ())
    assert (d.task, d.id_column, d.id_type, d.dims) == ("document", "id", pa.int64(), DIMS)
    assert prev_columns(d) == [] and d.schema == N.diff_schema(read_spec(), d)


def test_plan_diff_equal_settings_reuse_the_previous_vectors():
    seen = (("s3://o/snapshot-2/part-x.parquet", "s3://in/a.jsonl"),)
    d = plan(identity(output_dtype="float16"), seen=seen, output_dtype="float16")
    assert d.reuse is True and d.reembed_reason is None
    assert d.previous_files == (("s3://o/snapshot-1/part-a.parquet", 4000),
                                ("s3://o/snapshot-1/part-b.parquet", 6000))
    assert d.seen_files == seen and d.output_dtype == "float16"
    # The previous vectors travel through the shuffle in today's output dtype, as
    # variable-size lists: a row without one (today's, a seen id) costs an offset there,
    # not a fixed-size list's room.
    assert prev_columns(d) == [S.prev_embedding(w) for w in DIMS]
    assert [d.schema.field(S.prev_embedding(w)).type for w in DIMS] == [
        pa.list_(pa.float16()) for w in DIMS]


def test_plan_diff_what_is_not_a_setting_does_not_stop_the_reuse():
    # The model's name and revision, the nightly base, and the settled types (ids of the same
    # kind, another width; other kept-column types) are not settings of the vectors.
    previous = identity(pa.int32(), model_id="other/name", revision="abc",
                        nightly={"base": "snapshot-0"})
    d = plan(previous)
    assert d.reuse is True and d.reembed_reason is None and len(d.previous_files) == 2


@pytest.mark.parametrize("changes,named", [
    ({"task": "query"}, "task"),
    ({"dims": [64]}, "dims"),
    ({"model_fingerprint": "fp2", "tokenizer_sha256": "tk2"}, "model_fingerprint, tokenizer_sha256"),
    ({"output_dtype": "float16", "keep_columns": []}, "output_dtype, keep_columns"),
    ({"dtype": None}, "dtype"),
], ids=["task", "dims", "model", "dtype-and-columns", "dtype-unknown"])
def test_plan_diff_other_settings_reembed_every_row_but_still_compare(changes, named):
    d = plan(identity(**changes))
    assert d.reuse is False and d.reembed_reason == f"settings changed: {named}"
    # The previous rows are still read: the counts compare the two snapshots.
    assert len(d.previous_files) == 2 and prev_columns(d) == []


def test_plan_diff_a_field_missing_on_one_side_is_a_changed_setting():
    previous = {k: v for k, v in identity().items() if k != "on_duplicate"}
    d = plan(previous)
    assert d.reuse is False and d.reembed_reason == "settings changed: on_duplicate"


@pytest.mark.parametrize("before,now", [(pa.string(), pa.int64()), (pa.int64(), pa.string()),
                                        (pa.binary(), pa.large_string())], ids=str)
def test_plan_diff_ids_of_another_kind_are_other_ids(before, now):
    # Even with other settings changed too: nothing is compared, every row is new.
    d = plan(identity(before, task="query"), id_type=now, today=identity(now))
    assert d.reuse is False and d.previous_files == ()
    assert d.reembed_reason == f"id type changed: {before} -> {now}"
    assert prev_columns(d) == [] and d.id_type == now


def test_plan_diff_previous_without_settled_types_is_compared_by_settings_only():
    previous = {k: v for k, v in identity().items() if k != "types"}
    assert plan(previous, id_type=pa.string(), today=identity(pa.string())).reuse is True
    assert plan(identity(None)).reuse is True  # a previous id type never settled


@pytest.mark.parametrize("cpus,todo,files,want", [
    (4, 1000, (), 8),  # small: two buckets per CPU
    (2.5, 0, (), 4),  # whole CPUs
    (4, 10 * GIB, (), 40),  # one per 256 MiB of input
    (4, 10 * GIB + 1, (), 41),  # rounded up
    (4, 5 * GIB, (("p", 5 * GIB),), 40),  # the previous snapshot's bytes count too
    (16, 10 ** 15, (), N.MAX_BUCKETS),  # at most MAX_BUCKETS
], ids=["two-per-cpu", "fractional-cpus", "per-256MiB", "rounded-up", "previous-bytes", "max"])
def test_plan_diff_bucket_count_bounds(cpus, todo, files, want):
    previous = identity() if files else None
    d = plan(previous, files=files, todo_bytes=todo, cpus=cpus)
    assert d.buckets == want and isinstance(d.buckets, int)
    assert 1 <= d.buckets <= N.MAX_BUCKETS


def test_plan_diff_previous_bytes_of_other_ids_do_not_count():
    previous = identity(pa.string())
    d = plan(previous, files=(("p", 20 * GIB),), todo_bytes=1000)
    assert d.previous_files == () and d.buckets == 8


def test_plan_diff_at_least_one_bucket_without_cpus_or_bytes():
    # A KubeRay head with num-cpus 0 reports no CPUs before its workers join; with nothing
    # left to read the count would be 0, and bucket_of(ids, 0) divides by zero.
    diff = plan(None, todo_bytes=0, cpus=0.0)
    assert diff.buckets == 1
    assert N.bucket_of(pa.array(["a", "b"]), diff.buckets).to_pylist() == [0, 0]


def _snapshot_file(path: Path, table: pa.Table) -> tuple[str, int]:
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    return str(path), path.stat().st_size


@pytest.mark.parametrize("before,now", [(None, "chunk"), ("chunk", None), ("chunk", "chunk")])
def test_read_previous_follows_the_previous_snapshot_s_chunking(tmp_path, before, now):
    """A snapshot of one row per document or per chunk is read as one row per document,
    whatever today's --long-text (switching mode re-embeds every row, without failing)."""
    chunking = {"mode": "chunk", "window": 128, "overlap": 16, "max_chunks": 1000,
                "chunk_text": False, "doc_vectors": False}
    old = identity(long_text=chunking if before else None)
    new = identity(long_text=chunking if now else None)
    if before:  # id 1 in 3 chunks, id 2 in 1
        table = pa.table({"id": [1, 1, 1, 2], "chunk": [0, 1, 2, 0], "chunks": [3, 3, 3, 1],
                          N.HASH_COLUMN: ["a", "a", "a", "b"]})
    else:
        table = pa.table({"id": [1, 2], N.HASH_COLUMN: ["a", "b"]})
    for w in DIMS:
        one = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ones(table.num_rows * w, np.float32)), w)
        table = table.append_column(f"embedding_{w}", one)
    uri, size = _snapshot_file(tmp_path / "part-a.parquet", table)
    d = N.plan_diff(identity=new, read=read_spec(), previous_identity=old,
                    previous_files=((uri, size),), todo_bytes=0, seen_files=(), cpus=1)
    assert d.reuse == (before == now) and d.chunked == bool(now)
    rows = pa.concat_tables(N.read_previous(uri, d, {}))
    assert rows[S.ID].to_pylist() == [1, 2] and rows[S.PREV_HASH].to_pylist() == ["a", "b"]
    if d.reuse:  # each document's chunk vectors, as a list
        assert [len(v) for v in rows[S.prev_embedding(DIMS[0])].to_pylist()] == [3, 1]


# ---------------------------------------------------------------------------------------------
# --doc-vectors: the previous snapshot's document vectors, for the documents it reuses

CHUNKING = {"mode": "chunk", "window": 128, "overlap": 16, "max_chunks": 1000,
            "chunk_text": False, "doc_vectors": True}
DOC_FILES = (("s3://o/snapshot-1/_documents/part-a.parquet", 300),)


def chunking(**changes) -> dict:
    return CHUNKING | changes


def doc_plan(previous_chunking: dict | None, today_chunking: dict, **kwargs) -> N.Diff:
    """A chunked night's diff (the previous snapshot's part files and ``DOC_FILES``)."""
    previous = identity(long_text=previous_chunking) if previous_chunking else None
    return N.plan_diff(identity=identity(long_text=today_chunking), read=read_spec(),
                       previous_identity=previous,
                       previous_files=(("s3://o/snapshot-1/part-a.parquet", 4000),),
                       previous_documents=DOC_FILES, todo_bytes=1000, seen_files=(), cpus=4,
                       **kwargs)


def test_plan_diff_reuses_document_vectors_of_a_snapshot_that_has_them():
    d = doc_plan(chunking(), chunking())
    assert d.reuse and d.reuse_documents and d.previous_documents == DOC_FILES
    assert d.bytes == 1000 + 4000 + 300  # document files count towards the buckets
    assert [f.name for f in d.schema if f.name.startswith("__prev_doc_")] == [
        N.prev_doc_embedding(w) for w in DIMS]
    assert d.schema.field(N.prev_doc_embedding(64)).type == pa.list_(pa.float32())


def test_plan_diff_a_previous_snapshot_without_document_vectors_is_embedded_again():
    # Its chunks' stored vectors are cut and normalised: their pooled mean is lost, so the
    # unchanged documents are encoded again rather than left without a document vector.
    d = doc_plan(chunking(doc_vectors=False), chunking())
    assert not d.reuse and not d.reuse_documents and d.previous_documents == ()
    assert d.reembed_reason == ("the previous snapshot has no document vectors (made without "
                                "--doc-vectors)")
    assert len(d.previous_files) == 1  # still compared: the counts
    assert not [f.name for f in d.schema if f.name.startswith("__prev_")
                and f.name != S.PREV_HASH]


@pytest.mark.parametrize("before,now", [
    (chunking(), chunking(doc_vectors=False)),  # document vectors no longer wanted
    (chunking(doc_vectors=False), chunking(doc_vectors=False, chunk_text=True)),
    (chunking(chunk_text=True), chunking()),
], ids=["docs-dropped", "chunk-text-added", "chunk-text-dropped"])
def test_plan_diff_output_only_chunking_options_keep_the_chunk_vectors(before, now):
    d = doc_plan(before, now)
    assert d.reuse and d.reembed_reason is None
    assert d.reuse_documents == now["doc_vectors"]
    assert d.previous_documents == (DOC_FILES if now["doc_vectors"] else ())


def test_plan_diff_other_chunking_options_still_reembed():
    d = doc_plan(chunking(window=256), chunking())
    assert not d.reuse and d.reembed_reason == "settings changed: long_text"
    assert d.previous_documents == ()


def doc_rows(ids, hashes, seeds, dtype="float32") -> pa.Table:
    """The previous snapshot's document rows as ``read_previous_documents`` yields them."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    out = {S.ID: pa.array(ids, pa.int64()), S.PREV_HASH: pa.array(hashes, pa.string())}
    for w in DIMS:
        out[N.prev_doc_embedding(w)] = pa.array([vector(s, w, np_dtype) for s in seeds],
                                                S.embedding_type(w, dtype))
    out[S.BUCKET] = N.bucket_of(out[S.ID], 1)
    return pa.table(out)


def chunk_rows(ids, hashes, chunks) -> pa.Table:
    """The previous snapshot's chunked rows as ``read_previous`` yields them (one per document,
    its chunk vectors as a list)."""
    out = {S.ID: pa.array(ids, pa.int64()), S.PREV_HASH: pa.array(hashes, pa.string())}
    for w in DIMS:
        out[S.prev_embedding(w)] = pa.array(
            [[vector(100 * i + k, w) for k in range(n)] for i, n in zip(ids, chunks)],
            pa.list_(S.embedding_type(w, "float32")))
    out[S.BUCKET] = N.bucket_of(out[S.ID], 1)
    return pa.table(out)


def test_diff_attaches_the_previous_document_vector_to_each_reused_document():
    d = doc_plan(chunking(), chunking())
    today = N.hash_rows(reader_rows([1, 2, 3, 4, 5], ["same", "edited", "new", "same too",
                                                      "no doc row"]), "document", 1, d.schema)
    prev = N.conform(chunk_rows([1, 2, 4, 5, 9], [h("same"), h("before"), h("same too"),
                                                  h("no doc row"), h("gone")],
                                [3, 2, 1, 2, 1]), d.schema)
    # Document rows in another order; 4's document row is of another text (a damaged
    # snapshot could hold that): neither 4 nor 5 is reused without its own document vector.
    docs = N.conform(doc_rows([9, 4, 2, 1], [h("gone"), h("other"), h("before"), h("same")],
                              [9, 4, 2, 1]), d.schema)
    out = run_diff(pa.concat_tables([docs, today, prev]), d)
    assert by_id(out, S.CHANGE) == {1: "unchanged", 2: "changed", 3: "new", 4: "unchanged",
                                    5: "unchanged"}
    assert by_id(out, S.REUSE) == {1: True, 2: False, 3: False, 4: False, 5: False}
    for w in DIMS:
        docs_of = by_id(out, N.prev_doc_embedding(w))
        assert docs_of == {1: vector(1, w), 2: None, 3: None, 4: None, 5: None}
        chunks_of = by_id(out, S.prev_embedding(w))
        assert chunks_of[1] == [vector(100 + k, w) for k in range(3)]
        assert chunks_of[4] is None and chunks_of[5] is None  # encoded again, whole
    assert out.num_rows == 5 and out.schema.get_field_index(N.prev_doc_embedding(64)) >= 0


def test_diff_of_a_bucket_without_document_rows_reuses_no_document():
    d = doc_plan(chunking(), chunking())
    today = N.hash_rows(reader_rows([1], ["same"]), "document", 1, d.schema)
    prev = N.conform(chunk_rows([1], [h("same")], [2]), d.schema)
    out = run_diff(pa.concat_tables([today, prev]), d)
    assert by_id(out, S.CHANGE) == {1: "unchanged"} and by_id(out, S.REUSE) == {1: False}
    assert out[N.prev_doc_embedding(64)].type == pa.list_(pa.float32())


def test_read_previous_documents_is_on_the_shuffle_s_schema(tmp_path):
    d = doc_plan(chunking(), chunking())
    table = pa.table({"id": pa.array([7, 8], pa.int32()), "chunks": pa.array([3, 1], pa.int32()),
                      "tokens": pa.array([300, 20], pa.int32()), "lang": ["en", "fr"]})
    for w in DIMS:
        table = table.append_column(f"embedding_{w}", pa.array(
            [vector(7, w), vector(8, w)], S.embedding_type(w, "float32")))
    table = table.append_column(N.HASH_COLUMN, pa.array([h("seven"), h("eight")]))
    uri, _ = _snapshot_file(tmp_path / "part-d.parquet", table)
    rows = pa.concat_tables(N.read_previous_documents(uri, d, {}))
    assert rows.schema == d.schema
    assert rows[S.ID].to_pylist() == [7, 8] and rows[S.ID].type == pa.int64()  # today's type
    assert rows[S.PREV_HASH].to_pylist() == [h("seven"), h("eight")]
    assert rows[N.prev_doc_embedding(32)].to_pylist() == [vector(7, 32), vector(8, 32)]
    assert rows[S.BUCKET].to_pylist() == N.bucket_of(pa.array([7, 8]), d.buckets).to_pylist()
    assert rows[S.UNIT].null_count == 2 and rows[N.prev_doc_embedding(64)].null_count == 0


def test_read_previous_documents_refuses_a_document_without_its_vector(tmp_path):
    d = doc_plan(chunking(), chunking())
    table = pa.table({"id": [7], N.HASH_COLUMN: [h("seven")],
                      "embedding_64": pa.nulls(1, S.embedding_type(64, "float32")),
                      "embedding_32": pa.array([vector(7, 32)], S.embedding_type(32, "float32"))})
    uri, _ = _snapshot_file(tmp_path / "part-d.parquet", table)
    # An OutputError: not taken for a storage failure ("is the endpoint reachable?").
    with pytest.raises(OutputError, match="has no embedding_64 or content_hash; the snapshot "
                                          "is damaged"):
        list(N.read_previous_documents(uri, d, {}))


def test_the_diffs_read_tasks_carry_only_their_own_files_and_have_names(tmp_path):
    """At lake scale a task carrying every file's name is large, and Ray Data names a large
    read task after its function (a functools.partial has no name: the run failed)."""
    from ray import cloudpickle

    from pipeline.cluster.graph import FunctionDatasource

    seen = [(f"s3://b/out/part-{i:05d}.parquet", f"s3://b/in/f{i:05d}.jsonl")
            for i in range(4000)]
    diff = N.Diff(task="document", buckets=4, previous_files=tuple((u, 10) for u, _ in seen),
                  id_column="id", id_type=pa.int64(), dims=(64,), reuse=True,
                  seen_files=tuple(seen))
    slim = diff.for_tasks()
    assert slim.previous_files == slim.seen_files == () and slim.buckets == 4
    calls = []
    source = FunctionDatasource([(u, 0) for u, _ in seen],
                                lambda uri, src: calls.append((uri, src)) or iter(()),
                                args={u: (s,) for u, s in seen})
    assert len(cloudpickle.dumps(source)) > 100_000  # (the datasource itself holds them all)
    tasks = source.get_read_tasks(8)
    assert len(tasks) == 8 and all(t.read_fn.__name__ == "_read_all" for t in tasks)
    # What Ray ships with each task: its 500 files' names and sources, not all 4,000.
    whole = len(cloudpickle.dumps(seen))
    assert all(len(cloudpickle.dumps(t.read_fn)) < whole / 4 for t in tasks)
    for t in tasks:
        list(t.read_fn())
    assert sorted(calls) == sorted(seen)  # every file once, with its own source


def test_rows_without_previous_vectors_stay_small_in_the_shuffle(tmp_path):
    # At 768/512/256 the ids already in the snapshot (read_seen) and today's rows enter the
    # shuffle with null previous vectors; as fixed-size lists those nulls took 6 KB a row,
    # as many bytes as the vectors themselves.
    wide = [768, 512, 256]
    d = N.plan_diff(identity=identity(dims=wide), read=read_spec(),
                    previous_identity=identity(dims=wide),
                    previous_files=(("s3://o/snapshot-1/part-a.parquet", 4000),),
                    todo_bytes=1000, seen_files=(), cpus=4)
    assert d.reuse and d.dims == tuple(wide)
    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": pa.array(range(1000), pa.int64())}), part)
    (seen,) = N.read_seen(str(part), "s3://in/a.jsonl", d.for_tasks(), {})
    today = N.hash_rows(reader_rows(list(range(1000)), ["some text"] * 1000), "document", 1,
                        d.schema)
    assert seen.schema == today.schema == d.schema
    for table in (seen, today):
        assert table.nbytes / table.num_rows < 200, table.nbytes / table.num_rows


def _six_row_part_file(path):
    """A previous snapshot's part file of ids 0-5, hashes h0-h5, row i's vectors all i."""
    table = pa.table({"id": pa.array(range(6), pa.int64()),
                      N.HASH_COLUMN: [f"h{i}" for i in range(6)]})
    for w in DIMS:
        values = np.repeat(np.arange(6, dtype=np.float32), w)
        table = table.append_column(f"embedding_{w}",
                                    pa.FixedSizeListArray.from_arrays(pa.array(values), w))
    return _snapshot_file(path, table)


def test_a_touched_units_previous_part_file_is_read_once_for_previous_rows_and_seen_ids(tmp_path):
    # pipeline/stages/carry.py: the changed files' rows are compared (previous rows, with
    # their vectors), the copied files' rows only block their ids (seen, named by the unit).
    uri, size = _six_row_part_file(tmp_path / "part-a.parquet")
    d = N.plan_diff(identity=identity(), read=read_spec(), previous_identity=identity(),
                    previous_files=(), todo_bytes=0, seen_files=(), cpus=1)
    rows = pa.concat_tables(N.read_touched(uri, "/in/a.jsonl#files[3]", [(1, 2)],
                                           [(0, 1), (3, 3)], d, {}))
    previous = rows.filter(pc.is_null(rows[S.SEEN]))
    seen = rows.filter(pc.is_valid(rows[S.SEEN]))
    assert previous[S.ID].to_pylist() == [1, 2]
    assert previous[S.PREV_HASH].to_pylist() == ["h1", "h2"]
    assert [v[0] for v in previous[S.prev_embedding(DIMS[0])].to_pylist()] == [1.0, 2.0]
    assert seen[S.ID].to_pylist() == [0, 3, 4, 5]
    assert set(seen[S.SOURCE].to_pylist()) == {"/in/a.jsonl#files[3]"}
    assert rows.schema == d.schema
    for changed, copied in (([(5, 2)], [(0, 5)]), ([(1, 2)], [(0, 1)])):  # 7 rows, or 3
        with pytest.raises(OutputError, match="has 6 rows, its manifest's slices [73]"):
            list(N.read_touched(uri, "u", changed, copied, d, {}))


def test_the_ids_already_held_enter_the_diff_only_where_todays_rows_hold_them(tmp_path):
    # pipeline/cluster/graph.py::gather_today: today's rows are read first and their ids'
    # hashes gathered; the ids a snapshot already holds (read_seen, read_touched's copied
    # rows) are then kept only where today's rows may hold them.
    for one, other in ((pa.array([1, 2, 2**40], pa.int64()), pa.array([1, 2, 2**40], pa.uint64())),
                       (pa.array([5, -7], pa.int32()), pa.array([5, -7], pa.int64())),
                       (pa.array(["a", "é", ""]), pa.array(["a", "é", ""], pa.large_string())),
                       (pa.array(["a", "b", "a"]), pa.array(["a", "b", "a"]).dictionary_encode()),
                       (pa.array([b"ab", b"\xff\x00"]),
                        pa.array([b"ab", b"\xff\x00"], pa.binary(2)))):
        assert list(N.id_hashes(one)) == list(N.id_hashes(other)), one.type
    assert len(set(N.id_hashes(pa.array(range(100_000), pa.int64())))) == 100_000
    assert len(set(N.id_hashes(pa.array([f"doc-{i}" for i in range(100_000)])))) == 100_000

    d = N.plan_diff(identity=identity(), read=read_spec(), previous_identity=identity(),
                    previous_files=(), todo_bytes=0, seen_files=(), cpus=1)
    today = N.hash_rows(reader_rows([3, 7, 7, None, 11], ["t"] * 5), "document", 1, d.schema)
    gathered = N.today_ids(today)
    assert list(gathered) == sorted(set(N.id_hashes(pa.array([3, 7, 11], pa.int64()))))
    assert N.among(pa.array([3, 4, None, 11]), gathered).tolist() == [True, False, True, True]
    assert not N.among(pa.array([3]), np.empty(0, np.uint64)).any()  # nothing today

    part = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": pa.array(range(20), pa.int32())}), part)
    (everything,) = N.read_seen(str(part), "/in/a.jsonl", d.for_tasks(), {})
    (kept,) = N.read_seen(str(part), "/in/a.jsonl", d.for_tasks(), {}, today=gathered)
    assert everything[S.ID].to_pylist() == list(range(20))
    assert kept[S.ID].to_pylist() == [3, 7, 11] and kept.schema == d.schema
    assert kept[S.SOURCE].to_pylist() == ["/in/a.jsonl"] * 3
    # The diff then rejects today's rows of those ids, as before.
    rows = pa.concat_tables([today, kept])
    (out,) = N.diff_bucket(rows, d.for_tasks())
    reasons = dict(zip(out[S.ID].to_pylist(), out[S.REJECT].to_pylist()))
    assert all("committed earlier in this snapshot" in reasons[i] for i in (3, 11))

    uri, _ = _six_row_part_file(tmp_path / "part-a.parquet")
    held = np.sort(N.id_hashes(pa.array([1, 4], pa.int64())))
    rows = pa.concat_tables(N.read_touched(uri, "u", [(1, 2)], [(0, 1), (3, 3)], d, {},
                                           today=held))
    # The changed files' previous rows all come (they are compared); of the copied, only 4.
    assert rows.filter(pc.is_null(rows[S.SEEN]))[S.ID].to_pylist() == [1, 2]
    assert rows.filter(pc.is_valid(rows[S.SEEN]))[S.ID].to_pylist() == [4]


def test_todays_ids_are_gathered_only_when_the_held_ids_outnumber_them():
    assert N.worth_gathering(held_bytes=100, held_rows=10, read_bytes=1)  # a 1% night
    assert not N.worth_gathering(held_bytes=100, held_rows=10, read_bytes=100)
    assert not N.worth_gathering(held_bytes=100, held_rows=0, read_bytes=1)  # nothing held
    # Never more than MAX_TODAY_IDS rows' ids on the driver (at the held units' bytes a row).
    rows = N.MAX_TODAY_IDS
    assert N.worth_gathering(held_bytes=10 * rows, held_rows=10 * rows, read_bytes=rows)
    assert not N.worth_gathering(held_bytes=10 * rows, held_rows=10 * rows, read_bytes=rows + 1)


def test_a_touched_read_decodes_only_the_row_groups_of_changed_rows():
    """``_row_groups_of``: the row groups that hold any row of the ranges, and the ranges'
    places among those row groups' rows alone, over random row groups and ranges."""
    from pipeline.stages.diff import _row_groups_of

    rng = np.random.default_rng(9)
    for _ in range(200):
        sizes = rng.integers(1, 12, int(rng.integers(1, 9))).tolist()
        rows = sum(sizes)
        buffer = pa.BufferOutputStream()
        table = pa.table({"k": pa.array(range(rows), pa.int64())})
        with pq.ParquetWriter(buffer, table.schema) as writer:
            start = 0
            for n in sizes:
                writer.write_table(table.slice(start, n))
                start += n
        meta = pq.ParquetFile(pa.BufferReader(buffer.getvalue())).metadata
        cuts = sorted(set(rng.integers(0, rows + 1, int(rng.integers(0, 6))).tolist()))
        spans = list(zip([0, *cuts], [*cuts, rows]))
        ranges = [(a, b - a) for a, b in spans if rng.random() < 0.5]
        groups, local = _row_groups_of(meta, ranges)
        starts = np.cumsum([0, *sizes])
        held = {g for a, n in ranges for g in range(len(sizes))
                if n and starts[g] < a + n and starts[g + 1] > a}
        assert groups == sorted(held)
        chosen = [k for g in groups for k in range(starts[g], starts[g + 1])]
        assert [chosen[s + i] for s, n in local for i in range(n)] == \
            [a + i for a, n in ranges for i in range(n)]
