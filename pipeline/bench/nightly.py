"""``python -m pipeline.bench nightly``: what an incremental night costs against a full one.

The pipeline benchmark's texts (``pipeline.bench.workload``), same model and device, as Parquet shards.
Night 1 embeds the corpus into a fresh snapshot folder. Then ``--change`` of the rows get a new
text, ``--delete`` are removed and ``--add`` new rows arrive; night 2 should encode only those,
night 3 (nothing changed) nothing. A plain ``run`` over night 2's corpus gives the cost of
embedding everything again. Reports each run's wall time, rows encoded and reused, and the
fixed cost of a night that encodes nothing (read, content hashes, the shuffle against the
previous snapshot, writing every row again).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RunConfig
from .workload import (add_job_arguments, bench_model_dir, bench_texts, emit, job_dims, machine,
                       write_corpus)


def nightly_run(corpus: Path, out: Path, model_dir: Path, args) -> dict:
    from ..jobs.nightly import run_nightly  # lazy: ray (the encoder benchmarks run without it)

    t0 = time.perf_counter()
    summary = run_nightly(RunConfig(input=str(corpus), output=str(out), model=str(model_dir),
                                    dims=args.dims, device=args.device, dtype=args.dtype,
                                    progress="off"))
    keep = ("rows_in", "rows_new", "rows_changed", "rows_unchanged", "rows_deleted",
            "rows_embedded", "rows_reused", "tokens", "reconciled")
    return {k: summary[k] for k in keep} | {"wall_s": round(time.perf_counter() - t0, 1)}


def full_run(corpus: Path, out: Path, model_dir: Path, args) -> dict:
    from ..jobs.run import run  # lazy: ray (the encoder benchmarks run without it)

    t0 = time.perf_counter()
    summary = run(RunConfig(input=str(corpus), output=str(out), model=str(model_dir),
                            dims=args.dims, device=args.device, dtype=args.dtype,
                            progress="off", overwrite=True))
    return {"rows_embedded": summary["rows_embedded"], "tokens": summary["tokens"],
            "wall_s": round(time.perf_counter() - t0, 1)}


def edit_corpus(texts: list[str], args, rng) -> tuple[list[int], list[str]]:
    """Night 2's (ids, texts): some texts changed, some rows deleted, some added."""
    n = len(texts)
    ids = list(range(n))
    changed = rng.choice(n, int(n * args.change), replace=False)
    donors = rng.permutation(n)
    texts = list(texts)
    for k, i in enumerate(changed):
        texts[i] = texts[donors[k]] + " (revised)"
    deleted = set(rng.choice(n, int(n * args.delete), replace=False).tolist()) - set(changed.tolist())
    keep = [i for i in ids if i not in deleted]
    added = [texts[donors[-(k + 1)]] + " (new)" for k in range(int(n * args.add))]
    return keep + list(range(n, n + len(added))), [texts[i] for i in keep] + added


def bench_nightly(args) -> dict:
    from ..cluster.session import ray_session  # lazy: ray (see above)

    model_dir = bench_model_dir(args)
    texts = bench_texts(args, model_dir)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        day1, day2 = Path(tmp) / "day1", Path(tmp) / "day2"
        write_corpus(texts, day1, args.shards)
        ids, texts2 = edit_corpus(texts, args, rng)
        day2.mkdir()
        for k, part in enumerate(np.array_split(np.arange(len(ids)), args.shards)):
            pq.write_table(pa.table({"id": pa.array([ids[i] for i in part], pa.int64()),
                                     "text": [texts2[i] for i in part]}),
                           day2 / f"part-{k:03d}.parquet")
        out = Path(tmp) / "snapshots"
        # One local Ray for the four runs (each run's actors start afresh).
        with ray_session(RunConfig(input=str(day1), output=str(out), device=args.device)):
            night1 = nightly_run(day1, out, model_dir, args)
            night2 = nightly_run(day2, out, model_dir, args)
            night3 = nightly_run(day2, out, model_dir, args)
            full = full_run(day2, Path(tmp) / "full", model_dir, args)
    return {
        "benchmark": "nightly", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "model": args.size, "tokenizer": args.tokenizer, "texts": args.texts,
        "device": args.device, "dtype": args.dtype, "edits": {"change": args.change, "delete": args.delete, "add": args.add},
        "night1_full": night1, "night2_incremental": night2, "night3_unchanged": night3,
        "plain_run_on_night2_corpus": full,
        "night2_vs_plain_run_wall": round(night2["wall_s"] / full["wall_s"], 3),
    }


def add_arguments(parser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--change", type=float, default=0.02, help="fraction of texts changed")
    parser.add_argument("--delete", type=float, default=0.01, help="fraction of rows deleted")
    parser.add_argument("--add", type=float, default=0.01, help="new rows, as a fraction")


def main(args) -> None:
    args.dims = job_dims(args)
    emit(bench_nightly(args), args.json)
