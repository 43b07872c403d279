"""Iceberg source and target of the enrichment job, on real catalogs (SQLite) and real files.

The enrichment itself is simulated here the way the job does it: read each source data file
with pyarrow, append ``embedding_<width>`` columns (random unit vectors, some rows null),
write it under :func:`staging_location`, and commit with :func:`commit_enriched`.
"""

from __future__ import annotations

import datetime
import os
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
from pyiceberg.manifest import (
    DataFile,
    DataFileContent,
    FileFormat,
    ManifestContent,
    ManifestWriterV2,
)
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update.snapshot import _FastAppendFiles
from pyiceberg.typedef import Record
from pyiceberg.types import FloatType, ListType

from pipeline.io.iceberg import (
    IcebergError,
    commit_enriched,
    create_table_from,
    enriched_file_uri,
    is_iceberg,
    load_catalog,
    load_table,
    parse_table,
    source_files,
    staging_location,
)
from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401

S3_FIXTURES = (s3_bucket, s3_endpoint)  # imported for pytest, which finds them by name

SOURCE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("text", pa.string()),
    ("lang", pa.string()),
    ("day", pa.date32()),
    ("score", pa.float64()),
    ("tags", pa.list_(pa.string())),
])
LANGS = ["en", "de", "fr", None]  # None: a null partition value


@pytest.fixture(autouse=True)
def _no_pyiceberg_config(tmp_path, monkeypatch):
    """No developer ~/.pyiceberg.yaml or PYICEBERG_* variable leaks into a test."""
    for name in [n for n in os.environ if n.upper().startswith("PYICEBERG_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PYICEBERG_HOME", str(home))
    monkeypatch.chdir(home)  # pyiceberg also reads ./.pyiceberg.yaml


@pytest.fixture
def catalog(tmp_path):
    return load_catalog("test", warehouse=str(tmp_path / "warehouse"))


def batch(start: int, n: int, seed: int) -> pa.Table:
    """``n`` source rows with ids from ``start``: every type the enrichment must keep."""
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n)
    return pa.table({
        "id": ids,
        "text": [f"doc {i} " + "x" * int(rng.integers(0, 20)) if i % 7 else None for i in ids],
        "lang": [LANGS[i % len(LANGS)] for i in ids],
        "day": [datetime.date(2026, 1, 1 + (i // 4) % 2) for i in ids],
        "score": rng.normal(size=n),
        "tags": [[f"t{i % 3}"] * (i % 3) for i in ids],
    }, schema=SOURCE_SCHEMA)


def make_table(catalog, name: str, partition_by=None, appends: int = 3, rows: int = 12):
    table = create_table_from(catalog, f"iceberg:lake.{name}", SOURCE_SCHEMA, partition_by)
    for k in range(appends):
        table.append(batch(k * rows, rows, seed=k))
    return table


def read_sorted(table, **scan) -> pa.Table:
    return table.scan(**scan).to_arrow().sort_by("id").combine_chunks()


def unit_vectors(rng, n: int, width: int) -> np.ndarray:
    v = rng.normal(size=(n, width)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def enrich(table, run_id: str, widths, dtype=pa.float32(), seed: int = 0):
    """What the job does per source file; returns (mapping, {width: {id: vector or None}})."""
    rng = np.random.default_rng(seed)
    staging = staging_location(table, run_id)
    names = [f"embedding_{w}" for w in widths]
    mapping, expected = {}, {w: {} for w in widths}
    for index, info in enumerate(source_files(table)):
        with fsspec.open(info.uri, "rb") as f:
            data = pq.read_table(f)
        data = data.drop_columns([n for n in names if n in data.column_names])
        ids = data["id"].to_pylist()
        is_null = np.array([i % 5 == 0 for i in ids])  # rows whose text "could not be embedded"
        for width, name in zip(widths, names):
            vectors = unit_vectors(rng, len(ids), width).astype(dtype.to_pandas_dtype())
            values = pa.array(vectors.reshape(-1), type=dtype)
            column = pa.FixedSizeListArray.from_arrays(values, width, mask=pa.array(is_null))
            data = data.append_column(name, column)
            for i, vec, null in zip(ids, vectors, is_null):
                expected[width][i] = None if null else vec.astype(np.float32)
        out = enriched_file_uri(staging, index, info.uri)
        with fsspec.open(out, "wb") as f:
            pq.write_table(data, f)
        mapping[info.uri] = out
    return mapping, expected


def check_embeddings(result: pa.Table, expected) -> None:
    ids = result["id"].to_pylist()
    for width, by_id in expected.items():
        column = result[f"embedding_{width}"].to_pylist()
        assert len(column) == len(by_id) == len(ids)
        for i, got in zip(ids, column):
            want = by_id[i]
            if want is None:
                assert got is None, (width, i)
            else:
                np.testing.assert_array_equal(np.asarray(got, dtype=np.float32), want)


# ---------------------------------------------------------------------------------------------
# Identifiers and catalogs

def test_parse_table_accepts_both_spellings_and_nested_namespaces():
    assert parse_table("iceberg:lake.docs") == ("lake", "docs")
    assert parse_table("iceberg://lake.docs") == ("lake", "docs")
    assert parse_table("iceberg:a.b.docs_v2") == ("a", "b", "docs_v2")
    assert is_iceberg("iceberg:lake.docs") and not is_iceberg("s3://lake/docs")


@pytest.mark.parametrize("bad", ["iceberg:docs", "iceberg:", "iceberg:lake.", "iceberg:.docs",
                                 "iceberg:lake.do cs", "iceberg:lake/docs", "s3://lake/docs"])
def test_parse_table_rejects_bad_identifiers(bad):
    with pytest.raises(ValueError, match="iceberg:<namespace>.<table>"):
        parse_table(bad)


def test_default_catalog_is_sqlite_in_the_warehouse(tmp_path):
    catalog = load_catalog("local", warehouse=str(tmp_path / "wh"))
    table = make_table(catalog, "docs", appends=1)
    assert (tmp_path / "wh" / "catalog.db").is_file()
    assert table.location().startswith(f"file://{tmp_path}/wh/")
    # A second catalog object on the same warehouse sees the table: state is in the file.
    again = load_catalog("local", warehouse=f"file://{tmp_path}/wh")
    assert load_table(again, "iceberg:lake.docs").scan().to_arrow().num_rows == 12


def test_catalog_uri_and_pyiceberg_configuration(tmp_path, monkeypatch):
    db = tmp_path / "elsewhere.db"
    by_uri = load_catalog("lake", uri=f"sqlite:///{db}", warehouse=str(tmp_path / "wh"))
    make_table(by_uri, "docs", appends=1)
    assert db.is_file() and not (tmp_path / "wh" / "catalog.db").exists()

    # A SQL catalog keys its tables by catalog name: the same name finds the same tables.
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__URI", f"sqlite:///{db}")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__WAREHOUSE", f"file://{tmp_path}/wh")
    configured = load_catalog("lake")
    assert configured.name == "lake" and configured.properties["uri"] == f"sqlite:///{db}"
    assert load_table(configured, "lake.docs").scan().to_arrow().num_rows == 12
    with pytest.raises(IcebergError, match="does not exist in catalog 'other'"):
        load_table(load_catalog("other", uri=f"sqlite:///{db}"), "lake.docs")

    (tmp_path / "home" / ".pyiceberg.yaml").write_text(
        f"catalog:\n  yml:\n    uri: sqlite:///{tmp_path}/yml.db\n"
        f"    warehouse: file://{tmp_path}/yml-wh\n")
    from_yaml = load_catalog("yml")
    make_table(from_yaml, "docs", appends=1)
    assert (tmp_path / "yml.db").is_file() and (tmp_path / "yml-wh" / "lake" / "docs").is_dir()


def test_catalog_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="--iceberg-catalog-uri URI, or --iceberg-warehouse"):
        load_catalog("nothing")
    with pytest.raises(ValueError, match="cannot live in s3://bucket/wh"):
        load_catalog("remote", warehouse="s3://bucket/wh")
    with pytest.raises(IcebergError, match="cannot open Iceberg catalog 'pg'"):
        load_catalog("pg", uri="postgresql+psycopg2://u:p@127.0.0.1:1/db",
                     warehouse=str(tmp_path))
    catalog = load_catalog("local", warehouse=str(tmp_path / "wh"))
    with pytest.raises(IcebergError, match="'lake.missing' does not exist in catalog 'local'"):
        load_table(catalog, "iceberg:lake.missing")


# ---------------------------------------------------------------------------------------------
# Source files

def test_source_files_of_an_unpartitioned_table(catalog):
    table = make_table(catalog, "docs", appends=3, rows=12)
    files = source_files(table)
    assert len(files) == 3 and all(f.partition == {} for f in files)
    assert [f.records for f in files] == [12, 12, 12]
    for f in files:
        with fsspec.open(f.uri, "rb") as stream:
            assert pq.read_metadata(stream).num_rows == f.records
        assert fsspec.core.url_to_fs(f.uri)[0].size(fsspec.core.url_to_fs(f.uri)[1]) == f.size
    assert source_files(create_table_from(catalog, "lake.empty", SOURCE_SCHEMA)) == []


def test_source_files_of_a_partitioned_table_carry_their_partition(catalog):
    table = make_table(catalog, "docs", partition_by=["lang", "day"], appends=2, rows=16)
    files = source_files(table)
    # Each append writes one file per (lang, day) present: 4 langs x 2 days, twice.
    assert len(files) == 16 and sum(f.records for f in files) == 32
    for f in files:
        with fsspec.open(f.uri, "rb") as stream:
            data = pq.read_table(stream)
        assert set(data["lang"].to_pylist()) == {f.partition["lang"]}
        assert set(data["day"].to_pylist()) == {f.partition["day"]}
    assert {f.partition["lang"] for f in files} == set(LANGS)


# ---------------------------------------------------------------------------------------------
# Enrichment commits

def test_enrichment_of_an_unpartitioned_table(catalog):
    table = make_table(catalog, "docs", appends=3)
    before, schema_before = read_sorted(table), table.schema()
    old_snapshot = table.current_snapshot().snapshot_id
    history_before = [h.snapshot_id for h in table.history()]
    mapping, expected = enrich(table, "run1", [8, 4])

    snapshot_id = commit_enriched(table, mapping, [8, 4], properties={"pipeline.run": "run1"})

    table = load_table(catalog, "lake.docs")  # what another reader sees
    assert table.current_snapshot().snapshot_id == snapshot_id != old_snapshot
    schema = table.schema()
    old_fields = [(f.field_id, f.name, f.field_type, f.required) for f in schema_before.fields]
    assert [(f.field_id, f.name, f.field_type, f.required)
            for f in schema.fields[:len(old_fields)]] == old_fields
    assert [f.name for f in schema.fields[len(old_fields):]] == ["embedding_8", "embedding_4"]
    for name in ("embedding_8", "embedding_4"):
        field = schema.find_field(name)
        assert isinstance(field.field_type, ListType) and not field.required
        assert isinstance(field.field_type.element_type, FloatType)

    after = read_sorted(table)
    assert after.select(before.column_names).equals(before)
    check_embeddings(after, expected)
    assert sorted(f.uri for f in source_files(table)) == sorted(mapping.values())
    assert all(f.uri.startswith(staging_location(table, "run1")) for f in source_files(table))

    assert [h.snapshot_id for h in table.history()] == history_before + [snapshot_id]
    snapshot = table.current_snapshot()
    assert snapshot.parent_snapshot_id == old_snapshot
    assert snapshot.summary.operation == Operation.OVERWRITE
    assert snapshot.summary["pipeline.run"] == "run1"
    assert snapshot.summary["deleted-data-files"] == "3"
    assert snapshot.summary["added-data-files"] == "3"
    assert snapshot.summary["total-records"] == "36"
    # Time travel: the old snapshot still reads the old rows, without the new columns.
    assert read_sorted(table, snapshot_id=old_snapshot).equals(before)


def test_enrichment_of_a_partitioned_table_keeps_partitions(catalog):
    table = make_table(catalog, "docs", partition_by=["lang", "day"], appends=2, rows=16)
    before, spec_before = read_sorted(table), table.spec()
    partitions = {f.uri: f.partition for f in source_files(table)}
    mapping, expected = enrich(table, "run1", [8])

    commit_enriched(table, mapping, [8])

    table = load_table(catalog, "lake.docs")
    assert table.spec() == spec_before and table.spec().spec_id == spec_before.spec_id
    after_files = {f.uri: f for f in source_files(table)}
    assert set(after_files) == set(mapping.values())
    for source, enriched in mapping.items():
        assert after_files[enriched].partition == partitions[source]
    after = read_sorted(table)
    assert after.select(before.column_names).equals(before)
    check_embeddings(after, expected)
    # Partition pruning agrees with the data: a filtered scan reads only matching files.
    german = read_sorted(table, row_filter="lang == 'de' and day == '2026-01-02'")
    want = before.filter(pc.and_(pc.equal(before["lang"], "de"),
                                 pc.equal(before["day"], pa.scalar(datetime.date(2026, 1, 2)))))
    assert german.num_rows == want.num_rows > 0
    assert german.select(before.column_names).equals(want)
    tasks = list(table.scan(row_filter="lang == 'de'").plan_files())
    assert len(tasks) == sum(1 for p in partitions.values() if p["lang"] == "de")


def test_rerun_replaces_embeddings_adds_a_width_and_reads_float16_as_float32(catalog):
    table = make_table(catalog, "docs", partition_by=["lang"], appends=2)
    before = read_sorted(table)
    first = commit_enriched(table, enrich(table, "run1", [8, 4])[0], [8, 4])
    ids_after_first = {f.name: f.field_id for f in table.schema().fields}
    # The name mapping written by the first commit must learn the new embedding_2 column.
    mapping, expected = enrich(table, "run2", [8, 4, 2], dtype=pa.float16(), seed=1)

    second = commit_enriched(table, mapping, [8, 4, 2], properties={"pipeline.run": "run2"})

    table = load_table(catalog, "lake.docs")
    assert second != first and table.current_snapshot().parent_snapshot_id == first
    ids = {f.name: f.field_id for f in table.schema().fields}
    assert ids.pop("embedding_2") > max(ids_after_first.values())
    assert ids == ids_after_first
    after = read_sorted(table)
    assert after.schema.field("embedding_8").type.value_type == pa.float32()
    assert after.select(before.column_names).equals(before)
    check_embeddings(after, expected)
    assert len(table.history()) == 2 + 2


def test_enrichment_on_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch):  # noqa: F811
    catalog = load_catalog("s3", uri=f"sqlite:///{tmp_path}/catalog.db",
                           warehouse=f"s3://{s3_bucket}/warehouse")
    table = make_table(catalog, "docs", partition_by=["lang"], appends=2, rows=8)
    before = read_sorted(table)
    assert all(f.uri.startswith(f"s3://{s3_bucket}/warehouse/") for f in source_files(table))
    mapping, expected = enrich(table, "run1", [4])
    assert all(u.startswith(f"s3://{s3_bucket}/warehouse/") for u in mapping.values())

    commit_enriched(table, mapping, [4])

    after = read_sorted(load_table(catalog, "lake.docs"))
    assert after.select(before.column_names).equals(before)
    check_embeddings(after, expected)

    # The endpoint as a storage option instead of the AWS environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()  # else the client made with the variable is reused
    by_option = load_catalog("s3", uri=f"sqlite:///{tmp_path}/catalog.db",
                             storage_options={"endpoint_url": s3_endpoint})
    assert read_sorted(load_table(by_option, "lake.docs")).equals(after)


# ---------------------------------------------------------------------------------------------
# Refusals: nothing is committed

def test_commit_refuses_a_table_that_changed_since_listing(catalog):
    table = make_table(catalog, "docs", appends=2)
    mapping, _ = enrich(table, "run1", [4])
    table.append(batch(100, 5, seed=9))  # a concurrent writer
    snapshot = table.current_snapshot().snapshot_id
    with pytest.raises(IcebergError, match="changed since its files were listed: 1 current"):
        commit_enriched(table, mapping, [4])
    assert load_table(catalog, "lake.docs").current_snapshot().snapshot_id == snapshot
    assert "embedding_4" not in load_table(catalog, "lake.docs").schema().column_names


def test_commit_refuses_files_that_do_not_match_their_source(catalog, tmp_path):
    table = make_table(catalog, "docs", appends=1)
    mapping, _ = enrich(table, "run1", [4])
    (source, enriched), = mapping.items()
    with fsspec.open(enriched, "rb") as f:
        data = pq.read_table(f)
    cases = {
        "11 rows, its source 12": data.slice(1),
        "columns": data.drop_columns(["score"]),
        "column id is": data.set_column(0, "id", data["id"].cast(pa.int32())),
        "embedding_4 is not a list of float32": data.set_column(
            data.schema.get_field_index("embedding_4"), "embedding_4",
            pa.array([[1.0] * 4] * data.num_rows, pa.list_(pa.float64()))),
    }
    for message, bad in cases.items():
        path = tmp_path / f"bad-{uuid.uuid4().hex}.parquet"
        pq.write_table(bad, path)
        with pytest.raises(IcebergError, match=message):
            commit_enriched(table, {source: str(path)}, [4])
    with pytest.raises(IcebergError, match="cannot read the Parquet footer"):
        commit_enriched(table, {source: str(tmp_path / "missing.parquet")}, [4])
    assert len(load_table(catalog, "lake.docs").history()) == 1


def test_commit_refuses_bad_columns_widths_and_summary_keys(catalog):
    table = make_table(catalog, "docs", appends=1)
    mapping, _ = enrich(table, "run1", [4])
    with pytest.raises(ValueError, match=r"\['added-records', 'operation'\] are Iceberg's own"):
        commit_enriched(table, mapping, [4], properties={"operation": "x", "added-records": 1})
    with pytest.raises(ValueError, match="bad embedding widths"):
        commit_enriched(table, mapping, [4, 4])
    with table.update_schema() as update:
        update.add_column("embedding_4", FloatType())
    with pytest.raises(IcebergError, match="already has a column 'embedding_4' of type float"):
        commit_enriched(table, mapping, [4])
    assert len(load_table(catalog, "lake.docs").history()) == 1


class _DeleteManifestWriter(ManifestWriterV2):
    """A v2 manifest of delete files: pyiceberg 0.12 cannot write merge-on-read deletes itself."""

    def content(self) -> ManifestContent:
        return ManifestContent.DELETES

    @property
    def _meta(self) -> dict[str, str]:
        return {**super()._meta, "content": "deletes"}


class _AddDeleteFile(_FastAppendFiles):
    def new_manifest_writer(self, spec):
        return _DeleteManifestWriter(spec, self.schema(), self.new_manifest_output(),
                                     self._snapshot_id, self._compression)


def test_source_files_refuses_row_level_deletes_and_other_formats(catalog, tmp_path):
    table = make_table(catalog, "docs", appends=1)
    (target,) = source_files(table)
    deletes = tmp_path / "pos-deletes.parquet"
    pq.write_table(pa.table({"file_path": [target.uri], "pos": pa.array([3], pa.int64())}),
                   deletes)
    with table.transaction() as tx:
        producer = _AddDeleteFile(Operation.DELETE, tx, table.io)
        producer.append_data_file(DataFile.from_args(
            content=DataFileContent.POSITION_DELETES, file_path=str(deletes),
            file_format=FileFormat.PARQUET, partition=Record(), record_count=1,
            file_size_in_bytes=deletes.stat().st_size, spec_id=0))
        producer.commit()
    assert table.scan().to_arrow().num_rows == 11  # the delete file is real: one row gone
    with pytest.raises(IcebergError, match="has 1 delete file"):
        source_files(table)
    with pytest.raises(IcebergError, match="has 1 delete file"):
        commit_enriched(table, {target.uri: str(tmp_path / "x.parquet")}, [4])

    orc = make_table(catalog, "orc", appends=0)
    with orc.transaction() as tx:
        with tx.update_snapshot().fast_append() as append:
            append.append_data_file(DataFile.from_args(
                content=DataFileContent.DATA, file_path=str(tmp_path / "x.orc"),
                file_format=FileFormat.ORC, partition=Record(), record_count=1,
                file_size_in_bytes=10, spec_id=0))
    with pytest.raises(IcebergError, match="non-Parquet data file"):
        source_files(orc)


def test_staging_location_and_file_names(catalog):
    table = make_table(catalog, "docs", appends=0)
    staging = staging_location(table, "2026-11-22_run.1")
    assert staging == f"{table.location()}/data/enriched-2026-11-22_run.1/"
    assert enriched_file_uri(staging, 7, "s3://b/t/data/00000-1-abc.parquet") == \
        f"{staging}00007-00000-1-abc.parquet"
    with pytest.raises(ValueError, match="bad run id"):
        staging_location(table, "../escape")
    # An empty table: nothing to replace, the schema still gains the columns.
    assert commit_enriched(table, {}, [4]) is None
    assert "embedding_4" in load_table(catalog, "lake.docs").schema().column_names


def test_commit_loses_a_race_with_another_writer_cleanly(catalog, monkeypatch):
    import pipeline.io.iceberg as iceberg

    table = make_table(catalog, "docs", appends=2)
    mapping, _ = enrich(table, "run1", [4])
    read_footers = iceberg._read_footers

    def race(*args):  # another writer commits after the check, before the commit
        load_table(catalog, "lake.docs").append(batch(100, 5, seed=9))
        return read_footers(*args)

    monkeypatch.setattr(iceberg, "_read_footers", race)
    with pytest.raises(IcebergError, match="another writer committed .* nothing was committed"):
        commit_enriched(table, mapping, [4])
    table = load_table(catalog, "lake.docs")
    assert table.scan().to_arrow().num_rows == 2 * 12 + 5
    assert "embedding_4" not in table.schema().column_names
