"""``pipeline/summary.py``: the run summary (totals and row accounting over units, one unit
per input file, as the driver commits them) and the lines printed at the end of a job. Pure,
no Ray."""

from __future__ import annotations

import json

import pytest

from pipeline import summary
from pipeline.units import merge, unit_key


# ---------------------------------------------------------------------------------------------
# totals, build, reconcile: units (one per input file) as the driver commits them


def unit(uri, rows, *, file_rows=None, file_rowsum=None, rejected=0, tokens=0, grid=0,
         files=(), reasons=None, encode=(0.0, 0.0), encode_s=1.0, times=True) -> dict:
    """A unit's totals as ``units.merge`` builds them from one write record of ``rows``."""
    rows = list(rows)
    record = {
        "unit": unit_key(uri), "source": uri, "rows": len(rows), "row_sum": sum(rows),
        "file_rows": len(rows) if file_rows is None else file_rows,
        "file_rowsum": sum(rows) if file_rowsum is None else file_rowsum,
        "rows_embedded": len(rows) - rejected, "rows_rejected": rejected, "tokens": tokens,
        "texts_truncated": 0, "grid_tokens": grid, "batch_grid_tokens": grid,
        "bytes": 100 if files else 0, "files": list(files), "reject_reasons": reasons or {},
        "first_reject": None, "encode_first_start": encode[0], "encode_last_end": encode[1],
    }
    if times:
        record |= {"tokenize_s": 0.5, "encode_s": encode_s, "write_s": 0.25}
    return merge(None, record)


# Manifests name files relative to the output; the summary gives them the output's prefix.
A = unit("a.parquet", range(5), rejected=1, tokens=60, grid=75, encode=(1000.0, 1001.0),
         files=["part-a1.parquet", "_rejects/part-a2.parquet"], reasons={"text is null": 1})


B = unit("b.jsonl", [1, 2, 4], tokens=40, grid=50, encode=(1000.5, 1002.0),
         files=["part-b1.parquet"])


OUT = "s3://bkt/o"


EMPTY = unit("e.jsonl", [], times=False)  # a file without rows, committed by finish_empty


def build(committed, resumed=(), open_units=(), unseen=None, wall_s=2.0, output=OUT + "/"):
    return summary.build(
        committed={u["unit"]: u for u in committed}, resumed=[unit_key(u) for u in resumed],
        open_units=list(open_units), unseen_rows=unseen or {}, wall_s=wall_s,
        config={"dims": (8, 4), "input": "in", "output": output}, model={"model_id": "m"},
        input_files=3)


def test_totals_sum_units():
    total = summary.totals([A, B, EMPTY])
    assert total["rows"] == 8 and total["row_sum"] == 10 + 7
    assert (total["rows_embedded"], total["rows_rejected"]) == (7, 1)
    assert total["tokens"] == 100 and total["grid_tokens"] == 125 and total["bytes"] == 200
    assert total["encode_s"] == pytest.approx(2.0) and total["write_s"] == pytest.approx(0.5)
    assert total["reject_reasons"] == {"text is null": 1}
    assert total["files"] == ["_rejects/part-a2.parquet", "part-a1.parquet", "part-b1.parquet"]
    # The encoder window spans the units that ran the encoder (EMPTY has no window).
    assert (total["encode_first_start"], total["encode_last_end"]) == (1000.0, 1002.0)


def test_totals_merge_reasons_and_nothing():
    x = unit("x", [1], rejected=1, reasons={"malformed JSON": 1, "text is null": 2})
    y = unit("y", [1], rejected=1, reasons={"text is null": 1})
    assert summary.totals([y, x])["reject_reasons"] == {"malformed JSON": 1, "text is null": 3}
    total = summary.totals([])
    assert total["rows"] == 0 and total["files"] == [] and total["reject_reasons"] == {}
    assert (total["encode_first_start"], total["encode_last_end"]) == (0.0, 0.0)


def test_build_clean_run():
    doc = build([A, B, EMPTY], unseen={})
    assert doc["reconciled"] is True and doc["reconcile_problems"] == []
    assert doc["rows_in"] == 8 and doc["rows_embedded"] == 7 and doc["rows_rejected"] == 1
    assert doc["reject_fraction"] == 0.125 and doc["reject_reasons"] == {"text is null": 1}
    assert doc["units"] == {"total": 3, "committed": 3, "resumed": 0, "committed_now": 3}
    assert doc["rows_now"] == 8 and doc["tokens"] == 100
    assert doc["padding_waste"] == pytest.approx(0.2) and doc["tokens_per_s"] == 50.0
    assert doc["tokens_per_s_steady"] == 50.0  # 100 tokens from 1000.0 to 1002.0
    assert doc["encoder_tokens_per_busy_s"] == 50.0  # 100 tokens in 2 encoder-seconds
    assert doc["stage_busy_s"] == {"tokenize": 1.0, "encode": 2.0, "write": 0.5}
    # Full names under the output as configured (one "/" however it ends).
    assert doc["output_files"] == [f"{OUT}/part-a1.parquet", f"{OUT}/part-b1.parquet"]
    assert doc["rejects_files"] == [f"{OUT}/_rejects/part-a2.parquet"]
    assert doc["output_bytes"] == 200
    assert doc["widths"] == [8, 4] and doc["input_files"] == 3
    json.dumps(doc)  # _summary.json must serialise


def test_build_resumed_units_count_in_totals_not_in_rates():
    # A was committed by an earlier run; this run did B only ("ghost" is no unit of this output).
    doc = build([A, B], resumed=["a.parquet", "ghost.jsonl"])
    assert doc["reconciled"] is True
    assert doc["rows_in"] == 8 and doc["rows_embedded"] == 7 and doc["rows_rejected"] == 1
    assert doc["tokens"] == 100 and doc["output_files"] == [f"{OUT}/part-a1.parquet",
                                                            f"{OUT}/part-b1.parquet"]
    assert doc["units"] == {"total": 3, "committed": 2, "resumed": 1, "committed_now": 1}
    assert doc["rows_now"] == 3
    assert doc["tokens_per_s"] == 20.0  # B's 40 tokens over this run's 2 s
    assert doc["tokens_per_s_steady"] == pytest.approx(40 / 1.5, abs=0.1)
    assert doc["encoder_tokens_per_busy_s"] == 40.0
    assert doc["stage_busy_s"] == {"tokenize": 0.5, "encode": 1.0, "write": 0.25}


@pytest.mark.parametrize("open_unit,rows_in,problem", [
    (unit("c.jsonl", [1, 2, 3], file_rows=5, file_rowsum=15), 5 + 5,
     "c.jsonl: 5 rows in the file, 3 written or rejected"),
    (unit("c.jsonl", [1, 2], file_rows=-1, file_rowsum=-1), 5 + 2,
     "c.jsonl: the rows read at its end never came out (2 did)"),
    (unit("c.parquet", [0, 1, 1], file_rows=3, file_rowsum=3), 5 + 3,
     "c.parquet: its row numbers do not add up (a row came out twice and another not at all)"),
    (unit("c.parquet", [0, 1, 2, 2], file_rows=3, file_rowsum=3), 5 + 3,
     "c.parquet: 3 rows in the file, 4 written or rejected"),
], ids=["rows-missing", "last-block-lost", "row-sum-disagrees", "row-twice"])
def test_build_open_unit_counts_in_rows_in_only(open_unit, rows_in, problem):
    doc = build([A], open_units=[open_unit])
    assert doc["reconciled"] is False and doc["reconcile_problems"] == [problem]
    assert doc["rows_in"] == rows_in
    # Its rows are not in the output (its files are deleted): not embedded, not rejected.
    assert (doc["rows_embedded"], doc["rows_rejected"]) == (4, 1)
    assert doc["units"]["committed"] == 1
    assert doc["rows_now"] == 5 + open_unit["rows"]  # but they were this run's work


@pytest.mark.parametrize("output,prefix", [("/data/out", "/data/out"),
                                           ("/data/out/", "/data/out"),
                                           ("s3://bkt/run-1", "s3://bkt/run-1")])
def test_build_names_files_under_the_configured_output(output, prefix):
    doc = build([A, B], output=output)
    assert doc["output_files"] == [f"{prefix}/part-a1.parquet", f"{prefix}/part-b1.parquet"]
    assert doc["rejects_files"] == [f"{prefix}/_rejects/part-a2.parquet"]


def test_build_counts_files_and_names_the_full_list():
    doc = build([A, B, EMPTY])
    assert doc["files"] == {"output": 2, "rejects": 1, "list": f"{OUT}/_manifest/files.json"}
    lists = summary.file_lists(A["files"] + B["files"], OUT, {"long_text": "chunk"})
    assert lists == {"output_files": [f"{OUT}/part-a1.parquet", f"{OUT}/part-b1.parquet"],
                     "rejects_files": [f"{OUT}/_rejects/part-a2.parquet"],
                     "documents_files": []}


def test_summary_stays_small_whatever_the_input():
    # 20,000 units of two files each (long names): the lists leave the summary, counts stay.
    many = [unit(f"s3://lake/year=2026/month=12/day=06/shard-{k:06d}.parquet", [0, 1, 2],
                 files=[f"part-{k:016x}-{k:012x}.parquet",
                        f"_rejects/part-{k:016x}-{k:012x}.parquet"]) for k in range(20_000)]
    few = build(many[:500])
    assert len(few["output_files"]) == 500 and len(few["rejects_files"]) == 500
    doc = build(many)
    assert "output_files" not in doc and "rejects_files" not in doc
    assert doc["files"] == {"output": 20_000, "rejects": 20_000,
                            "list": f"{OUT}/_manifest/files.json"}
    assert len(json.dumps(doc, indent=1)) < 20_000  # bounded: no per-file field is left
    # Just over the inline limits, by count and by bytes of names: out too.
    assert "output_files" not in build(many[:summary.INLINE_FILES_MAX // 2 + 1])
    long_names = [u | {"files": [f"{'d/' * 200}part-{k}.parquet"]} for k, u in
                  enumerate(many[:summary.INLINE_FILES_BYTES // 400 + 1])]
    assert "output_files" not in build(long_names)


def test_build_unseen_non_empty_file():
    doc = build([A, B], unseen={"c.parquet": 3, "empty.jsonl": 0})
    assert doc["reconciled"] is False and doc["rows_in"] == 11
    assert doc["reconcile_problems"] == ["c.parquet: 3 rows in the file, none written or rejected"]


def test_reconcile_lists_every_problem_in_order():
    problems = summary.reconcile(
        [unit("z.jsonl", [1], file_rows=2, file_rowsum=3), unit("y.jsonl", [1], file_rows=-1)],
        {"x.parquet": 2, "w.parquet": 0})
    assert [p.split(":")[0] for p in problems] == ["x.parquet", "y.jsonl", "z.jsonl"]
    assert summary.reconcile([], {"e.jsonl": 0}) == []


def test_build_counts_disagreeing_with_the_file():
    # A committed unit whose embedded + rejected rows are not its file's: the safety net.
    bad = A | {"rows_embedded": 3}
    doc = build([bad])
    assert doc["reconciled"] is False
    assert doc["reconcile_problems"] == ["rows_in 5 != rows_embedded + rows_rejected"]


def test_build_empty_run():
    doc = build([EMPTY], unseen={"f.jsonl": 0}, wall_s=0.0)
    assert doc["reconciled"] is True and doc["rows_in"] == 0 and doc["reject_fraction"] == 0.0
    assert doc["padding_waste"] == 0.0 and doc["encoder_tokens_per_busy_s"] == 0.0
    assert doc["tokens_per_s"] == 0.0 and doc["tokens_per_s_steady"] == 0.0
    assert doc["output_files"] == [] and doc["units"]["committed"] == 1
    doc = build([])
    assert doc["reconciled"] is True and doc["rows_in"] == 0 and doc["units"]["committed"] == 0


# ---------------------------------------------------------------------------------------------
# report: the few lines printed at the end of a job (the whole summary is in _summary.json)


def run_result(**changes) -> dict:
    """A hand-made summary of a run, with the fields the report reads."""
    return {
        "rows_in": 12345, "rows_embedded": 12000, "rows_rejected": 345,
        "reject_fraction": round(345 / 12345, 6),
        "reject_reasons": {"malformed JSON": 40, "text is empty or whitespace only": 200,
                           "duplicate id": 100, "id is null": 5},
        "units": {"total": 7, "committed": 7, "resumed": 2, "committed_now": 5},
        "tokens": 1234567, "wall_s": 61.3, "tokens_per_s": 20156.2,
        "tokens_per_s_steady": 25000.4, "reconciled": True,
    } | changes


def config(output: str = "s3://bkt/out/"):
    from pipeline.config import RunConfig

    return RunConfig(input="s3://bkt/in/", output=output)


def test_report_of_a_run_names_rows_top_reasons_rates_and_where_the_output_is():
    lines = summary.report(run_result(), config(), elapsed_s=61.3)
    text = "\n".join(lines)
    assert lines[0].startswith("rows: 12,345 in, 12,000 embedded, 345 rejected (2.8%)")
    # The top three reasons, most frequent first, then how many more there are.
    reasons = [line.strip() for line in lines if line.strip().startswith("rejected ")]
    assert reasons == ["rejected 200: text is empty or whitespace only",
                       "rejected 100: duplicate id", "rejected 40: malformed JSON"]
    assert "id is null" not in text
    assert "1 more reason(s) in _summary.json" in text
    (rates,) = [line for line in lines if "tokens/s" in line]
    assert "1,234,567" in rates and "61.3 s" in rates and "20,156 tokens/s" in rates
    assert "25,000" in rates and "5 of 7 unit(s) committed" in rates
    assert "2 kept from an earlier run" in rates
    (where,) = [line for line in lines if line.startswith("output: ")]
    assert "s3://bkt/out/ " in where and "s3://bkt/out/_summary.json" in where
    assert "s3://bkt/out/_rejects/" in where and "//_" not in where
    assert "snapshot" not in text and "enriched" not in text
    assert not any("{" in line for line in lines)  # lines for people, not JSON


def test_report_without_rejects_shows_no_reasons_and_no_rejects_folder():
    result = run_result(rows_in=10, rows_embedded=10, rows_rejected=0, reject_fraction=0.0,
                        reject_reasons={})
    lines = summary.report(result, config("/data/out"))
    assert lines[0] == "rows: 10 in, 10 embedded, 0 rejected (0.0%)"
    # Texts cut at the token limit are said where a person reads (not only in the JSON).
    cut = summary.report(result | {"texts_truncated": 3}, config("/data/out"))[0]
    assert cut == "rows: 10 in, 10 embedded, 0 rejected (0.0%); 3 text(s) cut at the token " \
        "limit (--long-text)"
    assert not [line for line in lines if line.strip().startswith("rejected ")]
    assert "more reason" not in "\n".join(lines)
    (where,) = [line for line in lines if line.startswith("output: ")]
    assert "/data/out/_summary.json" in where and "_rejects" not in where


def test_report_shows_every_reason_when_there_are_three_or_fewer():
    result = run_result(reject_reasons={"b": 1, "a": 3, "c": 2})
    reasons = [line.strip() for line in summary.report(result, config())
               if line.strip().startswith("rejected ")]
    assert reasons == ["rejected 3: a", "rejected 2: c", "rejected 1: b"]
    assert "more reason" not in "\n".join(summary.report(result, config()))


def test_report_of_a_nightly_run_names_the_snapshot_and_its_changes():
    result = run_result(snapshot="snapshot-20260301T023015Z", rows_new=5, rows_changed=17,
                        rows_unchanged=11978, rows_reused=11978, rows_deleted=4,
                        rows_embedded=22)
    lines = summary.report(result, config("s3://bkt/snaps"), "nightly")
    # Rows the encoder ran on and rows that took the previous snapshot's vectors, as the
    # summary's rows_embedded (encoded now) and rows_reused count them.
    assert lines[0].startswith("rows: 12,345 in, 12,000 with vectors (22 encoded, 11,978 with "
                               "earlier vectors), 345 rejected")
    (changes,) = [line for line in lines if line.startswith("snapshot ")]
    assert "snapshot-20260301T023015Z" in changes
    assert all(s in changes for s in ("5 new", "17 changed", "11,978 unchanged",
                                      "4 deleted", "_LATEST"))
    # The output is the snapshot's folder, not the root of the snapshots.
    (where,) = [line for line in lines if line.startswith("output: ")]
    snap = "s3://bkt/snaps/snapshot-20260301T023015Z"
    assert f"{snap}/ " in where and f"{snap}/_summary.json" in where
    assert f"{snap}/_rejects/" in where
    # Units copied unchanged from the previous snapshot are named in the work line.
    result["units"] = {"total": 65, "committed": 65, "resumed": 0, "committed_now": 65,
                       "carried": 64}
    (work,) = [line for line in summary.report(result, config("s3://bkt/snaps"), "nightly")
               if line.startswith("this run: ")]
    assert "65 of 65 unit(s) committed (64 of the snapshot's carried unchanged" in work
    # Units of which some files changed: the files copied instead of read are counted too.
    result["units"] |= {"carried": 60, "touched": 4, "files_copied": 1000}
    (work,) = [line for line in summary.report(result, config("s3://bkt/snaps"), "nightly")
               if line.startswith("this run: ")]
    assert "(60 of the snapshot's carried unchanged from the previous one; 4 partly changed, " \
        "1,000 unchanged file(s) of theirs copied, not read)" in work


def test_report_of_an_enrich_run_counts_files_and_rows():
    result = run_result(enriched_files=["a", "b"], rows_out=12345, rows_with_embeddings=12000)
    lines = summary.report(result, config("s3://bkt/table"), "enrich")
    (enriched,) = [line for line in lines if line.startswith("enriched: ")]
    assert "2 file(s)" in enriched and "12,345 rows" in enriched and "12,000 with" in enriched


def test_report_of_an_iceberg_table_enriched_in_place_names_the_table_and_its_snapshots():
    result = run_result(enriched_files=["a"], rows_out=12345, rows_with_embeddings=12000,
                        iceberg={"table": "lake.docs", "snapshot_id": 222,
                                 "source_snapshot_id": 111})
    lines = summary.report(result, config("iceberg:lake.docs"), "enrich")
    (where,) = [line for line in lines if line.startswith("output: ")]
    assert "lake.docs" in where and "snapshot 222" in where and "111" in where
    assert "_enrich/111-summary.json" in where
    assert "iceberg:lake.docs/" not in where  # not a folder of part files


def test_report_of_a_rerun_with_nothing_left_says_so():
    result = run_result(units={"total": 7, "committed": 7, "resumed": 7, "committed_now": 0},
                        tokens_per_s=0.0, tokens_per_s_steady=0.0)
    lines = summary.report(result, config(), elapsed_s=3.2)
    assert "nothing left to do: all 7 unit(s) were committed by an earlier run in 3.2 s" in lines
    assert not any("tokens/s" in line for line in lines)


def test_resume_hint_after_too_many_rejects_asks_for_a_change_first():
    hint = summary.resume_hint(config(), "9 of 29 rows were rejected (31.0%), more than "
                                         "--max-reject-fraction 0.1; reasons: ...")
    assert "fix the input" in hint and "--max-reject-fraction" in hint
    assert "rerun the same command" not in hint


def test_resume_hint_names_the_output_and_the_same_command():
    hint = summary.resume_hint(config("s3://bkt/out/"))
    assert "s3://bkt/out;" in hint and "rerun the same command" in hint


def test_chunks_per_document_count_reused_documents_once():
    # Before the nightly summary splits them, rows_embedded counts every document written,
    # reused ones included (a night of 24 documents, 22 reused, 102 chunks: 4.25 a document).
    every = {"rows_embedded": 24, "rows_reused": 22, "chunks": 102, "chunks_max": 23,
             "docs_chunked": 6, "overlap_tokens": 640, "reject_reasons": {}}
    fields = summary._chunk_fields({"long_text": "chunk"}, every)
    assert fields["chunks_per_doc_mean"] == 4.25 and fields["chunks"] == 102
    assert summary._chunk_fields({"long_text": "truncate"}, every) == {}
