"""Enrichment round trips on a local Ray: a hive-partitioned Parquet table on S3 (moto's server
on 127.0.0.1) and an Iceberg table (SQLite catalog, local warehouse).

Every source row and column must come back with its values and types unchanged, partitions
kept, and the embedding columns equal to what the encoder gives for each row's text (null for
a row that cannot be embedded).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import Embedder
from pipeline.config import RunConfig
from pipeline.jobs.enrich import run_enrich
from pipeline.io import iceberg
from tests.helpers import s3
from tests.s3server import s3_bucket, s3_client, s3_endpoint  # noqa: F401

pytestmark = pytest.mark.slow
DIMS = (64, 32)
EMBEDDINGS = [f"embedding_{d}" for d in DIMS]




def source_table(n: int = 45) -> pa.Table:
    """Columns of many types; ids repeat (enrichment matches rows by position, not id); one
    empty text (kept, with null vectors)."""
    texts = [f"row {i}: {['a short note', 'quarterly sales report', 'Wetterbericht'][i % 3]}"
             for i in range(n)]
    texts[7] = ""
    return pa.table({
        "id": pa.array([i // 2 for i in range(n)], pa.int32()),
        "text": texts,
        "lang": [["en", "fr", "de"][i % 3] for i in range(n)],
        "score": pa.array([i / 7 if i % 5 else None for i in range(n)], pa.float32()),
        "when": pa.array([datetime.datetime(2026, 1, 1) + datetime.timedelta(minutes=13 * i)
                          for i in range(n)], pa.timestamp("us")),
        "tags": pa.array([[f"t{i % 4}"] * (i % 3) for i in range(n)], pa.list_(pa.string())),
        "price": pa.array([f"{i}.25" for i in range(n)]).cast(pa.decimal128(9, 2)),
    })


def check_embeddings(table: pa.Table, embedder: Embedder, empty: set[str]) -> None:
    texts = table["text"].to_pylist()
    good = [i for i, t in enumerate(texts) if t not in empty]
    want = embedder.encode([texts[i] for i in good], dims=DIMS)
    for d in DIMS:
        column = table[f"embedding_{d}"]
        assert column.null_count == len(texts) - len(good)
        got = np.array([column[i].as_py() for i in good], np.float32)
        np.testing.assert_allclose(got, want[d], atol=1e-5, rtol=0)


@pytest.mark.ray
def test_partitioned_parquet_table_round_trip_on_s3(cluster, s3_endpoint, s3_bucket,
                                                    tiny_model_dir, embedder, tmp_path):
    source = source_table()
    local = tmp_path / "table"
    for lang in ("de", "en", "fr"):  # hive layout: the partition column lives in the path
        rows = source.filter(pa.compute.equal(source["lang"], lang)).drop_columns(["lang"])
        (local / f"lang={lang}").mkdir(parents=True)
        for k in range(0, rows.num_rows, 10):
            pq.write_table(rows.slice(k, 10), local / f"lang={lang}" / f"part-{k // 10}.parquet",
                           row_group_size=4)
    client = s3_client(s3_endpoint)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*.parquet"))
    for name in names:
        client.put_object(Bucket=s3_bucket, Key=f"lake/docs/{name}", Body=(local / name).read_bytes())
    out = f"s3://{s3_bucket}/lake/docs_enriched"
    result = run_enrich(RunConfig(input=f"s3://{s3_bucket}/lake/docs/", output=out,
                                  model=str(tiny_model_dir), dims=DIMS, progress="off",
                                  s3_endpoint=s3_endpoint))
    assert result["reconciled"] and result["rows_out"] == 45
    assert result["rows_with_embeddings"] == 44 and result["rows_rejected"] == 1

    fs = s3(s3_endpoint)
    root = out.removeprefix("s3://")
    written = sorted(p[len(root) + 1:] for p in fs.find(root) if p.endswith(".parquet")
                     and "/_rejects/" not in p)
    assert written == names, "each file keeps its path (and its key=value folder)"
    assert not fs.exists(f"{root}/_staging")
    rejects = pq.read_table(fs.open(result["rejects_files"][0].removeprefix("s3://"), "rb"))
    assert rejects["reason"].to_pylist() == ["text is empty or whitespace only"]

    def read(path: str) -> pa.Table:
        ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                          exclude_invalid_files=True)
        return ds.to_table().sort_by([("lang", "ascending"), ("when", "ascending")])

    before = read(f"{s3_bucket}/lake/docs")
    after = read(root)
    assert after.select(before.column_names).equals(before), "every row and value unchanged"
    for name in before.column_names:
        assert after.schema.field(name).type == before.schema.field(name).type, name
    assert after.column_names == before.column_names[:-1] + EMBEDDINGS + ["lang"]
    assert after.schema.field("embedding_64").type == pa.list_(pa.float32(), 64)
    check_embeddings(after, embedder, empty={""})
    # One file read alone: the source file's columns, then the embeddings.
    one = pq.read_table(fs.open(f"{root}/{names[0]}", "rb"))
    src = pq.read_table(local / names[0])
    assert one.select(src.column_names).equals(src)
    assert json.loads(one.schema.metadata[b"nomic_moe_pipeline"])["widths"] == list(DIMS)

    # Again into the same output, from a glob inside one partition whose second file is
    # gone: the partition folder is kept in the paths, the gone file's enriched copy is
    # deleted, and the other partitions' files (outside this input) stay.
    gone = "lang=fr/part-1.parquet"
    client.delete_object(Bucket=s3_bucket, Key=f"lake/docs/{gone}")
    again = run_enrich(RunConfig(input=f"s3://{s3_bucket}/lake/docs/lang=fr/*.parquet",
                                 output=out, model=str(tiny_model_dir), dims=DIMS,
                                 progress="off", s3_endpoint=s3_endpoint))
    fs.invalidate_cache()
    written = sorted(p[len(root) + 1:] for p in fs.find(root) if p.endswith(".parquet")
                     and "/_rejects/" not in p)
    assert written == [n for n in names if n != gone]
    assert again["rows_out"] == 10 and again["enriched_names"] == written
    assert read(root).select(before.column_names).equals(read(f"{s3_bucket}/lake/docs"))


@pytest.fixture
def warehouse(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("PYICEBERG_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pyiceberg.yaml of the developer's
    return tmp_path / "warehouse"


@pytest.mark.ray
def test_iceberg_table_enriched_in_place_as_a_new_snapshot(cluster, tiny_model_dir, embedder,
                                                           warehouse):
    catalog = iceberg.load_catalog("lake", warehouse=str(warehouse))
    source = source_table().append_column("gone", pa.array(range(45), pa.int64()))
    table = iceberg.create_table_from(catalog, "iceberg:lake.docs", source.schema, ["lang"])
    for k in range(3):  # three appends: several data files per partition
        table.append(source.slice(15 * k, 15))
    with table.update_schema() as update:  # old data files still hold the dropped column
        update.delete_column("gone")
    table = table.refresh()
    source = source.drop_columns(["gone"])
    old_snapshot = table.current_snapshot().snapshot_id
    old_fields = {f.name: (f.field_id, f.field_type) for f in table.schema().fields}
    before = table.scan().to_arrow().sort_by("when")

    config = RunConfig(input="iceberg:lake.docs", output="iceberg:lake.docs",
                       model=str(tiny_model_dir), dims=DIMS, progress="off",
                       iceberg_catalog="lake", iceberg_warehouse=str(warehouse))
    result = run_enrich(config)
    assert result["reconciled"] and result["rows_out"] == 45 and result["rows_with_embeddings"] == 44
    table = iceberg.load_table(iceberg.load_catalog("lake", warehouse=str(warehouse)), "lake.docs")
    snapshot = table.current_snapshot()
    assert snapshot.snapshot_id == result["iceberg"]["snapshot_id"] != old_snapshot
    history = [h.snapshot_id for h in table.history()]
    assert history[-1] == snapshot.snapshot_id and old_snapshot in history[:-1]
    assert snapshot.summary["pipeline.rows-embedded"] == "44"
    new_fields = {f.name: (f.field_id, f.field_type) for f in table.schema().fields}
    assert {k: new_fields[k] for k in old_fields} == old_fields, "old columns keep ids and types"
    assert set(new_fields) - set(old_fields) == set(EMBEDDINGS)
    assert [f.name for f in table.spec().fields] == ["lang"]

    after = table.scan().to_arrow().sort_by("when")
    assert after.select(before.column_names).equals(before), "every row and value unchanged"
    check_embeddings(after, embedder, empty={""})
    # Time travel: the old snapshot still reads the old table.
    # (Iceberg reads a snapshot with its own schema, which still has the dropped column.)
    old = table.scan(snapshot_id=old_snapshot).to_arrow().sort_by("when")
    assert old.column_names == before.column_names + ["gone"]
    assert old.select(before.column_names).equals(before)
    # Partition pruning still works on the enriched files.
    fr = table.scan(row_filter="lang == 'fr'").to_arrow()
    assert fr.num_rows == 15 and set(fr["lang"].to_pylist()) == {"fr"}
    # The staging output is gone; the rejects are kept beside the summary.
    enrich_dir = Path(table.location().removeprefix("file://")) / "_enrich"
    assert sorted(p.name for p in enrich_dir.iterdir()) == [
        f"{old_snapshot}-rejects", f"{old_snapshot}-summary.json"]


def test_partition_folders_stay_in_the_output_paths(tmp_path):
    from pipeline.jobs.enrich import _input_base
    from pipeline.io.storage import list_inputs

    folder = tmp_path / "t" / "a=1" / "b=x"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), folder / "p0.parquet")
    root = str(tmp_path / "t")
    for given in (f"{root}/a=1/b=x/p0.parquet", f"{root}/a=1/*/*.parquet", f"{root}/a=1/",
                  f"{root}/a=1/b=x", root):
        assert _input_base(given, list_inputs(given), None) == root, given
    import os

    cwd = os.getcwd()
    try:  # a relative partition folder: named from the current folder
        os.chdir(tmp_path / "t")
        assert _input_base("a=1", list_inputs("a=1"), None) == "."
        assert _input_base("a=1/b=x/p0.parquet", list_inputs("a=1/b=x/p0.parquet"), None) == "."
    finally:
        os.chdir(cwd)


def test_enrich_refusals_exit_2_before_ray(tmp_path, tiny_model_dir, warehouse, capsys,
                                          monkeypatch):
    """In this process, with Ray's start (or join) failing the test: a refusal must come
    before it (the suite's shared Ray may be up around this test)."""
    import pipeline.cluster.session as session
    from pipeline.cli import main

    def no_ray(config):
        raise AssertionError("Ray was started (or joined) before the refusal")

    monkeypatch.setattr(session, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')

    def enrich(*argv: str) -> tuple[int, str]:
        code = main(["enrich", *argv, "--model", str(tiny_model_dir)])
        return code, capsys.readouterr().err

    code, err = enrich("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert code == 2 and "enrich reads Parquet tables" in err
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.table({"id": [2], "body": ["y"]}), tmp_path / "pq" / "b.parquet")
    code, err = enrich("--input", str(tmp_path / "pq"), "--output", str(tmp_path / "out"))
    assert code == 2 and "b.parquet has no ['text']" in err, err[-500:]
    code, err = enrich("--input", "iceberg:lake.docs", "--output", "iceberg:lake.other",
                       "--iceberg-warehouse", str(warehouse))
    assert code == 2 and "enriched in place" in err
    code, err = enrich("--input", "iceberg:lake.missing", "--output", "iceberg:lake.missing",
                       "--iceberg-warehouse", str(warehouse))
    assert code == 2 and "does not exist" in err, err[-2000:]
