"""``python -m pipeline.bench parquet``: what the part files' encodings cost to write and read.

A table as the writer gets it (int64 ids, 32-character content hashes, unit vectors of the
given widths in the output dtype) is written to memory and read back on one thread, with
pyarrow's defaults (a dictionary tried on every column, min/max statistics for every column)
and with the writer's own options (``pipeline/io/writers.py::encodings``: neither for the
vectors). Best of ``--repeats`` each; no Ray, no disk.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.writers import ROW_GROUP_ROWS, encodings
from .workload import emit, machine


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--dims", default="768,512,256", help="vector widths")
    parser.add_argument("--dtypes", default="float32,float16", help="output dtypes to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")


def table(rows: int, dims: list[int], dtype: str, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = {"id": pa.array(np.arange(rows, dtype=np.int64)),
               "content_hash": pa.array([f"{i * 2654435761 % 2**128:032x}" for i in range(rows)])}
    for d in dims:
        v = rng.standard_normal((rows, d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        columns[f"embedding_{d}"] = pa.FixedSizeListArray.from_arrays(
            pa.array(v.astype(dtype).ravel()), d)
    return pa.table(columns)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(t: pa.Table, options: dict, repeats: int) -> dict:
    def write() -> bytes:
        buf = io.BytesIO()
        pq.write_table(t, buf, row_group_size=ROW_GROUP_ROWS, **options)
        return buf.getvalue()

    data = write()
    assert pq.read_table(io.BytesIO(data)).equals(t)
    return {"write_ms": round(1000 * timed(write, repeats), 1),
            "read_ms": round(1000 * timed(lambda: pq.read_table(io.BytesIO(data)), repeats), 1),
            "bytes": len(data)}


def main(args) -> None:
    dims = [int(d) for d in args.dims.split(",")]
    result = {"benchmark": "parquet", "machine": machine(), "threads": 1, "rows": args.rows,
              "dims": dims, "dtypes": {}}
    threads = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:
        for dtype in args.dtypes.split(","):
            t = table(args.rows, dims, dtype)
            default = measure(t, {}, args.repeats)
            ours = measure(t, encodings(t.schema), args.repeats)
            result["dtypes"][dtype] = {
                "pyarrow_defaults": default, "writer_encodings": ours,
                "write_speedup": round(default["write_ms"] / ours["write_ms"], 2),
                "read_speedup": round(default["read_ms"] / ours["read_ms"], 2),
                "bytes_ratio": round(ours["bytes"] / default["bytes"], 3)}
    finally:
        pa.set_cpu_count(threads[0])
        pa.set_io_thread_count(threads[1])
    emit(result, args.json)
