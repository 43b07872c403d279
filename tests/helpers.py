"""Helpers shared by several test modules (one place, not copies): little input files and
their listing, rows as the reader and the nightly diff hand them on, and outputs read back."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import schema as S
from pipeline.io.storage import InputFile, list_inputs

# ---------------------------------------------------------------------------------------------
# input files on the local disk


def write_bytes(path: Path, data: bytes, compression: str | None = None) -> Path:
    """``data`` at ``path``, gzip-compressed with Python, zstd-compressed with Arrow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression == "gzip":
        path.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    else:
        path.write_bytes(data)
    return path


def write_parquet_file(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def sample_parquet(path: Path, n: int = 7, row_group_size: int = 3) -> Path:
    """A Parquet file of ``n`` rows (ids 100.., texts, a nullable ``lang``, a float32 score)."""
    table = pa.table({
        "id": pa.array(range(100, 100 + n), pa.int64()),
        "text": pa.array([f"text {i}" for i in range(n)], pa.string()),
        "lang": pa.array(["en", "de", None, "fr", "en", "es", "it"][:n], pa.string()),
        "score": pa.array([i / 4 for i in range(n)], pa.float32()),
    })
    return write_parquet_file(path, table, row_group_size)


def jsonl(*records) -> bytes:
    """JSON lines, each ending with a newline."""
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def compress(data: bytes, compression: str | None, gzip_level: int = 1) -> bytes:
    """``data`` compressed in memory (gzip with Python at ``gzip_level``, zstd with Arrow)."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=gzip_level)
    if compression == "zstd":
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        return sink.getvalue().to_pybytes()
    return data


def input_file(path: Path) -> InputFile:
    """The one input file that listing ``path`` finds (format and compression detected)."""
    (file,) = list_inputs(str(path))
    return file


def files_under(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# rows between stages


def vector(seed: int, width: int, dtype=np.float32) -> list[float]:
    """A reproducible random vector (an "earlier embedding" in the reuse tests)."""
    return np.random.default_rng(seed).standard_normal(width).astype(dtype).tolist()


def reader_rows(ids, texts, *, sources=None, rows=None, rejects=None, id_type=None,
                text_type=pa.string()) -> pa.Table:
    """A reader block as the nightly graph sees it (read_files appends ``__unit``)."""
    n = len(ids)
    sources = sources or ["s3://in/a.jsonl"] * n
    rows = rows if rows is not None else list(range(1, n + 1))
    texts = texts if isinstance(texts, pa.Array) else pa.array(texts, text_type)
    return pa.table({
        S.ID: pa.array(ids, id_type), S.TEXT: texts,
        S.SOURCE: pa.array(sources, pa.string()), S.ROW: pa.array(rows, pa.int64()),
        S.FILE_ROWS: pa.nulls(n, pa.int64()), S.FILE_ROWSUM: pa.nulls(n, pa.int64()),
        S.REJECT: pa.array(rejects or [None] * n, pa.string()),
        S.EXCERPT: pa.array([None if r is None else f"raw {i}" for i, r in
                             enumerate(rejects or [None] * n)], pa.string()),
        "lang": pa.array([f"l{i}" for i in range(n)], pa.string()),
        S.UNIT: pa.array(sources, pa.string()),
    })


# ---------------------------------------------------------------------------------------------
# outputs on S3 (moto's server)


@functools.cache
def s3(endpoint: str):
    """An S3 filesystem on ``endpoint`` that never answers from a cached listing (one per
    endpoint: each new one parses botocore's S3 model again, ~0.1-0.2 s)."""
    import s3fs  # only the S3 tests need it

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True,
                             use_listings_cache=False)


def read_output(fs, uri: str) -> tuple[pa.Table, dict]:
    """The part files of an output on S3, concatenated, and its ``_summary.json``, which must
    name exactly those files (no stray file left)."""
    path = uri.removeprefix("s3://").rstrip("/")
    parts = sorted(p for p in fs.ls(path, refresh=True) if p.rsplit("/", 1)[-1].startswith("part-"))
    summary = json.loads(fs.cat(f"{path}/_summary.json"))
    assert summary["output_files"] == sorted(f"s3://{p}" for p in parts), "stray files left"
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts]), summary


def live_processes() -> dict[int, tuple[int, bytes]]:
    """Every live (not zombie) process on the machine: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            if stat[0] != "Z":
                found[int(entry.name)] = (int(stat[1]), (entry / "cmdline").read_bytes())
        except OSError:
            continue
    return found


def ray_worker_pids(gcs_address: str, title: bytes) -> list[int]:
    """Live worker processes of the Ray cluster at ``gcs_address`` whose title (Ray names a
    worker ``ray::<actor or task>``) contains ``title``. Only this cluster's: a worker is a
    child of its node's raylet, whose command line names the cluster's GCS, so a test never
    touches another Ray on the machine (another test session's, running at the same time)."""
    procs = live_processes()
    raylet = f"--gcs-address={gcs_address}".encode()
    return [pid for pid, (parent, cmdline) in procs.items() if title in cmdline
            and raylet in procs.get(parent, (0, b""))[1]]


def processes_of(marker: bytes) -> set[int]:
    """Live processes whose command line holds ``marker``, and their descendants."""
    procs = live_processes()
    found = {pid for pid, (_, cmdline) in procs.items() if marker in cmdline}
    while more := {pid for pid, (parent, _) in procs.items() if parent in found} - found:
        found |= more
    return found
