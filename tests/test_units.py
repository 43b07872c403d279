"""Units of work (one per input file): commits, resuming an output, manifests. No Ray.

The Tracker sums the write records of each unit (``merge``, with the one ``Totals`` sum) and
commits it once its rows' count and the sum of their row numbers equal the file's own;
``resumable_units`` decides what an earlier run's output may keep, ``stray_files`` what must
go; ``load_state`` reads the manifests back from a local directory and from S3 (moto).
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import embedding_column
from pipeline.io import schema as S
from pipeline.io.readers import (JSON_TEXT, ReadSpec, open_decompressed, read_jsonl,
                                 read_parquet)
from pipeline.io.storage import (MANIFEST_DIR, SUMMARY_NAME, InputFile, OutputError,
                                 open_filesystem, own_files, prepare_output, remove_files)
from pipeline.io.writers import OutputSpec, write_outputs
from pipeline.units import (COUNTS, IDENTITY_FIELDS, MAXIMA, RUN_FILE, TIMES, OutputState,
                            RowsDuplicated, Totals, Tracker, complete, decode_types, encode_types,
                            incomplete_units, load_state, manifest_path, merge, resumable_units,
                            stray_files, unit_key, unit_manifest_name, write_identity)
from pipeline.io.storage import publish_json as write_json
from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401

# ---------------------------------------------------------------------------------------------
# helpers


def input_file(uri: str, size: int = 100, fmt: str = "jsonl") -> InputFile:
    return InputFile(uri, size, fmt, None)


def record(uri: str, rows, file_rows: int = -1, file_rowsum: int = -1, rejected: int = 0,
           files=(), reasons=None) -> dict:
    """One write record of ``uri``'s rows numbered ``rows``, as ``write_outputs`` makes it."""
    rows = list(rows)
    return {
        "unit": unit_key(uri), "source": uri, "rows": len(rows), "row_sum": sum(rows),
        "file_rows": file_rows, "file_rowsum": file_rowsum,
        "rows_embedded": len(rows) - rejected, "rows_rejected": rejected,
        "first_reject": [rows[0], "text is null"] if rejected else None,
        "tokens": 3 * (len(rows) - rejected), "files": list(files), "bytes": 10 * len(files),
        "reject_reasons": reasons or ({"text is null": rejected} if rejected else {}),
        "texts_truncated": 0, "grid_tokens": 0, "batch_grid_tokens": 0, "tokenize_s": 0.1,
        "encode_s": 0.2, "encode_first_start": 0.0, "encode_last_end": 0.0, "write_s": 0.05,
    }


class Commits(list):
    """The tracker's commit callback: remembers every unit committed, in order."""

    def __call__(self, unit: dict) -> None:
        self.append(json.loads(json.dumps(unit)))  # a manifest must serialise


# ---------------------------------------------------------------------------------------------
# Tracker

PQ = "s3://in/a.parquet"  # 6 rows, numbered 0..5 (sum 15), every block knows the counts
JS = "s3://in/b.jsonl"  # 5 rows on lines 1, 2, 4, 5, 7 (sum 19); only the last block knows


def test_tracker_commits_a_unit_once_all_its_rows_are_out():
    commits = Commits()
    tracker = Tracker([input_file(PQ, 640, "parquet"), input_file(JS)], commits)
    first = record(PQ, [0, 1], 6, 15, files=["o/part-1.parquet"])
    second = record(PQ, [2, 3], 6, 15, rejected=1,
                    files=["o/part-2.parquet", "o/_rejects/part-2.parquet"])
    third = record(PQ, [4, 5], 6, 15, rejected=2, files=["o/_rejects/part-3.parquet"],
                   reasons={"malformed JSON": 2})
    assert tracker.add(first) is None and tracker.add(second) is None
    assert commits == [] and tracker.committed == {}
    assert tracker.open[unit_key(PQ)]["rows"] == 4 and not complete(tracker.open[unit_key(PQ)])
    manifest = tracker.add(third)
    assert manifest is not None and commits == [manifest]
    assert tracker.committed == {unit_key(PQ): manifest} and tracker.open == {}
    assert {k: manifest[k] for k in ("unit", "uri", "size", "rows", "row_sum", "file_rows",
                                     "file_rowsum", "rows_embedded", "rows_rejected", "tokens",
                                     "bytes", "first_reject", "reject_reasons")} == {
        "unit": unit_key(PQ), "uri": PQ, "size": 640, "rows": 6, "row_sum": 15, "file_rows": 6,
        "file_rowsum": 15, "rows_embedded": 3, "rows_rejected": 3, "tokens": 9, "bytes": 40,
        "first_reject": [2, "text is null"],
        "reject_reasons": {"text is null": 1, "malformed JSON": 2}}
    assert manifest["files"] == ["o/part-1.parquet", "o/part-2.parquet",
                                 "o/_rejects/part-2.parquet", "o/_rejects/part-3.parquet"]
    assert manifest["write_s"] == pytest.approx(0.15) and manifest["committed_at"] > 0
    assert tracker.unseen() == [unit_key(JS)]


JS_BLOCKS = [record(JS, [1, 2]), record(JS, [4, 5]), record(JS, [7], 5, 19)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))),
                         ids=lambda o: "".join(map(str, o)))
def test_tracker_commits_whatever_the_order_of_the_records(order):
    commits = Commits()
    tracker = Tracker([input_file(JS)], commits)
    results = [tracker.add(JS_BLOCKS[i]) for i in order]
    assert results[:2] == [None, None] and results[2] is not None
    assert len(commits) == 1 and commits[0]["rows"] == 5 and commits[0]["row_sum"] == 19


def test_tracker_record_after_the_commit_is_a_duplicate():
    tracker = Tracker([input_file(JS)], Commits())
    for r in JS_BLOCKS:
        tracker.add(r)
    with pytest.raises(RowsDuplicated, match="after its unit was committed"):
        tracker.add(record(JS, [4]))  # a retried write of rows already committed


def test_tracker_record_of_an_unknown_unit_is_refused():
    tracker = Tracker([input_file(JS)], Commits())
    with pytest.raises(RowsDuplicated, match="s3://in/other.jsonl"):
        tracker.add(record("s3://in/other.jsonl", [1], 1, 1))  # e.g. a unit resumed, not redone


def test_tracker_more_rows_than_the_file_holds():
    tracker = Tracker([input_file(PQ, fmt="parquet")], Commits())
    tracker.add(record(PQ, [0, 1, 2], 6, 15))
    with pytest.raises(RowsDuplicated, match="7 rows written for a file of 6"):
        tracker.add(record(PQ, [2, 3, 4, 5], 6, 15))


def test_tracker_duplicates_found_once_the_count_arrives():
    commits = Commits()
    tracker = Tracker([input_file(JS)], commits)
    tracker.add(record(JS, [1, 2]))
    tracker.add(record(JS, [1, 2]))  # JSONL: the count is not known yet
    tracker.add(record(JS, [4]))
    with pytest.raises(RowsDuplicated, match="6 rows written for a file of 5"):
        tracker.add(record(JS, [7], 5, 19))
    assert commits == []


def test_tracker_count_right_but_row_sum_wrong_stays_open():
    # Row 1 twice and row 2 never: the count matches, the sum of row numbers does not.
    commits = Commits()
    tracker = Tracker([input_file(PQ, fmt="parquet")], commits)
    for rows in ([0, 1], [1, 3], [4, 5]):
        assert tracker.add(record(PQ, rows, 6, 15)) is None
    assert commits == [] and tracker.committed == {}
    unit = tracker.open[unit_key(PQ)]
    assert (unit["rows"], unit["row_sum"]) == (6, 14) and not complete(unit)


def test_tracker_finish_empty_commits_only_an_empty_file():
    commits = Commits()
    empty, full = input_file("s3://in/e.jsonl", 0), input_file("s3://in/f.jsonl", 50)
    tracker = Tracker([empty, full], commits)
    assert tracker.unseen() == [unit_key(empty.uri), unit_key(full.uri)]
    assert tracker.finish_empty(unit_key(full.uri), 4) is None  # rows that never came out
    assert commits == []
    manifest = tracker.finish_empty(unit_key(empty.uri), 0)
    assert commits == [manifest] and manifest["uri"] == empty.uri and manifest["size"] == 0
    assert (manifest["rows"], manifest["file_rows"], manifest["file_rowsum"]) == (0, 0, 0)
    assert manifest["files"] == [] and complete(manifest)
    assert tracker.unseen() == [unit_key(full.uri)]


def test_tracker_unseen_lists_units_without_any_record():
    files = [input_file(f"s3://in/{n}.jsonl") for n in "abcd"]
    tracker = Tracker(files, Commits())
    tracker.add(record(files[1].uri, [1]))  # open
    tracker.add(record(files[3].uri, [1], 1, 1))  # committed
    assert tracker.unseen() == [unit_key(files[0].uri), unit_key(files[2].uri)]
    assert list(tracker.open) == [unit_key(files[1].uri)]


def test_unit_key_is_stable_and_distinct():
    assert unit_key("s3://b/a.jsonl") == unit_key("s3://b/a.jsonl")
    assert len({unit_key(f"s3://b/{i}.jsonl") for i in range(1000)}) == 1000
    assert len(unit_key("x")) == 16 and int(unit_key("x"), 16) >= 0


# ---------------------------------------------------------------------------------------------
# Totals (the one sum behind manifests, the summary and the nightly counts) and merge


def test_totals_take_the_largest_of_a_maximum():
    total = Totals.of([{"chunks": 3, "chunks_max": 2}, {"chunks": 9, "chunks_max": 7},
                       {"chunks": 1, "chunks_max": 1}])
    assert (total.counts["chunks"], total.counts["chunks_max"]) == (13, 7)


def test_totals_start_at_zero_with_every_field():
    total = Totals()
    assert total.counts == dict.fromkeys(COUNTS + MAXIMA, 0)
    assert total.times == dict.fromkeys(TIMES, 0.0)
    assert (total.reject_reasons, total.files) == ({}, [])
    assert (total.encode_first_start, total.encode_last_end) == (0.0, 0.0)
    assert set(total.as_dict()) == set(COUNTS) | set(MAXIMA) | set(TIMES) | {
        "reject_reasons", "files", "encode_first_start", "encode_last_end"}
    assert Totals.of([]).as_dict() == total.as_dict()


def test_totals_add_sums_counts_times_reasons_files_and_the_encoder_window():
    a = record(PQ, range(6), rejected=2, files=["part-a.parquet", "_rejects/part-b.parquet"],
               reasons={"text is null": 1, "malformed JSON": 1}) | {
        "encode_first_start": 1000.0, "encode_last_end": 1003.0, "rows_new": 4}
    b = record(JS, [1, 2, 4], rejected=1, files=["part-c.parquet"]) | {
        "encode_first_start": 999.5, "encode_last_end": 1002.0, "rows_new": 1, "rows_reused": 2}
    no_window = record(JS, [7], files=[])  # encode_first_start 0.0: not in the window
    no_window["encode_last_end"] = 5000.0
    total = Totals()
    assert total.add(a) is total  # chains
    total.add(b).add(no_window)
    assert total.counts["rows"] == 10 and total.counts["row_sum"] == 15 + 7 + 7
    assert (total.counts["rows_embedded"], total.counts["rows_rejected"]) == (7, 3)
    assert total.counts["tokens"] == 21 and total.counts["bytes"] == 30
    assert (total.counts["rows_new"], total.counts["rows_reused"]) == (5, 2)  # nightly counts
    assert total.counts["rows_changed"] == 0  # absent from every record: zero
    assert total.times == pytest.approx({"tokenize_s": 0.3, "encode_s": 0.6, "write_s": 0.15})
    assert total.reject_reasons == {"text is null": 2, "malformed JSON": 1}
    assert total.files == ["part-a.parquet", "_rejects/part-b.parquet", "part-c.parquet"]
    assert (total.encode_first_start, total.encode_last_end) == (999.5, 1003.0)
    # of() is add() over the items; the items are not changed.
    assert Totals.of([a, b, no_window]) == total
    assert a["files"] == ["part-a.parquet", "_rejects/part-b.parquet"] and a["rows"] == 6


def test_totals_as_dict_is_flat_and_sums_again_to_itself():
    total = Totals.of([record(PQ, range(3), rejected=1, files=["part-a.parquet"]) | {
        "encode_first_start": 10.0, "encode_last_end": 12.0}])
    flat = total.as_dict()
    assert flat["rows"] == 3 and flat["encode_s"] == pytest.approx(0.2)
    assert flat["reject_reasons"] == {"text is null": 1} and flat["files"] == ["part-a.parquet"]
    assert (flat["encode_first_start"], flat["encode_last_end"]) == (10.0, 12.0)
    assert "unit" not in flat and "file_rows" not in flat and "first_reject" not in flat
    assert Totals.of([flat]) == total  # a manifest sums like the records it came from
    json.dumps(flat)


def test_merge_keeps_the_manifest_fields_beside_the_totals():
    first = record(JS, [1, 2], rejected=1, files=["part-1.parquet"])
    unit = merge(None, first)
    assert (unit["unit"], unit["uri"]) == (unit_key(JS), JS)
    assert (unit["file_rows"], unit["file_rowsum"]) == (-1, -1)  # not known yet (JSONL)
    assert unit["first_reject"] == [1, "text is null"] and unit["rows"] == 2
    assert set(unit) >= set(Totals().as_dict())
    unit["size"] = 123  # a field of the manifest the totals know nothing of
    second = record(JS, [4, 5, 7], file_rows=5, file_rowsum=19, rejected=1,
                    files=["part-2.parquet"])
    second["first_reject"] = [4, "malformed JSON"]
    merged = merge(unit, second)
    assert merged is unit  # the running totals are updated in place
    assert (merged["unit"], merged["uri"], merged["size"]) == (unit_key(JS), JS, 123)
    assert (merged["file_rows"], merged["file_rowsum"]) == (5, 19)  # the known counts win
    assert merged["first_reject"] == [1, "text is null"]  # the first one stays
    assert (merged["rows"], merged["row_sum"], merged["rows_rejected"]) == (5, 19, 2)
    assert merged["files"] == ["part-1.parquet", "part-2.parquet"]
    assert merged["reject_reasons"] == {"text is null": 2}
    assert complete(merged)
    # A later record without counts (-1) does not forget the known ones.
    assert merge(dict(merged), record(JS, [], files=[]))["file_rows"] == 5


# ---------------------------------------------------------------------------------------------
# readers -> writers -> Tracker: the file's counts close exactly its units

DIMS = (4,)


def fake_encode(table: pa.Table) -> pa.Table:
    """What the tokenizer and encoder stages add to the reader's rows."""
    n = table.num_rows
    columns = {S.NUM_TOKENS: pa.array(np.full(n, 3), pa.int32()),
               S.TRUNCATED: pa.array(np.zeros(n, bool)),
               S.TOKENIZE_S: pa.array(np.full(n, 0.1)), S.GRID_TOKENS: pa.array(np.full(n, 4)),
               S.BATCH_MAX: pa.array(np.full(n, 4)), S.ENCODE_S: pa.array(np.full(n, 0.2)),
               S.ENCODE_START: pa.array(np.full(n, 10.0)), S.ENCODE_END: pa.array(np.full(n, 11.0))}
    for d in DIMS:
        columns[embedding_column(d)] = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ones(n * d, np.float32)), d)
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


SPEC = OutputSpec("id", (), DIMS, "float32", {"model_id": "m"})


def run_units(tmp_path: Path, path: Path, reader, spec: ReadSpec, fmt: str) -> tuple:
    """Read ``path`` in blocks, write each block, feed the records last block first."""
    fs, out = open_filesystem(str(tmp_path / "out"))
    with open(path, "rb") as f:
        stream = open_decompressed(f, "gzip") if path.suffix == ".gz" else f
        blocks = list(reader(stream, str(path), spec))
    records = [r for b in blocks for r in write_outputs(fs, out, fake_encode(b), SPEC)]
    commits = Commits()
    tracker = Tracker([input_file(str(path), path.stat().st_size, fmt)], commits)
    results = [tracker.add(r) for r in reversed(records)]
    return records, results, commits


def test_jsonl_blocks_commit_their_unit_exactly_once(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "text": f"t{i}"}) for i in range(7)]
    lines[3] = "{oops"
    lines[5] = json.dumps({"id": 1, "text": "again"})  # a duplicate id
    path.write_text("\n\n".join(lines) + "\n")
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=2)
    records, results, commits = run_units(tmp_path, path, read_jsonl, spec, "jsonl")
    assert len(records) == 4
    assert results[:-1] == [None] * 3 and results[-1] == commits[0]
    (unit,) = commits
    assert (unit["rows"], unit["rows_embedded"], unit["rows_rejected"]) == (7, 5, 2)
    assert unit["row_sum"] == unit["file_rowsum"] == sum(range(1, 14, 2))
    assert unit["reject_reasons"] == {"malformed JSON": 1, "duplicate id": 1}
    assert sorted(unit["files"]) == sorted(f for r in records for f in r["files"])
    # Named relative to the output.
    assert sum(pq.read_table(tmp_path / "out" / f).num_rows for f in unit["files"]) == 7


def test_damaged_gzip_commits_its_unit_with_the_damage_rejected(tmp_path):
    data = "".join(json.dumps({"id": i, "text": "x" * 300}) + "\n" for i in range(2000))
    blob = gzip.compress(data.encode())
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    spec = ReadSpec("id", "text", id_type=pa.int64())
    _, results, commits = run_units(tmp_path, path, read_jsonl, spec, "jsonl")
    (unit,) = commits
    assert results[0] == unit and unit["rows_rejected"] == 1
    assert unit["rows"] == unit["file_rows"] and unit["row_sum"] == unit["file_rowsum"]
    # One reason kind for every damaged file; the line is in the reject's full reason.
    assert list(unit["reject_reasons"]) == ["damaged compressed data"]
    assert unit["first_reject"][0] == unit["rows"]
    assert unit["first_reject"][1].startswith("damaged compressed data: ")
    assert f" after line {unit['rows'] - 1}; " in unit["first_reject"][1]


@pytest.mark.parametrize("damaged", [False, True])
def test_parquet_blocks_commit_their_unit(tmp_path, damaged):
    path = tmp_path / "in.parquet"
    if damaged:
        path.write_bytes(b"not parquet")
    else:
        pq.write_table(pa.table({"id": [5, 6, 7, 5, 8], "text": list("abcde")}), path,
                       row_group_size=2)
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=2)
    records, results, commits = run_units(tmp_path, path, read_parquet, spec, "parquet")
    (unit,) = commits
    assert results[-1] == unit and results[:-1] == [None] * (len(records) - 1)
    if damaged:
        assert (unit["rows"], unit["rows_rejected"], unit["row_sum"]) == (1, 1, 0)
    else:
        assert (unit["rows"], unit["rows_rejected"], unit["row_sum"]) == (5, 1, 10)


# ---------------------------------------------------------------------------------------------
# resumable_units

IDENT = {"model_fingerprint": "fp1", "tokenizer_sha256": "tk1", "task": "document",
         "dims": [768, 256], "output_dtype": "float32", "dtype": "float32", "id_column": "id",
         "text_column": "text", "keep_columns": ["lang"], "on_duplicate": "keep-first",
         "model_id": "nomic-ai/nomic-embed-text-v2-moe", "revision": "abc123",
         "long_text": None}
A, B, C = "s3://in/a.jsonl", "s3://in/b.jsonl", "s3://in/c.jsonl"


def manifest(uri: str, size: int = 100, files=()) -> dict:
    return {"unit": unit_key(uri), "uri": uri, "size": size, "files": list(files), "rows": 1,
            "file_rows": 1, "row_sum": 1, "file_rowsum": 1}


def state(identity=IDENT, manifests=(), files=("/o/x",)) -> OutputState:
    return OutputState("/o", identity, {m["unit"]: m for m in manifests}, list(files))


INPUTS = [input_file(A), input_file(B), input_file(C)]


def test_resumable_units_keeps_the_committed_units():
    st = state(manifests=[manifest(A), manifest(B)])
    keep = resumable_units(st, dict(IDENT), INPUTS, "s3://o/")
    assert keep == {unit_key(A): manifest(A), unit_key(B): manifest(B)}
    keep.clear()
    assert len(st.units) == 2  # a copy


def test_resumable_units_of_an_empty_output():
    assert resumable_units(state(identity=None, files=()), IDENT, INPUTS, "s3://o/") == {}


def test_resumable_units_run_without_manifest_is_refused():
    st = state(identity=None, files=["/o/part-1.parquet", "/o/_summary.json"])
    with pytest.raises(OutputError, match=r"s3://o/ holds 2 file\(s\) named as this pipeline"
                                          r".*e\.g\. _summary\.json, part-1\.parquet\) but no "
                                          r"run manifest.*--overwrite deletes these files"):
        resumable_units(st, IDENT, INPUTS, "s3://o/")


@pytest.mark.parametrize("field", IDENTITY_FIELDS)
def test_resumable_units_other_settings_are_refused(field):
    now = IDENT | {field: ["changed"]}
    with pytest.raises(OutputError) as info:
        resumable_units(state(manifests=[manifest(A)]), now, INPUTS, "s3://o/")
    message = str(info.value)
    assert f"{field}: {IDENT[field]!r} there, ['changed'] now" in message
    assert "--overwrite" in message and "other settings" in message
    named = {f for f in IDENTITY_FIELDS if re.search(rf"(?<!\w){f}: ", message)}
    assert named == {field}


def test_resumable_units_names_every_differing_setting():
    now = IDENT | {"task": "query", "dims": [768]}
    with pytest.raises(OutputError, match=r"task: 'document' there, 'query' now; "
                                          r"dims: \[768, 256\] there, \[768\] now"):
        resumable_units(state(), now, INPUTS, "s3://o/")


def test_resumable_units_model_name_alone_is_not_identity():
    # The weights' fingerprint decides: the same weights under another name or revision.
    now = IDENT | {"model_id": "mirror/nomic", "revision": "other"}
    assert resumable_units(state(manifests=[manifest(A)]), now, INPUTS, "o") == {
        unit_key(A): manifest(A)}


def test_resumable_units_file_no_longer_in_the_input_is_refused():
    st = state(manifests=[manifest(A), manifest("s3://in/gone.jsonl")])
    with pytest.raises(OutputError, match=r"1 file\(s\) that are not in the input now "
                                          r"\(e\.g\. s3://in/gone\.jsonl\).*--overwrite"):
        resumable_units(st, IDENT, INPUTS, "s3://o/")


def test_resumable_units_changed_input_file_is_embedded_again(caplog):
    st = state(manifests=[manifest(A), manifest(B, size=90)])
    with caplog.at_level("WARNING"):
        assert resumable_units(st, IDENT, INPUTS, "s3://o/") == {unit_key(A): manifest(A)}
    assert "s3://in/b.jsonl (90 -> 100 bytes)" in caplog.text


def test_resumable_units_rewritten_input_file_of_the_same_size_is_embedded_again():
    from pipeline.io.storage import InputFile

    inputs = [InputFile(f.uri, f.size, f.format, f.compression, version="ETag:new")
              for f in INPUTS]
    st = state(manifests=[manifest(A) | {"version": "ETag:new"},
                          manifest(B) | {"version": "ETag:old"}])
    assert resumable_units(st, IDENT, inputs, "s3://o/") == {
        unit_key(A): manifest(A) | {"version": "ETag:new"}}
    # Manifests of before versions were recorded: compared by size alone.
    assert set(resumable_units(state(manifests=[manifest(A), manifest(B)]), IDENT, inputs,
                               "s3://o/")) == {unit_key(A), unit_key(B)}


# ---------------------------------------------------------------------------------------------
# load_state and stray_files on a local output


def rel(files, path: str) -> list[str]:
    """``files`` under ``path`` as a manifest names them: relative to the output."""
    return [Path(f).relative_to(path).as_posix() for f in files]


def touch(path: str, data: bytes = b"x") -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return path


@pytest.fixture
def earlier_run(tmp_path):
    """A local output of an earlier run: A and B committed, C's rows written but not
    committed, a retried write of A, temporaries of a killed run, a stale manifest.

    ``named``: each committed unit's files as found under ``path`` (its manifest names them
    relative to the output)."""
    uri = str(tmp_path / "out")
    fs, path = open_filesystem(uri)
    ka, kb, kc = unit_key(A), unit_key(B), unit_key(C)
    named = {
        A: [touch(f"{path}/part-{ka}-000000000001.parquet"),
            touch(f"{path}/_rejects/part-{ka}-000000000002.parquet")],
        B: [touch(f"{path}/part-{kb}-000000000003.parquet")],
    }
    stray = [
        touch(f"{path}/part-{kc}-000000000004.parquet"),  # C: not committed
        touch(f"{path}/part-{ka}-000000000005.parquet"),  # A: a failed attempt's file
        touch(f"{path}/.part-{kc}-000000000006.parquet.tmp-0a1b2c3d"),
        touch(f"{path}/_rejects/.part-{kc}-000000000007.parquet.tmp-4e5f6a7b"),
        touch(f"{path}/{MANIFEST_DIR}/.unit-{kc}.json.tmp-8c9d0e1f", b'{"unit": "tor'),
    ]
    write_identity(fs, path, IDENT)
    for uri_, files in named.items():
        write_json(fs, manifest_path(path, unit_key(uri_)),
                   manifest(uri_, files=rel(files, path)))
    touch(f"{path}/{SUMMARY_NAME}", b"{}")
    touch(f"{path}/notes.md")  # not ours
    return fs, path, uri, named, stray


def test_load_state_reads_identity_and_manifests(earlier_run):
    fs, path, uri, named, stray = earlier_run
    files = prepare_output(uri)
    st = load_state(fs, path, files)
    assert st.identity == IDENT and st.path == path and st.files == files and not st.empty
    assert set(st.units) == {unit_key(A), unit_key(B)}  # not the torn temporary manifest
    assert st.units[unit_key(A)] == manifest(A, files=rel(named[A], path))
    ka = unit_key(A)
    assert st.units[ka]["files"] == [f"part-{ka}-000000000001.parquet",
                                     f"_rejects/part-{ka}-000000000002.parquet"]
    assert f"{path}/{MANIFEST_DIR}/{RUN_FILE}" in files


def test_load_state_single_manifest_and_no_identity(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    write_json(fs, manifest_path(path, unit_key(A)), manifest(A))
    st = load_state(fs, path, own_files(fs, path))
    assert st.identity is None and st.units == {unit_key(A): manifest(A)}
    with pytest.raises(OutputError, match="but no run manifest"):
        resumable_units(st, IDENT, INPUTS, str(tmp_path / "out"))


def test_load_state_of_an_empty_output(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    st = load_state(fs, path, prepare_output(str(tmp_path / "out")))
    assert st.empty and st.identity is None and st.units == {}
    assert resumable_units(st, IDENT, INPUTS, "out") == {}


def test_stray_files_are_everything_no_kept_manifest_names(earlier_run):
    fs, path, uri, named, stray = earlier_run
    st = load_state(fs, path, own_files(fs, path))
    keep = resumable_units(st, IDENT, INPUTS, uri)
    assert sorted(stray_files(fs, st, keep)) == sorted(stray)
    # Keeping only A: B's files and B's manifest go too; the identity and summary stay.
    only_a = {unit_key(A): keep[unit_key(A)]}
    assert sorted(stray_files(fs, st, only_a)) == sorted(
        stray + named[B] + [manifest_path(path, unit_key(B))])
    # Keeping nothing (--overwrite): every part and manifest but the run identity.
    assert sorted(stray_files(fs, st, {})) == sorted(
        stray + named[A] + named[B] + [manifest_path(path, unit_key(k)) for k in (A, B)])


def test_resume_leaves_exactly_the_committed_output(earlier_run, tmp_path):
    fs, path, uri, named, stray = earlier_run
    st = load_state(fs, path, prepare_output(uri))
    keep = resumable_units(st, IDENT, INPUTS, uri)
    remove_files(uri, stray_files(fs, st, keep))
    left = sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*") if p.is_file())
    out = tmp_path / "out"
    assert left == sorted([Path(f).relative_to(out).as_posix() for f in named[A] + named[B]]
                          + [f"{MANIFEST_DIR}/{RUN_FILE}", f"{MANIFEST_DIR}/unit-{unit_key(A)}.json",
                             f"{MANIFEST_DIR}/unit-{unit_key(B)}.json", SUMMARY_NAME, "notes.md"])
    # A second resume finds nothing more to delete.
    st = load_state(fs, path, own_files(fs, path))
    assert stray_files(fs, st, resumable_units(st, IDENT, INPUTS, uri)) == []


# ---------------------------------------------------------------------------------------------
# the output spelled another way: ./, //, .., a trailing slash, file://, symbolic links


def spell(tmp_path: Path, how: str) -> str:
    """``tmp_path/out`` spelled another way (links and the working directory made here)."""
    if how == "symlink":
        (tmp_path / "out").mkdir(exist_ok=True)  # a link to a folder that exists
        (tmp_path / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    if how == "symlinked-parent":
        (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    return {"plain": "{t}/out", "dot": "{t}/./out", "double-slash": "{t}//out",
            "dotdot": "{t}/out/../out", "trailing-slash": "{t}/out/",
            "file-uri": "file://{t}/out", "symlink": "{t}/link",
            "symlinked-parent": "{t}/alias/out", "relative": "out"}[how].format(t=tmp_path)


SPELLINGS = ["dot", "double-slash", "dotdot", "trailing-slash", "file-uri", "symlink",
             "symlinked-parent", "relative"]


def files_left(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", SPELLINGS)
def test_resume_with_the_output_spelled_differently(earlier_run, tmp_path, monkeypatch, how):
    fs, path, uri, named, stray = earlier_run
    monkeypatch.chdir(tmp_path)
    other = spell(tmp_path, how)
    fs2, path2 = open_filesystem(other)
    st = load_state(fs2, path2, prepare_output(other))
    assert st.local and st.identity == IDENT and set(st.units) == {unit_key(A), unit_key(B)}
    keep = resumable_units(st, IDENT, INPUTS, other)
    assert incomplete_units(st, keep) == []  # every file a manifest names is found
    gone = stray_files(fs2, st, keep)
    assert sorted(st.name(p) for p in gone) == sorted(rel(stray, path))
    assert not {st.name(p) for p in gone} & {f for m in keep.values() for f in m["files"]}
    remove_files(other, gone)
    assert files_left(tmp_path / "out") == sorted(
        rel(named[A] + named[B], path)
        + [f"{MANIFEST_DIR}/{RUN_FILE}", f"{MANIFEST_DIR}/unit-{unit_key(A)}.json",
           f"{MANIFEST_DIR}/unit-{unit_key(B)}.json", SUMMARY_NAME, "notes.md"])
    # Read back in the plain spelling: nothing more to delete, nothing missing.
    st = load_state(fs, path, own_files(fs, path))
    keep = resumable_units(st, IDENT, INPUTS, uri)
    assert stray_files(fs, st, keep) == [] and incomplete_units(st, keep) == []


@pytest.mark.parametrize("written,read", [("dot", "symlink"), ("symlink", "plain"),
                                          ("file-uri", "double-slash"),
                                          ("relative", "trailing-slash"),
                                          ("symlinked-parent", "dotdot")])
def test_units_written_in_one_spelling_resume_in_another(tmp_path, monkeypatch, written, read):
    # Real write records and manifests (writer -> Tracker -> manifest) under one spelling.
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": ["a", None, "c", "d"]}), src,
                   row_group_size=2)
    uri_w = spell(tmp_path, written)
    fs, path = open_filesystem(uri_w)
    prepare_output(uri_w)
    write_identity(fs, path, IDENT)
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=2)
    tracker = Tracker([input_file(str(src), src.stat().st_size, "parquet")],
                      lambda m: write_json(fs, manifest_path(path, m["unit"]), m))
    for block in read_parquet(str(src), str(src), spec):
        for r in write_outputs(fs, path, fake_encode(block), SPEC):
            tracker.add(r)
    (unit,) = tracker.committed.values()
    assert unit["files"] and all(not f.startswith(("/", ".", "file:")) for f in unit["files"])
    # Resumed under another spelling: the unit is whole and nothing of it is stray.
    fs2, path2 = open_filesystem(spell(tmp_path, read) if read != written else uri_w)
    st = load_state(fs2, path2, own_files(fs2, path2))
    inputs = [input_file(str(src), src.stat().st_size, "parquet")]
    keep = resumable_units(st, IDENT, inputs, path2)
    assert set(keep) == {unit["unit"]}
    assert incomplete_units(st, keep) == [] and stray_files(fs2, st, keep) == []
    assert sorted(st.name(p) for p in st.files) == sorted(
        unit["files"] + [f"{MANIFEST_DIR}/{RUN_FILE}", unit_manifest_name(unit["unit"])])


def test_a_part_file_that_is_a_symlink_keeps_its_name_in_the_output(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    blob = touch(str(tmp_path / "store" / "3f2a9c"))
    name = f"part-{unit_key(A)}-000000000001.parquet"
    touch(f"{path}/x")  # the output folder exists
    Path(f"{path}/{name}").symlink_to(blob)
    write_identity(fs, path, IDENT)
    write_json(fs, manifest_path(path, unit_key(A)), manifest(A, files=[name]))
    st = load_state(fs, path, own_files(fs, path))
    keep = resumable_units(st, IDENT, INPUTS, path)
    assert incomplete_units(st, keep) == []


# ---------------------------------------------------------------------------------------------
# incomplete_units: kept units some of whose files are gone


def test_incomplete_units_names_kept_units_missing_any_file():
    ka, kb, kc, kd = (unit_key(u) for u in (A, B, C, "s3://in/d.jsonl"))
    st = OutputState("/o", IDENT, {}, ["/o/part-a.parquet", "/o/_rejects/part-a.parquet",
                                       "/o/part-b.parquet", "/o/_manifest/unit-x.json"])
    keep = {ka: manifest(A, files=["part-a.parquet", "_rejects/part-a.parquet"]),
            kb: manifest(B, files=["part-b.parquet", "_rejects/part-b.parquet"]),  # rejects gone
            kc: manifest(C, files=[]),  # an empty file: nothing to miss
            kd: manifest("s3://in/d.jsonl", files=["part-d.parquet"])}  # part gone
    assert incomplete_units(st, keep) == [kb, kd]
    assert incomplete_units(st, {ka: keep[ka], kc: keep[kc]}) == []
    assert incomplete_units(st, {}) == []
    # A file of the same name elsewhere (another folder) is not the named one.
    assert incomplete_units(st, {kb: manifest(B, files=["_rejects/part-b.parquet"])}) == [kb]


def test_incomplete_unit_is_redone_its_remaining_files_stray(earlier_run, tmp_path):
    fs, path, uri, named, stray = earlier_run
    Path(named[A][1]).unlink()  # A's rejects file deleted by hand
    st = load_state(fs, path, prepare_output(uri))
    keep = resumable_units(st, IDENT, INPUTS, uri)
    assert incomplete_units(st, keep) == [unit_key(A)]
    for key in incomplete_units(st, keep):  # what the runner does: redo it
        keep.pop(key)
    assert sorted(stray_files(fs, st, keep)) == sorted(
        stray + [named[A][0], manifest_path(path, unit_key(A))])
    remove_files(uri, stray_files(fs, st, keep))
    st = load_state(fs, path, own_files(fs, path))
    assert set(st.units) == {unit_key(B)}
    keep = resumable_units(st, IDENT, INPUTS, uri)
    assert incomplete_units(st, keep) == [] and stray_files(fs, st, keep) == []


# ---------------------------------------------------------------------------------------------
# encode_types / decode_types: the run's settled types in _run.json


KEEP_TYPES = (("lang", pa.string()), ("meta", JSON_TEXT), ("n", pa.int64()),
              ("score", pa.float64()), ("cat", pa.dictionary(pa.int32(), pa.string())),
              ("tags", pa.list_(pa.string())), ("flag", pa.bool_()), ("id", pa.int32()))


@pytest.mark.parametrize("id_type", [pa.int64(), pa.string(), pa.dictionary(pa.int32(),
                                     pa.string()), pa.large_string(), pa.binary(), None],
                         ids=str)
@pytest.mark.parametrize("keep_types", [KEEP_TYPES, (), (("meta", JSON_TEXT),)],
                         ids=["many", "none", "json-text"])
def test_encode_decode_types_round_trip(id_type, keep_types):
    text = encode_types(id_type, keep_types)
    assert isinstance(text, str) and text.isascii() and json.loads(json.dumps(text)) == text
    got_id, got_keep = decode_types(text)
    assert got_id == id_type if id_type is not None else got_id is None
    assert [c for c, _ in got_keep] == [c for c, _ in keep_types]  # order, names
    for (_, want), (_, got) in zip(keep_types, got_keep):
        if want == JSON_TEXT:
            assert got == JSON_TEXT  # not plain strings
        else:
            assert isinstance(got, pa.DataType) and got.equals(want), (got, want)
    assert dict(got_keep)["lang"] == pa.string() if keep_types == KEEP_TYPES else True
    assert (got_id, got_keep) == (id_type, tuple(keep_types))


def test_types_travel_in_the_run_file_and_are_not_compared(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    then = encode_types(pa.string(), (("meta", JSON_TEXT), ("lang", pa.string())))
    write_identity(fs, path, IDENT | {"types": then})
    write_json(fs, manifest_path(path, unit_key(A)), manifest(A))
    st = load_state(fs, path, own_files(fs, path))
    assert decode_types(st.identity["types"]) == (pa.string(), (("meta", JSON_TEXT),
                                                                ("lang", pa.string())))
    # Today's sample settled other types: the resume adopts the output's, it is not refused.
    now = IDENT | {"types": encode_types(pa.int64(), (("meta", pa.int64()),
                                                      ("lang", pa.string())))}
    assert set(resumable_units(st, now, INPUTS, str(tmp_path / "out"))) == {unit_key(A)}


def test_write_json_publishes_whole_documents(tmp_path):
    fs, path = open_filesystem(str(tmp_path / "out"))
    write_identity(fs, path, IDENT)
    doc = json.loads((tmp_path / "out" / MANIFEST_DIR / RUN_FILE).read_text())
    assert doc["identity"] == IDENT and doc["created"] > 0
    assert [p.name for p in (tmp_path / "out" / MANIFEST_DIR).iterdir()] == [RUN_FILE]


# ---------------------------------------------------------------------------------------------
# load_state on S3 (moto): the manifests come back in one batched fs.cat


def test_load_state_on_s3(s3_bucket):  # noqa: F811 - pytest fixture
    uri = f"s3://{s3_bucket}/out"
    fs, path = open_filesystem(uri)
    part = {}
    for u in (A, B, C):
        part[u] = f"part-{unit_key(u)}-0123456789ab.parquet"
        fs.pipe_file(f"{path}/{part[u]}", b"x")
        write_json(fs, manifest_path(path, unit_key(u)), manifest(u, files=[part[u]]))
    write_identity(fs, path, IDENT)
    unnamed = f"{path}/part-{unit_key(A)}-ba9876543210.parquet"
    fs.pipe_file(unnamed, b"x")
    files = prepare_output(uri)
    assert all(f.startswith(f"{s3_bucket}/out/") for f in files) and len(files) == 8
    st = load_state(fs, path, files)
    assert st.identity == IDENT and not st.local
    assert st.units == {unit_key(u): manifest(u, files=[part[u]]) for u in (A, B, C)}
    keep = resumable_units(st, IDENT, INPUTS, uri)
    assert stray_files(fs, st, keep) == [unnamed]  # manifests name files relative to out/
    assert incomplete_units(st, keep) == []
    # The same output spelled with a trailing slash: the same units, the same stray file.
    fs2, path2 = open_filesystem(uri + "/")
    st2 = load_state(fs2, path2, prepare_output(uri + "/"))
    assert st2.identity == IDENT and st2.units == st.units
    assert stray_files(fs2, st2, st2.units) == [unnamed]
    fs.rm_file(f"{path}/{part[B]}")  # a committed unit's part gone from the store
    st = load_state(fs, path, prepare_output(uri))
    assert incomplete_units(st, resumable_units(st, IDENT, INPUTS, uri)) == [unit_key(B)]


# ---------------------------------------------------------------------------------------------
# units of several small files


def listing(n: int, size: int = 10, prefix: str = "s3://in/f") -> list[InputFile]:
    return [InputFile(f"{prefix}{k:04d}.jsonl", size, "jsonl", None, version=f"v{k}")
            for k in range(n)]


def name(f: InputFile) -> str:
    return f.uri.rsplit("/", 1)[1]


def test_group_units_groups_runs_of_small_files(monkeypatch):
    import pipeline.units as U

    monkeypatch.setattr(U, "GROUPED_UNITS", 1)  # as many files a unit as the caps allow
    monkeypatch.setattr(U, "GROUP_FILES", 4)
    files = listing(10)
    big = InputFile("s3://in/f0005b.parquet", 1000, "parquet", None)
    sliced = [InputFile("s3://in/f0007b.parquet", 500, "parquet", None, row_groups=(0, 2)),
              InputFile("s3://in/f0007b.parquet", 500, "parquet", None, row_groups=(2, 4))]
    listed = sorted(files + [big] + sliced, key=lambda f: f.uri)
    got = U.group_units(listed, unit_bytes=1000)
    # Runs of at most 4 files (and < 1000 bytes); a large file and slices stay alone.
    assert [[name(m) for m in u.files] for u in got] == [
        ["f0000.jsonl", "f0001.jsonl", "f0002.jsonl", "f0003.jsonl"],
        ["f0004.jsonl", "f0005.jsonl"], ["f0005b.parquet"],
        ["f0006.jsonl", "f0007.jsonl"], ["f0007b.parquet"], ["f0007b.parquet"],
        ["f0008.jsonl", "f0009.jsonl"]]
    first = got[0]
    assert first.uri == files[0].uri and first.size == 40 and first.unit.endswith("#files[4]")
    assert first.version.startswith("files:") and first.members == tuple(files[:4])
    assert U.group_units(listed, unit_bytes=1000) == got  # the same listing, the same units
    # Bytes bound a group too (--unit-bytes 25: two files of 10).
    assert [len(u.files) for u in U.group_units(files[:5], unit_bytes=25)] == [2, 2, 1]
    assert U.group_units(files[:1], unit_bytes=1000) == files[:1]  # one file: itself
    # Few files: one unit each; many: len // GROUPED_UNITS files a unit.
    monkeypatch.setattr(U, "GROUPED_UNITS", 3)
    assert U.group_units(files[:5], unit_bytes=1000) == files[:5]
    assert [len(u.files) for u in U.group_units(files, unit_bytes=1000)] == [3, 3, 3, 1]


def test_group_units_plans_committed_units_again(monkeypatch):
    import pipeline.units as U

    monkeypatch.setattr(U, "GROUPED_UNITS", 2)
    files = listing(6)
    first = U.group_units(files, 1000)  # [0 1 2] [3 4 5]
    committed = Commits()
    tracker = Tracker(first, committed)
    tracker.finish_empty(unit_key(first[1].unit), 0)
    (manifest_1,) = committed
    assert manifest_1["members"] == [f.uri for f in files[3:]]
    assert manifest_1["version"] == first[1].version
    # A file added since (between 3 and 4) and one committed alone by an earlier version:
    # the committed unit is planned as it was, the rest grouped afresh.
    added = InputFile("s3://in/f0003a.jsonl", 10, "jsonl", None)
    alone = manifest(files[0].uri)
    now = sorted(files + [added], key=lambda f: f.uri)
    state_units = {manifest_1["unit"]: manifest_1, alone["unit"]: alone}
    got = U.group_units(now, 1000, state_units)
    assert got[0] == first[1]
    assert [[name(m) for m in u.files] for u in got[1:]] == [
        ["f0000.jsonl"], ["f0001.jsonl", "f0002.jsonl", "f0003a.jsonl"]]
    keep = resumable_units(state(manifests=[manifest_1]), IDENT, got, "s3://o/")
    assert list(keep) == [manifest_1["unit"]]
    # A member changed: the same unit, embedded again; a member gone: refused as before.
    changed = [InputFile(f.uri, f.size, f.format, None, version="new") if f.uri == files[4].uri
               else f for f in now]
    assert resumable_units(state(manifests=[manifest_1]), IDENT,
                           U.group_units(changed, 1000, state_units), "s3://o/") == {}
    gone = [f for f in now if f.uri != files[4].uri]
    with pytest.raises(OutputError, match=r"not in the input now \(e\.g\. s3://in/f0003\.jsonl"
                                          r"#files\[3\]\)"):
        resumable_units(state(manifests=[manifest_1]), IDENT,
                        U.group_units(gone, 1000, state_units), "s3://o/")


def test_a_unit_of_several_files_commits_once_every_row_is_out(tmp_path, monkeypatch):
    from pipeline.io.readers import read_unit
    from pipeline.units import group_units

    monkeypatch.setattr("pipeline.units.GROUPED_UNITS", 1)
    for k, n in enumerate([3, 0, 5, 2]):  # an empty file among them
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"f{k}.jsonl").write_text(
            "".join(json.dumps({"id": 10 * k + i, "text": f"t{i}"}) + "\n" for i in range(n)))
    from pipeline.io.storage import list_inputs

    (unit,) = group_units(list_inputs(str(tmp_path / "in")), 1 << 20)
    spec = ReadSpec("id", "text", id_type=pa.int64(), block_rows=4)
    blocks = list(read_unit(unit, spec))
    # Gathered across files into blocks of >= 4 rows; the totals on the last block only.
    assert [b.num_rows for b in blocks] == [7, 3]  # f2 reads as 4 + 1
    assert blocks[0][S.FILE_ROWS].null_count == 7 and blocks[1][S.FILE_ROWS][0].as_py() == 10
    assert set(pa.concat_tables(blocks)[S.UNIT].to_pylist()) == {unit.unit}
    fs, out = open_filesystem(str(tmp_path / "out"))
    records = [r for b in blocks for r in write_outputs(fs, out, fake_encode(b), SPEC)]
    commits = Commits()
    tracker = Tracker([unit], commits)
    assert tracker.add(records[1]) is None and tracker.add(records[0]) == commits[0]
    assert commits[0]["rows"] == 10 and len(commits[0]["members"]) == 4
    # Rows 0-1 of f0 written twice and rows 0-1 of f2 lost: same count, same row numbers;
    # the per-file checksum still tells.
    swapped = pa.concat_tables(blocks)
    f0, f2 = (str(tmp_path / "in" / n) for n in ("f0.jsonl", "f2.jsonl"))
    lost = pc.and_(pc.equal(swapped[S.SOURCE], f2), pc.less(swapped[S.ROW], 3))
    twice = swapped.filter(pc.and_(pc.equal(swapped[S.SOURCE], f0), pc.less(swapped[S.ROW], 3)))
    bad = pa.concat_tables([swapped.filter(pc.invert(lost)), twice])
    assert bad.num_rows == 10 and pc.sum(bad[S.ROW]) == pc.sum(swapped[S.ROW])
    tracker = Tracker([unit], Commits())
    for r in write_outputs(fs, out, fake_encode(bad), SPEC):
        assert tracker.add(r) is None
    assert list(tracker.open) == [unit_key(unit.unit)]


def test_a_lake_listing_gets_few_units():
    import time

    from pipeline.units import GROUP_FILES, group_units

    files = listing(100_000, size=2_000)
    t0 = time.perf_counter()
    got = group_units(files, 512 << 20)
    assert time.perf_counter() - t0 < 5  # linear in the listing (0.3 s here)
    # 100,000 files: units of 256, so 391 manifests to write and list, not 100,000.
    assert len(got) == -(-100_000 // GROUP_FILES) == 391
    assert [m for u in got for m in u.files] == files  # every file once, in order
