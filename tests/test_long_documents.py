"""``--long-text chunk`` end to end on a local Ray: ``run`` (chunk rows, document vectors, a
50 MB document among small ones), ``nightly`` (a document that grows, one that shrinks to one
chunk, one deleted: exactly their chunks and document vectors change; a resumed night) and
``enrich`` (document vectors appended row-aligned, the chunk table beside the table). Rows in
are documents; chunks are counted. Nightly document vectors are also checked in-process
(no Ray), night after night through the stages the nightly graph chains."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.chunking import LongText
from pipeline.config import RunConfig
from pipeline.io import schema as S
from pipeline.io.readers import ReadSpec
from pipeline.io.writers import OutputSpec, write_outputs
from pipeline.jobs.enrich import run_enrich
from pipeline.jobs.nightly import run_nightly
from pipeline.jobs.run import run
from pipeline.model.builder import sample_texts
from pipeline.stages.diff import (HASH_COLUMN, diff_bucket, hash_rows, plan_diff, read_previous,
                                  read_previous_documents)
from pipeline.stages.embed import EncodeStage, TokenizeStage
from tests.helpers import reader_rows
from tests.test_chunking import long_documents

DIMS = (64, 32)
CHUNKING = dict(long_text="chunk", chunk_tokens=128, chunk_overlap=16)


def write_jsonl(path: Path, docs: dict[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                            for i, t in docs.items()), encoding="utf-8")


def parts(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


def check_chunk_table(table: pa.Table, texts: dict[int, str], embedder) -> None:
    rows = table.to_pydict()
    assert rows["chunk_text"] == [texts[i][a:b] for i, a, b in
                                  zip(rows["id"], rows["char_start"], rows["char_end"])]
    for doc in set(rows["id"]):
        mine = sorted(c for i, c in zip(rows["id"], rows["chunk"]) if i == doc)
        assert mine == list(range(len(mine)))
    want = embedder.encode(rows["chunk_text"], dims=DIMS)
    for d in DIMS:
        np.testing.assert_allclose(np.array(rows[f"embedding_{d}"], np.float32), want[d],
                                   atol=1e-5)


@pytest.mark.ray
def test_run_writes_chunks_and_document_vectors_and_rejects_a_50_mb_document(
        cluster, tmp_path, tiny_model_dir, embedder):
    docs = long_documents()
    texts = {i: docs[name][:3000] for i, name in enumerate(("prose", "cjk", "emoji", "controls"))}
    texts |= {10: "a short text", 11: "  ", 12: sample_texts()[3]}
    huge = {20: "all work and no play. " * (50_000_000 // 22)}  # 50 MB, one line
    write_jsonl(tmp_path / "in" / "a.jsonl", texts)
    write_jsonl(tmp_path / "in" / "b.jsonl", huge)
    out = tmp_path / "out"
    result = run(RunConfig(input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir),
                           dims=DIMS, progress="off", keep_chunk_text=True, doc_vectors=True,
                           max_reject_fraction=1.0, **CHUNKING))
    assert result["reconciled"] and result["rows_in"] == 8
    assert (result["rows_embedded"], result["rows_rejected"]) == (6, 2)
    assert result["reject_reasons"] == {"text is empty or whitespace only": 1,
                                        "document over --max-chunks": 1}
    assert result["docs_over_max_chunks"] == 1
    table = parts(out)
    assert result["chunks"] == table.num_rows and result["docs_chunked"] == 4
    assert result["chunks_per_doc_max"] == max(table["chunks"].to_pylist())
    check_chunk_table(table, texts | huge, embedder)
    documents = parts(out / "_documents")
    assert sorted(documents["id"].to_pylist()) == [0, 1, 2, 3, 10, 12]
    short = documents.filter(pa.compute.equal(documents["id"], 10))
    np.testing.assert_allclose(short["embedding_64"].to_pylist()[0],
                               embedder.encode(["a short text"], dims=DIMS)[64][0], atol=1e-5)
    assert result["documents_files"] and json.loads((out / "_summary.json").read_text())["chunks"]


def unfinish(out: Path, name: str, base: str, lose: str, keep: str) -> str:
    """A copy of the snapshot ``name`` as a night on ``base`` killed after committing the unit
    of ``keep`` (its manifest's counts as a night that reused its rows would have committed
    them) but not the unit of ``lose`` (whose part and document files are left behind)."""
    from pipeline.snapshots import new_snapshot_name

    unfinished = new_snapshot_name({name, base})
    shutil.copytree(out / name, out / unfinished)
    (out / unfinished / "_summary.json").unlink()
    run_file = out / unfinished / "_manifest" / "_run.json"
    document = json.loads(run_file.read_text())
    document["identity"]["nightly"]["base"] = base
    run_file.write_text(json.dumps(document))
    for manifest in (out / unfinished / "_manifest").glob("unit-*.json"):
        unit = json.loads(manifest.read_text())
        if unit["uri"].endswith(lose):
            manifest.unlink()
        elif unit["uri"].endswith(keep):
            rows = unit["rows_embedded"]
            manifest.write_text(json.dumps(unit | {"rows_new": 0, "rows_unchanged": rows,
                                                   "rows_reused": rows}))
    return unfinished


@pytest.mark.ray
def test_nightly_replaces_exactly_the_chunks_of_changed_documents(
        cluster, tmp_path, tiny_model_dir, embedder, tokenizer_json, doc_encoder):
    """Night 2 resumes a night killed after committing b.jsonl's unit (made here from night 1's
    snapshot): its document vectors are kept, a.jsonl's left-behind files are not."""
    prose = long_documents()["prose"] * 3
    day1 = {1: prose[:2500], 2: prose[2500:4500], 3: prose[4500:7000], 4: "stays short",
            5: prose[9000:11000]}
    day2 = {1: day1[1], 2: day1[2] + " " + prose[7000:9000],  # 2 grows
            3: "now one chunk", 4: day1[4]}  # 3 shrinks to one chunk, 5 is deleted
    unchanged = {6: prose[11000:13000]}  # b.jsonl, the same both days
    write_jsonl(tmp_path / "in" / "a.jsonl", day1)
    write_jsonl(tmp_path / "in" / "b.jsonl", unchanged)
    out = tmp_path / "night"
    config = RunConfig(input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir),
                       dims=DIMS, progress="off", keep_chunk_text=True, doc_vectors=True,
                       **CHUNKING)
    first = run_nightly(config)
    resumed = unfinish(out, first["snapshot"], first["snapshot"], "a.jsonl", "b.jsonl")
    write_jsonl(tmp_path / "in" / "a.jsonl", day2)
    second = run_nightly(config)
    assert second["snapshot"] == resumed and second["units"]["resumed"] == 1
    assert (second["rows_changed"], second["rows_unchanged"], second["rows_deleted"]) == (2, 3, 1)
    assert second["rows_reused"] == 3 and second["rows_embedded"] == 2
    before = parts(out / first["snapshot"]).to_pydict()
    after = parts(out / second["snapshot"])
    check_chunk_table(after, day2 | unchanged, embedder)
    rows = after.to_pydict()

    def chunks_of(table, doc):
        return [(c, t, v) for i, c, t, v in zip(table["id"], table["chunk"], table["chunk_text"],
                                                 table["embedding_64"]) if i == doc]
    for doc in (1, 4, 6):  # unchanged: the very same chunks and vectors
        assert sorted(chunks_of(rows, doc)) == sorted(chunks_of(before, doc))
    assert len(chunks_of(rows, 2)) > len(chunks_of(before, 2))
    assert len(chunks_of(rows, 3)) == 1 and len(chunks_of(before, 3)) > 1
    assert 5 not in rows["id"] and second["chunks"] == after.num_rows

    # One vector per document, each once (the killed night's files of a.jsonl are gone):
    # the unchanged ones the previous snapshot's very values, the others as `run` makes them.
    docs, old = documents_of(out / second["snapshot"]), documents_of(out / first["snapshot"])
    assert sorted(docs) == [1, 2, 3, 4, 6] and sorted(old) == [1, 2, 3, 4, 5, 6]
    assert sorted(second["documents_files"]) == sorted(
        str(p) for p in (out / second["snapshot"] / "_documents").iterdir())
    for doc in (1, 4, 6):
        assert docs[doc] == old[doc]
    want = run_documents({2: day2[2], 3: day2[3]}, tokenizer_json, doc_encoder)
    for doc in (2, 3):
        assert docs[doc][HASH_COLUMN] != old[doc][HASH_COLUMN]
        for d in DIMS:
            np.testing.assert_allclose(docs[doc][f"embedding_{d}"], want[doc][d], atol=1e-5)


@pytest.mark.ray
def test_enrich_appends_document_vectors_and_writes_the_chunk_table(cluster, tmp_path,
                                                                     tiny_model_dir, embedder):
    prose = long_documents()["prose"]
    source = pa.table({"id": [7, 7, 8], "text": [prose[:3000], "short", prose[3000:6000]],
                       "x": [1.0, 2.0, 3.0]})
    (tmp_path / "table").mkdir()
    pq.write_table(source, tmp_path / "table" / "p.parquet")
    out = tmp_path / "enriched"
    result = run_enrich(RunConfig(input=str(tmp_path / "table"), output=str(out),
                                  model=str(tiny_model_dir), dims=DIMS, progress="off",
                                  **CHUNKING))
    assert result["reconciled"] and result["rows_with_embeddings"] == 3
    enriched = pq.read_table(out / "p.parquet")
    assert enriched.select(source.column_names).equals(source)
    chunks = parts(out / "_chunks")
    assert sorted(set(chunks["_row"].to_pylist())) == [0, 1, 2]
    assert result["chunks"] == chunks.num_rows and not (out / "_staging").exists()
    # Row 1 fits: its document vector is its plain embedding.
    np.testing.assert_allclose(enriched["embedding_64"].to_pylist()[1],
                               embedder.encode(["short"], dims=DIMS)[64][0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Nightly document vectors in-process: hash -> diff -> tokenize -> encode -> write, as the
# nightly graph chains them (one bucket per diff call), night after night on a local folder.

LONG_TEXT = LongText("chunk", CHUNKING["chunk_tokens"], CHUNKING["chunk_overlap"],
                     doc_vectors=True)
READ = ReadSpec("id", "text", ("lang",), pa.int64(), keep_types=(("lang", pa.string()),))


def doc_encoder_of(model_dir: Path, output_dtype: str) -> EncodeStage:
    # One thread: two OpenMP threads on a busy 2-core machine took 10-30x longer here.
    return EncodeStage(str(model_dir), revision=None, device="cpu", dtype="float32",
                       dims=DIMS, output_dtype=output_dtype, max_tokens_per_batch=2048,
                       doc_vectors=True, threads=1)


@pytest.fixture(scope="module")
def doc_encoder(tiny_model_dir) -> Iterator[EncodeStage]:
    import torch

    before = torch.get_num_threads()
    yield doc_encoder_of(tiny_model_dir, "float32")
    torch.set_num_threads(before)  # the process's other tests keep theirs


def night(out: Path, texts: dict[int, str], tokenizer_json, encoder, previous: Path | None,
          doc_vectors: bool = True):
    """One night into ``out`` against the snapshot folder ``previous``: (records, diff)."""
    long_text = dataclasses.replace(LONG_TEXT, doc_vectors=doc_vectors)
    identity = {"task": "document", "id_column": "id", "dims": list(DIMS),
                "output_dtype": encoder.output_dtype, "long_text": long_text.identity()}
    sized = lambda pattern: tuple((str(p), p.stat().st_size)  # noqa: E731
                                  for p in sorted(previous.glob(pattern))) if previous else ()
    diff = plan_diff(identity=identity, read=READ, previous_identity=json.loads(
        (previous / "identity.json").read_text()) if previous else None,
        previous_files=sized("part-*.parquet"), previous_documents=sized("_documents/part-*"),
        todo_bytes=0, seen_files=(), cpus=2)
    sides = [hash_rows(reader_rows(list(texts), list(texts.values())), "document",
                       diff.buckets, diff.schema)]
    sides += [t for uri, _ in diff.previous_files for t in read_previous(uri, diff, {})]
    sides += [t for uri, _ in diff.previous_documents
              for t in read_previous_documents(uri, diff, {})]
    table = pa.concat_tables(sides)
    rows = pa.concat_tables([r for b in range(diff.buckets) for r in diff_bucket(
        table.filter(pc.equal(table[S.BUCKET], b)), diff)])
    encoded = encoder(TokenizeStage(tokenizer_json, "document", long_text)(rows))
    spec = OutputSpec("id", ("lang",), DIMS, encoder.output_dtype, {}, long_text=long_text,
                      extra_columns=((HASH_COLUMN, S.HASH),))
    out.mkdir()
    records = write_outputs(fsspec.filesystem("file"), str(out), encoded, spec)
    (out / "identity.json").write_text(json.dumps(identity))
    return records, diff


def documents_of(folder: Path) -> dict[int, dict]:
    """The document rows of a snapshot folder by id (each id once)."""
    rows = parts(folder / "_documents").to_pylist()
    assert len({r["id"] for r in rows}) == len(rows), "a document written twice"
    return {r["id"]: r for r in rows}


def run_documents(texts: dict[int, str], tokenizer_json, encoder) -> dict[int, dict]:
    """What ``run`` computes for these documents: the same stages without the diff."""
    encoded = encoder(TokenizeStage(tokenizer_json, "document", LONG_TEXT)(
        reader_rows(list(texts), list(texts.values()))))
    return {i: {d: encoded[S.doc_embedding(d)][k].as_py() for d in DIMS}
            for k, i in enumerate(encoded[S.ID].to_pylist())}


def test_nightly_document_vectors_in_process(tmp_path, tokenizer_json, doc_encoder):
    prose = long_documents()["prose"] * 2
    day1 = {1: prose[:2500], 2: prose[2500:4500], 3: "short and stays", 4: prose[4500:7000]}
    day2 = {1: day1[1], 2: day1[2] + " " + prose[7000:8500], 3: day1[3],  # 2 grows
            5: "a new document " + prose[8500:10000]}  # 4 is deleted, 5 is new
    want = run_documents(day2, tokenizer_json, doc_encoder)

    first, _ = night(tmp_path / "n1", day1, tokenizer_json, doc_encoder, None)
    second, diff = night(tmp_path / "n2", day2, tokenizer_json, doc_encoder, tmp_path / "n1")
    assert diff.reuse_documents and len(diff.previous_documents) == 1
    (rec,) = second
    assert (rec["rows_new"], rec["rows_changed"], rec["rows_unchanged"], rec["rows_reused"]) \
        == (1, 1, 2, 2)
    before, after = documents_of(tmp_path / "n1"), documents_of(tmp_path / "n2")
    chunks = parts(tmp_path / "n2")
    # One document row per document of the snapshot: rows out = documents = chunk tables' ids.
    assert sorted(after) == sorted(set(chunks["id"].to_pylist())) == sorted(day2)
    assert len(after) == rec["rows_embedded"] and rec["files"][-1].startswith("_documents/")
    for i in (1, 3):  # unchanged: the previous snapshot's very values
        assert after[i] == before[i] | {"lang": after[i]["lang"]}
    for i in day2:  # each as `run` computes it (reused ones included)
        for d in DIMS:
            np.testing.assert_allclose(after[i][f"embedding_{d}"], want[i][d], atol=1e-5)
    for i, doc in after.items():  # the chunks' own counts, also for reused documents
        mine = chunks.filter(pc.equal(chunks["id"], i))
        assert (doc["chunks"], doc["tokens"]) == (mine.num_rows, pc.sum(mine["tokens"]).as_py())
    assert after[1]["chunks"] > 1 and after[2]["chunks"] > before[2]["chunks"]

    # A snapshot made without document vectors: the next night asking for them embeds every
    # document again (their pooled mean cannot come from stored chunk vectors); none missing.
    night(tmp_path / "m1", day1, tokenizer_json, doc_encoder, None, doc_vectors=False)
    assert not (tmp_path / "m1" / "_documents").exists()
    (rec,), diff = night(tmp_path / "m2", day2, tokenizer_json, doc_encoder, tmp_path / "m1")
    assert not diff.reuse and "no document vectors" in diff.reembed_reason
    assert (rec["rows_unchanged"], rec["rows_reused"]) == (2, 0)
    again = documents_of(tmp_path / "m2")
    assert sorted(again) == sorted(day2)
    for i in day2:
        for d in DIMS:
            np.testing.assert_allclose(again[i][f"embedding_{d}"], want[i][d], atol=1e-5)


def test_nightly_float16_document_vectors_are_reused_bit_for_bit(tmp_path, tiny_model_dir,
                                                                  tokenizer_json, doc_encoder):
    encoder = doc_encoder_of(tiny_model_dir, "float16")
    prose = long_documents()["prose"]
    day1 = {1: prose[:2000], 2: prose[2000:3500]}
    day2 = {1: day1[1], 2: prose[3500:5000]}
    night(tmp_path / "n1", day1, tokenizer_json, encoder, None)
    (rec,), _ = night(tmp_path / "n2", day2, tokenizer_json, encoder, tmp_path / "n1")
    assert rec["rows_reused"] == 1
    before, after = (pq.read_table(tmp_path / n / "_documents") for n in ("n1", "n2"))
    assert after.schema.field("embedding_64").type == pa.list_(pa.float16(), 64)
    row = lambda t, i: t.filter(pc.equal(t["id"], i)).to_pylist()[0]  # noqa: E731
    assert row(after, 1) == row(before, 1)
    want = run_documents({2: day2[2]}, tokenizer_json, doc_encoder)[2]
    for d in DIMS:  # float16 keeps ~3 significant digits
        np.testing.assert_allclose(row(after, 2)[f"embedding_{d}"], want[d], atol=2e-3)
