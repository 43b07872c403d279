"""End to end through the CLI: a real local Ray, moto's S3 server on 127.0.0.1, real Parquet.

Inputs, model and outputs all live on the S3 endpoint. The in-process runs reach it only
through ``--s3-endpoint`` (the Ray workers were started before ``AWS_ENDPOINT_URL`` was set);
the subprocess run reaches it only through the standard AWS environment.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import Embedder
from pipeline.cli import main
from pipeline.io.schema import read_metadata
from pipeline.model.builder import sample_texts
from tests.helpers import read_output, s3
from tests.s3server import s3_bucket, s3_client, s3_endpoint, upload_dir  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.ray]
DIMS = (64, 32)
REPO = Path(__file__).resolve().parents[1]


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def corpus_rows(n: int, start: int = 0) -> list[dict]:
    texts = sample_texts()
    return [{"id": start + i, "text": texts[(start + i) % len(texts)] + f" #{start + i}",
             "lang": f"l{(start + i) % 7}", "score": (start + i) * 0.5} for i in range(n)]


def upload_model(endpoint: str, bucket: str, model_dir: Path) -> str:
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    upload_dir(s3_client(endpoint), bucket, "models/tiny", files)
    return f"s3://{bucket}/models/tiny/"


def check_embeddings(table: pa.Table, rows: list[dict], embedder: Embedder, id_column: str,
                     task: str, dims=DIMS) -> None:
    by_id = {r[id_column]: r for r in rows}
    ids = table[id_column].to_pylist()
    assert sorted(ids) == sorted(by_id), "output ids must equal input ids, each once"
    want = embedder.encode([by_id[i]["text"] for i in ids], task=task, dims=dims)
    for d in dims:
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        assert table.schema.field(f"embedding_{d}").type == pa.list_(pa.float32(), d)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, want[d], atol=1e-5, rtol=0)


def test_parquet_shards_on_s3(cluster, s3_endpoint, s3_bucket, tiny_model_dir, embedder):
    sizes = [37, 5, 0, 130]  # uneven, one empty
    rows, client, start = [], s3_client(s3_endpoint), 0
    for i, n in enumerate(sizes):
        shard = corpus_rows(n, start)
        start += n
        rows += shard
        schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("lang", pa.string()),
                            ("score", pa.float64())])
        data = parquet_bytes(pa.Table.from_pylist(shard, schema=schema))
        client.put_object(Bucket=s3_bucket, Key=f"corpus/part-{i}.parquet", Body=data)
    client.put_object(Bucket=s3_bucket, Key="corpus/_SUCCESS", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="corpus/", Body=b"")  # a console "folder" marker
    model = upload_model(s3_endpoint, s3_bucket, tiny_model_dir)
    out = f"s3://{s3_bucket}/emb/"
    code = main(["run", "--input", f"s3://{s3_bucket}/corpus/", "--output", out,
                 "--model", model, "--dims", "64,32", "--keep-columns", "lang,score",
                 "--s3-endpoint", s3_endpoint, "--progress", "off", "--window-rows", "64",
                 "--rows-per-file", "100"])
    assert code == 0
    table, summary = read_output(s3(s3_endpoint), out)
    check_embeddings(table, rows, embedder, "id", "document")
    by_id = {r["id"]: r for r in rows}
    assert table.column_names == ["id", "lang", "score", "embedding_64", "embedding_32"]
    assert table.schema.field("score").type == pa.float64()
    assert [by_id[i]["lang"] for i in table["id"].to_pylist()] == table["lang"].to_pylist()
    assert [by_id[i]["score"] for i in table["id"].to_pylist()] == table["score"].to_pylist()
    meta = read_metadata(table.schema)
    assert meta["widths"] == [64, 32] and meta["prefix"] == "search_document: "
    assert meta["weights_fingerprint"] == summary["model"]["weights_fingerprint"]
    assert meta["model_id"] == model.rstrip("/") + "/" or meta["model_id"].startswith("s3://")
    assert summary["rows_in"] == summary["rows_embedded"] == len(rows) == sum(sizes)
    assert summary["rows_rejected"] == 0 and summary["reconciled"] is True
    assert summary["tokens"] > 0 and 0 <= summary["padding_waste"] < 1
    assert summary["input_files"] == 4 and summary["widths"] == [64, 32]
    # Files hold one input file's rows each (the unit of resume), at least 100 rows per
    # write unless a unit has fewer: not one file per 64-row block.
    assert 3 <= len(summary["output_files"]) <= 4
    assert summary["units"] == {"total": 4, "committed": 4, "resumed": 0, "committed_now": 4}
    # The full lists, for outputs whose summary cannot hold them, name the same files.
    base = out.rstrip("/")
    listed = json.loads(s3(s3_endpoint).cat(base.removeprefix("s3://") + "/_manifest/files.json"))
    assert summary["files"] == {"output": len(summary["output_files"]), "rejects": 0,
                                "list": f"{base}/_manifest/files.json"}
    assert listed == {"output_files": summary["output_files"], "rejects_files": []}


def test_gzip_jsonl_with_bad_rows(cluster, s3_endpoint, s3_bucket, tiny_model_dir, embedder):
    rows = [{"doc_id": f"d{r['id']}", "body": r["text"], "lang": r["lang"]}
            for r in corpus_rows(45)]
    lines = [json.dumps(r) for r in rows[:30]]
    lines += ['{"doc_id": "bad1", "body": ', json.dumps({"doc_id": "bad2", "body": ""}), ""]
    shards = {
        "a.jsonl.gz": gzip.compress("\n".join(lines).encode()),
        "b.jsonl.gz": gzip.compress(b""),
        "c.jsonl.gz": gzip.compress("\n".join(json.dumps(r) for r in rows[30:]).encode()),
    }
    upload_dir(s3_client(s3_endpoint), s3_bucket, "jsonl", shards)
    out = f"s3://{s3_bucket}/jsonl-emb/"
    command = ["run", "--input", f"s3://{s3_bucket}/jsonl/*.jsonl.gz", "--output", out,
               "--model", str(tiny_model_dir), "--dims", "64,32", "--id-column", "doc_id",
               "--text-column", "body", "--keep-columns", "lang", "--task", "query",
               "--s3-endpoint", s3_endpoint, "--progress", "off"]
    # 2 of 47 rejected, more than 2%: the run fails and writes no summary (readers wait for
    # one); relaxed, the same command keeps every unit and publishes it.
    assert main(command + ["--max-reject-fraction", "0.02"]) == 3
    fs = s3(s3_endpoint)
    assert not fs.exists(out.removeprefix("s3://") + "_summary.json")
    assert fs.exists(out.removeprefix("s3://") + "_manifest/files.json")
    code = main(command)
    assert code == 0
    table, summary = read_output(s3(s3_endpoint), out)
    assert summary["units"]["resumed"] == summary["units"]["total"]
    check_embeddings(table, [{"doc_id": r["doc_id"], "text": r["body"]} for r in rows], embedder,
                     "doc_id", "query")
    assert summary["rows_in"] == 47 and summary["rows_embedded"] == 45
    assert summary["rows_rejected"] == 2 and summary["reconciled"]
    assert summary["reject_reasons"] == {"malformed JSON": 1, "text is empty or whitespace only": 1}
    rejects = pq.read_table(s3(s3_endpoint).open(
        summary["rejects_files"][0].removeprefix("s3://"), "rb"))
    assert sorted(rejects["row"].to_pylist()) == [31, 32]
    assert set(rejects["id"].to_pylist()) == {None, "bad2"}


def test_cli_subprocess_with_the_aws_environment_only(s3_endpoint, s3_bucket, tiny_model_dir,
                                                      tmp_path, embedder):
    rows = corpus_rows(25)
    data = "\n".join(json.dumps({"id": r["id"], "text": r["text"]}) for r in rows).encode()
    upload_dir(s3_client(s3_endpoint), s3_bucket, "sub", {"x.jsonl": data})
    model = upload_model(s3_endpoint, s3_bucket, tiny_model_dir)
    out = f"s3://{s3_bucket}/sub-emb/"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["AWS_ENDPOINT_URL"] = s3_endpoint  # the standard variable, and no --s3-endpoint
    env["NOMIC_PIPELINE_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", f"s3://{s3_bucket}/sub/",
         "--output", out, "--model", model, "--dims", "64,32", "--output-dtype", "float16",
         "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert printed["rows_embedded"] == 25 and printed["reconciled"]
    fs = s3(s3_endpoint)
    (part,) = [p for p in fs.ls(out.removeprefix("s3://")) if "/part-" in p]
    table = pq.read_table(fs.open(part, "rb"))
    assert table.schema.field("embedding_64").type == pa.list_(pa.float16(), 64)
    want = embedder.encode([r["text"] for r in rows], dims=(64,))[64]
    got = np.stack(table["embedding_64"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(got, want[table["id"].to_numpy()], atol=2e-3)


def test_compression_suffixes_and_binary_ids(cluster, tmp_path, tiny_model_dir, embedder):
    import pyarrow as pa_

    rows = corpus_rows(12)
    body = "\n".join(json.dumps({"id": r["id"], "text": r["text"]}) for r in rows).encode()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gzip").write_bytes(gzip.compress(body[: body.index(b"\n", 600)]))
    rest = body[body.index(b"\n", 600) + 1:]
    with pa_.CompressedOutputStream(str(tmp_path / "in" / "B.JSONL.ZSTD"), "zstd") as f:
        f.write(rest)
    out = tmp_path / "out"
    # With a tokenizer actor of its own, as on GPU nodes (on CPU the encoder actors tokenize
    # by default: every other run here).
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(out), "--model",
                 str(tiny_model_dir), "--dims", "64", "--progress", "off",
                 "--tokenizer-actors", "1"]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["model"]["tokenizer_actors"] == 1
    assert summary["rows_embedded"] == 12 and summary["rows_rejected"] == 0
    assert summary["reconciled"]
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    check_embeddings(table, rows, embedder, "id", "document", dims=(64,))

    # Binary ids (UUID bytes) with a rejected row: the rejects file shows the id as hex.
    ids = [bytes([i]) * 16 for i in range(3)]
    pq.write_table(pa.table({"id": pa.array(ids, pa.binary(16)), "text": ["one", "", "three"]}),
                   tmp_path / "bin.parquet")
    out2 = tmp_path / "out2"
    assert main(["run", "--input", str(tmp_path / "bin.parquet"), "--output", str(out2),
                 "--model", str(tiny_model_dir), "--dims", "64", "--progress", "off",
                 "--max-reject-fraction", "0.5"]) == 0
    rejects = pq.read_table(sorted((out2 / "_rejects").glob("part-*.parquet")))
    assert rejects["id"].to_pylist() == [ids[1].hex()]
    assert pq.read_table(sorted(out2.glob("part-*.parquet")))["id"].type == pa.binary(16)


def test_a_failure_during_the_run_exits_3(cluster, tmp_path, tiny_model_dir, capsys):
    (tmp_path / "in").mkdir()
    lines = [{"id": 1, "text": "a", "score": 1}, {"id": 2, "text": "b", "score": "n/a"}]
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    code = main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", str(tiny_model_dir), "--dims", "64", "--keep-columns", "score",
                 "--progress", "off", "--on-bad-rows", "fail"])
    printed = capsys.readouterr()
    err = printed.err
    assert code == 3 and "row 2 of" in err and "a.jsonl was rejected (--on-bad-rows fail)" in err
    assert "kept column 'score'" in err
    assert not (tmp_path / "out" / "_summary.json").exists()
    # How to go on, on stderr after the error: the committed units stay; a row stopped the
    # run, so the input (or --on-bad-rows) must change first. Nothing on stdout.
    (hint,) = [line for line in err.splitlines() if "fix the input" in line]
    assert str(tmp_path / "out") in hint and "--on-bad-rows" in hint and "rerun" in hint
    assert err.splitlines().index(hint) > err.splitlines().index(
        next(line for line in err.splitlines() if line.startswith("error:")))
    assert "rows:" not in printed.out and "tokens/s" not in printed.out
