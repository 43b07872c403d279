"""The scale benchmark's own parts (no Ray): the corpus it writes, and a run killed at 50%."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipeline.bench import scale
from pipeline.io.storage import MANIFEST_DIR, SUMMARY_NAME, list_inputs


def test_shards_hold_every_row_once():
    shards = scale.shard_rows(7, 30)
    assert [len(s) for s in shards] == [5, 5, 4, 4, 4, 4, 4]
    assert [i for s in shards for i in s] == list(range(30))


def test_corpus_is_listed_as_written(tmp_path):
    scale.write_corpus(tmp_path / "p", 4, 10, "parquet")
    scale.write_corpus(tmp_path / "j", 3, 7, "jsonl")
    parquet, jsonl = list_inputs(str(tmp_path / "p")), list_inputs(str(tmp_path / "j"))
    assert len(parquet) == 4 and {f.format for f in parquet} == {"parquet"}
    assert sum(pq.read_metadata(f.uri).num_rows for f in parquet) == 10
    lines = [json.loads(line) for f in jsonl for line in open(f.uri)]
    assert sorted(r["id"] for r in lines) == list(range(7))
    assert scale.row_text(3) != scale.row_text(3, night=2)


def test_kill_at_half_leaves_the_earlier_half(tmp_path):
    manifests = tmp_path / MANIFEST_DIR
    manifests.mkdir()
    for k in range(5):
        (manifests / f"unit-{k}.json").write_text(json.dumps({"committed_at": 10 - k}))
    (tmp_path / SUMMARY_NAME).write_text("{}")
    assert scale.kill_at_half(tmp_path) == 3
    # The two committed first (the highest k: the earliest commit times) are kept.
    assert sorted(p.name for p in manifests.iterdir()) == ["unit-3.json", "unit-4.json"]
    assert not (tmp_path / SUMMARY_NAME).exists()
