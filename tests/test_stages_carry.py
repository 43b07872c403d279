"""A touched unit's unchanged files copied, not read (``pipeline/stages/carry.py``), on real
local files, no Ray: what the writer records of a unit of several files (each file's rows
together, its slices per part file), which files a night copies, the copy itself, and the
reader that skips the copied files but counts them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import units
from pipeline.io import schema as S
from pipeline.io.errors import InputError, OutputError
from pipeline.io.readers import ReadSpec, Skipped, read_unit
from pipeline.io.storage import (CHECKSUM_MOD, GROUP_MARK, InputFile, file_rows_checksum,
                                  publish_json)
from pipeline.io.writers import write_outputs
from pipeline.stages.carry import (MemberCopy, copy_members, copy_plan, gather_unit, gathering,
                                   group_spans, member_copy, take_ranges)
from tests.test_io_writers import encoded_table, output_spec

A, B, C = "/in/a.jsonl", "/in/b.jsonl", "/in/c.jsonl"
UNIT = f"{A}{GROUP_MARK}3]"


def members(tmp_path=None, versions=("v1", "v2", "v3")) -> InputFile:
    files = tuple(InputFile(uri, 10 + i, "jsonl", None, version=v)
                  for i, (uri, v) in enumerate(zip((A, B, C), versions)))
    return InputFile(A, sum(f.size for f in files), "jsonl", None, version="g",
                     members=files)


def group_rows() -> pa.Table:
    """One write's rows of the unit, in the shuffle's order: a has rows 0-2, b rows 0-1 (1
    rejected), c row 0."""
    rows = [{"id": 11, "source": B, "row": 1, "reject": "text is null"},
            {"id": 2, "source": A, "row": 2}, {"id": 20, "source": C, "row": 0},
            {"id": 0, "source": A, "row": 0}, {"id": 10, "source": B, "row": 0},
            {"id": 1, "source": A, "row": 1}]
    table = encoded_table(rows)
    return table.append_column(S.UNIT, pa.array([UNIT] * len(rows)))


def write_previous(tmp_path) -> tuple[dict, str]:
    """The unit written and committed in a "previous snapshot" folder: its manifest."""
    base = tmp_path / "prev"
    (record,) = write_outputs(fsspec.filesystem("file"), str(base),
                              group_rows(), output_spec())
    unit = members()
    commits = []
    tracker = units.Tracker([unit], commit=commits.append)
    checksum = sum(file_rows_checksum(u, n, s) for u, n, s in
                   ((A, 3, 3), (B, 2, 1), (C, 1, 0))) % CHECKSUM_MOD
    assert tracker.add(record | {"file_rows": 6, "file_rowsum": checksum}) is not None
    return json.loads(json.dumps(commits[0])), str(base)


def test_a_group_units_part_file_keeps_each_files_rows_together_and_records_its_slices(tmp_path):
    manifest, base = write_previous(tmp_path)
    (part,) = [f for f in manifest["files"] if f.startswith("part-")]
    table = pq.read_table(f"{base}/{part}")
    assert table["doc_id"].to_pylist() == [0, 1, 2, 10, 20]  # by file, then row
    assert manifest["members"] == [A, B, C]
    assert manifest["slices"] == {part: [[0, 3], [1, 1], [2, 1]]}
    # size, version, rows (good and rejected) and the sum of their numbers, per file
    assert manifest["member_files"] == [[10, "v1", 3, 3], [11, "v2", 2, 1], [12, "v3", 1, 0]]


def commit_scattered(base: str) -> tuple[units.Tracker, list[dict], dict | None]:
    """The unit's rows written in three writes (as a night's shuffle deals them) into the
    folder ``base`` (3 part files, 1 reject file) and given to a tracker: the tracker, the
    manifests it committed, and what its last ``add`` returned."""
    fs = fsspec.filesystem("file")
    rows = group_rows()
    records = [write_outputs(fs, base, rows.slice(k, 2), output_spec())[0] for k in (0, 2, 4)]
    checksum = sum(file_rows_checksum(u, n, s) for u, n, s in
                   ((A, 3, 3), (B, 2, 1), (C, 1, 0))) % CHECKSUM_MOD
    commits = []
    tracker = units.Tracker([members()], commit=commits.append)
    tracker.add(records[0])
    tracker.add(records[1])
    last = tracker.add(records[2] | {"file_rows": 6, "file_rowsum": checksum})
    return tracker, commits, last


def test_the_driver_keeps_a_committed_unit_without_its_slices(tmp_path):
    """The manifest published has the part files' slices; what the driver keeps of a
    committed unit does not (they grow with the writes a unit's rows were dealt to)."""
    tracker, commits, last = commit_scattered(str(tmp_path / "prev"))
    assert last is not None
    (published,) = commits
    assert len(published["slices"]) == 3
    (kept,) = tracker.committed.values()
    assert "slices" not in kept
    assert {k: v for k, v in published.items() if k != "slices"} == kept


def test_which_files_of_a_unit_are_copied(tmp_path):
    manifest, base = write_previous(tmp_path)
    copy = member_copy(members(versions=("v1", "v2b", "v3")), manifest, base)
    assert copy.kept == {0, 2} and [m.uri for m in copy.changed] == [B]
    (part,) = [name for name, _ in copy.parts]
    assert copy.ranges(part, copied=True) == [(0, 3), (4, 1)]
    assert copy.ranges(part, copied=False) == [(3, 1)]
    assert copy.skipped == Skipped(frozenset({A, C}), 4, (
        file_rows_checksum(A, 3, 3) + file_rows_checksum(C, 1, 0)) % CHECKSUM_MOD)
    # Nothing is copied: all files unchanged (the unit is carried whole), none unchanged, a
    # file without a version (never trusted), other files, no slices recorded, a
    # duplicate-id reject (the row it lost to may be in a changed file).
    assert member_copy(members(), manifest, base) is None
    assert member_copy(members(versions=("x", "y", "z")), manifest, base) is None
    assert member_copy(members(versions=(None, "y", "v3")), manifest, base).kept == {2}
    assert member_copy(members(versions=(None, "y", None)), manifest, base) is None
    other = members(versions=("v1", "y", "v3"))
    other = InputFile(A, other.size, "jsonl", None, version="g", members=other.members[:2])
    assert member_copy(other, manifest, base) is None
    assert member_copy(InputFile(A, 10, "jsonl", None, version="v1"), manifest, base) is None
    changed = members(versions=("v1", "y", "v3"))
    assert member_copy(changed, {k: v for k, v in manifest.items() if k != "slices"},
                       base) is None
    assert member_copy(changed, manifest | {"reject_reasons": {"duplicate id": 1}}, base) is None
    # Unchanged files without a row are read, not copied: the unit's rows would otherwise
    # be the changed files' alone, and could commit it before the copy's record came.
    empty = [[10, "v1", 0, 0], [11, "v2", 2, 1], [12, "v3", 0, 0]]
    assert member_copy(changed, manifest | {"member_files": empty}, base) is None
    assert member_copy(members(versions=("v1", "v2", "y")),
                       manifest | {"member_files": empty[:2] + [[12, "v3", 1, 0]]},
                       base).kept == {1}


def test_a_manifest_whose_slices_name_no_file_of_the_unit_is_refused(tmp_path):
    manifest, base = write_previous(tmp_path)
    (part,) = manifest["slices"]
    changed = members(versions=("v1", "v2b", "v3"))
    for bad in ([5, 1], [1, -1]):  # a fourth file of three; a negative count of rows
        broken = manifest | {"slices": {part: manifest["slices"][part] + [bad]}}
        with pytest.raises(OutputError, match=r"has a row slice .* the snapshot is damaged"):
            member_copy(changed, broken, base)


def test_the_driver_holds_loaded_slices_as_arrays_and_publishes_them_as_lists(tmp_path):
    """A loaded manifest's slices are (n, 2) int64 arrays (16 bytes a slice, not a JSON
    list's ~100: they grow with the writes a unit's rows were dealt to); copies planned from
    them are the same, and a manifest published again is the one read."""
    manifest, base = write_previous(tmp_path)
    fs, out = fsspec.filesystem("file"), str(tmp_path / "snap")
    path = publish_json(fs, units.manifest_path(out, manifest["unit"]), manifest)
    (loaded,) = units.load_state(fs, out, [path]).units.values()
    (part,) = loaded["slices"]
    assert loaded["slices"][part].dtype == np.int64
    assert loaded["slices"][part].tolist() == manifest["slices"][part]
    changed = members(versions=("v1", "v2b", "v3"))
    ours, theirs = member_copy(changed, loaded, base), member_copy(changed, manifest, base)
    assert ours.ranges(part, copied=True) == theirs.ranges(part, copied=True) == [(0, 3), (4, 1)]
    assert ours.kept == theirs.kept and ours.skipped == theirs.skipped
    publish_json(fs, path, loaded)
    assert json.loads(Path(path).read_text()) == manifest
    # Damaged slices are refused as arrays too; slices that are not pairs are left as loaded.
    broken = loaded | {"slices": {part: np.vstack([loaded["slices"][part], [[3, 1]]])}}
    with pytest.raises(OutputError, match=r"has a row slice \[3, 1\] that is not one of"):
        member_copy(changed, broken, base)
    odd = ([1, 2], [[0, 3, 9], [1, 1, 9]], [[[0, 3]], [[1, 1]]], [["a", 1]], [[0, None]],
           [[0, 1 << 64]], [[0, 2.5]], [[0, 1], [2]], [[True, False]])
    for runs in odd:
        assert units.packed_slices({part: runs}) == {part: runs}
        with pytest.raises(OutputError, match=r"has slices .* that are not pairs of integers"):
            member_copy(changed, loaded | {"slices": {part: runs}}, base)
    assert units.packed_slices([[0, 1]]) == [[0, 1]]
    assert hash(ours) == hash(ours) and ours == ours  # a frozen dataclass, arrays and all


def test_a_write_naming_a_file_not_of_its_unit_is_refused(tmp_path):
    (record,) = write_outputs(fsspec.filesystem("file"), str(tmp_path / "prev"),
                              group_rows(), output_spec())
    (part,) = record["slices"]
    tracker = units.Tracker([members()], commit=lambda unit: None)
    stray = record | {"slices": {part: record["slices"][part] + [["/in/d.jsonl", 1]]}}
    with pytest.raises(OutputError, match="names rows of /in/d.jsonl, not one of its files"):
        tracker.add(stray)


def test_has_rows_stops_at_the_first_row(tmp_path):
    from pipeline.io.readers import has_rows

    blank, lines = tmp_path / "blank.jsonl", tmp_path / "lines.jsonl"
    blank.write_text("\n  \n\n")
    lines.write_text("\n" + "not json\n" * 3)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), empty)
    files = {p: InputFile(str(p), p.stat().st_size, p.suffix[1:], None)
             for p in (blank, lines, empty)}
    assert [has_rows(f) for f in files.values()] == [False, True, False]
    assert not has_rows(InputFile(str(tmp_path / "gone.jsonl"), 0, "jsonl", None))


def test_the_copy_writes_the_unchanged_files_rows_and_rejects_and_their_record(tmp_path):
    manifest, base = write_previous(tmp_path)
    b = tmp_path / "b.jsonl"
    b.write_text('{"id": 10, "text": "b changed"}\n')
    unit = members(versions=("v1", "v2", "v3b"))  # c changed: a and b are copied
    unit = InputFile(A, unit.size, "jsonl", None, version="g",
                     members=(unit.members[0], unit.members[1], InputFile(str(b), 5, "jsonl",
                                                                          None, version="v3b")))
    manifest = manifest | {"members": [A, B, str(b)]}
    copy = member_copy(unit, manifest, base)
    copy = MemberCopy(**{**copy.__dict__, "output_uri": str(tmp_path / "out")})
    record = copy_members(copy, {})
    assert (record["rows"], record["rows_embedded"], record["rows_rejected"]) == (5, 4, 1)
    assert record["rows_unchanged"] == record["rows_reused"] == 4
    assert record["file_rows"] == -1  # the changed file's rows bring the unit's count
    assert record["row_sum"] == (file_rows_checksum(A, 3, 3) + file_rows_checksum(B, 2, 1)) \
        % CHECKSUM_MOD
    assert record["reject_reasons"] == {"text is null": 1} and record["first_reject"][0] == 1
    part, reject = record["files"]
    copied = pq.read_table(tmp_path / "out" / part)
    previous = pq.read_table(f"{base}/{[f for f in manifest['files'] if f.startswith('part-')][0]}")
    assert copied.equals(previous.slice(0, 4))  # bit for bit, schema metadata included
    assert copied.schema.metadata == previous.schema.metadata
    assert record["slices"] == {part: [[A, 3], [B, 1]]}
    assert json.loads(json.dumps(record)) == record  # plain ints, not the plan's arrays'
    assert pq.read_table(tmp_path / "out" / reject)["source"].to_pylist() == [B]
    assert record["member_rows"] == {A: [3, 3], B: [2, 1]}

    # The changed file is empty: this record carries the unit's count (no other will come).
    b.write_text("\n")
    assert copy_members(copy, {})["file_rows"] == 5
    # A part file that lost rows: the copy refuses, naming the file.
    damaged = MemberCopy(**{**copy.__dict__, "counts": ((4, 6),) + copy.counts[1:]})
    with pytest.raises(OutputError, match="holds 3 row.*of /in/a.jsonl.*counts 4"):
        copy_members(damaged, {})


def test_the_reader_skips_the_copied_files_and_counts_them(tmp_path):
    paths = []
    for name, lines in (("a", 2), ("b", 3), ("c", 1)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{name}{i}", "text": "t"}) + "\n"
                                for i in range(lines)))
        paths.append(InputFile(str(path), path.stat().st_size, "jsonl", None, version="v"))
    unit = InputFile(paths[0].uri, 1, "jsonl", None, version="g", members=tuple(paths))
    spec = ReadSpec("id", "text", id_type=pa.string())
    whole = pa.concat_tables(read_unit(unit, spec))
    skipped = Skipped(frozenset({paths[1].uri}), 3, file_rows_checksum(paths[1].uri, 3, 6))
    part = pa.concat_tables(read_unit(unit, spec, None, skipped))
    assert part[S.ID].to_pylist() == ["a0", "a1", "c0"]
    last = lambda t, c: t[c][t.num_rows - 1].as_py()  # noqa: E731 (the unit's totals)
    assert last(part, S.FILE_ROWS) == last(whole, S.FILE_ROWS) == 6
    assert last(part, S.FILE_ROWSUM) == last(whole, S.FILE_ROWSUM)
    assert np.all(part[S.UNIT].to_numpy(zero_copy_only=False) == unit.unit)


def test_the_copy_gathers_several_previous_part_files_into_files_of_at_most_a_part_files_rows(
        tmp_path):
    """A unit's rows written by two write batches (two part files): the copy writes them back
    as one file (its part files do not multiply night after night), or as several of at most
    ``rows_per_file`` rows; a part file that lost rows is refused."""
    fs = fsspec.filesystem("file")
    rows, base = group_rows(), str(tmp_path / "prev")
    records = [write_outputs(fs, base, rows.slice(0, 3), output_spec())[0],
               write_outputs(fs, base, rows.slice(3), output_spec())[0]]
    checksum = sum(file_rows_checksum(u, n, s) for u, n, s in
                   ((A, 3, 3), (B, 2, 1), (C, 1, 0))) % CHECKSUM_MOD
    commits = []
    tracker = units.Tracker([members()], commit=commits.append)
    tracker.add(records[0])
    assert tracker.add(records[1] | {"file_rows": 6, "file_rowsum": checksum}) is not None
    manifest = json.loads(json.dumps(commits[0]))
    assert len(manifest["slices"]) == 2
    copy = member_copy(members(versions=("v1", "v2b", "v3")), manifest, base)  # b changed
    copy = MemberCopy(**{**copy.__dict__, "changed": ()})  # (b is not on this disk)
    out = str(tmp_path / "out")
    record = copy_members(MemberCopy(**{**copy.__dict__, "output_uri": out}), {})
    (part,) = [f for f in record["files"] if f.startswith("part-")]
    # a's rows were in two runs (one per write): they are gathered, each file's together
    assert pq.read_table(f"{out}/{part}")["doc_id"].to_pylist() == [2, 0, 1, 20]
    assert record["slices"] == {part: [[A, 3], [C, 1]]}
    assert record["rows_embedded"] == 4 and record["rows_rejected"] == 0
    small = copy_members(MemberCopy(**{**copy.__dict__, "output_uri": out + "2",
                                       "rows_per_file": 2}), {})
    assert [[(uri, n) for uri, n in small["slices"][f]] for f in small["files"]] == [
        [(A, 2)], [(A, 1), (C, 1)]]
    # A previous part file with a row its slices do not count: the snapshot is damaged.
    first = [f for f in manifest["files"] if f.startswith("part-")][0]
    table = pq.read_table(f"{base}/{first}")
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), f"{base}/{first}")
    with pytest.raises(OutputError, match="its manifest's slices"):
        copy_members(MemberCopy(**{**copy.__dict__, "output_uri": out + "3"}), {})
    # One that is not Parquet at all: the error names it.
    (tmp_path / "prev" / first).write_bytes(b"PAR1 damaged PAR1")
    with pytest.raises(InputError, match=f"cannot copy rows of the previous snapshot's "
                                         f".*{re.escape(first)}: not a readable file"):
        copy_members(MemberCopy(**{**copy.__dict__, "output_uri": out + "4"}), {})


def test_the_copy_takes_the_ranges_of_a_previous_part_file_in_order():
    rows = 23
    whole = pa.table({"id": pa.array(range(rows), pa.int64()),
                      "v": pa.array([[float(i)] * 3 for i in range(rows)])})
    rng = np.random.default_rng(7)
    cases = [[], [(0, rows)], [(0, 1)], [(22, 1)], [(3, 2)], [(0, 4), (8, 0), (9, 14)],
             [(1, 1), (2, 1), (20, 3)]]
    for _ in range(20):
        cuts = np.sort(rng.choice(np.arange(1, rows), rng.integers(1, 8), replace=False))
        spans = list(zip([0, *cuts], [*cuts, rows]))
        cases.append([(int(a), int(b - a)) for a, b in spans if rng.random() < 0.5])
    for ranges in cases:
        got = take_ranges(whole, ranges, "part.parquet", rows)
        want = [i for start, n in ranges for i in range(start, start + n)]
        assert got["id"].to_pylist() == want, ranges
        assert got["v"].to_pylist() == [[float(i)] * 3 for i in want]
        assert got.schema == whole.schema
    with pytest.raises(OutputError, match="has 23 rows, its manifest's slices 24"):
        take_ranges(whole, [(0, 1)], "part.parquet", 24)


def test_a_touched_units_read_is_sized_by_its_changed_files_alone():
    """Ray Data sizes a read by the datasource's estimate: a 1% night at 100,000 files counted
    the copied files too, and read its 1,000 changed files in 200 tasks of 5."""
    from pipeline.cluster.graph import ShardDatasource

    def unit(k):
        files = tuple(InputFile(f"/in/f{k}-{i}.parquet", 1000, "parquet", None, version="v")
                      for i in range(256))
        return InputFile(files[0].uri, 1000 * len(files), "parquet", None, version="g",
                         members=files)

    units = [unit(k) for k in range(40)] + [InputFile("/in/alone.parquet", 5000, "parquet",
                                                      None)]
    changed = {u.unit: 1 + k % 3 for k, u in enumerate(units[:40])}  # 1-3 files of 256 read
    skipped = {u.unit: Skipped(frozenset(m.uri for m in u.members[changed[u.unit]:]), 0, 0)
               for u in units[:40]}
    spec = ReadSpec("id", "text", (), None)
    source = ShardDatasource(units, "parquet", spec, {}, skipped)
    assert source.estimate_inmemory_data_size() == 1000 * sum(changed.values()) + 5000
    assert ShardDatasource(units, "parquet", spec, {}).estimate_inmemory_data_size() == \
        sum(u.size for u in units)  # a run reads every file
    tasks = source.get_read_tasks(4)
    assert len(tasks) == 4
    sizes = [t.metadata.size_bytes for t in tasks]
    assert sum(sizes) == source.estimate_inmemory_data_size()
    assert max(sizes) - min(sizes) <= 5000  # dealt by the bytes each unit reads
    read = {uri for t in tasks for uri in t.metadata.input_files}
    assert read == {m.uri for u in units[:40] for m in u.members[:changed[u.unit]]} | {
        "/in/alone.parquet"}


def _random_parts(rng, files: int, scattered: bool) -> list[list[tuple[int, int]]]:
    """The slices of a unit's previous part files: each file's rows dealt to several writes
    (a first night's shuffle), or each file in one part file, with a few split in two."""
    counts = rng.integers(1, 40, files)
    if scattered:
        writes = int(rng.integers(1, 5))
        dealt = [rng.multinomial(int(n), [1 / writes] * writes) for n in counts]
        return [[(i, int(d[w])) for i, d in enumerate(dealt) if d[w]] for w in range(writes)]
    parts, current = [], []
    for i, n in enumerate(counts):
        current.append((i, int(n)))
        if rng.random() < 0.3:
            parts.append(current)
            current = []
    return [part for part in parts + [current] if part]


def _write_part(path, slices, rng, page_index=False) -> list[int]:
    """A previous part file of ``slices`` (ids "file:part:k", a vector each), its row groups
    ending with its files' rows as the writer cuts them; returns their rows."""
    from pipeline.io.writers import file_row_groups, write_table

    ids = [f"{i}:{path.stem}:{k}" for i, n in slices for k in range(n)]
    table = pa.table({"id": ids, "v": pa.array([[float(len(s))] * 4 for s in ids],
                                               pa.list_(pa.float32()))})
    if page_index:  # another writer's file, whose row groups cannot move as bytes
        pq.write_table(table, path, row_group_size=17, write_page_index=True)
        return _group_rows(path)
    groups = file_row_groups([n for _, n in slices], least=int(rng.integers(1, 50)))
    with open(path, "wb") as f:
        write_table(f, table, groups)
    return groups


def _scattered(spans, kept) -> set[int]:
    """The copied files found in more than one run of a unit's part files."""
    runs = []
    for part in spans:
        for group in part:
            for i, _, n in group:
                if runs and runs[-1][0] == i:
                    runs[-1][1] += n
                else:
                    runs.append([i, n])
    return {i for i in kept if sum(r[0] == i for r in runs) > 1}


def _plain_plan(spans, kept, small):
    """``copy_plan`` the plain way: the row groups that cannot move, grown to a fixed point
    (every row group of a decoded file), and the decoded files."""
    scattered = _scattered(spans, kept)
    groups = [(p, g) for p, part in enumerate(spans) for g in range(len(part))]
    bad = {(p, g) for p, g in groups
           if sum(n for _, _, n in spans[p][g]) < small
           or any(i not in kept or i in scattered for i, _, _ in spans[p][g])}
    while True:
        want = {i for p, g in bad for i, _, _ in spans[p][g] if i in kept}
        grown = bad | {(p, g) for p, g in groups if any(i in want for i, _, _ in spans[p][g])}
        if grown == bad:
            return [[(p, g) not in bad for g in range(len(part))]
                    for p, part in enumerate(spans)], want
        bad = grown


def test_the_copy_plan_moves_clean_row_groups_and_decodes_whole_files():
    """Over random units: a row group moves as bytes when it holds only copied files that
    are each in one run of the unit and has enough rows; every copied file with rows in
    another row group is decoded, all its row groups with it (checked against a plain fixed
    point), and the others keep all their row groups moving."""
    rng = np.random.default_rng(11)
    for trial in range(200):
        files = int(rng.integers(1, 12))
        parts = _random_parts(rng, files, scattered=trial % 2 == 0)
        spans = []
        for slices in parts:  # row groups cut anywhere
            rows = sum(n for _, n in slices)
            cuts = np.sort(rng.choice(np.arange(1, rows), min(rows - 1, int(
                rng.integers(0, 4))), replace=False)) if rows > 1 else []
            groups = np.diff([0, *cuts, rows]).tolist()
            spans.append(group_spans(tuple(slices), groups, "part"))
        kept = frozenset(int(i) for i in rng.choice(files, int(rng.integers(1, files + 1)),
                                                    replace=False))
        small = int(rng.integers(1, 30))
        moved, decoded = copy_plan(spans, kept, small)
        assert (moved, decoded) == _plain_plan(spans, kept, small), trial
        groups = [(p, g) for p, part in enumerate(spans) for g in range(len(part))]
        scattered = _scattered(spans, kept)
        for p, g in groups:
            if moved[p][g]:
                assert all(i in kept and i not in decoded and i not in scattered
                           for i, _, _ in spans[p][g])


def _group_rows(path) -> list[int]:
    """The rows of each row group of the Parquet file at ``path``."""
    meta = pq.read_metadata(path)
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def _copy_of(tmp_path, rng, parts, kept, name, page_index=False, rows_per_file=1 << 62):
    base = tmp_path / name
    base.mkdir()
    files = 1 + max(i for part in parts for i, _ in part)
    for k, slices in enumerate(parts):
        _write_part(base / f"part-{k}.parquet", slices, rng, page_index and k == 0)
    counts = [0] * files
    for part in parts:
        for i, n in part:
            counts[i] += n
    return MemberCopy(
        unit="u", key="0123456789abcdef", source=str(base),
        members=tuple(f"/in/{i}.parquet" for i in range(files)), kept=kept,
        parts=tuple((f"part-{k}.parquet", tuple(s)) for k, s in enumerate(parts)),
        rejects=(), counts=tuple((n, 0) for n in counts), changed=(),
        output_uri=str(tmp_path / f"{name}-out"), rows_per_file=rows_per_file)


def test_the_copy_moves_the_planned_row_groups_as_bytes_and_gathers_each_files_rows(
        tmp_path, monkeypatch):
    """Over random units, their files' rows dealt over several writes (a first night) or not,
    some part files another writer's: the copy holds every copied row once, each file's rows
    together; the row groups the plan moves are in its part files byte for byte; no file
    exceeds ``rows_per_file`` rows but by a moved row group. A second night on the copy
    finds no file scattered, so its plan decodes only the row groups of changed files (and
    small ones)."""
    from pipeline.io import splice
    from pipeline.stages import carry

    rng = np.random.default_rng(5)
    moved_in_all = decoded_in_all = moved_next = 0
    for trial in range(24):
        monkeypatch.setattr(carry, "SMALL_GROUP_ROWS", int(rng.integers(1, 20)))
        files = int(rng.integers(2, 14))
        parts = _random_parts(rng, files, scattered=trial % 2 == 0)
        files = 1 + max(i for part in parts for i, _ in part)
        kept = frozenset(int(i) for i in rng.choice(files, int(rng.integers(1, files + 1)),
                                                    replace=False))
        most = int(rng.integers(5, 80)) if trial % 3 == 0 else 1 << 62
        job = _copy_of(tmp_path, rng, parts, kept, f"t{trial}", page_index=trial % 5 == 4,
                       rows_per_file=most)
        record = copy_members(job, {})
        out = Path(job.output_uri)
        tables = [pq.read_table(out / f) for f in record["files"]]
        ids = [x for t in tables for x in t["id"].to_pylist()]
        want = sorted(f"{i}:part-{p}:{k}" for p, slices in enumerate(parts)
                      for i, n in slices for k in range(n) if i in kept)
        assert sorted(ids) == want and len(ids) == len(set(ids)), trial
        for i in kept:  # a file's rows in the order they were found, part by part
            mine = [x for x in ids if int(x.split(":")[0]) == i]
            assert mine == sorted(mine, key=lambda x: (int(x.split(":")[1][5:]),
                                                       int(x.split(":")[2]))), trial
        order = [int(x.split(":")[0]) for x in ids]
        assert len([i for k, i in enumerate(order) if k == 0 or order[k - 1] != i]) == \
            len(set(order)), trial  # each file's rows together
        for f, t in zip(record["files"], tables):
            got = [(int(x.split(":")[0]), 1) for x in t["id"].to_pylist()]
            runs = []
            for i, n in got:
                if runs and runs[-1][0] == job.members[i]:
                    runs[-1][1] += n
                else:
                    runs.append([job.members[i], n])
            assert record["slices"][f] == runs, trial
        # The planned row groups moved byte for byte (the other writer's file excepted).
        spans = [group_spans(s, _group_rows(Path(job.source) / n), n) for n, s in job.parts]
        moved, decoded = carry.copy_plan(spans, kept)
        written = b"".join((out / f).read_bytes() for f in record["files"])
        for (name, _), flags in zip(job.parts, moved):
            data = (Path(job.source) / name).read_bytes()
            try:
                groups = splice.parse(data).row_groups
            except splice.SpliceError:
                continue
            for group, flag in zip(groups, flags):
                if flag:
                    assert bytes(group.chunks()) in written, trial
                    moved_in_all += 1
        decoded_in_all += len(decoded)
        sizes = [t.num_rows for t in tables]
        biggest = max((g for part in spans for g in [sum(n for *_, n in grp) for grp in part]),
                      default=0)
        assert max(sizes) <= max(most, biggest), trial
        # The next night: every copied file is in one run of the unit (none scattered), so
        # its plan decodes only the row groups of a changed file, small ones, and their
        # files' others.
        again = [tuple((job.members.index(uri), n) for uri, n in record["slices"][f])
                 for f in record["files"]]
        spans = [group_spans(s, _group_rows(out / f), f) for f, s in zip(record["files"], again)]
        changed = {int(rng.choice(sorted(kept)))}
        assert not _scattered(spans, kept), trial
        moved, decoded = carry.copy_plan(spans, kept - changed)
        assert (moved, decoded) == _plain_plan(spans, kept - changed,
                                               carry.SMALL_GROUP_ROWS), trial
        moved_next += sum(map(sum, moved))
    assert moved_in_all > 20 and decoded_in_all > 30 and moved_next > moved_in_all


def test_row_groups_of_files_whose_schemas_differ_are_written_again_whole(tmp_path,
                                                                          monkeypatch):
    """Row groups of two previous part files whose Parquet schemas differ (here a field id
    that one writer added) cannot share a footer: the copy decodes them and writes them
    again, rows in order."""
    from pipeline.stages import carry
    from pipeline.io.writers import write_table

    monkeypatch.setattr(carry, "SMALL_GROUP_ROWS", 1)
    base = tmp_path / "prev"
    base.mkdir()
    tables = []
    for k, field_id in enumerate((None, "7")):
        table = pa.table({"id": [f"{k}:{i}" for i in range(6)],
                          "v": pa.array([[float(i)] * 2 for i in range(6)],
                                        pa.list_(pa.float32()))})
        if field_id:
            table = table.cast(pa.schema([table.schema.field("id").with_metadata(
                {"PARQUET:field_id": field_id}), table.schema.field("v")]))
        with open(base / f"part-{k}.parquet", "wb") as f:
            write_table(f, table, [3, 3])
        tables.append(table)
    job = MemberCopy(unit="u", key="0123456789abcdef", source=str(base),
                     members=("/in/0", "/in/1", "/in/2"), kept=frozenset({0, 1}),
                     parts=(("part-0.parquet", ((0, 6),)), ("part-1.parquet", ((1, 6),))),
                     rejects=(), counts=((6, 0), (6, 0), (1, 0)), changed=(),
                     output_uri=str(tmp_path / "out"))
    record = copy_members(job, {})
    (part,) = record["files"]
    written = pq.read_table(tmp_path / "out" / part)
    assert written["id"].to_pylist() == [f"{k}:{i}" for k in range(2) for i in range(6)]
    assert written["v"].to_pylist() == tables[0]["v"].to_pylist() * 2


def test_row_groups_planned_to_move_from_a_file_that_cannot_be_spliced_are_decoded_in_place(
        tmp_path, monkeypatch):
    """A previous part file with a page index (another writer's) holds only copied files, in
    row groups the plan moves: they cannot move as bytes, so they are decoded, in their place
    and order, before the row groups that do move."""
    from pipeline.stages import carry

    monkeypatch.setattr(carry, "SMALL_GROUP_ROWS", 1)
    rng = np.random.default_rng(2)
    parts = [[(0, 30), (1, 25)], [(2, 10), (3, 40)]]
    job = _copy_of(tmp_path, rng, parts, frozenset({0, 1, 3}), "p", page_index=True)
    spans = [group_spans(s, _group_rows(Path(job.source) / n), n) for n, s in job.parts]
    assert len(spans[0]) > 2  # the page-index file's row groups of 17 rows
    moved, decoded = carry.copy_plan(spans, job.kept)
    assert all(moved[0]) and decoded <= {3}
    record = copy_members(job, {})
    (part,) = record["files"]
    ids = pq.read_table(Path(job.output_uri) / part)["id"].to_pylist()
    want = [f"{i}:part-0:{k}" for i, n in parts[0] for k in range(n)]
    assert ids[:55] == want and len(ids) == 95
    assert sorted(ids[55:]) == sorted(f"3:part-1:{k}" for k in range(40))
    assert record["slices"][part] == [["/in/0.parquet", 30], ["/in/1.parquet", 25],
                                      ["/in/3.parquet", 40]]


def scattered_unit(base: str) -> dict:
    """The manifest :func:`commit_scattered` commits, as loaded from JSON."""
    return json.loads(json.dumps(commit_scattered(base)[1][0]))


def test_a_unit_scattered_over_writes_is_gathered_into_one_part_file(tmp_path):
    """A unit whose rows came in three writes: its three part files and reject file are
    copied into one part file of each file's rows together and one reject file, with the
    same rows and counts; a later night copies from it."""
    base = str(tmp_path / "snap")
    manifest = scattered_unit(base)
    scattered = [f for f in manifest["files"] if f.startswith("part-")]
    assert len(scattered) == 3
    # 5 good rows in 3 part files: more than 1 file of 1,000 rows needs (and 1 to spare);
    # in files of 2 rows they need 3: nothing to gather.
    assert gathering(manifest, base, 1000) is not None
    assert gathering(manifest, base, 2) is None
    assert gather_unit(manifest, base, {}, 2) is None

    gathered = gather_unit(manifest, base, {}, 1000)
    (part, reject) = gathered["files"]
    assert part.startswith("part-") and reject.startswith("_rejects/")
    assert not set(gathered["files"]) & set(manifest["files"])  # the first ones: strays now
    table = pq.read_table(f"{base}/{part}")
    ids = table["doc_id"].to_pylist()
    assert sorted(ids[:3]) == [0, 1, 2] and ids[3:] == [10, 20]  # each file's rows together
    assert gathered["slices"] == {part: [[0, 3], [1, 1], [2, 1]]}
    assert pq.read_table(f"{base}/{reject}")["row"].to_pylist() == [1]
    assert gathered["gathered_from"] == 3
    assert gathered["bytes"] == sum(Path(f"{base}/{f}").stat().st_size for f in gathered["files"])
    same = ("rows", "row_sum", "rows_embedded", "rows_rejected", "member_files", "members")
    assert {k: gathered[k] for k in same} == {k: manifest[k] for k in same}
    # A later night copies its unchanged files from the gathered unit as from any.
    copy = member_copy(members(versions=("v1", "v2b", "v3")), gathered, base)
    assert copy.kept == {0, 2} and copy.rejects == (reject,)
    assert copy.ranges(part, copied=True) == [(0, 3), (4, 1)]  # a's rows, then c's


def test_a_damaged_scattered_unit_is_not_gathered_silently(tmp_path):
    base = str(tmp_path / "snap")
    manifest = scattered_unit(base)
    # Rows its manifest does not count: refused, naming the unit and this snapshot, with no
    # advice meant for a damaged previous snapshot (deleting _LATEST would lose a good one).
    miscounted = manifest | {"member_files": [[10, "v1", 4, 3]] + manifest["member_files"][1:]}
    with pytest.raises(OutputError, match=r"cannot gather the 3 part files of unit "
                       rf"{re.escape(UNIT)} in {re.escape(base)}: .*holds 3 row.*counts 4") as err:
        gather_unit(miscounted, base, {}, 1000)
    assert "_LATEST" not in str(err.value) and "run the night again" in str(err.value)
    part = sorted(f for f in manifest["files"] if f.startswith("part-"))[0]
    Path(f"{base}/{part}").unlink()  # lost before the gathering read it
    with pytest.raises(OutputError, match=r"FileNotFoundError: .*" + re.escape(part)):
        gather_unit(manifest, base, {}, 1000)
