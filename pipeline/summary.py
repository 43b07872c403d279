"""The run summary: per-write statistics summed into ``_summary.json``. Pure, no Ray.

Every row carries its source file and row number, and the rows of each file carry the file's
row count (a Parquet footer's; for JSONL, counted by the reader and set on the file's last
block). :func:`reconcile` checks each input file: its rows must all come out, embedded or
rejected, exactly once, and a file that produced no row at all must be empty. ``rows_in``
counts rows by their sources.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

COUNTS = ("rows_embedded", "rows_rejected", "tokens", "texts_truncated", "grid_tokens",
          "batch_grid_tokens", "bytes")
TIMES = ("tokenize_s", "encode_s", "write_s")


def combine(writes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the statistics of all writes of a run."""
    total: dict[str, Any] = {k: 0 for k in COUNTS} | {k: 0.0 for k in TIMES}
    reasons: collections.Counter = collections.Counter()
    sources: dict[str, list[int]] = {}
    files: list[str] = []
    for w in writes:
        for k in COUNTS + TIMES:
            total[k] += w.get(k, 0)
        if "encode_first_start" in w:
            first = total.get("encode_first_start")
            total["encode_first_start"] = min(first, w["encode_first_start"]) if first else \
                w["encode_first_start"]
            total["encode_last_end"] = max(total.get("encode_last_end", 0.0), w["encode_last_end"])
        reasons.update(w.get("reject_reasons", {}))
        for source, (count, last, file_rows) in w.get("sources", {}).items():
            seen = sources.setdefault(source, [0, -1, -1])
            seen[0] += count
            seen[1] = max(seen[1], last)
            seen[2] = max(seen[2], file_rows)
        files.extend(w.get("files", []))
    total["reject_reasons"] = dict(sorted(reasons.items()))
    total["sources"] = sources
    total["files"] = sorted(files)
    return total


def rows_in(sources: dict[str, list[int]]) -> int:
    """Rows of the input: the file's own count where known, else the rows that came out."""
    return sum(file_rows if file_rows >= 0 else count for count, _, file_rows in sources.values())


def reconcile(sources: dict[str, list[int]], unseen_rows: dict[str, int]) -> list[str]:
    """Problems with the row accounting per input file; empty when every row is accounted for.

    ``sources`` maps a file to ``[rows out, highest row number, rows in the file or -1]``;
    ``unseen_rows`` maps each input file that produced no row to its row count (0 if empty).
    """
    problems = [f"{source}: {n} rows in the file, none written or rejected"
                for source, n in sorted(unseen_rows.items()) if n]
    for source, (count, last, file_rows) in sorted(sources.items()):
        if file_rows < 0:
            problems.append(f"{source}: the rows read at its end never came out ({count} did)")
        elif count != file_rows:
            problems.append(f"{source}: {file_rows} rows in the file, {count} written or rejected")
    return problems


def build(*, stats: dict[str, Any], unseen_rows: dict[str, int], wall_s: float,
          config: dict[str, Any], model: dict[str, Any], input_files: int) -> dict[str, Any]:
    """The ``_summary.json`` document of a finished run."""
    rows_embedded, rows_rejected = stats["rows_embedded"], stats["rows_rejected"]
    tokens, grid = stats["tokens"], stats["grid_tokens"]
    total_in = rows_in(stats["sources"]) + sum(unseen_rows.values())
    problems = reconcile(stats["sources"], unseen_rows)
    window = stats.get("encode_last_end", 0.0) - stats.get("encode_first_start", 0.0)
    if total_in != rows_embedded + rows_rejected and not problems:
        problems.append(f"rows_in {total_in} != rows_embedded + rows_rejected")
    return {
        "rows_in": total_in,
        "rows_embedded": rows_embedded,
        "rows_rejected": rows_rejected,
        "reconciled": not problems,
        "reconcile_problems": problems[:20],
        "reject_reasons": stats["reject_reasons"],
        "tokens": tokens,
        "texts_truncated": stats["texts_truncated"],
        # Padding in what the encoder computed: its matmuls run on real tokens only, and its
        # attention on varlen (GPU, no padding) or on grids of similar lengths (CPU).
        "padding_waste": _waste(tokens, grid),
        # The padding that a [batch, longest] layout of the same batches would have held.
        "batch_padding": _waste(tokens, stats["batch_grid_tokens"]),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        # From the first encoder window's start to the last one's end: the rate once the
        # actors are up (start-up, model loading and the final write excluded).
        "tokens_per_s_steady": round(tokens / window, 1) if window > 0 else 0.0,
        "wall_s": round(wall_s, 3),
        # Seconds each stage's actors or tasks spent on their batches, summed over actors.
        "stage_busy_s": {
            "tokenize": round(stats["tokenize_s"], 3), "encode": round(stats["encode_s"], 3),
            "write": round(stats["write_s"], 3),
        },
        "encoder_tokens_per_busy_s": round(tokens / stats["encode_s"], 1)
        if stats["encode_s"] > 0 else 0.0,
        "input_files": input_files,
        "output_files": [f for f in stats["files"] if "/_rejects/" not in f],
        "rejects_files": [f for f in stats["files"] if "/_rejects/" in f],
        "output_bytes": stats["bytes"],
        "model": model,
        "widths": list(config["dims"]),
        "config": config,
    }


def _waste(real: int, computed: int) -> float:
    return round(1.0 - real / computed, 6) if computed else 0.0
