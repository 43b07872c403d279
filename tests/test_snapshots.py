"""``pipeline/snapshots.py``: the nightly job's snapshot folders on a local filesystem, no
Ray: names that sort in the order runs started, ``_LATEST`` (read, published atomically),
listing complete and unfinished snapshots, the previous snapshot's part and document files,
the unfinished one a run resumes, pruning."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import fsspec
import pytest

from pipeline import snapshots as Snap
from pipeline.io.errors import OutputError


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


def test_load_previous_lists_the_part_and_document_files_its_units_committed(local):
    fs, root, path = local
    name = snap(0)
    run_file(root, name, None)
    put(root, f"{name}/_summary.json", json.dumps({"rows_out": 5}).encode())
    unit_files = {"a": ["part-a-1.parquet", "_rejects/part-a-2.parquet",
                        "_documents/part-a-3.parquet"],
                  "b": ["part-b-1.parquet", "part-b-2.parquet", "_documents/part-b-3.parquet"]}
    for unit, files in unit_files.items():
        put(root, f"{name}/_manifest/unit-{unit}.json",
            json.dumps({"unit": unit, "uri": f"in/{unit}.jsonl", "files": files}).encode())
        for k, f in enumerate(files):
            put(root, f"{name}/{f}", b"x" * (10 + k))
    put(root, f"{name}/_documents/part-stray.parquet")  # no manifest names it: not read
    previous = Snap.load_previous(fs, path, name, "s3://o")
    assert previous.rows == 5 and previous.identity["nightly"] == {"base": None}
    assert previous.files == [(f"s3://o/{name}/part-a-1.parquet", 10),
                              (f"s3://o/{name}/part-b-1.parquet", 10),
                              (f"s3://o/{name}/part-b-2.parquet", 11)]
    assert previous.documents == [(f"s3://o/{name}/_documents/part-a-3.parquet", 12),
                                  (f"s3://o/{name}/_documents/part-b-3.parquet", 12)]
    # A snapshot made without --doc-vectors has none.
    complete(root, snap(10))
    put(root, f"{snap(10)}/_manifest/unit-a.json",
        json.dumps({"unit": "a", "uri": "in/a.jsonl", "files": ["part-a.parquet"]}).encode())
    assert Snap.load_previous(fs, path, snap(10), "s3://o").documents == []


# --- carrying units unchanged since the previous snapshot ----------------------------------------


def previous_with(units: dict, identity: dict | None = None) -> Snap.Previous:
    return Snap.Previous("snapshot-20260301T023015Z", identity or {"task": "document"}, 0, [],
                         uri="file:///out/snapshot-20260301T023015Z", units=units)


def previous_folder(tmp_path: Path) -> Path:
    """The folder of :func:`previous_with`'s snapshot under ``tmp_path / "out"``, holding the
    files :func:`manifest` names (a part file and its rejects)."""
    before = tmp_path / "out" / "snapshot-20260301T023015Z"
    (before / "_rejects").mkdir(parents=True)
    (before / "part-a.parquet").write_bytes(b"rows")
    (before / "_rejects" / "part-a.parquet").write_bytes(b"rejects")
    return before


def manifest(uri: str, size: int, version: str | None, **extra) -> dict:
    return {"unit": uri, "uri": uri, "size": size, "version": version, "rows": 4,
            "rows_embedded": 3, "rows_rejected": 1, "reject_reasons": {"malformed JSON": 1},
            "files": ["part-a.parquet", "_rejects/part-a.parquet"], "tokens": 40,
            "rows_new": 3, "rows_changed": 0, "rows_unchanged": 0, "rows_reused": 0} | extra


def test_only_units_with_the_same_files_size_and_version_are_carried():
    from pipeline.io.storage import InputFile, unit_key
    from pipeline.units import group_units

    def f(name: str, size: int = 10, version: str | None = "etag:1") -> InputFile:
        return InputFile(f"s3://b/{name}", size, "jsonl", None, version=version)

    same, resized, rewritten, unversioned, duplicated = (
        f("a"), f("b", 11), f("c", version="etag:2"), f("d", version=None), f("e"))
    group = group_units([f(f"g{i:03d}") for i in range(200)], 1 << 30)[0]
    regrouped = dataclasses.replace(group, members=group.members[:-1])  # a file fewer
    prev = previous_with({
        unit_key(x.unit): manifest(x.unit, 10, "etag:1") for x in (same, resized, rewritten)
    } | {unit_key(unversioned.unit): manifest(unversioned.unit, 10, None),
         unit_key(duplicated.unit): manifest(duplicated.unit, 10, "etag:1",
                                             reject_reasons={"duplicate id": 1}),
         unit_key(group.unit): manifest(group.unit, group.size, group.version,
                                        members=[m.uri for m in group.members])})
    todo = [same, resized, rewritten, unversioned, duplicated, group, regrouped, f("new")]
    found = Snap.carriable(prev, todo)
    assert sorted(found) == sorted([unit_key(same.unit), unit_key(group.unit)])


def test_a_carried_manifest_counts_every_good_row_unchanged_and_no_work():
    prev = previous_with({})
    done = Snap.carried_manifest(prev, manifest("s3://b/a", 10, "etag:1"))
    assert (done["rows_new"], done["rows_changed"], done["rows_unchanged"],
            done["rows_reused"]) == (0, 0, 3, 3)
    assert done["tokens"] == 0 and done["rows"] == 4 and done["rows_rejected"] == 1
    assert done["files"] == ["part-a.parquet", "_rejects/part-a.parquet"]
    assert done["carried_from"] == prev.name


def test_carrying_needs_every_setting_and_column_type_equal():
    identity = {f: f"value of {f}" for f in ("model_fingerprint", "tokenizer_sha256", "task",
                                             "dims", "output_dtype", "dtype", "id_column",
                                             "text_column", "keep_columns", "on_duplicate",
                                             "long_text", "types")}
    prev = previous_with({}, identity)
    assert Snap.carry_refusal(prev, identity | {"nightly": {"base": "x"}}) is None
    assert "types" in Snap.carry_refusal(prev, identity | {"types": "other"})
    chunking = identity | {"long_text": {"mode": "chunk", "chunk_text": True}}
    assert "long_text" in Snap.carry_refusal(prev, chunking)  # an output-only option too


def test_carry_units_copies_the_files_and_commits_them(tmp_path):
    fs = fsspec.filesystem("file")
    previous_folder(tmp_path)
    prev = previous_with({})
    now = tmp_path / "out" / "snapshot-20260302T023015Z"
    done = Snap.carry_units(prev, {"k1": manifest("s3://b/a", 10, "etag:1")}, fs, str(now))
    assert (now / "part-a.parquet").read_bytes() == b"rows"
    assert (now / "_rejects" / "part-a.parquet").read_bytes() == b"rejects"
    written = json.loads((now / "_manifest" / "unit-k1.json").read_text())
    assert written == done["k1"] and written["carried_from"] == prev.name


def test_a_group_with_a_file_the_store_gives_no_version_is_not_carried():
    # A group's version is a digest of its files' URIs, sizes and versions: with a version
    # missing it still matches the previous one, so only the sizes would be compared.
    from pipeline.io.storage import InputFile, unit_key
    from pipeline.units import group_units

    def f(name: str, version: str | None) -> InputFile:
        return InputFile(f"https://host/{name}", 10, "jsonl", None, version=version)

    versioned = group_units([f(f"v{i:03d}", "etag:1") for i in range(200)], 1 << 30)[0]
    unversioned = group_units([f(f"u{i:03d}", None) for i in range(200)], 1 << 30)[0]
    assert unversioned.members and unversioned.version  # the digest of "None"s
    prev = previous_with({unit_key(g.unit): manifest(g.unit, g.size, g.version,
                                                     members=[m.uri for m in g.members])
                          for g in (versioned, unversioned)})
    assert sorted(Snap.carriable(prev, [versioned, unversioned])) == [unit_key(versioned.unit)]


def test_units_carried_tonight_are_committed_by_this_run_not_kept_from_an_earlier_one(tmp_path):
    # run() keeps the carried units with those an earlier run committed (the summary's
    # `resumed`); a night that carried 1 unit and embedded 1 was not a resume.
    from pipeline import summary
    from pipeline.io.storage import InputFile, unit_key
    from pipeline.jobs import nightly
    from pipeline.jobs.run import Carry

    fs = fsspec.filesystem("file")
    previous_folder(tmp_path)
    same, changed = (InputFile(f"s3://b/{n}", 10, "jsonl", None, version=v)
                     for n, v in (("a", "etag:1"), ("b", "etag:2")))
    identity = {"task": "document", "tokenizer_sha256": "t"}
    prev = dataclasses.replace(previous_with(
        {unit_key(f.unit): manifest(f.unit, 10, "etag:1", file_rows=4) for f in (same, changed)},
        identity), rows=6)
    now = tmp_path / "out" / "snapshot-20260302T023015Z"
    carried, facts = nightly.carry(prev, Carry(identity, (same, changed), fs, str(now)))
    assert list(carried) == [unit_key(same.unit)]
    embedded = {unit_key(changed.unit): manifest(changed.unit, 10, "etag:2", file_rows=4,
                                                 files=["part-b.parquet"])}
    committed = carried | embedded
    config = {"output": str(tmp_path / "out"), "dims": [64], "task": "document",
              "long_text": "truncate"}
    result = summary.build(committed=committed, resumed=set(carried), open_units=[],
                           unseen_rows={}, wall_s=1.0, config=config,
                           model={"weights_fingerprint": "w"}, input_files=2)
    out = nightly.summarize(prev, now.name, result, committed, facts)
    assert out["units"] == {"total": 2, "committed": 2, "carried": 1, "resumed": 0,
                            "committed_now": 2, "touched": 0, "files_copied": 0, "gathered": 0}
    assert out["rows_unchanged"] == 3 and out["rows_new"] == 3 and out["rows_deleted"] == 3
    # A resume that finds the carried unit committed by its earlier attempt keeps it.
    again = nightly.summarize(prev, now.name, result, committed, {})
    assert again["units"]["resumed"] == 1 and again["units"]["committed_now"] == 1


def test_a_carried_unit_keeps_the_bytes_of_its_files():
    # Its files are in the snapshot: the summary's output_bytes counts them (a night that
    # carried most units reported a few KB for a snapshot of MBs).
    from pipeline import summary

    carried = Snap.carried_manifest(previous_with({}), manifest("s3://b/a", 10, "etag:1",
                                                                bytes=1234, file_rows=4))
    assert carried["bytes"] == 1234
    doc = summary.build(committed={"k": carried}, resumed={"k"}, open_units=[], unseen_rows={},
                        wall_s=1.0, config={"output": "/out", "dims": [64]}, model={},
                        input_files=1)
    assert doc["output_bytes"] == 1234


def test_load_previous_sizes_its_files_from_one_listing_not_a_request_each():
    # On an object store a HEAD per part file, one after another, is minutes a night at
    # 100,000 units, most of them carried without being read.
    import uuid

    from fsspec.implementations.memory import MemoryFileSystem

    class Counting(MemoryFileSystem):
        cachable = False
        heads: list[str] = []

        def info(self, path, **kwargs):
            if "part-" in path:
                Counting.heads.append(path)
            return super().info(path, **kwargs)

    fs, root, name = Counting(), f"/snaps-{uuid.uuid4().hex}", snap(0)
    base = f"{root}/{name}"
    try:
        fs.pipe(f"{base}/_manifest/_run.json",
                json.dumps({"identity": {"task": "document", "nightly": {"base": None}}}).encode())
        fs.pipe(f"{base}/_summary.json", json.dumps({"rows_out": 9}).encode())
        files = [f"part-{k}.parquet" for k in range(20)] + ["_documents/part-d.parquet"]
        for k, f in enumerate(files):
            fs.pipe(f"{base}/{f}", b"x" * (k + 1))
        fs.pipe(f"{base}/_manifest/unit-a.json", json.dumps(
            {"unit": "a", "uri": "in/a", "files": files}).encode())
        previous = Snap.load_previous(fs, root, name, "s3://o")
        assert Counting.heads == []
        assert previous.files == sorted((f"s3://o/{name}/{f}", k + 1)
                                        for k, f in enumerate(files[:-1]))
        assert previous.documents == [(f"s3://o/{name}/_documents/part-d.parquet", 21)]
        fs.rm(f"{base}/part-7.parquet")  # named by a manifest, gone
        with pytest.raises(OutputError, match="lacks 1 file.*part-7.parquet"):
            Snap.load_previous(fs, root, name, "s3://o")
    finally:
        fs.rm(root, recursive=True)


def test_a_resume_with_units_the_diff_committed_carries_nothing(tmp_path):
    # The diff checked those units' ids against the rows it read then, never against units
    # carried later: a file restored to its previous version between the attempts (same
    # size and store version) would be carried with an id a committed unit already holds.
    from pipeline.io.storage import InputFile, unit_key
    from pipeline.jobs import nightly
    from pipeline.jobs.run import Carry

    fs = fsspec.filesystem("file")
    previous_folder(tmp_path)
    restored, new, copied = (InputFile(f"s3://b/{n}", 10, "jsonl", None, version="etag:1")
                             for n in ("a", "n", "c"))
    identity = {"task": "document"}
    prev = previous_with({unit_key(f.unit): manifest(f.unit, 10, "etag:1",
                                                     files=["part-a.parquet"])
                          for f in (restored, copied)}, identity)
    now = tmp_path / "out" / "snapshot-20260302T023015Z"
    # Only units carried before the interruption are kept: the rest is carried.
    carried_before = {unit_key(copied.unit): Snap.carried_manifest(
        prev, prev.units[unit_key(copied.unit)])}
    job = Carry(identity, (restored,), fs, str(now), carried_before)
    assert list(nightly.carry(prev, job)[0]) == [unit_key(restored.unit)]
    (now / "_manifest" / f"unit-{unit_key(restored.unit)}.json").unlink()
    # A unit the diff committed (a new file's, holding the id the restored file holds).
    committed = carried_before | {unit_key(new.unit): manifest(new.unit, 10, "etag:1",
                                                               files=["part-n.parquet"])}
    job = Carry(identity, (restored,), fs, str(now), committed)
    assert nightly.carry(prev, job) == ({}, {})
    assert not (now / "_manifest" / f"unit-{unit_key(restored.unit)}.json").exists()


def test_a_night_that_carries_nothing_says_why(tmp_path, caplog):
    import logging

    from pipeline.io.storage import InputFile, unit_key
    from pipeline.jobs import nightly
    from pipeline.jobs.run import Carry

    same = InputFile("s3://b/a", 10, "jsonl", None, version="etag:1")
    prev = previous_with({unit_key(same.unit): manifest(same.unit, 10, "etag:1")},
                         {"task": "document", "types": "int64 ids"})
    job = Carry({"task": "document", "types": "int32 ids"}, (same,),
                fsspec.filesystem("file"), str(tmp_path / "snapshot-20260302T023015Z"))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert nightly.carry(prev, job) == ({}, {})
    assert f"no unit is carried from {prev.name}: settings changed: types" in caplog.text
