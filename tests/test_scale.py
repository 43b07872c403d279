"""The scale benchmark's own parts (no Ray): the corpus it writes, and a run killed at 50%."""

from __future__ import annotations

import json
import mmap
import time

import pyarrow.parquet as pq
import pytest

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


def test_each_job_gets_its_own_peak():
    # A phase's peak must not carry an earlier phase's: 128 MiB touched then freed before the
    # reset is in the process's peak (kept in PEAKS), not in the next phase's.
    big = bytearray(128 << 20)
    big[::4096] = b"x" * len(big[::4096])
    del big
    reset = scale._new_peak()
    if not reset:
        pytest.skip("the peak RSS cannot be reset on this system")
    before = scale.PEAKS[-1]
    after = scale._peak_since(reset)
    assert after < before - (96 << 20)
    assert scale._peak_since(False) is None


def test_rss_kinds_peak_holds_memory_freed_before_the_end():
    # 96 MiB of new private anonymous pages (a mapping of their own: the allocator's free pages,
    # already resident in a long-lived process, cannot stand in), touched then unmapped
    # inside the block: its anon peak holds them (sampled while they were there), its end
    # does not.
    if not scale.rss_kinds():
        pytest.skip("no /proc/self/status on this system")
    before = scale.rss_kinds()["anon"]
    with scale.RssKindPeaks(every=0.01) as kinds:
        big = mmap.mmap(-1, 96 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for at in range(0, len(big), 4096):
            big[at] = 1
        time.sleep(0.1)
        big.close()
    assert set(kinds.peaks) == {"anon", "file", "shmem"}
    assert kinds.peaks["anon"] >= before + (80 << 20)
    assert scale.rss_kinds()["anon"] < kinds.peaks["anon"] - (64 << 20)
