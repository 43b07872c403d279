"""The nightly job (``pipeline/jobs/nightly.py``) end to end: snapshots on S3 (moto's server on
127.0.0.1), a local Ray; and its refusals, found before Ray starts.

Run 1 embeds a corpus; texts are then changed, rows added and deleted; run 2 must encode
exactly the new and changed rows, reuse the others' vectors, and publish a snapshot equal to
a from-scratch run on the new corpus. A run 2 killed mid-way leaves ``_LATEST`` on run 1's
complete snapshot, and the next run resumes it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import Embedder
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.io.errors import OutputError
from pipeline.model.builder import sample_texts
from pipeline.jobs.nightly import run_nightly
from pipeline.snapshots import LATEST, new_snapshot_name
from pipeline.stages.diff import HASH_COLUMN, content_hash
from pipeline.tokenize import add_prefix
from tests.helpers import read_output, s3
from tests.s3server import s3_bucket, s3_client, s3_endpoint, upload_dir  # noqa: F401

DIMS = (64, 32)




def make_corpus(shards: int, rows: int) -> dict[str, dict[int, dict]]:
    texts = sample_texts()
    return {f"shard-{s:02d}.jsonl": {
        s * 1000 + i: {"id": s * 1000 + i, "text": f"{texts[(s + i) % len(texts)]} {s}.{i}",
                       "lang": ["en", "fr", "de"][i % 3]}
        for i in range(rows)} for s in range(shards)}


def encoded(corpus: dict[str, dict[int, dict]]) -> dict[str, bytes]:
    return {name: "\n".join(json.dumps(r) for r in rows.values()).encode()
            for name, rows in corpus.items()}


def edit(corpus: dict[str, dict[int, dict]]) -> tuple[dict, dict[str, set]]:
    """Change 3 texts, delete 4 rows, add 5 (3 in a new shard), change a kept value only."""
    new = {name: {i: dict(r) for i, r in rows.items()} for name, rows in corpus.items()}
    s0, s1 = new["shard-00.jsonl"], new["shard-01.jsonl"]
    changed = {0, 1, 1002}
    s0[0]["text"] += " (edited)"
    s0[1]["text"] = "A wholly different text."
    s1[1002]["text"] = s1[1002]["text"].upper()
    deleted = {5, 6, 1007, 2003}
    for i in deleted:
        new[f"shard-{i // 1000:02d}.jsonl"].pop(i)
    added = {900, 901, 9000, 9001, 9002}
    s0[900] = {"id": 900, "text": "Brand new row", "lang": "en"}
    s0[901] = {"id": 901, "text": "Another new row", "lang": "fr"}
    new["shard-new.jsonl"] = {i: {"id": i, "text": f"new shard row {i}", "lang": "de"}
                             for i in (9000, 9001, 9002)}
    s1[1004]["lang"] = "xx"  # a kept column changes, its text does not
    return new, {"changed": changed, "deleted": deleted, "added": added}


def texts_of(corpus) -> dict[int, str]:
    return {i: r["text"] for rows in corpus.values() for i, r in rows.items()}


def config(input_uri: str, output_uri: str, model: Path, **extra) -> RunConfig:
    # The endpoint explicitly: Ray's workers started before the test set AWS_ENDPOINT_URL.
    import os

    return RunConfig(input=input_uri, output=output_uri, model=str(model), dims=DIMS,
                     keep_columns=("lang",), progress="off",
                     s3_endpoint=os.environ.get("AWS_ENDPOINT_URL"), **extra)


def latest(fs, out: str) -> str:
    fs.invalidate_cache()
    return fs.cat(f"{out.removeprefix('s3://')}/{LATEST}").decode().strip()


def read_snapshot(fs, out: str, name: str) -> tuple[pa.Table, dict]:
    fs.invalidate_cache()
    table, summary = read_output(fs, f"{out}/{name}")
    return table.sort_by("id"), summary


def check_snapshot(table: pa.Table, corpus, embedder: Embedder) -> None:
    """Every id once, kept columns and hashes of today's rows, vectors equal to the encoder's."""
    rows = {i: r for rs in corpus.values() for i, r in rs.items()}
    ids = table["id"].to_pylist()
    assert ids == sorted(rows), "the snapshot holds exactly today's ids, each once"
    assert table["lang"].to_pylist() == [rows[i]["lang"] for i in ids]
    assert table[HASH_COLUMN].to_pylist() == [
        content_hash(add_prefix(rows[i]["text"], "search_document: ")) for i in ids]
    want = embedder.encode([rows[i]["text"] for i in ids], dims=DIMS)
    for d in DIMS:
        got = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got, want[d], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.ray
def test_second_run_encodes_only_new_and_changed_rows_and_equals_a_fresh_run(
        cluster, s3_endpoint, s3_bucket, tiny_model_dir, embedder):
    """A fresh run's output is what check_snapshot compares with: every id, kept value, hash
    and vector as Embedder.encode gives them today."""
    fs = s3(s3_endpoint)
    client = s3_client(s3_endpoint)
    day1 = make_corpus(shards=5, rows=12)
    upload_dir(client, s3_bucket, "day1", encoded(day1))
    out = f"s3://{s3_bucket}/nightly"
    first = run_nightly(config(f"s3://{s3_bucket}/day1/", out, tiny_model_dir))
    assert first["rows_new"] == first["rows_embedded"] == first["rows_out"] == 60
    assert first["previous_snapshot"] is None and latest(fs, out) == first["snapshot"]

    day2, edits = edit(day1)
    upload_dir(client, s3_bucket, "day2", encoded(day2))
    second = run_nightly(config(f"s3://{s3_bucket}/day2/", out, tiny_model_dir))
    assert second["previous_snapshot"] == first["snapshot"] and second["reused_previous"]
    assert (second["rows_new"], second["rows_changed"], second["rows_deleted"]) == (5, 3, 4)
    assert second["rows_unchanged"] == second["rows_reused"] == 60 - 4 - 3
    assert second["rows_embedded"] == 8 and second["rows_out"] == 61
    assert second["reconciled"] and second["rows_in"] == 61 and second["rows_rejected"] == 0
    # Only the 8 encoded rows' tokens were computed.
    assert 0 < second["tokens"] < first["tokens"] / 4
    assert latest(fs, out) == second["snapshot"] != first["snapshot"]

    snap2, summary2 = read_snapshot(fs, out, second["snapshot"])
    check_snapshot(snap2, day2, embedder)
    assert summary2["rows_new"] == 5 and summary2["fingerprints"]["weights"].startswith("sha256:")
    # Reused vectors are the first snapshot's, bit for bit.
    snap1, _ = read_snapshot(fs, out, first["snapshot"])
    old = {i: v for i, v in zip(snap1["id"].to_pylist(), snap1["embedding_64"].to_pylist())}
    new = dict(zip(snap2["id"].to_pylist(), snap2["embedding_64"].to_pylist()))
    assert all(new[i] == old[i] for i in new if i in old and i not in edits["changed"])

    # Nothing changed: nothing is encoded; --keep-snapshots 1 deletes the older snapshots.
    third = run_nightly(config(f"s3://{s3_bucket}/day2/", out, tiny_model_dir, keep_snapshots=1))
    assert third["rows_embedded"] == 0 and third["rows_unchanged"] == 61
    assert third["rows_deleted"] == third["rows_new"] == third["rows_changed"] == 0
    assert third["units"]["carried"] == third["units"]["total"] == 6  # not read, copied
    assert sorted(third["snapshots_deleted"]) == sorted([first["snapshot"], second["snapshot"]])
    left = {p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("s3://"), refresh=True)}
    assert left == {LATEST, third["snapshot"]}


@pytest.mark.slow
@pytest.mark.ray
def test_other_settings_encode_every_row_again(cluster, s3_endpoint, s3_bucket, tiny_model_dir):
    client = s3_client(s3_endpoint)
    day1 = make_corpus(shards=2, rows=6)
    upload_dir(client, s3_bucket, "in", encoded(day1))
    out = f"s3://{s3_bucket}/nightly"
    run_nightly(config(f"s3://{s3_bucket}/in/", out, tiny_model_dir))
    again = run_nightly(config(f"s3://{s3_bucket}/in/", out, tiny_model_dir, task="clustering"))
    assert not again["reused_previous"] and "task" in again["reembed_reason"]
    assert again["rows_embedded"] == again["rows_out"] == 12 and again["rows_reused"] == 0
    assert again["units"]["carried"] == 0  # other settings: no file is what this run writes
    # The prefix is part of the hash: every text changed as the encoder sees it.
    assert again["rows_changed"] == 12 and again["rows_deleted"] == 0

    # An unfinished snapshot on the same base made with other settings cannot be resumed:
    # a scheduled job starts a new snapshot instead of stopping (and prunes the old one).
    fs = s3(s3_endpoint)
    root = out.removeprefix("s3://")
    stale = again["snapshot"][:-3] + "59Z"  # a later second of the same minute
    if stale <= again["snapshot"]:
        stale = again["snapshot"] + "-002"
    fs.copy(f"{root}/{again['snapshot']}", f"{root}/{stale}", recursive=True)
    fs.rm(f"{root}/{stale}/_summary.json")
    run_file = f"{root}/{stale}/_manifest/_run.json"
    document = json.loads(fs.cat(run_file))
    document["identity"]["nightly"]["base"] = again["snapshot"]
    document["identity"]["task"] = "query"  # a killed run with other settings
    fs.pipe(run_file, json.dumps(document).encode())
    third = run_nightly(config(f"s3://{s3_bucket}/in/", out, tiny_model_dir, task="clustering"))
    assert third["snapshot"] not in (stale, again["snapshot"]) and third["reconciled"]
    assert third["rows_embedded"] == 0 and third["rows_reused"] == 12
    assert third["units"]["carried"] == 2  # the files are unchanged since `again`
    assert stale in third["snapshots_deleted"] and latest(fs, out) == third["snapshot"]

    # Ids of another kind (the same ids as strings) are other ids: test_stages_diff's
    # test_plan_diff_ids_of_another_kind_are_other_ids.


def command(input_uri: str, output_uri: str, model: Path, address: str, endpoint: str,
            *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "nightly", "--input", input_uri, "--output",
            output_uri, "--model", str(model), "--dims", ",".join(map(str, DIMS)),
            "--keep-columns", "lang", "--address", address, "--s3-endpoint", endpoint,
            "--progress", "off", *extra]


class DriverDied(BaseException):
    """The driver's end, raised where no handler of the job catches it (not an Exception)."""


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_second_run_leaves_latest_on_the_first_and_is_resumed(
        cluster, s3_endpoint, s3_bucket, tiny_model_dir, embedder, monkeypatch, caplog):
    """Run 2's driver dies right after its first unit is committed (in this process, so the
    kill lands mid-run every time; a driver killed by SIGKILL is test_resume_faults')."""
    import pipeline.jobs.run as job

    fs = s3(s3_endpoint)
    client = s3_client(s3_endpoint)
    day1 = make_corpus(shards=6, rows=10)
    upload_dir(client, s3_bucket, "day1", encoded(day1))
    out = f"s3://{s3_bucket}/nightly"
    first = run_nightly(config(f"s3://{s3_bucket}/day1/", out, tiny_model_dir))
    day2, _ = edit(day1)
    for rows in day2.values():  # every shard has changed rows: every unit encodes something
        for r in list(rows.values())[:2]:
            r["text"] += " v2"
    upload_dir(client, s3_bucket, "day2", encoded(day2))

    publish = job.publish_json

    def publish_then_die(fs_, path, document):
        publish(fs_, path, document)
        if "/_manifest/unit-" in path:
            raise DriverDied(path)

    cmd = command(f"s3://{s3_bucket}/day2/", out, tiny_model_dir, cluster, s3_endpoint)
    monkeypatch.setattr(job, "publish_json", publish_then_die)
    with pytest.raises(DriverDied):
        main(cmd[3:])
    monkeypatch.setattr(job, "publish_json", publish)
    root = out.removeprefix("s3://")
    fs.invalidate_cache()
    committed = [p for p in fs.glob(f"{root}/snapshot-*/_manifest/unit-*.json")
                 if first["snapshot"] not in p]
    assert len(committed) == 1, committed
    unfinished = committed[0].split("/")[-3]
    # Readers still see run 1's complete snapshot.
    assert latest(fs, out) == first["snapshot"]
    snap1, summary1 = read_snapshot(fs, out, first["snapshot"])
    check_snapshot(snap1, day1, embedder)
    assert not fs.exists(f"{root}/{unfinished}/_summary.json")

    # The same command again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        code = main(cmd[3:])
    log = caplog.text
    assert code == 0, log[-3000:]
    assert f"resuming the unfinished snapshot {out}/{unfinished}" in log
    assert latest(fs, out) == unfinished
    snap2, summary2 = read_snapshot(fs, out, unfinished)
    check_snapshot(snap2, day2, embedder)
    assert summary2["units"]["resumed"] == 1
    changed = 3 + 2 * 6 - 2  # edit()'s 3, plus 2 per shard (rows 0 and 1 of shard 0 counted once)
    assert (summary2["rows_new"], summary2["rows_changed"], summary2["rows_deleted"]) == (5, changed, 4)
    assert summary2["rows_embedded"] == 5 + changed


@pytest.mark.slow
@pytest.mark.ray
def test_a_resumed_snapshot_keeps_its_committed_units_and_never_repeats_their_ids(
        cluster, tmp_path, tiny_model_dir, embedder):
    """An unfinished snapshot (made here from a finished one: its summary removed, one unit
    uncommitted) is resumed: the committed unit is kept, an id the re-done file now shares
    with it is rejected, and a file rewritten with the same size is not taken as unchanged."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    day1 = {"x.jsonl": {i: {"id": i, "text": f"x text {i}", "lang": "en"} for i in range(12)},
            "y.jsonl": {i: {"id": i, "text": f"y text {i}", "lang": "fr"} for i in range(20, 32)},
            "z.jsonl": {i: {"id": i, "text": f"z text {i}", "lang": "de"} for i in range(40, 52)}}
    for name, data in encoded(day1).items():
        (src / name).write_bytes(data)
    out = tmp_path / "nightly"
    first = run_nightly(config(str(src), str(out), tiny_model_dir))

    # An unfinished snapshot on the first: y's unit not committed, x's kept.
    unfinished = new_snapshot_name({first["snapshot"]})  # later than the first, always
    shutil.copytree(out / first["snapshot"], out / unfinished)
    (out / unfinished / "_summary.json").unlink()
    run_file = out / unfinished / "_manifest" / "_run.json"
    document = json.loads(run_file.read_text())
    document["identity"]["nightly"]["base"] = first["snapshot"]
    run_file.write_text(json.dumps(document))
    for manifest in (out / unfinished / "_manifest").glob("unit-*.json"):
        unit = json.loads(manifest.read_text())
        if unit["uri"].endswith("y.jsonl"):
            manifest.unlink()
        else:  # as a second night over the same file would have committed it
            unit |= {"rows_new": 0, "rows_unchanged": 12, "rows_reused": 12}
            manifest.write_text(json.dumps(unit))

    day2 = {"x.jsonl": day1["x.jsonl"], "y.jsonl": dict(day1["y.jsonl"]),
            "z.jsonl": dict(day1["z.jsonl"])}
    day2["y.jsonl"][3] = {"id": 3, "text": "y now also has id 3", "lang": "fr"}  # x's id
    day2["y.jsonl"][20] = {"id": 20, "text": "y text 99", "lang": "fr"}
    # z was committed; rewritten with the same size, its unit must not be kept.
    day2["z.jsonl"][41] = {"id": 41, "text": "z text 99", "lang": "de"}
    time.sleep(0.01)  # a later modification time than the one recorded
    for name in ("y.jsonl", "z.jsonl"):  # x.jsonl untouched
        (src / name).write_bytes(encoded(day2)[name])
    assert (src / "z.jsonl").stat().st_size == len(encoded(day1)["z.jsonl"])
    result = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert result["snapshot"] == unfinished and result["units"]["resumed"] == 1
    # Today's rows (y, z) outnumber the snapshot's (x): every id x holds enters the diff.
    assert result["today_ids_gathered"] is None
    assert result["rows_out"] == 36 and result["rows_rejected"] == 1
    assert (result["rows_changed"], result["rows_unchanged"], result["rows_new"]) == (2, 34, 0)
    assert result["rows_deleted"] == 0
    rejects = pq.read_table(result["rejects_files"][0])
    assert rejects["id"].to_pylist() == ["3"] and "committed earlier in this snapshot" in \
        rejects["reason"][0].as_py()
    table = pq.read_table(result["output_files"]).sort_by("id")
    assert table["id"].to_pylist() == sorted(list(range(12)) + list(range(20, 32))
                                             + list(range(40, 52)))
    del day2["y.jsonl"][3]
    check_snapshot(table, day2, embedder)


@pytest.mark.slow
@pytest.mark.ray
def test_files_unchanged_since_the_previous_snapshot_are_carried_not_read(
        cluster, tmp_path, tiny_model_dir, embedder):
    """x and z are unchanged: their part files are copied as they are and their rows never
    enter the graph (only their ids, for the duplicate check: a new file repeating one of
    x's ids loses it); y changed and goes through the diff."""
    src = tmp_path / "in"
    src.mkdir()
    day1 = {"x.jsonl": {i: {"id": i, "text": f"x text {i}", "lang": "en"} for i in range(12)},
            "y.jsonl": {i: {"id": i, "text": f"y text {i}", "lang": "fr"} for i in range(20, 32)},
            "z.jsonl": {i: {"id": i, "text": f"z text {i}", "lang": "de"} for i in range(40, 52)}}
    day1["y.jsonl"][2] = {"id": 2, "text": "the same id as x's", "lang": "fr"}
    for name, data in encoded(day1).items():
        (src / name).write_bytes(data)
    out = tmp_path / "nightly"
    first = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert first["units"]["carried"] == 0
    # An id in more than one file: the first by file and row is kept (a plain run does not
    # check across files).
    assert first["rows_in"] == 37 and first["rows_out"] == 36 and first["rows_rejected"] == 1
    rejects = pq.read_table(first["rejects_files"][0])
    assert rejects["id"].to_pylist() == ["2"] and rejects["source"][0].as_py().endswith("y.jsonl")
    assert "also in" in rejects["reason"][0].as_py() and "x.jsonl row 3" in \
        rejects["reason"][0].as_py()

    day2 = {"w.jsonl": {3: {"id": 3, "text": "w repeats x's id 3", "lang": "en"},
                        60: {"id": 60, "text": "w text 60", "lang": "en"}},
            "x.jsonl": day1["x.jsonl"], "y.jsonl": dict(day1["y.jsonl"]), "z.jsonl": day1["z.jsonl"]}
    del day2["y.jsonl"][2]  # y no longer repeats x's id
    day2["y.jsonl"][21] = {"id": 21, "text": "y text 21, edited", "lang": "fr"}
    del day2["y.jsonl"][22]
    time.sleep(0.01)  # a later modification time
    for name in ("w.jsonl", "y.jsonl"):
        (src / name).write_bytes(encoded(day2)[name])
    second = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert second["units"]["carried"] == 2 and second["reconciled"]
    # x and z hold more than w and y: today's ids were gathered first (w: 3, 60; y: 11), and
    # of x's and z's ids only 3 entered the diff, which rejects it below.
    assert second["today_ids_gathered"] == 13
    assert (second["rows_new"], second["rows_changed"], second["rows_deleted"]) == (1, 1, 1)
    assert second["rows_unchanged"] == second["rows_reused"] == 12 + 10 + 12
    assert second["rows_embedded"] == 2 and second["rows_rejected"] == 1
    # Carried files are the previous snapshot's, byte for byte, under the same names.
    before, now = out / first["snapshot"], out / second["snapshot"]
    for name in ("x.jsonl", "z.jsonl"):
        (manifest,) = [json.loads(p.read_text()) for p in (now / "_manifest").glob("unit-*.json")
                       if json.loads(p.read_text())["uri"].endswith(name)]
        assert manifest["carried_from"] == first["snapshot"] and manifest["tokens"] == 0
        for part in manifest["files"]:
            assert (now / part).read_bytes() == (before / part).read_bytes()
    rejects = pq.read_table(second["rejects_files"][0])
    assert rejects["id"].to_pylist() == ["3"] and rejects["source"][0].as_py().endswith("w.jsonl")
    assert "unchanged since the previous one" in rejects["reason"][0].as_py()
    table = pq.read_table(second["output_files"]).sort_by("id")
    del day2["w.jsonl"][3]
    check_snapshot(table, day2, embedder)

    # A night where nothing changed (all carried) and one with other settings (none carried):
    # test_second_run_... and test_other_settings_...; which units qualify: test_snapshots.


@pytest.mark.slow
@pytest.mark.ray
def test_a_touched_unit_copies_its_unchanged_files_and_reads_only_the_changed_ones(
        cluster, tmp_path, tiny_model_dir, embedder, monkeypatch):
    """Units of several files (4 each here): when one file of a unit changed, the unit's
    other files' rows (and rejects) are copied from the previous snapshot's part files, not
    read; only the changed file goes through the diff. Proof that a copied file is not read:
    its bytes are replaced by others of the same size and its modification time restored (the
    store's version, which a night trusts), and the snapshot keeps its old rows."""
    import os

    from pipeline import units

    monkeypatch.setattr(units, "GROUPED_UNITS", 2)  # 8 files: 2 units of 4
    sorts = count_sort_shuffle_blocks(monkeypatch)
    src = tmp_path / "in"
    src.mkdir()
    day1 = {f"a{k}.jsonl": {i: {"id": i, "text": f"text {k} {i}", "lang": "en"}
                            for i in range(10 * k, 10 * k + 3)} for k in range(8)}
    day1["a1.jsonl"][99] = {"id": 99, "text": " ", "lang": "en"}  # a reject, copied later
    for name, data in encoded(day1).items():
        (src / name).write_bytes(data)
    out = tmp_path / "nightly"
    first = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert first["units"]["total"] == 2 and first["rows_out"] == 24

    day2 = {name: dict(rows) for name, rows in day1.items()}
    day2["a2.jsonl"][20] = {"id": 20, "text": "text 2 20, edited", "lang": "fr"}
    day2["a2.jsonl"][28] = {"id": 28, "text": "a new row", "lang": "de"}
    day2["a5.jsonl"][1] = {"id": 1, "text": "repeats a0's id 1", "lang": "en"}
    time.sleep(0.01)
    for name in ("a2.jsonl", "a5.jsonl"):
        (src / name).write_bytes(encoded(day2)[name])
    a3 = src / "a3.jsonl"
    stat = a3.stat()
    a3.write_bytes(b"x" * stat.st_size)  # other bytes, same size and mtime: "unchanged"
    os.utime(a3, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert second["reconciled"] and second["units"]["carried"] == 0
    assert (second["units"]["touched"], second["units"]["files_copied"]) == (2, 6)
    assert second["today_ids_gathered"] == 8  # a2's and a5's: the copied ids are filtered
    assert (second["rows_new"], second["rows_changed"], second["rows_deleted"]) == (1, 1, 0)
    assert second["rows_unchanged"] == second["rows_reused"] == 23
    assert second["rows_embedded"] == 2 and second["rows_rejected"] == 2
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"]
               for r in pq.read_table(second["rejects_files"]).to_pylist()}
    assert reasons["a1.jsonl"].startswith("text is empty")  # copied with its file's rows
    assert "unchanged since the previous one" in reasons["a5.jsonl"]  # a0 copied: it keeps 1
    table = pq.read_table(second["output_files"]).sort_by("id")
    before = pq.read_table(first["output_files"]).sort_by("id")
    copied = [i for i in range(40) if i // 10 in (0, 1, 3) and i % 10 < 3]
    for d in DIMS:  # the copied rows' vectors are the previous snapshot's, bit for bit
        column = f"embedding_{d}"
        old = dict(zip(before["id"].to_pylist(), before[column].to_pylist()))
        new = dict(zip(table["id"].to_pylist(), table[column].to_pylist()))
        assert [new[i] for i in copied] == [old[i] for i in copied]
    good = lambda day: {n: {i: r for i, r in rows.items() if i != 99}  # noqa: E731
                        for n, rows in day.items()}
    del day2["a5.jsonl"][1]
    check_snapshot(table, good(day2), embedder)  # a3's rows are its old ones: not read

    # A file copied last night changes: the unit is touched again, its slices now those of
    # last night's copied and written part files. (The other unit holds a duplicate-id
    # reject: it goes through the diff whole, as a unit with one is never carried.)
    day3 = {name: dict(rows) for name, rows in day2.items()}
    day3["a0.jsonl"][0] = {"id": 0, "text": "text 0 0, edited", "lang": "en"}
    a3.write_bytes(encoded(day3)["a3.jsonl"])  # its true bytes back, with a new mtime
    time.sleep(0.01)
    (src / "a0.jsonl").write_bytes(encoded(day3)["a0.jsonl"])
    third = run_nightly(config(str(src), str(out), tiny_model_dir))
    assert third["reconciled"] and third["units"]["touched"] == 1
    assert third["units"]["files_copied"] == 2  # a1, a2 (a0 and a3 changed)
    assert (third["rows_changed"], third["rows_unchanged"], third["rows_rejected"]) == (1, 24, 2)
    check_snapshot(pq.read_table(third["output_files"]).sort_by("id"), good(day3), embedder)
    # Each night's diff went through the sort shuffle on at most its cap of blocks (2 here),
    # though today's rows and every previous part file read came as blocks of their own.
    assert len(sorts) == 3 and max(sorts) == 2, sorts


@pytest.mark.ray
def test_a_touched_units_unchanged_row_groups_move_as_bytes_night_after_night(
        cluster, tmp_path, tiny_model_dir, embedder, monkeypatch):
    """One unit of 8 files of 150 rows: its part file's row groups end with its files' rows
    (a0-a6's 1,050 rows, then a7's 150). A night where a7 changed moves the first row group
    to the new snapshot as bytes; the next night, where a3 changed, decodes it and keeps the
    rest. Each snapshot holds today's rows with the encoder's vectors, and DuckDB's own
    Parquet reader reads it as pyarrow does."""
    import duckdb

    from pipeline import units
    from pipeline.io import splice

    monkeypatch.setattr(units, "GROUPED_UNITS", 1)
    src, out = tmp_path / "in", tmp_path / "nightly"
    src.mkdir()
    day = {f"a{k}.jsonl": {i: {"id": i, "text": f"text {k} {i}", "lang": "en"}
                           for i in range(1000 * k, 1000 * k + 150)} for k in range(8)}

    def night(changed: list[str]) -> dict:
        time.sleep(0.01)
        for name in changed:
            (src / name).write_bytes(encoded(day)[name])
        summary = run_nightly(config(str(src), str(out), tiny_model_dir))
        assert summary["reconciled"]
        table = pq.read_table(summary["output_files"]).sort_by("id")
        check_snapshot(table, day, embedder)
        files = ", ".join(f"'{f}'" for f in summary["output_files"])
        (count, total), = duckdb.sql(
            f"SELECT count(*), sum(list_sum(embedding_{DIMS[-1]})) FROM read_parquet([{files}])"
        ).fetchall()
        assert count == table.num_rows
        assert total == pytest.approx(float(pa.compute.sum(pa.compute.list_flatten(
            table[f"embedding_{DIMS[-1]}"])).as_py()), rel=1e-6)
        return summary

    first = night(list(day))
    (part,) = first["output_files"]
    groups = splice.parse(Path(part).read_bytes()).row_groups
    assert [g.rows for g in groups] == [1050, 150]

    day["a7.jsonl"][7000]["text"] = "edited"
    second = night(["a7.jsonl"])
    assert (second["units"]["touched"], second["units"]["files_copied"]) == (1, 7)
    assert (second["rows_changed"], second["rows_unchanged"]) == (1, 1199)
    copied = [f for f in second["output_files"]
              if [g.rows for g in splice.parse(Path(f).read_bytes()).row_groups] == [1050]]
    assert len(copied) == 1  # the copy: a0-a6's row group, its bytes those of last night's
    (moved,) = splice.parse(Path(copied[0]).read_bytes()).row_groups
    assert moved.chunks() == groups[0].chunks()

    day["a3.jsonl"][3001]["text"] = "edited too"
    day["a3.jsonl"][3999] = {"id": 3999, "text": "a new row", "lang": "de"}
    third = night(["a3.jsonl"])
    assert (third["units"]["touched"], third["units"]["files_copied"]) == (1, 7)
    assert (third["rows_new"], third["rows_changed"], third["rows_unchanged"]) == (1, 1, 1199)


@pytest.mark.ray
def test_units_the_shuffle_scattered_are_gathered_before_they_are_committed(
        cluster, tmp_path, tiny_model_dir, embedder, monkeypatch):
    """Two units of 6 files of 40 rows, on a first night with 8 buckets and write batches of
    100 rows (a cluster's many buckets, at a smaller scale): each unit's rows are dealt to
    several writes, and each is committed gathered into one part file, each file's rows
    together; the part files written first are gone."""
    import dataclasses

    from pipeline import units
    from pipeline.jobs import nightly

    monkeypatch.setattr(units, "GROUPED_UNITS", 2)
    plan_diff = nightly.plan_diff
    monkeypatch.setattr(nightly, "plan_diff", lambda **kw: dataclasses.replace(
        plan_diff(**kw), buckets=8))
    src, out = tmp_path / "in", tmp_path / "nightly"
    src.mkdir()
    day = {f"f{k:02d}.jsonl": {i: {"id": i, "text": f"text {k} {i}", "lang": "en"}
                               for i in range(1000 * k, 1000 * k + 40)} for k in range(12)}
    for name, data in encoded(day).items():
        (src / name).write_bytes(data)
    night = dataclasses.replace(config(str(src), str(out), tiny_model_dir), rows_per_file=100)

    first = run_nightly(night)
    assert first["reconciled"] and first["units"]["total"] == 2
    assert first["units"]["gathered"] == 2
    check_snapshot(pq.read_table(first["output_files"]).sort_by("id"), day, embedder)
    snap = out / first["snapshot"]
    manifests = [json.loads(p.read_text()) for p in (snap / "_manifest").glob("unit-*.json")]
    named = {f for m in manifests for f in m["files"]}
    assert {p.name for p in snap.glob("part-*.parquet")} == named  # nothing else is left
    for m in manifests:
        assert m["gathered_from"] >= 3
        (part,) = m["files"]
        assert m["slices"] == {part: [[i, 40] for i in range(6)]}  # one run a file
    # (A later night copies from a gathered unit as from any: test_stages_carry.py.)


@pytest.mark.ray
def test_the_gatherer_commits_gathered_units_and_stops_on_a_failed_one(cluster, tmp_path):
    """``UnitGatherer`` on Ray: a scattered unit is committed gathered (the tracker then
    holds its new files, without slices); a unit whose part file is gone stops the night
    with an error naming it; :meth:`cancel` leaves nothing running or committed."""
    from pipeline import units
    from pipeline.cluster.gather import UnitGatherer
    from pipeline.errors import RunFailed
    from pipeline.jobs.run import gather
    from tests.test_stages_carry import members, scattered_unit

    base = str(tmp_path / "a")
    manifest = scattered_unit(base)
    published = []
    gatherer = UnitGatherer(published.append, base, {}, 1000)
    tracker = units.Tracker([members()], commit=gatherer.commit)
    gatherer.commit(manifest)
    gather(gatherer, tracker)
    (unit,) = published
    assert unit["gathered_from"] == 3 and len(unit["files"]) == 2
    assert tracker.committed[unit["unit"]] == {k: v for k, v in unit.items() if k != "slices"}

    base = str(tmp_path / "b")
    broken = scattered_unit(base)
    Path(base, [f for f in broken["files"] if f.startswith("part-")][0]).unlink()
    gatherer = UnitGatherer(published.append, base, {}, 1000)
    gatherer.commit(broken)
    with pytest.raises(RunFailed, match="cannot gather the 3 part files of unit"):
        gather(gatherer, tracker)
    assert len(published) == 1

    base = str(tmp_path / "c")
    gatherer = UnitGatherer(published.append, base, {}, 1000)
    unit = scattered_unit(base)
    gatherer.commit(unit)  # queued until the graph is done
    gatherer.start()
    gatherer.cancel()
    gatherer.drain()  # nothing left to wait for
    time.sleep(1)  # a task left running would have written its part file by now
    assert {p.name for p in Path(base).glob("part-*.parquet")} == set(unit["slices"])
    assert len(published) == 1 and not gatherer.gathered


def count_sort_shuffle_blocks(monkeypatch) -> list[int]:
    """Cap the blocks a small night's sort shuffle gets at 2, and count the blocks of each
    sort shuffle run in this process (Ray Data's shuffle runs in the driver): it makes one
    partition per block, and the driver owns n * n of its objects."""
    from ray.data._internal.planner.exchange.pull_based_shuffle_task_scheduler import (
        PullBasedShuffleTaskScheduler as Sort)

    from pipeline.cluster import graph

    monkeypatch.setattr(graph, "SORT_SHUFFLE_BLOCKS", 2)
    sorts, execute = [], Sort.execute

    def counted(self, refs, output_num_blocks, *args, **kwargs):
        sorts.append(sum(len(bundle.block_refs) for bundle in refs))
        return execute(self, refs, output_num_blocks, *args, **kwargs)

    monkeypatch.setattr(Sort, "execute", counted)
    return sorts


@pytest.mark.ray
def test_a_benchmark_night_runs_with_the_stand_in_encoder(cluster, tmp_path, tiny_model_dir):
    """``run_nightly``'s ``adapt`` (benchmarks only: the scale benchmark's nights) reaches the
    night's encode stage: every vector is the stand-in's one-hot unit vector."""
    import functools

    from pipeline.bench.rate import with_rate_encoder

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(encoded({"a.jsonl": {i: {"id": i, "text": f"text {i}",
                                                           "lang": "en"} for i in range(6)}})
                                  ["a.jsonl"])
    night = run_nightly(config(str(src), str(tmp_path / "out"), tiny_model_dir),
                        functools.partial(with_rate_encoder, rate=1e6))
    assert night["reconciled"] and night["rows_embedded"] == 6
    table = pq.read_table(night["output_files"])
    for d in DIMS:
        vectors = np.stack(table[f"embedding_{d}"].to_numpy(zero_copy_only=False))
        assert ((vectors == 0) | (vectors == 1)).all() and (vectors.sum(axis=1) == 1).all()
    # Its snapshot carries another weights fingerprint, so a night of the real encoder
    # neither reuses its vectors nor carries its files (those rules: test_other_settings_...).
    run_file = tmp_path / "out" / night["snapshot"] / "_manifest" / "_run.json"
    fingerprint = json.loads(run_file.read_text())["identity"]["model_fingerprint"]
    assert fingerprint == "stand-in encoder at 1e+06 tokens/s (benchmark only)"


# ---------------------------------------------------------------------------------------------
# Refusals, before any work (no Ray)


def test_nightly_refuses_a_kept_content_hash_column_and_a_run_output(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"id": 1, "text": "x", "content_hash": "u"}\n')
    with pytest.raises(ValueError, match="content_hash"):
        run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                              keep_columns=("content_hash",)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-0123456789abcdef-0123456789ab.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="holds the output of a `run`"):
        run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="keep-all"):
        run_nightly(RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out2"),
                              on_duplicate="keep-all"))


def test_a_latest_write_cut_short_does_not_stop_the_next_night(tmp_path, tiny_model_dir):
    """A night killed while publishing _LATEST leaves its temporary at the root; the next
    night removes it instead of taking the root for a `run`'s output. (Here that night stops
    at its missing input, before Ray starts.)"""
    from pipeline.io.errors import InputError

    root = tmp_path / "snapshots"
    root.mkdir()
    (root / "._LATEST.tmp-1a2b3c4d").write_text("snapshot-20261207T000000Z\n")
    with pytest.raises(InputError, match="does not exist|not found|no input"):
        run_nightly(config(str(tmp_path / "missing"), str(root), tiny_model_dir))
    assert not (root / "._LATEST.tmp-1a2b3c4d").exists()
