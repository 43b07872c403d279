"""The run summary: the committed units' totals in ``_summary.json``. Pure, no Ray.

Each unit (input file) is committed with its counts once all of its rows came out (see
``pipeline/units.py``), so the summary of a resumed run covers the whole output: the units
committed earlier and the ones committed now. A unit that did not complete (rows missing, a
file that produced no row but holds some) is a reconcile problem, and the run is not
reconciled. Rates (tokens per second) are of this run's work only.
"""

from __future__ import annotations

from typing import Any, Iterable

from .units import COUNTS, TIMES


def totals(units: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts, times, reject reasons and files of units."""
    total: dict[str, Any] = {k: 0 for k in COUNTS} | {k: 0.0 for k in TIMES}
    reasons: dict[str, int] = {}
    files: list[str] = []
    first, last = 0.0, 0.0
    for u in units:
        for k in COUNTS + TIMES:
            total[k] += u.get(k, 0)
        for reason, n in u.get("reject_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
        files += u.get("files", [])
        if u.get("encode_first_start"):
            first = min(first, u["encode_first_start"]) if first else u["encode_first_start"]
            last = max(last, u["encode_last_end"])
    return total | {"reject_reasons": dict(sorted(reasons.items())), "files": sorted(files),
                    "encode_first_start": first, "encode_last_end": last}


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
        "output_files": [f"{base}/{f}" for f in every["files"] if not f.startswith("_rejects/")],
        "rejects_files": [f"{base}/{f}" for f in every["files"] if f.startswith("_rejects/")],
        "output_bytes": every["bytes"],
        "model": model,
        "widths": list(config["dims"]),
        "config": config,
    }


def _waste(real: int, computed: int) -> float:
    return round(1.0 - real / computed, 6) if computed else 0.0
