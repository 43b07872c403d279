"""The run summary: the committed units' totals in ``_summary.json``. Pure, no Ray.

Each unit (input file) is committed with its counts once all of its rows came out (see
``pipeline/units.py``), so the summary of a resumed run covers the whole output: the units
committed earlier and the ones committed now. A unit that did not complete (rows missing, a
file that produced no row but holds some) is a reconcile problem, and the run is not
reconciled. Rates (tokens per second) are of this run's work only.
"""

from __future__ import annotations

from typing import Any, Iterable

from .chunking import OVER_MAX_CHUNKS
from .io.storage import DOCUMENTS_DIR, MANIFEST_DIR, REJECTS_DIR, is_side_file
from .units import Totals

# The output's full file lists, written at the end of every run (``_summary.json`` stays
# small whatever the input: it holds the lists too only while they are short).
FILES_NAME = f"{MANIFEST_DIR}/files.json"
FILE_LISTS = ("output_files", "rejects_files", "documents_files")
INLINE_FILES_MAX = 1000
INLINE_FILES_BYTES = 256 << 10


def totals(units: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts, times, reject reasons and files of units (flat, sorted)."""
    total = Totals.of(units)
    return total.counts | total.times | {
        "reject_reasons": dict(sorted(total.reject_reasons.items())),
        "files": sorted(total.files), "encode_first_start": total.encode_first_start,
        "encode_last_end": total.encode_last_end}


def reconcile(open_units: Iterable[dict[str, Any]], unseen_rows: dict[str, int]) -> list[str]:
    """Problems with the row accounting: units that did not complete.

    ``open_units`` are units some of whose rows came out but not all (or more than all);
    ``unseen_rows`` maps each input file that produced no row to its row count.
    """
    problems = [f"{uri}: {n} rows in the file, none written or rejected"
                for uri, n in sorted(unseen_rows.items()) if n]
    for u in sorted(open_units, key=lambda u: u["uri"]):
        if u["file_rows"] < 0:
            problems.append(f"{u['uri']}: the rows read at its end never came out "
                            f"({u['rows']} did)")
        elif u["rows"] != u["file_rows"]:
            problems.append(f"{u['uri']}: {u['file_rows']} rows in the file, {u['rows']} "
                            "written or rejected")
        else:
            problems.append(f"{u['uri']}: its row numbers do not add up (a row came out twice "
                            "and another not at all)")
    return problems


def build(*, committed: dict[str, dict[str, Any]], resumed: Iterable[str],
          open_units: list[dict[str, Any]], unseen_rows: dict[str, int], wall_s: float,
          config: dict[str, Any], model: dict[str, Any], input_files: int,
          units_total: int | None = None) -> dict[str, Any]:
    """The ``_summary.json`` document of a finished run (all committed units, this run's rates).

    ``resumed`` names the units committed by earlier runs of the same output; ``units_total``
    counts the run's units (input files, with large Parquet files split in row-group slices).
    """
    resumed = set(resumed)
    every = totals(committed.values())  # the output: committed units only
    now = totals([u for k, u in committed.items() if k not in resumed] + open_units)
    problems = reconcile(open_units, unseen_rows)
    rows_in = sum(u["file_rows"] for u in committed.values()) + sum(unseen_rows.values()) \
        + sum(u["file_rows"] if u["file_rows"] >= 0 else u["rows"] for u in open_units)
    rows_embedded, rows_rejected = every["rows_embedded"], every["rows_rejected"]
    # The rows of units left open are not in the output (their files are deleted), so
    # rows_in exceeds embedded + rejected exactly when some unit did not complete.
    if rows_in != rows_embedded + rows_rejected and not problems:
        problems.append(f"rows_in {rows_in} != rows_embedded + rows_rejected")
    window = now["encode_last_end"] - now["encode_first_start"]
    base = str(config["output"]).rstrip("/")  # manifests name files relative to the output
    lists = file_lists(every["files"], base, config)
    return {
        "rows_in": rows_in,
        "rows_embedded": rows_embedded,
        "rows_rejected": rows_rejected,
        "reject_fraction": round(rows_rejected / rows_in, 6) if rows_in else 0.0,
        "reconciled": not problems,
        "reconcile_problems": problems[:20],
        "reject_reasons": every["reject_reasons"],
        "units": {"total": input_files if units_total is None else units_total,
                  "committed": len(committed),
                  "resumed": len(resumed & set(committed)),
                  "committed_now": len(set(committed) - resumed)},
        "rows_now": now["rows"],
        "tokens": every["tokens"],
        "tokens_now": now["tokens"],  # this run's (a resumed run skips the units kept)
        "texts_truncated": every["texts_truncated"],
        # Padding in what the encoder computed: its matmuls run on real tokens only, and its
        # attention on varlen (GPU, no padding) or on grids of similar lengths (CPU).
        "padding_waste": _waste(every["tokens"], every["grid_tokens"]),
        # The padding that a [batch, longest] layout of the same batches would have held.
        "batch_padding": _waste(every["tokens"], every["batch_grid_tokens"]),
        # Rates of this run's work (a resumed run skips the units committed before).
        "tokens_per_s": round(now["tokens"] / wall_s, 1) if wall_s > 0 else 0.0,
        # From the first encoder window's start to the last one's end: the rate once the
        # actors are up (start-up, model loading and the final write excluded).
        "tokens_per_s_steady": round(now["tokens"] / window, 1) if window > 0 else 0.0,
        "wall_s": round(wall_s, 3),
        # Seconds each stage's actors or tasks spent on this run's batches, summed over actors.
        "stage_busy_s": {
            "tokenize": round(now["tokenize_s"], 3), "encode": round(now["encode_s"], 3),
            "write": round(now["write_s"], 3),
        },
        "encoder_tokens_per_busy_s": round(now["tokens"] / now["encode_s"], 1)
        if now["encode_s"] > 0 else 0.0,
        "input_files": input_files,
        "files": {k.removesuffix("_files"): len(v) for k, v in lists.items()}
        | {"list": f"{base}/{FILES_NAME}"},
        **(lists if inline(lists) else {}),
        **_chunk_fields(config, every),
        "output_bytes": every["bytes"],
        "model": model,
        "widths": list(config["dims"]),
        "config": config,
    }


def file_lists(files: Iterable[str], base: str, config: dict[str, Any]) -> dict[str, list[str]]:
    """The output's files by kind, full names under ``base`` (the output as configured):
    the document written to :data:`FILES_NAME` (``documents_files`` with ``--long-text
    chunk`` only)."""
    files = sorted(files)
    lists = {"output_files": [f"{base}/{f}" for f in files if not is_side_file(f)],
             "rejects_files": [f"{base}/{f}" for f in files if f.startswith(REJECTS_DIR + "/")]}
    if config.get("long_text") == "chunk":
        lists["documents_files"] = [f"{base}/{f}" for f in files
                                    if f.startswith(DOCUMENTS_DIR + "/")]
    return lists


def inline(lists: dict[str, list[str]]) -> bool:
    """Whether the file lists are short enough to be repeated in ``_summary.json``."""
    names = [f for v in lists.values() for f in v]
    return len(names) <= INLINE_FILES_MAX and sum(len(f) + 4 for f in names) <= INLINE_FILES_BYTES


def _chunk_fields(config: dict[str, Any], every: dict[str, Any]) -> dict[str, Any]:
    """With ``--long-text chunk``: the chunks of the embedded documents (rows stay documents:
    ``rows_embedded`` counts documents, ``chunks`` the output's rows)."""
    if config.get("long_text") != "chunk":
        return {}
    docs = every["rows_embedded"]  # every document written (nightly: reused ones too)
    return {"chunks": every["chunks"], "chunks_per_doc_max": every["chunks_max"],
            "chunks_per_doc_mean": round(every["chunks"] / docs, 4) if docs else 0.0,
            "docs_chunked": every["docs_chunked"], "overlap_tokens": every["overlap_tokens"],
            "docs_over_max_chunks": every["reject_reasons"].get(OVER_MAX_CHUNKS, 0)}


MAX_NODES_LOST = 50  # listed in the summary (it stays small); the count is always there


def nodes_lost(nodes) -> dict[str, Any]:
    """The summary's ``nodes_lost`` (the first :data:`MAX_NODES_LOST` nodes that left the
    cluster during the run: ID, address, Ray's reason) and ``nodes_lost_count``."""
    nodes = list(nodes)
    return {"nodes_lost": nodes[:MAX_NODES_LOST], "nodes_lost_count": len(nodes)}


def model_fields(plan) -> dict[str, Any]:
    """What the summary's ``model`` says of the run's plan (a :class:`~pipeline.plan.RunPlan`):
    device, dtype and actor counts."""
    return {"device": plan.device, "dtype": plan.dtype, "encoder_replicas": plan.encode.actors,
            "expert_parallel": plan.encode.ranks, "tokenizer_actors": plan.tokenize.actors}


def _waste(real: int, computed: int) -> float:
    return round(1.0 - real / computed, 6) if computed else 0.0


def report(result: dict[str, Any], config, command: str = "run",
           elapsed_s: float | None = None) -> list[str]:
    """The few lines a person reads at the end of a job (``config``: its
    :class:`~pipeline.config.RunConfig`; ``elapsed_s``: the command's own wall time); the whole
    summary is in ``_summary.json``."""
    out = str(config.output).rstrip("/")
    where = f"{out}/{result['snapshot']}" if result.get("snapshot") else out
    if result.get("rows_reused"):  # nightly: rows_embedded counts the rows encoded now
        done = (f"{result['rows_embedded'] + result['rows_reused']:,} with vectors "
                f"({result['rows_embedded']:,} encoded, {result['rows_reused']:,} with earlier "
                "vectors)")
    else:
        done = f"{result['rows_embedded']:,} embedded"
    truncated = result.get("texts_truncated") or 0
    cut = f"; {truncated:,} text(s) cut at the token limit (--long-text)" if truncated else ""
    lines = [f"rows: {result['rows_in']:,} in, {done}, "
             f"{result['rows_rejected']:,} rejected ({result['reject_fraction']:.1%}){cut}"]
    if "chunks" in result:
        documents = f"; document vectors: {where}/_documents/" \
            if result.get("files", {}).get("documents") else ""
        lines.append(f"chunks: {result['chunks']:,} rows ({result['docs_chunked']:,} document(s) "
                     f"over {config.chunk_tokens} tokens cut in several; "
                     f"{result['chunks_per_doc_mean']:,.2f} per document, at most "
                     f"{result['chunks_per_doc_max']:,}; {result['overlap_tokens']:,} overlap "
                     f"tokens){documents}")
    reasons = sorted(result.get("reject_reasons", {}).items(), key=lambda kv: -kv[1])
    for reason, n in reasons[:3]:
        lines.append(f"  rejected {n:,}: {reason}")
    if len(reasons) > 3:
        lines.append(f"  ... {len(reasons) - 3} more reason(s) in _summary.json")
    if command == "nightly":
        lines.append(f"snapshot {result['snapshot']}: {result['rows_new']:,} new, "
                     f"{result['rows_changed']:,} changed, {result['rows_unchanged']:,} "
                     f"unchanged, {result['rows_deleted']:,} deleted; _LATEST names it")
    if command == "enrich":
        lines.append(f"enriched: {len(result.get('enriched_files', []))} file(s), "
                     f"{result.get('rows_out', 0):,} rows, "
                     f"{result.get('rows_with_embeddings', 0):,} with embeddings")
    lines += _work_lines(result, elapsed_s)
    iceberg = result.get("iceberg")
    if iceberg:  # enriched in place: the summary and rejects lie beside the table's data
        lines.append(f"output: {iceberg['table']}, snapshot {iceberg['snapshot_id']} (from "
                     f"{iceberg['source_snapshot_id']}); summary: <table location>/_enrich/"
                     f"{iceberg['source_snapshot_id']}-summary.json")
    else:
        lines.append(f"output: {where}/ (summary: {where}/_summary.json"
                     + (f", rejects: {where}/_rejects/" if result["rows_rejected"] else "")
                     + ")")
    return lines


def _work_lines(result: dict[str, Any], elapsed_s: float | None) -> list[str]:
    """This run's work: the units it committed, its tokens/s, the time it took."""
    units = result["units"]
    took = f" in {elapsed_s:.1f} s" if elapsed_s is not None else ""
    if not units.get("committed_now", units["committed"] - units["resumed"]):
        return [f"nothing left to do: all {units['committed']} unit(s) were committed by an "
                f"earlier run{took}"]
    kept = f", {units['resumed']} kept from an earlier run" if units["resumed"] else ""
    parts = [f"{units['carried']} of the snapshot's carried unchanged from the previous one"] \
        if units.get("carried") else []
    if units.get("touched"):
        parts.append(f"{units['touched']} partly changed, {units['files_copied']:,} unchanged "
                     "file(s) of theirs copied, not read")
    carried = f" ({'; '.join(parts)})" if parts else ""
    tokens = result.get("tokens_now", result["tokens"])
    return [f"this run: {units['committed'] - units['resumed']} of {units['total']} unit(s) "
            f"committed{carried}{kept}{took}; {tokens:,} tokens encoded, "
            f"{result['tokens_per_s']:,.0f} tokens/s over the {result['wall_s']:.1f} s the "
            f"graph ran, {result['tokens_per_s_steady']:,.0f} once the encoders were up"]


def resume_hint(config, error: str = "") -> str:
    """What to do after a failed run: the committed units stay and the same command resumes;
    a failure the input causes (too many rejects, --on-bad-rows fail) needs a change first."""
    kept = f"the units committed so far stay in {str(config.output).rstrip('/')}"
    if "--max-reject-fraction" in error or "--on-bad-rows fail" in error:
        return (f"{kept}; fix the input (see _rejects/) or relax --max-reject-fraction / "
                "--on-bad-rows, then rerun: only the rest is embedded")
    return f"{kept}; rerun the same command to resume (only the rest is embedded)"
