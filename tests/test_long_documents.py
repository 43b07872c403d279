"""``--long-text chunk`` end to end on a local Ray: ``run`` (chunk rows, document vectors, a
50 MB document among small ones), ``nightly`` (a document that grows, one that shrinks to one
chunk, one deleted: exactly their chunks change) and ``enrich`` (document vectors appended
row-aligned, the chunk table beside the table). Rows in are documents; chunks are counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import RunConfig
from pipeline.jobs.enrich import run_enrich
from pipeline.jobs.nightly import run_nightly
from pipeline.jobs.run import run
from pipeline.model.builder import sample_texts
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


@pytest.mark.ray
def test_nightly_replaces_exactly_the_chunks_of_changed_documents(cluster, tmp_path,
                                                                   tiny_model_dir, embedder):
    prose = long_documents()["prose"] * 3
    day1 = {1: prose[:2500], 2: prose[2500:4500], 3: prose[4500:7000], 4: "stays short",
            5: prose[9000:11000]}
    day2 = {1: day1[1], 2: day1[2] + " " + prose[7000:9000],  # 2 grows
            3: "now one chunk", 4: day1[4]}  # 3 shrinks to one chunk, 5 is deleted
    write_jsonl(tmp_path / "d1" / "a.jsonl", day1)
    write_jsonl(tmp_path / "d2" / "a.jsonl", day2)
    config = dict(output=str(tmp_path / "night"), model=str(tiny_model_dir), dims=DIMS,
                  progress="off", keep_chunk_text=True, **CHUNKING)
    first = run_nightly(RunConfig(input=str(tmp_path / "d1"), **config))
    second = run_nightly(RunConfig(input=str(tmp_path / "d2"), **config))
    assert (second["rows_changed"], second["rows_unchanged"], second["rows_deleted"]) == (2, 2, 1)
    assert second["rows_reused"] == 2 and second["rows_embedded"] == 2
    before = parts(tmp_path / "night" / first["snapshot"]).to_pydict()
    after = parts(tmp_path / "night" / second["snapshot"])
    check_chunk_table(after, day2, embedder)
    rows = after.to_pydict()

    def chunks_of(table, doc):
        return [(c, t, v) for i, c, t, v in zip(table["id"], table["chunk"], table["chunk_text"],
                                                 table["embedding_64"]) if i == doc]
    for doc in (1, 4):  # unchanged: the very same chunks and vectors
        assert sorted(chunks_of(rows, doc)) == sorted(chunks_of(before, doc))
    assert len(chunks_of(rows, 2)) > len(chunks_of(before, 2))
    assert len(chunks_of(rows, 3)) == 1 and len(chunks_of(before, 3)) > 1
    assert 5 not in rows["id"] and second["chunks"] == after.num_rows


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
